"""Suite-wide settings.

Hypothesis' default 200 ms deadline measures the machine, not the code: on a shared 2-core
box a vLLM engine starting next door makes innocent examples "too slow". Correctness is what
these properties check; speed is measured by the benchmarks.
"""

from hypothesis import settings

settings.register_profile("suite", deadline=None)
settings.load_profile("suite")
