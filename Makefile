# Two commands on a fresh machine: `make demo` and `make test`.
# TORCH_SPEC is what gets installed for torch before the package itself. The default is
# the CPU-testable build that this project's CI machines carry on disk; on a GPU cluster
# run `make install TORCH_SPEC=` to keep the CUDA torch already in your environment, or
# name another build, e.g. TORCH_SPEC="torch==2.5.1 torchvision==0.20.1 --index-url ...".
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PY := $(VENV)/bin/python
STAMP := $(VENV)/.gps-ds-installed

export HF_HUB_OFFLINE ?= 1
# One ninja for every build of DeepSpeed's CPU op (a different one on PATH forces a rebuild).
export PATH := $(abspath $(VENV))/bin:$(PATH)
export PYTHONDONTWRITEBYTECODE = 1

.PHONY: install test test-fast test-gpu gpu-check demo clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): $(PY) setup.cfg pyproject.toml
	@if [ -n "$(TORCH_SPEC)" ]; then $(PY) -m pip install --quiet $(TORCH_SPEC); fi
	$(PY) -m pip install --quiet -e ".[test,sam,lora,demo]"
	@touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -ra --durations=25

test-fast: $(STAMP)
	$(PY) -m pytest -q -ra -m "not slow"

# Only the tests marked `gpu` (sparse kernels against dense on CUDA, fp32 and bf16); they skip without CUDA.
test-gpu: $(STAMP)
	$(PY) -m pytest -q -ra -m gpu

# The whole GPU check (trainer under deepspeed/NCCL, select, eval, kernels, bench): docs/gpu-check.md
GPU_CHECK_OUT ?= gpu-check
gpu-check: $(STAMP)
	PYTHON=$(abspath $(PY)) bash scripts/gpu_check.sh $(GPU_CHECK_OUT)

demo: $(STAMP)
	$(VENV)/bin/gps-ds demo

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
