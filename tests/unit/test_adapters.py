"""The per-release adapters (connector/adapters/), without engines, under whichever vLLM is installed.

Run under both environments: ``.venv`` (vLLM 0.32) and ``.venv-028`` (vLLM 0.28). Tests that
need one release's own code say so and are skipped under the other. The era-B tests build KV
tensors exactly as 0.28's model runner does (``_reshape_attention_kv_cache`` with the backend's
shape and stride order), write K/V into them the way the backend's kernels address them, and
check that ``describe`` on what ``detect`` would read gives a format the shim decodes back to
those K/V.
"""

from __future__ import annotations

import types

import pytest
import torch
import vllm

from vllm_hetero_pd.connector import adapters
from vllm_hetero_pd.connector.adapters import v0_28
from vllm_hetero_pd.connector.connector import ADAPTER, HeteroNixlConnector
from vllm_hetero_pd.connector.cpu_attn import derive_inner, pack_reference
from vllm_hetero_pd.connector.detect import describe
from vllm_hetero_pd.connector.metadata import TransferResults
from vllm_hetero_pd.connector.version import RELEASES, UnsupportedVllmVersion, adapter_name
from vllm_hetero_pd.formats import preset
from vllm_hetero_pd.formats.format import LayoutError
from vllm_hetero_pd.shim import decode

INSTALLED = tuple(int(x) for x in vllm.__version__.split("+")[0].split(".")[:2])
ON_028 = pytest.mark.skipif(INSTALLED != (0, 28), reason="needs vLLM 0.28's own code (.venv-028)")
ON_032 = pytest.mark.skipif(INSTALLED != (0, 32), reason="needs vLLM 0.32's own code (.venv)")


# ---------------------------------------------------------------------------------------- choice
@pytest.mark.parametrize("version, name", [("0.26.0", "v0_28"), ("0.27.1", "v0_28"), ("0.28.0", "v0_28"),
                                           ("0.28.0+cpu", "v0_28"), ("0.29.0", "v0_29"), ("0.30.0", "v0_32"),
                                           ("0.31.2", "v0_32"), ("0.32.0", "v0_32"), ("0.32.0+cpu", "v0_32")])
def test_each_supported_release_has_one_adapter(version, name):
    assert adapter_name(version) == name


@pytest.mark.parametrize("version", ["0.25.0", "0.33.0", "0.34.0", "1.0.0"])
def test_releases_without_an_adapter_are_refused_naming_the_supported_ones(version):
    with pytest.raises(UnsupportedVllmVersion, match=r"supports vLLM 0\.26, .*0\.31 and 0\.32; found " + version):
        adapter_name(version)


def test_the_installed_release_picks_its_adapter():
    assert ADAPTER is adapters.load() and ADAPTER.__name__.endswith(RELEASES[INSTALLED])
    assert issubclass(HeteroNixlConnector, ADAPTER.ConnectorAPI)
    assert not HeteroNixlConnector.__abstractmethods__


def test_release_specific_methods_live_only_in_the_adapters():
    """The facade defines none of them, so an adapter's version is the one vLLM calls."""
    for name in ("get_finished", "get_transfer_results", "has_pending_block_frees"):
        assert name not in vars(HeteroNixlConnector), name
    assert vars(v0_28.ConnectorAPI).keys() >= {"get_finished"}
    # 0.28 has neither hook: defining them there would be dead code that looks load-bearing
    assert not vars(v0_28.ConnectorAPI).keys() & {"get_transfer_results", "has_pending_block_frees"}


# ---------------------------------------------------------------------------------------- facade
class FakeWorker:
    def __init__(self, results: TransferResults):
        self.results, self.calls = results, 0

    def get_transfer_results(self, meta):
        self.calls += 1
        return self.results


class FakeScheduler:
    def __init__(self, pending: bool = False):
        self.asked: list[str] = []
        self.pending = pending

    def get_num_new_matched_tokens(self, request, num_computed_tokens):
        self.asked.append(request.request_id)
        return 100 - num_computed_tokens, True

    def has_pending_sends(self):
        return self.pending


def _facade(worker=None, scheduler=None) -> HeteroNixlConnector:
    """A facade around fakes, without vLLM's constructor (which needs an engine config)."""
    connector = object.__new__(HeteroNixlConnector)
    connector._connector_metadata = None
    connector.worker, connector.scheduler = worker, scheduler
    return connector


RESULTS = TransferResults(finished_sending={"p1"}, finished_recving={"ok", "bad"}, failed_recving={"bad"})


def test_get_finished_reports_failures_as_received_on_every_release():
    """0.28 has no failed_recving: a failure must still leave WAITING_FOR_REMOTE_KVS, and its
    blocks (reported apart) make 0.28's scheduler treat it as failed."""
    sending, recving = _facade(FakeWorker(RESULTS)).get_finished({"p1"})
    assert sending == {"p1"} and recving == {"ok", "bad"}


@ON_032
def test_032_reports_failed_receives_in_vllms_own_type():
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorTransferResults

    results = _facade(FakeWorker(RESULTS)).get_transfer_results(set())
    assert isinstance(results, KVConnectorTransferResults)
    assert (results.finished_sending, results.finished_recving, results.failed_recving) == (
        {"p1"}, {"ok", "bad"}, {"bad"})


@ON_032
@pytest.mark.parametrize("pending", [True, False])
def test_032_lets_the_scheduler_wait_for_leased_blocks(pending):
    assert _facade(scheduler=FakeScheduler(pending)).has_pending_block_frees() is pending
    assert _facade(worker=FakeWorker(RESULTS)).has_pending_block_frees() is False  # a worker has no leases


def _request(request_id: str, skip: bool):
    return types.SimpleNamespace(request_id=request_id, skip_reading_prefix_cache=skip)


def test_v0_29_is_the_028_api_on_the_era_c_layout():
    from vllm_hetero_pd.connector.adapters import v0_29, v0_32

    assert v0_29.ConnectorAPI is v0_28.ConnectorAPI and v0_29.ERA == "C"
    assert v0_29.kv_cache_layout is v0_32.kv_cache_layout and v0_29.cpu_attn_isa is v0_32.cpu_attn_isa


def test_the_installed_facade_forwards_matched_tokens():
    scheduler = FakeScheduler()
    assert _facade(scheduler=scheduler).get_num_new_matched_tokens(_request("r", skip=False), 0) == (100, True)
    assert scheduler.asked == ["r"]


# ---------------------------------------------------------------------------------------- layouts
@pytest.mark.parametrize("order, layout", [((0, 1, 2, 3), "LBHNC"), ((0, 2, 1, 3), "LBNHC")])
def test_028_stride_orders_name_era_c_layouts(order, layout):
    backend = types.SimpleNamespace(get_kv_cache_stride_order=lambda: order, get_name=lambda: "FLASH_ATTN")
    assert v0_28.kv_cache_layout(None, backend) == layout


def test_028_backend_without_a_stride_order_stores_the_logical_order():
    def unimplemented():
        raise NotImplementedError

    backend = types.SimpleNamespace(get_kv_cache_stride_order=unimplemented, get_name=lambda: "CPU_ATTN")
    assert v0_28.kv_cache_layout(None, backend) == "LBHNC"


def test_028_unknown_stride_order_is_refused_with_the_backend():
    backend = types.SimpleNamespace(get_kv_cache_stride_order=lambda: (0, 3, 1, 2), get_name=lambda: "ODD")
    with pytest.raises(LayoutError, match=r"ODD: KV cache stride order \(0, 3, 1, 2\)"):
        v0_28.kv_cache_layout(None, backend)


def test_028_cpu_isa_lives_on_the_impl():
    assert v0_28.cpu_attn_isa(types.SimpleNamespace(impl=types.SimpleNamespace(isa="vec16"))) == "vec16"


@ON_032
def test_032_layout_and_isa_come_from_config_and_layer():
    from vllm.v1.kv_cache_layout import KVCacheLayout

    from vllm_hetero_pd.connector.adapters import v0_32

    config = types.SimpleNamespace(cache_config=types.SimpleNamespace(
        get_resolved_kv_cache_layout=lambda: KVCacheLayout.LBHNC))
    assert v0_32.kv_cache_layout(config, None) == "LBHNC"
    assert v0_32.cpu_attn_isa(types.SimpleNamespace(isa="vec")) == "vec"


# ---------------------------------------------------------------------------------------- era-B tensors
HEADS, HEAD_SIZE, NUM_BLOCKS = 3, 64, 5


def _era_b_tensor(backend, block_size: int, dtype=torch.bfloat16) -> torch.Tensor:
    """One layer's KV cache as 0.28's GPUModelRunner._reshape_kv_cache_tensors builds it."""
    from vllm.v1.worker.gpu.attn_utils import _reshape_attention_kv_cache

    shape = backend.get_kv_cache_shape(NUM_BLOCKS, block_size, HEADS, HEAD_SIZE)
    try:
        order = backend.get_kv_cache_stride_order()
    except (AttributeError, NotImplementedError):
        order = tuple(range(len(shape)))
    raw = torch.zeros(torch.Size(shape).numel() * dtype.itemsize, dtype=torch.int8)
    spec = types.SimpleNamespace(dtype=dtype, page_size_padded=None)
    return _reshape_attention_kv_cache(raw, spec, shape, order, NUM_BLOCKS, None)


def _describe(backend_name: str, layout: str, kv: torch.Tensor, cpu_inner=None):
    return describe(backend=backend_name, layout=layout, shape=tuple(kv.shape), strides=tuple(kv.stride()),
                    dtype=str(kv.dtype).removeprefix("torch."), num_layers=1, num_kv_heads=HEADS, head_start=0,
                    head_size=HEAD_SIZE, cpu_inner=cpu_inner)


def _tokens(block_size: int):
    tokens, block_ids = block_size + 5, [4, 1]  # a partial second block, scattered ids
    pos = torch.arange(tokens)
    slots = torch.tensor(block_ids)[pos // block_size] * block_size + pos % block_size
    torch.manual_seed(block_size)
    k = torch.randn(tokens, HEADS, HEAD_SIZE).to(torch.bfloat16)
    v = torch.randn(tokens, HEADS, HEAD_SIZE).to(torch.bfloat16)
    return tokens, block_ids, slots, k, v


@ON_028
@pytest.mark.parametrize("block_size", [16, 32, 128])
def test_028_cpu_attn_tensor_is_detected_and_decodes_back(block_size):
    """0.28's CPU_ATTN: (NB, H, BS, 2D), no stride order, packed by 0.28's own op; the interior it
    derives is the one 0.32's op gives (preset cpu/cpu_attn/vec)."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, _get_attn_isa

    kv = _era_b_tensor(CPUAttentionBackend, block_size)
    isa = _get_attn_isa(torch.bfloat16, block_size, HEAD_SIZE)
    fmt = _describe("CPU_ATTN", v0_28.kv_cache_layout(None, CPUAttentionBackend), kv,
                    lambda: derive_inner(isa, kv.dtype, block_size, HEAD_SIZE))
    cpu = preset("cpu/cpu_attn/vec")
    assert (fmt.outer, fmt.k_inner, fmt.v_inner) == (cpu.outer, cpu.k_inner, cpu.v_inner)
    tokens, block_ids, slots, k, v = _tokens(block_size)
    pack_reference(k, v, kv, slots, isa)
    k_back, v_back = decode(fmt, kv, block_ids, tokens)
    assert torch.equal(k_back[0], k) and torch.equal(v_back[0], v)


@ON_028
@pytest.mark.parametrize("label", ["HND", "NHD"])
def test_028_flash_attn_tensor_is_detected_as_its_era_b_preset(label):
    """0.28's FLASH_ATTN on either label: the stride order the runner applies names the layout,
    describe accepts the tensor's strides, and K/V written through the backend's own view
    (``kv_cache.transpose(1, 2).split(head_size, -1)``) decode back."""
    from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend
    from vllm.v1.attention.backends.utils import set_kv_cache_layout

    set_kv_cache_layout(label)
    try:
        kv = _era_b_tensor(FlashAttentionBackend, 16)
        layout = v0_28.kv_cache_layout(None, FlashAttentionBackend)
    finally:
        set_kv_cache_layout(None)
    fmt = _describe("FLASH_ATTN", layout, kv)
    era_b = preset(f"cuda/flash_attn/B/{label}")
    assert (fmt.storage, fmt.outer, fmt.k_inner, fmt.v_inner) == (era_b.storage, era_b.outer, era_b.k_inner,
                                                                   era_b.v_inner)
    tokens, block_ids, slots, k, v = _tokens(16)
    key_cache, value_cache = kv.transpose(1, 2).split(HEAD_SIZE, dim=-1)  # [B, N, H, D] views
    key_cache[slots // 16, slots % 16] = k
    value_cache[slots // 16, slots % 16] = v
    k_back, v_back = decode(fmt, kv, block_ids, tokens)
    assert torch.equal(k_back[0], k) and torch.equal(v_back[0], v)
