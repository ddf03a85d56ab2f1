"""The vLLM releases this connector runs on, and the connector-API adapter each one uses.

Standard library only: it is read before anything heavy is imported. The table is the whole
support statement; ``docs/compatibility.md`` says which rows are tested end to end and which
are claimed from source.
"""

from __future__ import annotations

# (major, minor) -> module in connector/adapters/ holding that release's glue.
RELEASES: dict[tuple[int, int], str] = {
    (0, 28): "v0_28",  # layout era B; KVConnector API without get_transfer_results
    (0, 32): "v0_32",  # layout era C (KVCacheLayout enum)
    (0, 33): "v0_32",  # claimed with 0.32 since the first release of this connector; not re-read here
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
