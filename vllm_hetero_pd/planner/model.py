"""Model geometry: the numbers of a transformer that decide FLOPs, weight bytes and KV bytes.

Read from a Hugging Face ``config.json`` or a named preset (the presets are the same fields,
copied from the published configs, so both paths go through ``from_hf_config``). Covered:

* dense and MoE MLPs, with leading dense layers (DeepSeek ``first_k_dense_replace``) and shared
  experts; decode reads only the experts its batch routes to (``experts_touched``);
* GQA/MQA attention and DeepSeek's MLA, whose KV cache is one compressed latent per token
  (``kv_lora_rank + qk_rope_head_dim``) instead of K and V heads;
* sliding-window layers (``layer_types`` / ``sliding_window``), which keep only the last
  ``sliding_window`` tokens of KV (vLLM's hybrid KV cache manager frees the rest);
* weight and KV widths from BF16 down to 4-bit formats, including the checkpoint's own
  ``quantization_config`` (FP8 blocks, MXFP4 experts, 4-bit AWQ/GPTQ).
"""

from __future__ import annotations

import json
from pathlib import Path

import msgspec

# Fields of the published config.json files (huggingface.co/meta-llama/<name>/blob/main/config.json).
PRESETS: dict[str, dict] = {
    "llama-3.1-8b": {
        "_name_or_path": "meta-llama/Llama-3.1-8B-Instruct", "num_hidden_layers": 32,
        "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
        "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False,
        "max_position_embeddings": 131072,
    },
    "llama-3.1-70b": {
        "_name_or_path": "meta-llama/Llama-3.1-70B-Instruct", "num_hidden_layers": 80,
        "hidden_size": 8192, "intermediate_size": 28672, "num_attention_heads": 64,
        "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False,
        "max_position_embeddings": 131072,
    },
    "llama-3.1-405b": {
        "_name_or_path": "meta-llama/Llama-3.1-405B-Instruct", "num_hidden_layers": 126,
        "hidden_size": 16384, "intermediate_size": 53248, "num_attention_heads": 128,
        "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False,
        "max_position_embeddings": 131072,
    },
}

# Bits per stored element, block scales included: FP8 with 128x128 blocks adds < 0.01 bit; MXFP4 is
# 4 bits + one E8M0 scale per 32 (OCP Microscaling spec v1.0); NVFP4 4 bits + one E4M3 scale per 16
# (NVIDIA Blackwell NVFP4); INT4 as AWQ/GPTQ ship it, group 128 with an FP16 scale [inferred: zero
# points packed at 4 bits are ignored].
DTYPE_BITS = {"fp32": 32.0, "bf16": 16.0, "fp16": 16.0, "fp8": 8.0, "int8": 8.0, "mxfp4": 4.25, "fp4": 4.25,
              "nvfp4": 4.5, "int4": 4.125}
FOUR_BIT = ("mxfp4", "fp4", "nvfp4", "int4")
_REQUIRED = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "vocab_size")


class ModelError(ValueError):
    """The model spec is unknown or its config lacks a field the planner needs."""


class ModelSpec(msgspec.Struct, frozen=True, kw_only=True):
    """A decoder-only transformer as the roofline sees it, plus the widths it is served with.

    ``mla_latent`` > 0 marks MLA: the KV cache holds that many elements per token per layer and
    K/V heads do not exist. ``num_sliding_layers`` of the ``num_layers`` keep ``sliding_window``
    tokens of KV. ``num_dense_layers`` run a dense MLP of ``dense_intermediate``; the rest route
    each token to ``num_experts_per_token`` of ``num_experts`` experts of ``moe_intermediate``,
    plus ``num_shared_experts`` that every token uses.
    """

    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int  # query/key width per head (MLA: nope + rope part)
    v_head_dim: int
    vocab_size: int
    tie_embeddings: bool
    dense_intermediate: int
    num_dense_layers: int
    moe_intermediate: int = 0
    num_experts: int = 0  # routed experts per MoE layer; 0 for dense models
    num_experts_per_token: int = 0
    num_shared_experts: int = 0
    q_lora_rank: int = 0  # MLA only: queries go through a low-rank projection when > 0
    kv_lora_rank: int = 0  # MLA only
    rope_head_dim: int = 0  # MLA only: the rotary part of each key, shared by all heads
    sliding_window: int = 0
    num_sliding_layers: int = 0
    weight_dtype: str = "bf16"  # linear layers outside the experts
    expert_dtype: str = "bf16"
    kv_dtype: str = "bf16"
    max_context: int | None = None  # max_position_embeddings; None when the config does not say
    online_fp8: bool = False  # FP8 asked of a higher-precision checkpoint: vLLM quantizes at load

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.num_dense_layers if self.num_experts else 0

    @property
    def attention_params_per_layer(self) -> int:
        """Projection weights of one attention block (norms and biases are < 0.1 % and left out)."""
        h, n = self.hidden_size, self.num_heads
        if self.is_mla:
            q = (h * self.q_lora_rank + self.q_lora_rank * n * self.head_dim if self.q_lora_rank
                 else h * n * self.head_dim)
            kv = h * (self.kv_lora_rank + self.rope_head_dim) + self.kv_lora_rank * n * (
                self.head_dim - self.rope_head_dim + self.v_head_dim)
            return q + kv + n * self.v_head_dim * h
        return h * n * self.head_dim + 2 * h * self.num_kv_heads * self.head_dim + n * self.v_head_dim * h

    @property
    def expert_params(self) -> int:
        """One routed or shared expert: gate, up and down projections."""
        return 3 * self.hidden_size * self.moe_intermediate

    @property
    def router_params(self) -> int:
        return self.num_moe_layers * self.num_experts * self.hidden_size

    @property
    def routed_expert_params(self) -> int:
        """Weights of every routed expert in every MoE layer: what expert parallelism shards."""
        return self.num_moe_layers * self.num_experts * self.expert_params

    @property
    def dense_params(self) -> int:
        """Linear weights every token passes through: attention, dense MLPs, shared experts, router."""
        mlp = self.num_dense_layers * 3 * self.hidden_size * self.dense_intermediate
        shared = self.num_moe_layers * self.num_shared_experts * self.expert_params
        return self.num_layers * self.attention_params_per_layer + mlp + shared + self.router_params

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size * (1 if self.tie_embeddings else 2)

    @property
    def num_params(self) -> int:
        """All weights held in memory (every expert of an MoE)."""
        return self.dense_params + self.routed_expert_params + self.embedding_params

    @property
    def num_active_params(self) -> int:
        """Weights each token multiplies through (matmul FLOPs = 2 x this per token): the LM head
        counts, the embedding lookup does not."""
        routed = self.num_moe_layers * self.num_experts_per_token * self.expert_params
        return self.dense_params + routed + self.vocab_size * self.hidden_size

    @property
    def _embedding_bits(self) -> float:
        """Checkpoints and vLLM's online FP8 keep the embedding and LM head at 16 bits (32 for FP32)."""
        return max(16.0, DTYPE_BITS[self.weight_dtype])

    @property
    def dense_weight_bytes(self) -> float:
        """Bytes every forward reads whatever the routing: all but the routed experts and the
        embedding table (a forward reads only its tokens' rows; the LM head is read whole)."""
        head = self.vocab_size * self.hidden_size
        return (self.dense_params * DTYPE_BITS[self.weight_dtype] + head * self._embedding_bits) / 8

    @property
    def expert_bytes(self) -> float:
        """Bytes of one routed expert."""
        return self.expert_params * DTYPE_BITS[self.expert_dtype] / 8

    @property
    def weight_bytes(self) -> float:
        """Bytes resident in device memory: every weight, embedding table included."""
        return ((self.dense_params * DTYPE_BITS[self.weight_dtype] + self.embedding_params * self._embedding_bits)
                + self.routed_expert_params * DTYPE_BITS[self.expert_dtype]) / 8

    @property
    def low_precision(self) -> str:
        """The narrowest matmul input the weights allow: "fp4", "fp8" or "bf16" (sets the FLOP rate)."""
        bits = min(DTYPE_BITS[self.weight_dtype], DTYPE_BITS[self.expert_dtype] if self.num_experts else 99)
        if bits < 8:
            return "fp4" if {self.weight_dtype, self.expert_dtype} & {"mxfp4", "fp4", "nvfp4"} else "bf16"
        return "fp8" if bits == 8 else "bf16"

    @property
    def kv_element_bytes(self) -> float:
        return DTYPE_BITS[self.kv_dtype] / 8

    def experts_touched(self, num_tokens: float) -> float:
        """Expected distinct routed experts per MoE layer that ``num_tokens`` tokens select, with
        uniform independent top-k routing: E (1 - (1 - k/E)^n). [inferred: real routers are
        skewed, which touches fewer experts; this is the bandwidth-pessimistic side]"""
        if not self.num_experts or num_tokens <= 0:
            return 0.0
        return self.num_experts * (1 - (1 - self.num_experts_per_token / self.num_experts) ** num_tokens)

    def kv_per_layer_token(self, tp: int) -> float:
        """KV bytes one token occupies in one layer across a TP-``tp`` instance.

        vLLM replicates KV heads when ``tp`` exceeds their number, so the instance stores
        ``max(num_kv_heads, tp)`` heads; MLA's latent has no heads to split, so every rank holds it.
        """
        if self.is_mla:
            return tp * (self.kv_lora_rank + self.rope_head_dim) * self.kv_element_bytes
        return max(self.num_kv_heads, tp) * (self.head_dim + self.v_head_dim) * self.kv_element_bytes

    def kv_bytes(self, num_tokens: float, tp: int) -> float:
        """KV bytes a sequence of ``num_tokens`` holds across a TP-``tp`` instance: full layers keep
        every token, sliding-window layers at most the window."""
        full = self.num_layers - self.num_sliding_layers
        kept = full * num_tokens + self.num_sliding_layers * min(num_tokens, self.sliding_window)
        return kept * self.kv_per_layer_token(tp)

    def attention_flops_per_token(self, context: float, decode: bool) -> float:
        """Attention FLOPs of one query token against ``context`` earlier tokens, all layers.

        2 (QK^T) + 2 (AV) multiply-adds per head and position; sliding layers see at most the
        window. MLA decodes in vLLM's absorbed form (queries against the 576-wide latent, values
        from the 512-wide latent), and prefills expanded to per-head K/V.
        """
        if self.is_mla and decode:
            width = self.num_heads * (2 * self.kv_lora_rank + self.rope_head_dim)
        else:
            width = self.num_heads * (self.head_dim + self.v_head_dim)
        full = self.num_layers - self.num_sliding_layers
        seen = full * context + self.num_sliding_layers * min(context, self.sliding_window)
        return 2 * width * seen

    def prefill_attention_flops(self, num_tokens: int) -> float:
        """Causal attention of a whole prompt: the mean query sees half the prompt (or the window)."""
        full = self.num_layers - self.num_sliding_layers
        window = min(num_tokens, self.sliding_window)
        seen = full * num_tokens / 2 + self.num_sliding_layers * (window - window * window / (2 * num_tokens))
        width = self.num_heads * (self.head_dim + self.v_head_dim)
        return 2 * width * seen * num_tokens

    def valid_tp(self, tp: int) -> bool:
        """vLLM's rule: query heads divide evenly, KV heads divide evenly or are replicated evenly."""
        if tp < 1 or self.num_heads % tp:
            return False
        return self.is_mla or self.num_kv_heads % tp == 0 or tp % self.num_kv_heads == 0

    def check_context(self, num_tokens: int) -> None:
        """Refuse requests longer than the model was trained for: vLLM would reject them too."""
        if self.max_context is not None and num_tokens > self.max_context:
            raise ModelError(f"--isl + --osl = {num_tokens} tokens exceeds {self.name}'s context limit "
                             f"{self.max_context} (max_position_embeddings)")


def _checkpoint_dtypes(text: dict) -> tuple[str, str]:
    """(weight, expert) dtypes the checkpoint ships, from ``quantization_config`` and ``torch_dtype``."""
    base = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(text.get("torch_dtype"), "bf16")
    quant = text.get("quantization_config") or {}
    method = quant.get("quant_method", "")
    if method == "fp8":
        return "fp8", "fp8"
    if method == "mxfp4":  # gpt-oss: experts in MXFP4, attention and embeddings in BF16
        return base, "mxfp4"
    if method in ("awq", "gptq") and quant.get("bits") == 4:
        return "int4", "int4"
    return base, base


def _sliding_layers(text: dict) -> tuple[int, int]:
    """(window, number of sliding layers): ``layer_types`` when given, else all layers or none."""
    window = text.get("sliding_window") or 0
    if not window:
        return 0, 0
    types = text.get("layer_types")
    if types:
        return window, sum(t == "sliding_attention" for t in types)
    return window, text["num_hidden_layers"] if text.get("use_sliding_window", True) else 0


def _moe_fields(text: dict) -> dict:
    """Expert counts under the names Mixtral, Qwen-MoE, DeepSeek and gpt-oss use."""
    experts = text.get("num_local_experts") or text.get("num_experts") or text.get("n_routed_experts") or 0
    if experts <= 1:
        return {"num_dense_layers": text["num_hidden_layers"], "dense_intermediate": text["intermediate_size"]}
    dense = text.get("first_k_dense_replace", 0) + len(text.get("mlp_only_layers") or ())
    return {"num_experts": experts, "num_dense_layers": dense, "dense_intermediate": text["intermediate_size"],
            "num_experts_per_token": text.get("num_experts_per_tok") or text.get("experts_per_token") or 1,
            "moe_intermediate": text.get("moe_intermediate_size") or text["intermediate_size"],
            "num_shared_experts": text.get("n_shared_experts") or 0}


def _attention_fields(text: dict) -> dict:
    heads = text["num_attention_heads"]
    if text.get("kv_lora_rank"):
        rope = text["qk_rope_head_dim"]
        return {"num_heads": heads, "num_kv_heads": 1, "head_dim": text["qk_nope_head_dim"] + rope,
                "v_head_dim": text["v_head_dim"], "kv_lora_rank": text["kv_lora_rank"], "rope_head_dim": rope,
                "q_lora_rank": text.get("q_lora_rank") or 0}
    head_dim = text.get("head_dim") or text["hidden_size"] // heads
    return {"num_heads": heads, "num_kv_heads": text.get("num_key_value_heads") or heads, "head_dim": head_dim,
            "v_head_dim": head_dim}


def default_kv_dtype(weight_dtype: str) -> str:
    """KV in the weights' width down to FP8; 4-bit weights keep BF16 KV (vLLM has no 4-bit KV cache)."""
    return weight_dtype if DTYPE_BITS[weight_dtype] >= 8 else "bf16"


def from_hf_config(config: dict, *, name: str, weight_dtype: str = "auto", kv_dtype: str | None = None) -> ModelSpec:
    """Build a ModelSpec from config.json fields; a missing field is named in the error.

    ``weight_dtype`` "auto" takes the checkpoint's own widths; any other value sets every linear
    layer, experts included.
    """
    text = config.get("text_config", config)  # multimodal configs nest the language model
    missing = [f for f in _REQUIRED if f not in text]
    if missing:
        raise ModelError(f"model config {name} lacks {', '.join(missing)}; the planner needs "
                         f"{', '.join(_REQUIRED)} (num_key_value_heads and head_dim are optional)")
    for label, dtype in (("--dtype", weight_dtype), ("--kv-dtype", kv_dtype)):
        if dtype is not None and dtype not in (*DTYPE_BITS, "auto"):
            raise ModelError(f"{label} {dtype!r} is not one of auto, {', '.join(DTYPE_BITS)}")
    shipped = _checkpoint_dtypes(text)
    weights, experts = shipped if weight_dtype == "auto" else (weight_dtype, weight_dtype)
    kv = default_kv_dtype(weights) if kv_dtype in (None, "auto") else kv_dtype
    window, sliding = _sliding_layers(text)
    return ModelSpec(
        name=name, num_layers=text["num_hidden_layers"], hidden_size=text["hidden_size"],
        vocab_size=text["vocab_size"], tie_embeddings=bool(text.get("tie_word_embeddings", False)),
        sliding_window=window, num_sliding_layers=sliding, weight_dtype=weights, expert_dtype=experts,
        kv_dtype=kv, max_context=text.get("max_position_embeddings"),
        online_fp8=weights == "fp8" and shipped[0] != "fp8",
        **_attention_fields(text), **_moe_fields(text))


def load_model(spec: str, *, weight_dtype: str = "auto", kv_dtype: str | None = None) -> ModelSpec:
    """``spec`` is a preset name, a config.json path, or a directory holding config.json."""
    if spec.lower() in PRESETS:
        return from_hf_config(PRESETS[spec.lower()], name=spec.lower(), weight_dtype=weight_dtype,
                              kv_dtype=kv_dtype)
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ModelError(f"model {spec!r} is neither a preset ({', '.join(PRESETS)}) nor an existing "
                         "config.json file or model directory")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelError(f"{path} is not valid JSON: {e}") from e
    return from_hf_config(config, name=str(spec), weight_dtype=weight_dtype, kv_dtype=kv_dtype)


def serve_name(spec: str) -> str:
    """What ``vllm serve`` should load: the HF id for a preset, else the model directory.

    A bare ``*.json`` file is not loadable by vLLM, so its ``_name_or_path`` is used, and a file
    without one is an error (the caller passes ``--served-model``) rather than a broken script.
    """
    if spec.lower() in PRESETS:
        return PRESETS[spec.lower()]["_name_or_path"]
    path = Path(spec)
    if path.is_dir() or path.name == "config.json":
        return str(path if path.is_dir() else path.parent)
    name = json.loads(path.read_text()).get("_name_or_path") if path.is_file() else None
    if not name:
        raise ModelError(f"{spec} is a bare config file that vllm serve cannot load and it names no "
                         "_name_or_path; give --served-model ID_OR_DIR for the emitted scripts")
    return name
