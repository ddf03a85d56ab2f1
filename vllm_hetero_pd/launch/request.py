"""One disaggregated request without a router: prefill with ``max_tokens=1``, then decode.

This is the smallest correct P->D client: the router does the same with pools, retries and
streaming, and sends the prefill leg the router's ``prefill_body``. It follows the pull-mode flow
of vLLM 0.32's NIXL connectors: the prefill answer's ``kv_transfer_params`` (block ids, engine id,
side-channel address, and with our connector a lease token and the prompt's digest) are forwarded
verbatim to the decode instance together with the original request, under the same
``X-Request-Id``. One prompt and ``n=1`` per call: a batch or ``n > 1`` needs the router's fan-out.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
import uuid
from typing import Any

from vllm_hetero_pd.router.protocol import prefill_body


class RequestFailed(RuntimeError):
    """An instance answered with an error status; carries the status and the body it sent."""

    def __init__(self, url: str, status: int, body: str):
        super().__init__(f"{url} answered HTTP {status}: {body[:2000]}")
        self.status, self.body = status, body


def post_json(url: str, body: dict[str, Any], request_id: str, timeout_s: float) -> dict[str, Any]:
    data = json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST",
                                 headers={"Content-Type": "application/json", "X-Request-Id": request_id})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as e:
        raise RequestFailed(url, e.code, e.read().decode(errors="replace")) from None


def disaggregated_request(prefill_url: str, decode_url: str, body: dict[str, Any],
                          endpoint: str = "/v1/completions", timeout_s: float = 300.0) -> dict[str, Any]:
    """Run ``body`` (an OpenAI request) with its prefill on one instance and its decode on another.

    Returns the decode instance's JSON answer. Raises ``RequestFailed`` when either leg fails or
    when the prefill answer carries no ``kv_transfer_params`` (the prefill instance then has no
    KV connector configured, and the decode would silently recompute the prompt).
    """
    request_id = str(uuid.uuid4())
    prefilled = post_json(prefill_url + endpoint, prefill_body(body), request_id, timeout_s)
    params = prefilled.get("kv_transfer_params")
    if not params:
        raise RequestFailed(prefill_url + endpoint, 200,
                            "prefill answer has no kv_transfer_params: start the prefill instance with "
                            "--kv-transfer-config and kv_role kv_producer")
    return post_json(decode_url + endpoint, {**body, "kv_transfer_params": params}, request_id, timeout_s)
