"""The vLLM releases this connector is written against, checked once at start-up."""

from __future__ import annotations

SUPPORTED = ((0, 32), (0, 34))  # [from, to): vllm>=0.32,<0.34


class UnsupportedVllmVersion(RuntimeError):
    pass


def check_vllm_version(version: str | None = None) -> None:
    if version is None:
        import vllm

        version = vllm.__version__
    try:
        major_minor = tuple(int(x) for x in version.split("+")[0].split(".")[:2])
    except ValueError:
        raise UnsupportedVllmVersion(f"cannot parse vLLM version {version!r}") from None
    low, high = SUPPORTED
    if not low <= major_minor < high:
        raise UnsupportedVllmVersion(
            f"HeteroNixlConnector supports vllm>={low[0]}.{low[1]},<{high[0]}.{high[1]}; found {version}. "
            f"Install a supported vLLM or a vllm-hetero-pd release built for {version}.")
