"""KV cache formats as data (leaf package: msgspec and the standard library only)."""

from vllm_hetero_pd.formats.format import KVFormat, LayoutError, can_translate, head_range
from vllm_hetero_pd.formats.presets import PRESETS, Preset, preset

__all__ = ["KVFormat", "LayoutError", "PRESETS", "Preset", "can_translate", "head_range", "preset"]
