"""``plan --emit k8s DIR`` writes manifests that pass the Kubernetes schema, checked offline.

Built-in kinds are checked against the ``kubernetes`` client's models field by field: an unknown
field, a wrong type or a missing required field fails. The LeaderWorkerSet CRD is not in the client;
its spec is checked against the LWS v1 API fields (sigs.k8s.io/lws api/leaderworkerset/v1) and its
pod templates against ``V1PodTemplateSpec``.
"""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest

from vllm_hetero_pd.cli import main

kubernetes = pytest.importorskip("kubernetes", reason="the test extra brings the kubernetes client")
from kubernetes import client  # noqa: E402

BASE = ["plan", "--model", "llama-3.1-70b", "--dtype", "fp8", "--isl", "4096", "--osl", "512", "--rate", "10",
        "--ttft-p90", "2000", "--tpot-p90", "50", "--mode", "disaggregated", "--json"]
PRIMITIVES = {"str": str, "int": int, "bool": bool, "float": (int, float), "object": object, "datetime": str}
LWS_SPEC = {"replicas": "int", "leaderWorkerTemplate": "LWSTemplate", "rolloutStrategy": "object",
            "startupPolicy": "str", "networkConfig": "object"}
LWS_TEMPLATE = {"leaderTemplate": "V1PodTemplateSpec", "workerTemplate": "V1PodTemplateSpec", "size": "int",
                "restartPolicy": "str", "subGroupPolicy": "object"}


def check(value, type_name: str, where: str) -> None:
    """Strict structural check of ``value`` against a kubernetes client model or primitive type."""
    if type_name.lower().startswith("list["):
        assert isinstance(value, list), where
        for i, item in enumerate(value):
            check(item, type_name[5:-1], f"{where}[{i}]")
    elif type_name.lower().startswith(("dict(", "dict[")):
        assert isinstance(value, dict), where
        for k, v in value.items():
            check(v, type_name[type_name.index(",") + 1:-1].strip(), f"{where}.{k}")
    elif type_name in PRIMITIVES:
        assert isinstance(value, PRIMITIVES[type_name]) and not (type_name == "int" and isinstance(value, bool)), where
    elif type_name == "LWSSpec":
        _fields(value, LWS_SPEC, where)
    elif type_name == "LWSTemplate":
        _fields(value, LWS_TEMPLATE, where)
        assert value["restartPolicy"] in ("RecreateGroupOnPodRestart", "None") and value["size"] >= 2, where
    else:
        model = getattr(client, type_name)
        by_json = {j: model.openapi_types[py] for py, j in model.attribute_map.items()}
        _fields(value, by_json, where)
        client.ApiClient()._ApiClient__deserialize(value, type_name)  # raises on a missing required field


def _fields(value: dict, known: dict[str, str], where: str) -> None:
    assert isinstance(value, dict), where
    for key, item in value.items():
        assert key in known, f"{where}: unknown field {key!r}"
        check(item, known[key], f"{where}.{key}")


def validate(obj: dict) -> None:
    kinds = {"Deployment": "V1Deployment", "Service": "V1Service", "ConfigMap": "V1ConfigMap"}
    if obj["kind"] == "LeaderWorkerSet":
        assert obj["apiVersion"] == "leaderworkerset.x-k8s.io/v1"
        _fields(obj, {"apiVersion": "str", "kind": "str", "metadata": "V1ObjectMeta", "spec": "LWSSpec"}, "lws")
    else:
        check(obj, kinds[obj["kind"]], obj["kind"])


def emit(tmp_path: Path, capsys, *extra: str) -> tuple[dict, list[dict]]:
    assert main([*BASE, *extra, "--emit", "k8s", str(tmp_path)]) == 0
    best = json.loads(capsys.readouterr().out)["result"]["best"]
    objects = [msgspec.yaml.decode(p.read_bytes()) for p in sorted(tmp_path.glob("*.yaml"))]
    for obj in objects:
        validate(obj)
    return best, objects


def containers(obj: dict) -> list[dict]:
    if obj["kind"] == "Deployment":
        return obj["spec"]["template"]["spec"]["containers"]
    spec = obj["spec"]["leaderWorkerTemplate"]
    return spec["leaderTemplate"]["spec"]["containers"] + spec["workerTemplate"]["spec"]["containers"]


@pytest.mark.parametrize("device,resource", [("H100", "nvidia.com/gpu"), ("MI300X", "amd.com/gpu"),
                                             ("Gaudi3", "habana.ai/gaudi")])
def test_each_vendor_gets_its_device_resource_and_node_selector(tmp_path, capsys, device, resource):
    best, objects = emit(tmp_path, capsys, "--devices", device)
    pools = [o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] != "router"]
    assert len(pools) == len(best["prefill"]) + len(best["decode"])
    for obj in pools:
        (container,) = containers(obj)
        assert container["resources"]["limits"] == {resource: str(obj_tp(container))}
        assert obj["spec"]["template"]["spec"]["nodeSelector"] == {"vllm-hetero-pd.io/accelerator": device}
    assert sorted(o["spec"]["replicas"] for o in pools) == sorted(e["count"] for e in best["prefill"] + best["decode"])


def obj_tp(container: dict) -> int:
    args = container["args"]
    return int(args[args.index("--tensor-parallel-size") + 1])


def test_router_lists_every_pool_through_its_service_and_the_configmap_holds_the_connector(tmp_path, capsys):
    _, objects = emit(tmp_path, capsys, "--devices", "B200,Gaudi3")
    services = {o["metadata"]["name"] for o in objects if o["kind"] == "Service"}
    router = next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "router")
    args = router["spec"]["template"]["spec"]["containers"][0]["args"]
    upstreams = [args[i + 1] for i, a in enumerate(args) if a in ("--prefill", "--decode")]
    assert upstreams and all(u.split("//")[1].split(":")[0] in services for u in upstreams)
    from vllm_hetero_pd.config import parse_config

    config = next(o for o in objects if o["kind"] == "ConfigMap")["data"]
    for role, kv_role in (("prefill", "kv_producer"), ("decode", "kv_consumer")):
        kv = json.loads(config[f"{role}.json"])
        assert kv["kv_connector"] == "HeteroNixlConnector" and kv["kv_role"] == kv_role
        parse_config(kv["kv_connector_extra_config"])  # the connector accepts it


def test_an_instance_wider_than_a_node_becomes_a_leaderworkerset(tmp_path, capsys):
    """4-GPU H100 nodes: a TP8 instance spans two pods, led by the one that serves HTTP."""
    _, objects = emit(tmp_path, capsys, "--devices", "H100", "--tp", "8", "--granularity", "H100=4")
    lws = [o for o in objects if o["kind"] == "LeaderWorkerSet"]
    assert lws
    for obj in lws:
        template = obj["spec"]["leaderWorkerTemplate"]
        assert template["size"] == 2
        leader = template["leaderTemplate"]["spec"]["containers"][0]
        assert leader["resources"]["limits"] == {"nvidia.com/gpu": "4"}
        assert "--tensor-parallel-size 8" in leader["args"][1]
        worker = template["workerTemplate"]["spec"]["containers"][0]
        assert "ray start --address=${LWS_LEADER_ADDRESS}" in worker["args"][1]
    service = next(o for o in objects if o["kind"] == "Service" and o["metadata"]["name"] == lws[0]["metadata"]["name"])
    assert service["spec"]["selector"]["leaderworkerset.sigs.k8s.io/worker-index"] == "0"


def test_the_validator_rejects_what_kubernetes_would(tmp_path, capsys):
    _, objects = emit(tmp_path, capsys, "--devices", "H100")
    broken = json.loads(json.dumps(objects[1]))
    broken["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(AssertionError, match="unknown field 'imagePullPolicyy'"):
        validate(broken)
    broken = json.loads(json.dumps(objects[1]))
    del broken["spec"]["selector"]
    with pytest.raises(ValueError, match="selector"):
        validate(broken)
