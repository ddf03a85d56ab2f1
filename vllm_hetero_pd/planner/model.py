"""Model geometry: the few numbers of a transformer that decide FLOPs, weight bytes and KV bytes.

Read from a Hugging Face ``config.json`` or a named preset (the presets are the same fields,
copied from the published configs, so both paths go through ``from_hf_config``).
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

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp8": 1, "fp32": 4}
_REQUIRED = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "vocab_size")


class ModelError(ValueError):
    """The model spec is unknown or its config lacks a field the planner needs."""


class ModelSpec(msgspec.Struct, frozen=True, kw_only=True):
    """A dense or MoE decoder-only transformer, plus the byte widths it is served with."""

    name: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_embeddings: bool
    num_experts: int  # 1 for dense models
    num_experts_per_token: int
    weight_bytes_per_param: int
    kv_bytes_per_element: int
    max_context: int | None = None  # max_position_embeddings; None when the config does not say

    def check_context(self, num_tokens: int) -> None:
        """Refuse requests longer than the model was trained for: vLLM would reject them too."""
        if self.max_context is not None and num_tokens > self.max_context:
            raise ModelError(f"--isl + --osl = {num_tokens} tokens exceeds {self.name}'s context limit "
                             f"{self.max_context} (max_position_embeddings)")

    @property
    def attention_params_per_layer(self) -> int:
        q_and_o = 2 * self.hidden_size * self.num_heads * self.head_dim
        k_and_v = 2 * self.hidden_size * self.num_kv_heads * self.head_dim
        return q_and_o + k_and_v

    @property
    def expert_params(self) -> int:
        return 3 * self.hidden_size * self.intermediate_size  # gate, up, down

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size * (1 if self.tie_embeddings else 2)

    @property
    def num_params(self) -> int:
        """All weights held in memory (every expert of an MoE)."""
        per_layer = self.attention_params_per_layer + self.num_experts * self.expert_params
        return self.num_layers * per_layer + self.embedding_params

    @property
    def num_active_params(self) -> int:
        """Weights each token multiplies through (matmul FLOPs = 2 x this per token)."""
        per_layer = self.attention_params_per_layer + self.num_experts_per_token * self.expert_params
        return self.num_layers * per_layer + self.vocab_size * self.hidden_size  # LM head, not the lookup

    @property
    def weight_bytes(self) -> float:
        return self.num_params * self.weight_bytes_per_param

    @property
    def fp8_weights(self) -> bool:
        return self.weight_bytes_per_param == 1

    def kv_bytes_per_token(self, tp: int) -> float:
        """KV bytes one token occupies across a TP-``tp`` instance.

        vLLM replicates KV heads when ``tp`` exceeds their number, so the instance stores
        ``max(num_kv_heads, tp)`` heads, not ``num_kv_heads``.
        """
        stored_heads = max(self.num_kv_heads, tp)
        return 2 * self.num_layers * stored_heads * self.head_dim * self.kv_bytes_per_element

    def valid_tp(self, tp: int) -> bool:
        """vLLM's rule: query heads divide evenly, KV heads divide evenly or are replicated evenly."""
        return self.num_heads % tp == 0 and (self.num_kv_heads % tp == 0 or tp % self.num_kv_heads == 0)


def from_hf_config(config: dict, *, name: str, weight_dtype: str, kv_dtype: str) -> ModelSpec:
    """Build a ModelSpec from config.json fields; a missing field is named in the error."""
    text = config.get("text_config", config)  # multimodal configs nest the language model
    missing = [f for f in _REQUIRED if f not in text]
    if missing:
        raise ModelError(f"model config {name} lacks {', '.join(missing)}; the planner needs "
                         f"{', '.join(_REQUIRED)} (num_key_value_heads and head_dim are optional)")
    for label, dtype in (("--dtype", weight_dtype), ("--kv-dtype", kv_dtype)):
        if dtype not in DTYPE_BYTES:
            raise ModelError(f"{label} {dtype!r} is not one of {', '.join(DTYPE_BYTES)}")
    num_heads = text["num_attention_heads"]
    num_experts = text.get("num_local_experts") or text.get("num_experts") or 1
    intermediate = text.get("moe_intermediate_size", text["intermediate_size"]) if num_experts > 1 \
        else text["intermediate_size"]
    return ModelSpec(
        name=name,
        num_layers=text["num_hidden_layers"],
        hidden_size=text["hidden_size"],
        intermediate_size=intermediate,
        num_heads=num_heads,
        num_kv_heads=text.get("num_key_value_heads") or num_heads,
        head_dim=text.get("head_dim") or text["hidden_size"] // num_heads,
        vocab_size=text["vocab_size"],
        tie_embeddings=bool(text.get("tie_word_embeddings", False)),
        num_experts=num_experts,
        num_experts_per_token=text.get("num_experts_per_tok", 1) if num_experts > 1 else 1,
        weight_bytes_per_param=DTYPE_BYTES[weight_dtype],
        kv_bytes_per_element=DTYPE_BYTES[kv_dtype],
        max_context=text.get("max_position_embeddings"),
    )


def load_model(spec: str, *, weight_dtype: str = "bf16", kv_dtype: str | None = None) -> ModelSpec:
    """``spec`` is a preset name, a config.json path, or a directory holding config.json."""
    kv_dtype = kv_dtype or weight_dtype
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
