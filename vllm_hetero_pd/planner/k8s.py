"""Kubernetes manifests for a plan (``plan --emit k8s DIR``): the plan on an orchestrator you already run.

Per pool entry: a Deployment of ``count`` replicas when one instance fits a node, else a
LeaderWorkerSet (leaderworkerset.x-k8s.io/v1) whose group spans the nodes of one TP instance
(Ray across pods, as vLLM's LWS guide runs multi-node TP); each requests its vendor's device-plugin
resource and is pinned by a node label. A Service per entry, a router Deployment (+ Service) whose
``--prefill`` / ``--decode`` URLs are those Services weighted by planned capacity, and a ConfigMap
holding the connector's ``--kv-transfer-config`` for each role. We build no cluster manager.

The router runs with the plan's model and SLO (``--ratio-model``, ``--ttft-slo-ms``, ...; each
upstream with its ``device``/``tp``), so it exports ``hetero_pd_router_desired_replicas{pool}``:
the replicas each pool needs at the workload it observes, by the same model. ``autoscalers``
gives, for each role planned as one entry, a HorizontalPodAutoscaler (external metric, via a
Prometheus adapter) and a KEDA ScaledObject (Prometheus trigger) on that gauge; they are written
under ``autoscaling/hpa`` and ``autoscaling/keda`` for the user to apply one set (KEDA makes its
own HPA, so the two must not target one workload together).
"""

from __future__ import annotations

import json
import math
import shlex
from pathlib import Path

import msgspec

from vllm_hetero_pd.planner import emit
from vllm_hetero_pd.planner.catalog import Catalog
from vllm_hetero_pd.planner.model import ModelSpec
from vllm_hetero_pd.planner.search import Entry, Plan
from vllm_hetero_pd.planner.workload import Slo

# Extended resources the vendors' Kubernetes device plugins advertise (NVIDIA k8s-device-plugin,
# ROCm k8s-device-plugin, Intel Gaudi device plugin).
VENDOR_RESOURCE = {"nvidia": "nvidia.com/gpu", "amd": "amd.com/gpu", "intel": "habana.ai/gaudi"}
NODE_LABEL = "vllm-hetero-pd.io/accelerator"  # label your nodes, or swap in your GPU operator's product label
ENTRY_LABEL = "vllm-hetero-pd.io/entry"
HTTP_PORT = 8000
SIDE_CHANNEL_PORT = 5600  # one prefill per pod, so every pod can use the same port
CONFIG_MAP = "vllm-hetero-pd-kv"
DESIRED_REPLICAS_METRIC = "hetero_pd_router_desired_replicas"  # router/metrics.py
PROMETHEUS_URL = "http://prometheus-operated.monitoring.svc:9090"  # kube-prometheus-stack's default Service
MAX_REPLICAS_FACTOR = 4  # autoscalers may grow a pool to this many times its planned count


class Pod(msgspec.Struct, frozen=True, kw_only=True):
    """One pool entry as Kubernetes runs it."""

    name: str
    role: str  # prefill | decode | monolithic
    entry: Entry
    vendor: str
    pods_per_instance: int
    devices_per_pod: int


def _pods(plan: Plan, catalog: Catalog, node_devices: dict[str, int]) -> list[Pod]:
    pools = ([("monolithic", plan.colocated)] if plan.mode == "colocated"
             else [("prefill", plan.prefill), ("decode", plan.decode)])
    out = []
    for role, entries in pools:
        for i, e in enumerate(entries):
            per_node = min(e.tp, node_devices.get(e.device, catalog.device(e.device).max_tp))
            out.append(Pod(name=f"{role}-{i}-{e.device.lower()}-{'ep' if e.ep else 'tp'}{e.tp}", role=role, entry=e,
                           vendor=catalog.device(e.device).vendor, pods_per_instance=math.ceil(e.tp / per_node),
                           devices_per_pod=per_node))
    return out


def _meta(name: str, **labels: str) -> dict:
    return {"name": name, "labels": {"app.kubernetes.io/name": "vllm-hetero-pd", **labels}}


def _container(pod: Pod, command: list[str], image: str, leader: bool) -> dict:
    resource = VENDOR_RESOURCE.get(pod.vendor)
    limits = {resource: str(pod.devices_per_pod)} if resource else {}
    env = [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}]
    env += [{"name": k, "value": v} for k, v in emit.VENDOR_LAUNCH[pod.vendor].env.items()]
    if pod.role != "monolithic":
        env.append({"name": "KV_TRANSFER_CONFIG",
                    "valueFrom": {"configMapKeyRef": {"name": CONFIG_MAP, "key": f"{pod.role}.json"}}})
    if pod.role == "prefill":
        env.append({"name": "VLLM_NIXL_SIDE_CHANNEL_HOST", "value": "$(POD_IP)"})
    ports = [{"name": "http", "containerPort": HTTP_PORT}] if leader else []
    if pod.role == "prefill" and leader:
        ports.append({"name": "side-channel", "containerPort": SIDE_CHANNEL_PORT})
    container = {"name": "vllm", "image": image, "command": command[:1], "args": command[1:], "env": env,
                 "ports": ports, "resources": {"limits": limits, "requests": limits}}
    if leader:
        container["readinessProbe"] = {"httpGet": {"path": "/health", "port": HTTP_PORT}, "periodSeconds": 10}
    return container


def _serve_command(pod: Pod, model: ModelSpec, served: str, max_model_len: int) -> list[str]:
    inst = emit.Instance(name=pod.name, role=pod.role, device=pod.entry.device, vendor=pod.vendor, tp=pod.entry.tp,
                         ep=pod.entry.ep, port=HTTP_PORT, weight=pod.entry.capacity_per_instance,
                         max_model_len=max_model_len, max_num_seqs=pod.entry.max_num_seqs,
                         side_channel_port=SIDE_CHANNEL_PORT if pod.role == "prefill" else 0)
    args = emit.serve_args(model, served, inst, kv_config="$(KV_TRANSFER_CONFIG)")
    args += ["--host", "0.0.0.0", "--port", str(HTTP_PORT)]
    if pod.pods_per_instance > 1:
        args += ["--distributed-executor-backend", "ray"]
    return args


def _pod_spec(pod: Pod, containers: list[dict]) -> dict:
    return {"nodeSelector": {NODE_LABEL: pod.entry.device}, "containers": containers}


def _workload(pod: Pod, model: ModelSpec, served: str, max_model_len: int, image: str) -> dict:
    """A Deployment, or a LeaderWorkerSet when one instance needs more than one node."""
    labels = {ENTRY_LABEL: pod.name, "vllm-hetero-pd.io/role": pod.role}
    serve = _serve_command(pod, model, served, max_model_len)
    if pod.pods_per_instance == 1:
        template = {"metadata": {"labels": {"app.kubernetes.io/name": "vllm-hetero-pd", **labels}},
                    "spec": _pod_spec(pod, [_container(pod, serve, image, leader=True)])}
        return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(pod.name, **labels),
                "spec": {"replicas": pod.entry.count, "selector": {"matchLabels": labels}, "template": template}}
    leader_cmd = ["sh", "-c", "ray start --head --port=6379 && exec " + shlex.join(serve)]
    worker_cmd = ["sh", "-c", "exec ray start --address=${LWS_LEADER_ADDRESS}:6379 --block"]
    pod_labels = {"app.kubernetes.io/name": "vllm-hetero-pd", **labels}
    return {"apiVersion": "leaderworkerset.x-k8s.io/v1", "kind": "LeaderWorkerSet",
            "metadata": _meta(pod.name, **labels),
            "spec": {"replicas": pod.entry.count, "leaderWorkerTemplate": {
                "size": pod.pods_per_instance, "restartPolicy": "RecreateGroupOnPodRestart",
                "leaderTemplate": {"metadata": {"labels": pod_labels},
                                   "spec": _pod_spec(pod, [_container(pod, leader_cmd, image, leader=True)])},
                "workerTemplate": {"metadata": {"labels": pod_labels},
                                   "spec": _pod_spec(pod, [_container(pod, worker_cmd, image, leader=False)])}}}}


def _service(name: str, selector: dict[str, str], ports: list[dict]) -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": _meta(name),
            "spec": {"selector": selector, "ports": ports}}


def _entry_service(pod: Pod) -> dict:
    selector = {ENTRY_LABEL: pod.name}
    if pod.pods_per_instance > 1:
        selector["leaderworkerset.sigs.k8s.io/worker-index"] = "0"  # the leader serves HTTP
    return _service(pod.name, selector, [{"name": "http", "port": HTTP_PORT, "targetPort": HTTP_PORT}])


def _router(pods: list[Pod], image: str, model: ModelSpec, slo: Slo) -> list[dict]:
    """The router Deployment and its Service; each pool entry is one weighted upstream (its Service).

    It sizes pools with the plan's model and SLO, so its desired-replica gauges (scraped by
    Prometheus through the pod annotations) drive the autoscalers."""
    args = ["proxy", "--host", "0.0.0.0", "--port", str(HTTP_PORT), "--ratio-model", model.name,
            "--ratio-dtype", model.weight_dtype, "--ttft-slo-ms", f"{slo.ttft_s * 1e3:g}",
            "--tpot-slo-ms", f"{slo.tpot_s * 1e3:g}"]
    for pod in pods:
        weight = pod.entry.count * pod.entry.capacity_per_instance
        args += [f"--{pod.role}", f"http://{pod.name}:{HTTP_PORT},weight={weight:.4g},device={pod.entry.device},"
                 f"tp={pod.entry.tp}"]
    labels = {"vllm-hetero-pd.io/role": "router"}
    container = {"name": "router", "image": image, "command": ["vllm-hetero-pd"], "args": args,
                 "ports": [{"name": "http", "containerPort": HTTP_PORT}],
                 "readinessProbe": {"httpGet": {"path": "/health", "port": HTTP_PORT}, "periodSeconds": 5}}
    scrape = {"prometheus.io/scrape": "true", "prometheus.io/port": str(HTTP_PORT), "prometheus.io/path": "/metrics"}
    template = {"metadata": {"labels": {"app.kubernetes.io/name": "vllm-hetero-pd", **labels}, "annotations": scrape},
                "spec": {"containers": [container]}}
    deployment = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta("router", **labels),
                  "spec": {"replicas": 1, "selector": {"matchLabels": labels}, "template": template}}
    return [deployment, _service("router", labels, [{"name": "http", "port": HTTP_PORT, "targetPort": HTTP_PORT}])]


def _target(pod: Pod) -> dict:
    """The scale target of an entry: its Deployment, or its LeaderWorkerSet (which has a scale subresource)."""
    if pod.pods_per_instance == 1:
        return {"apiVersion": "apps/v1", "kind": "Deployment", "name": pod.name}
    return {"apiVersion": "leaderworkerset.x-k8s.io/v1", "kind": "LeaderWorkerSet", "name": pod.name}


def _hpa(pod: Pod) -> dict:
    """autoscaling/v2: replicas = the gauge (an AverageValue target of 1 per replica)."""
    metric = {"name": DESIRED_REPLICAS_METRIC, "selector": {"matchLabels": {"pool": pod.role}}}
    return {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": _meta(pod.name),
            "spec": {"scaleTargetRef": _target(pod), "minReplicas": 1,
                     "maxReplicas": MAX_REPLICAS_FACTOR * pod.entry.count,
                     "metrics": [{"type": "External", "external": {
                         "metric": metric, "target": {"type": "AverageValue", "averageValue": "1"}}}]}}


def _scaled_object(pod: Pod) -> dict:
    """keda.sh/v1alpha1 with a Prometheus trigger: replicas = ceil(gauge / threshold 1)."""
    query = f'max({DESIRED_REPLICAS_METRIC}{{pool="{pod.role}"}})'
    return {"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject", "metadata": _meta(pod.name),
            "spec": {"scaleTargetRef": _target(pod), "minReplicaCount": 1,
                     "maxReplicaCount": MAX_REPLICAS_FACTOR * pod.entry.count, "pollingInterval": 15,
                     "cooldownPeriod": 300,
                     "triggers": [{"type": "prometheus", "metricType": "AverageValue",
                                   "metadata": {"serverAddress": PROMETHEUS_URL, "query": query, "threshold": "1"}}]}}


def autoscalers(plan: Plan, catalog: Catalog, node_devices: dict[str, int]) -> dict[str, list[dict]]:
    """``{"hpa": [...], "keda": [...]}``: one object each per role planned as a single entry (the
    gauge counts a pool's replicas of one shape; a role of several entries keeps its counts)."""
    if plan.mode != "disaggregated":
        return {"hpa": [], "keda": []}
    pods = _pods(plan, catalog, node_devices)
    single = [p for p in pods if sum(q.role == p.role for q in pods) == 1]
    return {"hpa": [_hpa(p) for p in single], "keda": [_scaled_object(p) for p in single]}


def _config_map() -> dict:
    configs = {}
    for role in ("prefill", "decode"):
        inst = emit.Instance(name=role, role=role, device="", vendor="", tp=1, ep=False, port=HTTP_PORT, weight=1,
                             max_model_len=1, max_num_seqs=1,
                             side_channel_port=SIDE_CHANNEL_PORT if role == "prefill" else 0)
        configs[f"{role}.json"] = json.dumps(emit.kv_transfer_config(inst), separators=(",", ":"))
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(CONFIG_MAP), "data": configs}


def manifests(plan: Plan, catalog: Catalog, model: ModelSpec, served: str, max_model_len: int, image: str,
              node_devices: dict[str, int], slo: Slo) -> list[dict]:
    """Every object of the plan; ``node_devices`` is devices per node (default: each device's max_tp)."""
    pods = _pods(plan, catalog, node_devices)
    objects = [_workload(p, model, served, max_model_len, image) for p in pods] + [_entry_service(p) for p in pods]
    if plan.mode == "disaggregated":
        objects = [_config_map(), *objects, *_router(pods, image, model, slo)]
    return objects


def write_k8s(objects: list[dict], out_dir: Path) -> list[Path]:
    """One YAML file per object, named ``<kind>-<name>.yaml``, applied together with ``kubectl apply -f DIR``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for obj in objects:
        path = out_dir / f"{obj['kind'].lower()}-{obj['metadata']['name']}.yaml"
        path.write_bytes(msgspec.yaml.encode(obj))
        written.append(path)
    return written
