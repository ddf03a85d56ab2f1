"""``ConnectorScheduler`` as vLLM's scheduler drives it, with stand-ins for vLLM's request objects.

Decode side: which requests get a ``RecvJob`` (and so are reported as received) and which only
a ``ReleaseJob``; params of another prompt are refused. Prefill side: the params it answers with,
and the export jobs that keep the export area in step with vLLM's block lists.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from vllm.v1.request import RequestStatus

from vllm_hetero_pd import kv_params
from vllm_hetero_pd.config import ConnectorConfig
from vllm_hetero_pd.connector.metadata import ExportJob
from vllm_hetero_pd.connector.scheduler import IDLE_STEP_S, ConnectorScheduler

BLOCK = 16


def scheduler(*, producer=False, consumer=False, **config) -> ConnectorScheduler:
    vllm_config = SimpleNamespace(cache_config=SimpleNamespace(block_size=BLOCK),
                                  parallel_config=SimpleNamespace(tensor_parallel_size=1, data_parallel_rank=0))
    return ConnectorScheduler(vllm_config, ConnectorConfig(side_channel_port=5999, **config), "engine-p",
                              is_producer=producer, is_consumer=consumer)


def request(request_id, prompt, params, status=RequestStatus.WAITING):
    return SimpleNamespace(request_id=request_id, prompt_token_ids=list(prompt), kv_transfer_params=params,
                           status=status)


def blocks(*ids):
    return SimpleNamespace(get_block_ids=lambda: (list(ids),))


def prefill_answer(prompt, request_id="p-0") -> dict:
    """What a real prefill answers for ``prompt`` (its request_finished), as the router forwards it."""
    prefill = scheduler(producer=True)
    done = request(request_id, prompt, kv_params.prefill_request_params(), RequestStatus.FINISHED_LENGTH_CAPPED)
    delay, params = prefill.request_finished(done, list(range(8)))
    assert delay and params
    return dict(params)


def meta(sched):
    return sched.build_connector_meta(SimpleNamespace(total_num_scheduled_tokens=1))


PROMPT0, PROMPT1 = list(range(100, 140)), list(range(200, 230))


def test_remote_prefill_request_gets_a_recv_job_for_the_uncomputed_positions():
    decode = scheduler(consumer=True)
    req = request("d-0", PROMPT0, prefill_answer(PROMPT0))
    assert decode.get_num_new_matched_tokens(req, 16) == (24, True)
    decode.update_state_after_alloc(req, blocks(4, 5, 6), 24)
    [job] = meta(decode).recvs
    assert (job.request_id, job.local_block_ids, job.start, job.stop, job.error) == ("d-0", [4, 5, 6], 16, 40, "")
    assert job.params.remote_request_id == "p-0"
    assert decode.get_num_new_matched_tokens(req, 0) == (0, False), "params must be consumed once"
    decode.request_finished(req, [4, 5, 6])
    assert meta(decode).releases == [], "a request that read its lease must not release it twice"


def test_zero_external_tokens_give_a_release_and_no_recv():
    """vLLM asks for 0 external tokens when it skips the prefix cache (``prompt_logprobs``, ``echo``
    with ``logprobs``: ``skip_reading_prefix_cache``): such a request must never be reported as
    received (vLLM's scheduler asserts on it), and its prefill lease is released."""
    decode = scheduler(consumer=True)
    req = request("d-0", PROMPT0, prefill_answer(PROMPT0))
    decode.update_state_after_alloc(req, blocks(), 0)
    m = meta(decode)
    assert m.recvs == []
    [release] = m.releases
    assert release.request_id == "d-0" and release.params.remote_request_id == "p-0"
    decode.request_finished(req, [])
    assert meta(decode).releases == [] and meta(decode).recvs == []


def test_a_request_that_skips_the_prefix_cache_is_never_loaded_on_any_release():
    """vLLM 0.31+ zeroes our answer for it; 0.26-0.30 trust it and would load KV the request must
    compute (its prompt logprobs). The scheduler answers 0 itself, so every release releases."""
    decode = scheduler(consumer=True)
    req = request("d-0", PROMPT0, prefill_answer(PROMPT0))
    req.skip_reading_prefix_cache = True
    assert decode.get_num_new_matched_tokens(req, 0) == (0, False)
    plain = request("d-1", PROMPT0, prefill_answer(PROMPT0))
    plain.skip_reading_prefix_cache = False
    assert decode.get_num_new_matched_tokens(plain, 16) == (len(PROMPT0) - 16, True)


def test_params_of_another_prompt_give_a_recv_job_with_an_error():
    """A batch: prompt 1 arrives with prompt 0's params (vLLM returns only prompt 0's)."""
    decode = scheduler(consumer=True)
    req = request("d-1", PROMPT1, prefill_answer(PROMPT0))
    count, _ = decode.get_num_new_matched_tokens(req, 0)
    decode.update_state_after_alloc(req, blocks(1, 2), count)
    [job] = meta(decode).recvs
    assert "belong to another prompt" in job.error


def test_same_length_prompt_with_other_tokens_is_caught_by_the_digest():
    decode = scheduler(consumer=True)
    other = [t + 1 for t in PROMPT0]
    req = request("d-1", other, prefill_answer(PROMPT0))
    decode.update_state_after_alloc(req, blocks(1, 2, 3), len(other))
    [job] = meta(decode).recvs
    assert "belong to another prompt" in job.error


def test_malformed_params_give_a_recv_job_with_an_error_and_no_release():
    decode = scheduler(consumer=True)
    params = {**prefill_answer(PROMPT0), "remote_port": "not-a-port"}
    req = request("d-0", PROMPT0, params)
    decode.update_state_after_alloc(req, blocks(1, 2, 3), len(PROMPT0))
    m = meta(decode)
    [job] = m.recvs
    assert "remote_port" in job.error and job.params is None and m.releases == []


def test_decode_request_finished_before_it_was_scheduled_releases_its_lease():
    decode = scheduler(consumer=True)
    req = request("d-0", PROMPT0, prefill_answer(PROMPT0), RequestStatus.FINISHED_ABORTED)
    assert decode.request_finished(req, []) == (False, None)
    m = meta(decode)
    [release] = m.releases
    assert release.request_id == "d-0" and release.params.lease_token and m.recvs == []
    decode.request_finished(req, [])
    assert meta(decode).releases == [], "released twice"


def test_producer_answers_with_typed_params_carrying_a_token_and_the_digest():
    prefill = scheduler(producer=True)
    done = request("p-0", PROMPT0, kv_params.prefill_request_params(), RequestStatus.FINISHED_STOPPED)
    delay, raw = prefill.request_finished(done, [7, 3, 9, 11])
    assert delay
    params = kv_params.parse_transfer_params(raw)
    assert params.do_remote_prefill and not params.do_remote_decode
    assert params.remote_block_ids == [7, 3, 9]  # 40 tokens need 3 blocks of 16
    assert params.remote_num_tokens == 40 and params.prompt_digest == kv_params.prompt_digest(PROMPT0)
    assert len(params.lease_token) >= 32 and (params.remote_engine_id, params.remote_port) == ("engine-p", 5999)
    assert prefill.leases.pin("p-0", params.lease_token, "reader", [7]) > 0
    assert prefill.has_pending_sends()
    other = prefill.request_finished(request("p-1", PROMPT0, kv_params.prefill_request_params(),
                                             RequestStatus.FINISHED_LENGTH_CAPPED), [1, 2, 4])[1]
    assert other["lease_token"] != raw["lease_token"], "lease tokens must be unguessable, not reused"


@pytest.mark.parametrize("status", [RequestStatus.FINISHED_ABORTED, RequestStatus.FINISHED_ERROR])
def test_producer_takes_no_lease_for_an_aborted_request(status):
    prefill = scheduler(producer=True)
    assert prefill.request_finished(request("p-0", PROMPT0, kv_params.prefill_request_params(), status),
                                    [1, 2, 3]) == (False, None)
    assert len(prefill.leases) == 0 and not prefill.has_pending_sends()


# ---------------------------------------------------------------------------------------------- export jobs
def export_scheduler(*request_ids) -> ConnectorScheduler:
    prefill = scheduler(producer=True, export_format="cuda/flash_attn/C/LBNHC")
    for rid in request_ids:
        prefill.update_state_after_alloc(request(rid, PROMPT0, kv_params.prefill_request_params()), blocks(), 0)
    return prefill


def output(new=(), cached=(), resumed=(), scheduled=None):
    """A SchedulerOutput-like namespace: ``new`` = (req_id, block_ids, num_computed_tokens);
    ``cached`` = (req_id, new_block_ids or None, num_computed_tokens)."""
    return SimpleNamespace(
        scheduled_new_reqs=[SimpleNamespace(req_id=r, block_ids=(list(b),), num_computed_tokens=c) for r, b, c in new],
        scheduled_cached_reqs=SimpleNamespace(
            req_ids=[r for r, _, _ in cached], resumed_req_ids=set(resumed),
            new_block_ids=[None if b is None else (list(b),) for _, b, _ in cached],
            num_computed_tokens=[c for _, _, c in cached]),
        num_scheduled_tokens=scheduled or {})


def test_new_request_with_a_prefix_hit_mirrors_from_position_zero():
    prefill = export_scheduler("p-0")
    jobs = prefill._export_jobs(output(new=[("p-0", [4, 5, 6], 32)], scheduled={"p-0": 8}))
    assert jobs == [ExportJob("p-0", [4, 5, 6], 0, 40)]


def test_running_request_appends_blocks_and_mirrors_only_the_new_positions():
    prefill = export_scheduler("p-0")
    prefill._export_jobs(output(new=[("p-0", [4, 5], 0)], scheduled={"p-0": 32}))
    jobs = prefill._export_jobs(output(cached=[("p-0", [6], 32)], scheduled={"p-0": 8}))
    assert jobs == [ExportJob("p-0", [4, 5, 6], 32, 40)]


def test_resumed_request_replaces_its_block_list_and_mirrors_from_zero():
    prefill = export_scheduler("p-0")
    prefill._export_jobs(output(new=[("p-0", [4, 5], 0)], scheduled={"p-0": 32}))
    # Preempted, then resumed on other blocks: vLLM sends the whole new list, to replace the old one.
    jobs = prefill._export_jobs(output(cached=[("p-0", [9, 1, 2], 16)], resumed=["p-0"], scheduled={"p-0": 24}))
    assert jobs == [ExportJob("p-0", [9, 1, 2], 0, 40)]


def test_host_staging_alone_mirrors_into_the_host_buffer():
    """Host staging without an export format still needs every written position mirrored."""
    prefill = scheduler(producer=True, host_staging=True)
    prefill.update_state_after_alloc(request("p-0", PROMPT0, kv_params.prefill_request_params()), blocks(), 0)
    jobs = prefill._export_jobs(output(new=[("p-0", [4, 5], 0)], scheduled={"p-0": 40}))
    assert jobs == [ExportJob("p-0", [4, 5], 0, 40)]
    plain = scheduler(producer=True)
    plain.update_state_after_alloc(request("p-0", PROMPT0, kv_params.prefill_request_params()), blocks(), 0)
    assert plain._export_jobs(output(new=[("p-0", [4, 5], 0)], scheduled={"p-0": 40})) == []


def test_requests_not_bound_for_a_remote_decode_are_not_exported():
    prefill = export_scheduler("p-0")
    jobs = prefill._export_jobs(output(new=[("other", [1], 0), ("p-0", [2], 0)], cached=[("other2", [3], 5)],
                                       scheduled={"other": 4, "p-0": 4, "other2": 1}))
    assert [j.request_id for j in jobs] == ["p-0"]
    assert export_scheduler()._export_jobs(output(new=[("x", [1], 0)], scheduled={"x": 1})) == []


@pytest.mark.parametrize("scheduled, idle_s", [(0, IDLE_STEP_S), (1, 0.0)])
def test_an_empty_step_hands_its_idle_time_to_the_worker(scheduled, idle_s):
    """The scheduler no longer sleeps on an empty step: the worker spends that time, watching its
    loads, so that a READ that ends during it is reported in the same step."""
    step = scheduler(consumer=True).build_connector_meta(SimpleNamespace(total_num_scheduled_tokens=scheduled))
    assert step.idle_s == idle_s
