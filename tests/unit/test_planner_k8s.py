"""``plan --emit k8s DIR`` writes manifests that pass the Kubernetes schema, checked offline.

Built-in kinds are checked against the ``kubernetes`` client's models field by field: an unknown
field, a wrong type or a missing required field fails. The LeaderWorkerSet CRD is not in the client;
its spec is checked against the LWS v1 API fields (sigs.k8s.io/lws api/leaderworkerset/v1) and its
pod templates against ``V1PodTemplateSpec``. KEDA's ScaledObject is checked against the keda.sh/v1alpha1
fields (kedacore/keda apis/keda/v1alpha1/scaledobject_types.go), the HPA against ``V2HorizontalPodAutoscaler``.
"""

from __future__ import annotations

import argparse
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
KEDA_SPEC = {"scaleTargetRef": "KedaTarget", "pollingInterval": "int", "cooldownPeriod": "int",
             "initialCooldownPeriod": "int", "idleReplicaCount": "int", "minReplicaCount": "int",
             "maxReplicaCount": "int", "fallback": "object", "advanced": "object", "triggers": "list[KedaTrigger]"}
KEDA_TARGET = {"name": "str", "apiVersion": "str", "kind": "str", "envSourceContainerName": "str"}
KEDA_TRIGGER = {"type": "str", "name": "str", "metadata": "dict(str, str)", "authenticationRef": "object",
                "metricType": "str", "useCachedMetrics": "bool"}
KEDA = {"KedaSpec": KEDA_SPEC, "KedaTarget": KEDA_TARGET, "KedaTrigger": KEDA_TRIGGER}
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
    elif type_name in ("KedaSpec", "KedaTarget", "KedaTrigger"):
        _fields(value, KEDA[type_name], where)
        assert type_name != "KedaTarget" or "name" in value, where
        assert type_name != "KedaTrigger" or value["metricType"] in ("AverageValue", "Value", "Utilization"), where
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
    kinds = {"Deployment": "V1Deployment", "Service": "V1Service", "ConfigMap": "V1ConfigMap",
             "HorizontalPodAutoscaler": "V2HorizontalPodAutoscaler"}
    if obj["kind"] == "ScaledObject":
        assert obj["apiVersion"] == "keda.sh/v1alpha1"
        _fields(obj, {"apiVersion": "str", "kind": "str", "metadata": "V1ObjectMeta", "spec": "KedaSpec"}, "keda")
    elif obj["kind"] == "LeaderWorkerSet":
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


def autoscaling(tmp_path: Path) -> dict[str, list[dict]]:
    """The objects under autoscaling/hpa and autoscaling/keda, each validated."""
    out = {}
    for kind in ("hpa", "keda"):
        out[kind] = [msgspec.yaml.decode(p.read_bytes()) for p in sorted((tmp_path / "autoscaling" / kind).glob("*"))]
        for obj in out[kind]:
            validate(obj)
    return out


def test_autoscalers_scale_each_pool_on_the_routers_desired_replicas_gauge(tmp_path, capsys):
    """One HPA and one ScaledObject per single-entry pool, on the gauge the router exports, targeting
    that pool's workload; the router is started with the plan's model and SLO, which it accepts."""
    from vllm_hetero_pd.router import cli as router_cli
    from vllm_hetero_pd.router.capacity import CapacityModel
    from vllm_hetero_pd.router.metrics import RouterMetrics

    best, objects = emit(tmp_path, capsys, "--devices", "H100")
    scalers = autoscaling(tmp_path)
    workloads = {o["metadata"]["name"]: o for o in objects if o["kind"] in ("Deployment", "LeaderWorkerSet")}
    roles = {"prefill": best["prefill"], "decode": best["decode"]}
    expected = sorted(role for role, entries in roles.items() if len(entries) == 1)
    assert expected, "the H100 plan has single-entry pools"
    gauge = RouterMetrics().desired_replicas._name
    for hpa, keda in zip(scalers["hpa"], scalers["keda"]):
        target = workloads[hpa["spec"]["scaleTargetRef"]["name"]]
        role = target["metadata"]["labels"]["vllm-hetero-pd.io/role"]
        (external,) = hpa["spec"]["metrics"]
        assert external["external"]["metric"] == {"name": gauge, "selector": {"matchLabels": {"pool": role}}}
        assert keda["spec"]["scaleTargetRef"] == hpa["spec"]["scaleTargetRef"]
        assert keda["spec"]["triggers"][0]["metadata"]["query"] == f'max({gauge}{{pool="{role}"}})'
        assert hpa["spec"]["maxReplicas"] >= target["spec"]["replicas"]
    assert sorted(workloads[h["spec"]["scaleTargetRef"]["name"]]["metadata"]["labels"]["vllm-hetero-pd.io/role"]
                  for h in scalers["hpa"]) == expected
    router = workloads["router"]["spec"]["template"]
    assert router["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    parser = argparse.ArgumentParser()
    router_cli.add_arguments(parser)
    config = router_cli.config_from_args(parser.parse_args(router["spec"]["containers"][0]["args"][1:]))
    assert config.ratio.ttft_ms == 2000 and config.ratio.dtype == "fp8"
    CapacityModel(config.ratio).check(config.instances)  # every upstream's device is known to the model


def test_the_validator_rejects_a_scaled_object_kubernetes_would(tmp_path, capsys):
    emit(tmp_path, capsys, "--devices", "H100")
    keda = autoscaling(tmp_path)["keda"][0]
    broken = json.loads(json.dumps(keda))
    broken["spec"]["maxReplicas"] = 3  # HPA spelling, not KEDA's
    with pytest.raises(AssertionError, match="unknown field 'maxReplicas'"):
        validate(broken)
    broken = json.loads(json.dumps(autoscaling(tmp_path)["hpa"][0]))
    broken["spec"]["metrics"][0]["external"]["target"]["averageValu"] = "1"
    with pytest.raises(AssertionError, match="unknown field 'averageValu'"):
        validate(broken)
