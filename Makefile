# evalkit front door: `make demo` and `make test` on a fresh clone.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel on machines without a GPU; on a CUDA machine the same pin is the CUDA build.
TORCH_SPEC ?= torch==2.13.0
# Reuse a CUDA-enabled torch that the system Python already has instead of downloading one.
SYSTEM_CUDA_TORCH := $(shell python3 -c "import torch; print(int(bool(torch.version.cuda)))" 2>/dev/null)
VENV_FLAGS := $(if $(filter 1,$(SYSTEM_CUDA_TORCH)),--system-site-packages,)
NPROC ?= 2
DEMO := .demo

.PHONY: install demo test test-fast bench lint style clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	python3 -m venv $(VENV_FLAGS) $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: install
	$(PY) -m evalkit.tinymodel $(DEMO)/tiny-llama
	rm -rf $(DEMO)/results
	$(VENV)/bin/torchrun --nproc_per_node=$(NPROC) -m evalkit \
		--model $(DEMO)/tiny-llama --tasks demo --output $(DEMO)/results --batch-size 4 --device cpu

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not multiprocess"

lint: install
	$(VENV)/bin/ruff check evalkit tests
	$(VENV)/bin/ruff format --check evalkit tests

style: install
	$(VENV)/bin/ruff check --fix evalkit tests
	$(VENV)/bin/ruff format evalkit tests

clean:
	rm -rf $(DEMO) .pytest_cache .ruff_cache *.egg-info
