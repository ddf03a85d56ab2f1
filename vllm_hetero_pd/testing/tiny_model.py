"""Deterministic tiny random-weight decoder models that vLLM loads from disk.

No model can be downloaded on the machines this project is tested on, so tests, the demo and the
benchmarks build their own. A plain random init decodes to one token repeated, which would let a
wrong KV cache go unnoticed; the weights are therefore shaped so that greedy continuations are
varied and depend on the whole context (see ``_shape_weights``). Models are cached by content
hash, so repeated builds are free and concurrent builders never see a half-written directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

import msgspec

FACTORY_VERSION = 3  # bump when the weights or tokenizer recipe change
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL_TOKENS = ["<|bos|>", "<|eos|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]


class TinyModelSpec(msgspec.Struct, frozen=True, kw_only=True):
    """Geometry of one tiny Llama-style model; KV layout in tests follows from these numbers."""

    num_layers: int = 4
    hidden_size: int = 256
    num_heads: int = 8
    num_kv_heads: int = 4
    head_dim: int = 32
    intermediate_size: int = 512
    vocab_size: int = 2048
    max_position_embeddings: int = 4096
    seed: int = 0


PRESETS: dict[str, TinyModelSpec] = {
    # GQA ratio 2, head_dim 32 (the default for tests and the demo)
    "llama-gqa-d32": TinyModelSpec(),
    # GQA ratio 2, head_dim 64: a different per-block byte size
    "llama-gqa-d64": TinyModelSpec(hidden_size=512, head_dim=64, intermediate_size=1024, seed=1),
    # MHA (GQA ratio 1)
    "llama-mha-d32": TinyModelSpec(num_kv_heads=8, seed=2),
}
DTYPES = ("bfloat16", "float32", "float16")


def default_cache_dir() -> Path:
    root = os.environ.get("HETERO_PD_CACHE") or os.path.join(Path.home(), ".cache", "vllm-hetero-pd")
    return Path(root) / "models"


def build_tiny_model(name: str = "llama-gqa-d32", dtype: str = "bfloat16", cache_dir: Path | None = None) -> Path:
    """Return the directory of the named tiny model in ``dtype``, building it on first use."""
    if name not in PRESETS:
        raise ValueError(f"unknown tiny model {name!r}; choose one of {sorted(PRESETS)}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {DTYPES}")
    spec = PRESETS[name]
    key = hashlib.sha256(msgspec.json.encode([FACTORY_VERSION, spec, dtype])).hexdigest()[:12]
    target = (cache_dir or default_cache_dir()) / f"{name}-{dtype}-{key}"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        _write_tokenizer(staging, spec)
        _write_model(staging, spec, dtype)
        os.replace(staging, target)  # atomic: readers see all files or none
    except OSError:
        if not (target / "config.json").exists():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


@lru_cache(maxsize=4)
def corpus_words(seed: int) -> tuple[str, ...]:
    """A fixed pseudo-English vocabulary: syllable words give BPE something to merge."""
    rng = random.Random(seed)
    onsets = ["b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "st", "tr", "pl"]
    vowels = ["a", "e", "i", "o", "u", "ai", "ou", "ee"]
    codas = ["", "n", "s", "t", "r", "l", "nd", "ng"]
    return tuple("".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas)
                         for _ in range(rng.randint(1, 3))) for _ in range(3000))


def sample_text(num_words: int, seed: int) -> str:
    """Deterministic text for prompts: sentences of corpus words with punctuation."""
    words, rng = corpus_words(0), random.Random(seed)
    out = []
    for i in range(num_words):
        w = rng.choice(words)
        out.append(w.capitalize() if i == 0 or out[-1].endswith(".") else w)
        if rng.random() < 0.08:
            out[-1] += rng.choice([".", ",", "?"])
    return " ".join(out)


def _write_tokenizer(path: Path, spec: TinyModelSpec) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=spec.vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((sample_text(64, s) for s in range(2000)), trainer=trainer)
    tok.save(str(path / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|bos|>", "eos_token": "<|eos|>",
              "model_max_length": spec.max_position_embeddings, "chat_template": CHAT_TEMPLATE,
              "clean_up_tokenization_spaces": False}
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    (path / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<|bos|>", "eos_token": "<|eos|>"}))


def _write_model(path: Path, spec: TinyModelSpec, dtype: str) -> None:
    import torch
    from tokenizers import Tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = Tokenizer.from_file(str(path / "tokenizer.json")).get_vocab_size()
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.head_dim, max_position_embeddings=spec.max_position_embeddings, rms_norm_eps=1e-5,
        bos_token_id=SPECIAL_TOKENS.index("<|bos|>"), eos_token_id=SPECIAL_TOKENS.index("<|eos|>"),
        tie_word_embeddings=False, torch_dtype=dtype,
    )
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config)
    _shape_weights(model, spec)
    model.to(getattr(torch, dtype)).save_pretrained(path, safe_serialization=True)


def _shape_weights(model, spec: TinyModelSpec) -> None:
    """Make greedy decoding varied and context-dependent.

    With the default 0.02 init every layer is a near-identity, the residual stream is dominated by
    the current token's embedding, and argmax collapses onto a few tokens regardless of context.
    Larger attention projections make attention sharp enough that earlier tokens move the output,
    and a larger embedding/unembedding spread makes the logit distribution peaky so greedy picks
    vary. The sampled EOS logit is pushed down so continuations run their full length.
    """
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() < 2:
                continue
            fan_in = p.shape[1]
            scale = {"q_proj": 2.0, "k_proj": 2.0, "v_proj": 1.5, "o_proj": 1.5,
                     "embed_tokens": 1.0 * fan_in ** 0.5, "lm_head": 3.0}.get(name.split(".")[-2], 1.0)
            p.normal_(0.0, scale / fan_in ** 0.5)
        model.lm_head.weight[model.config.eos_token_id].mul_(0.0)
