"""The vLLM releases this connector runs on, and the connector-API adapter each one uses.

Standard library only: it is read before anything heavy is imported. The table is the whole
support statement; ``docs/compatibility.md`` says which rows are tested end to end and which
are claimed from source.
"""

from __future__ import annotations

# (major, minor) -> module in connector/adapters/ holding that release's glue.
RELEASES: dict[tuple[int, int], str] = {
    (0, 26): "v0_28",  # era B, 0.28's API; claimed from source (torch 2.11: not installable here)
    (0, 27): "v0_28",  # era B, 0.28's API; claimed from source
    (0, 28): "v0_28",  # layout era B; KVConnector API without get_transfer_results; tested end to end
    (0, 29): "v0_29",  # era C layout with 0.28's API; claimed from source
    (0, 30): "v0_32",  # claimed from source
    (0, 31): "v0_32",  # claimed from source
    (0, 32): "v0_32",  # layout era C (KVCacheLayout enum); tested end to end
}


class UnsupportedVllmVersion(RuntimeError):
    pass


def supported_range() -> str:
    names = [f"{major}.{minor}" for major, minor in sorted(RELEASES)]
    return ", ".join(names[:-1]) + " and " + names[-1]


def adapter_name(version: str | None = None) -> str:
    """The adapter module for ``version`` (default: the installed vLLM); raises if unsupported."""
    if version is None:
        import vllm

        version = vllm.__version__
    try:
        major_minor = tuple(int(x) for x in version.split("+")[0].split(".")[:2])
    except ValueError:
        raise UnsupportedVllmVersion(f"cannot parse vLLM version {version!r}") from None
    if major_minor not in RELEASES:
        raise UnsupportedVllmVersion(
            f"HeteroNixlConnector supports vLLM {supported_range()}; found {version}. "
            f"Install a supported vLLM or a vllm-hetero-pd release built for {version}.")
    return RELEASES[major_minor]


def check_vllm_version(version: str | None = None) -> None:
    adapter_name(version)
