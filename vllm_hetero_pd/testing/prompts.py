"""Deterministic prompts of exact token lengths for the tiny models."""

from __future__ import annotations

from pathlib import Path

from vllm_hetero_pd.testing.tiny_model import sample_text

DEFAULT_LENGTHS = (50, 97, 128, 161, 255, 384, 640, 900)  # spans block boundaries of 16/32/128
EDGE_LENGTHS = (1, 31, 33, 97, 127, 129, 384, 900)  # 1-900 tokens: block sizes 32 and 128 plus and minus one


def make_prompts(model_dir: Path | str, lengths: tuple[int, ...] = DEFAULT_LENGTHS, seed: int = 100) -> list[list[int]]:
    """Token-id prompts of exactly the given lengths, each from different text."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
    prompts = []
    for i, n in enumerate(lengths):
        ids = tok.encode(sample_text(2 * n + 10, seed + i)).ids
        if len(ids) < n:
            raise ValueError(f"sample text too short for a {n}-token prompt")
        prompts.append(ids[:n])
    return prompts
