# paddy-pipeline: every target says what it does before doing it.
#
# One environment for everything: by default the project's own virtual environment .venv (made from BASE_PYTHON);
# `make <target> PYTHON=/path/to/python` uses that interpreter instead (a Kaggle notebook's, a conda env's).
# Its bin folder goes first on PATH for every recipe, so `dvc repro`'s stage commands (`python -m pipeline.<stage>`
# in dvc.yaml) and the tests' `dvc` subprocesses run in the same environment as the target itself.
#
# requirements.lock pins every transitive dependency with its sha256 hashes (a pip-tools style lock written by
# `uv pip compile --universal`): plain pip installs it (`--require-hashes`), as on Kaggle, and the same lock serves
# Linux x86_64 with the CUDA wheels torch pulls from PyPI, other Linux machines, macOS and Windows.
# `make lock` regenerates it after a change to pyproject.toml's dependencies.
# make profile: PROFILE names the profile to write (default: the one params.yaml names).
PROFILE ?=
# make train-parallel: GPUS lists the devices (default: every GPU nvidia-smi lists, none on a CPU machine);
# JOBS members train at once (default: one per GPU, else 1), each seeing one GPU through CUDA_VISIBLE_DEVICES
# (more JOBS than GPUS share them round-robin).
GPUS ?= $(shell nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null)
JOBS ?= $(if $(strip $(GPUS)),$(words $(GPUS)),1)
BASE_PYTHON ?= python3
LOCK := requirements.lock
OLDEST_LOCK := requirements-oldest.lock
UV_VERSION := 0.13.8
ifeq ($(origin PYTHON),command line)
ENV_BIN := $(shell $(PYTHON) -c 'import os, sys, sysconfig; print(sysconfig.get_path("scripts") + ":" + os.path.dirname(sys.executable))')
else
VENV := .venv
PYTHON := $(CURDIR)/$(VENV)/bin/python
ENV_BIN := $(CURDIR)/$(VENV)/bin
endif
export PATH := $(ENV_BIN):$(PATH)
.DEFAULT_GOAL := help

.PHONY: help install lock demo repro train-parallel test test-oldest bench rehearsal submit kaggle-run profile clean

help:
	@echo "make install   make .venv and install $(LOCK) + the pipeline into it; with PYTHON=..., install into that"
	@echo "               Python, keeping its packages that are in range (torch never replaced: docs/install.md)"
	@echo "make demo      install, then run the whole DAG (dvc repro) on the active profile"
	@echo "make repro     run the whole DAG (dvc repro); a second run with nothing changed runs nothing"
	@echo "make train-parallel JOBS=2   like make repro, but fold@ then train@ stages run JOBS at a time, one GPU each"
	@echo "make test      install, then run the test suite (CPU, a few minutes; ARGS=\"-k probe\" to select)"
	@echo "make test-oldest   the oldest supported stack ($(OLDEST_LOCK): Kaggle's versions) in a venv of its own:"
	@echo "               every stage end to end, probe, architecture families, train, tricks (OLDEST_VENV=$(OLDEST_VENV))"
	@echo "make bench     benchmarks: training throughput, DataLoader vs step rate, collab vs collab_learner, demo DAG time, DDP 1 vs 2 processes, accuracy vs the seeds on real digit scans"
	@echo "make rehearsal the competition profile's DAG on generated 480x640 photos in a scratch workspace: run it"
	@echo "               before spending GPU hours (ARGS=\"--members a,b --bs 16 --keep\")"
	@echo "make submit    upload submissions/submission.csv to Kaggle (refuses synthetic or stale outputs)"
	@echo "               make submit ARGS=--force re-uploads a file that was submitted before"
	@echo "make kaggle-run   train on Kaggle's GPUs with your Kaggle token: push this commit as a private GPU kernel,"
	@echo "               then bring its outputs back into DVC (ARGS=\"--members a,b --no-wait --name x\": docs/kaggle.md)"
	@echo "make profile PROFILE=competition|demo   write params.yaml: base + that profile + your params.local.yaml"
	@echo "               (no PROFILE: the current one again); ARGS=--force writes over values changed in params.yaml"
	@echo "make lock      re-resolve pyproject.toml's dependencies into $(LOCK) (after changing them)"
	@echo "make clean     remove caches of Python and pytest (never data, models, preds or submissions)"
	@echo "Every target runs in .venv; add PYTHON=/path/to/python to use that interpreter instead."

# $(call install_lock,PYTHON,LOCK): a lock into a venv, hashes checked. pip itself first: the pip that `python -m venv`
# bundles (23.2 with Python 3.11) rejects a hashed lock in which a package asks for an extra of a pinned one
# (python-fasthtml wants uvicorn[standard]) as soon as the index holds a newer release than the pin; pip 23.3 fixed that.
PIP_VERSION = 25.3
define install_lock
	$(1) -m pip install --quiet pip==$(PIP_VERSION)
	$(1) -m pip install --require-hashes -r $(2)
endef

# --no-build-isolation: the editable install is built with the locked setuptools, not whatever pip would fetch.
define install_from_lock
	@echo ">> installing the locked dependencies ($(LOCK), hashes checked) and paddy-pipeline into $(PYTHON)"
	$(call install_lock,$(PYTHON),$(LOCK))
	$(PYTHON) -m pip install --no-deps --no-build-isolation -e .
endef

ifdef VENV
# .venv reinstalls only when the lock or pyproject.toml is newer than its last install (a stamp file in .venv).
install: $(VENV)/installed-from-lock

$(VENV)/installed-from-lock: $(LOCK) pyproject.toml | $(PYTHON)
	$(install_from_lock)
	touch $@

$(PYTHON):
	@echo ">> creating the project's virtual environment $(VENV) with $(BASE_PYTHON)"
	$(BASE_PYTHON) -m venv $(VENV)
else
# A host's own Python (Kaggle, Colab, conda): its packages inside pyproject.toml's ranges are kept (torch and its CUDA
# libraries never replaced), the rest come from $(LOCK); one line per dependency says which (pipeline/host_install.py).
install:
	@echo ">> installing paddy-pipeline into $(PYTHON), keeping its packages that are inside pyproject.toml's ranges"
	$(PYTHON) pipeline/host_install.py
endif

# uv keeps every version already in a lock that still satisfies pyproject.toml (it reads the output file first):
# delete a lock to re-resolve it from scratch. The oldest lock takes the lowest version of each direct dependency,
# so it is exactly pyproject.toml's lower bounds (the stack CI tests as the oldest supported, e.g. Kaggle's).
UV_COMPILE = $(PYTHON) -m uv pip compile pyproject.toml --extra dev --universal --generate-hashes --custom-compile-command "make lock"
lock: $(if $(VENV),| $(PYTHON))
	@echo ">> resolving pyproject.toml (with the dev extra) for every platform into $(LOCK) and $(OLDEST_LOCK), with uv $(UV_VERSION)"
	$(PYTHON) -m pip install --quiet uv==$(UV_VERSION)
	$(UV_COMPILE) -o $(LOCK)
	$(UV_COMPILE) --resolution lowest-direct -o $(OLDEST_LOCK)

demo: install repro

repro:
	@echo ">> dvc repro: rebuilding every stage whose code, params or inputs changed"
	$(PYTHON) -m dvc repro

# DVC runs one stage at a time per `dvc repro`, but several `dvc repro` processes may share a workspace: each holds the
# repo lock (.dvc/tmp/lock) except while a stage's command runs, and `--wait-for-lock` makes them queue for it instead
# of failing. A stage holds per-path read/write locks (.dvc/tmp/rwlock) for its whole run, and `dvc repro train@m`
# also visits the up-to-date upstream stages, taking write locks on their outputs (data/paddy), which the members
# being trained are reading: so the upstream (data and every member's probe) is built first, and each member then
# runs as `--single-item`. xargs -P keeps JOBS of them going; its process slot picks the GPU. With validation.folds
# K > 1 the fold@<member>-<k> stages (the training) go first, then the train@<member> stages that gather them.
train-parallel:
	@echo ">> dvc repro, training $(JOBS) members at a time on GPUs: $(or $(strip $(GPUS)),none (CPU))"
	dvc repro probe
	for group in fold train; do \
	  dvc stage list --name-only $$group | xargs -I{} -P $(JOBS) --process-slot-var=SLOT sh -c \
	    'stage=$$1; shift; if [ $$# -gt 0 ]; then shift $$((SLOT % $$#)); export CUDA_VISIBLE_DEVICES=$$1; fi; \
	     echo ">> $$stage: CUDA_VISIBLE_DEVICES=$${CUDA_VISIBLE_DEVICES-unset}"; \
	     exec dvc --wait-for-lock repro --single-item "$$stage"' member {} $(GPUS) || exit 1; \
	done
	dvc repro

test: install
	@echo ">> running the test suite"
	$(PYTHON) -m pytest $(ARGS)

# The oldest supported stack (pyproject.toml's lower bounds: Kaggle's versions), in a venv of its own outside the
# repository, installed from $(OLDEST_LOCK) and then as a host's Python is (make install PYTHON=...). The tests run
# there: every stage end to end once (the demo DAG), the probe, the architecture families, train, gradient
# accumulation and the member's data/learner. Node ids, not -k: a renamed test fails loudly (pytest exit 4) rather
# than being deselected.
OLDEST_VENV ?= $(HOME)/.cache/paddy-pipeline/venv-oldest
OLDEST_TESTS ?= tests/test_dag.py::test_the_demo_dag_runs_every_stage_of_dvc_yaml tests/test_probe.py \
	tests/test_arch_families.py tests/test_train.py tests/test_grad_accum.py tests/test_vision.py tests/test_tricks.py
test-oldest: $(OLDEST_VENV)/installed-from-lock
	$(MAKE) install PYTHON=$(OLDEST_VENV)/bin/python
	@echo ">> running the oldest stack's tests in $(OLDEST_VENV)"
	PATH=$(OLDEST_VENV)/bin:$$PATH $(OLDEST_VENV)/bin/python -m pytest $(OLDEST_TESTS) $(ARGS)

$(OLDEST_VENV)/installed-from-lock: $(OLDEST_LOCK)
	@echo ">> creating $(OLDEST_VENV) with $(BASE_PYTHON) and installing $(OLDEST_LOCK) (hashes checked) into it"
	$(BASE_PYTHON) -m venv $(OLDEST_VENV)
	$(call install_lock,$(OLDEST_VENV)/bin/python,$(OLDEST_LOCK))
	touch $@

bench:
	@echo ">> benchmarks (results in bench/): see README 'Benchmarks'"
	$(PYTHON) -m benchmarks

rehearsal:
	@echo ">> rehearsal: the competition profile's DAG, every member at its real shapes, in a scratch workspace"
	$(PYTHON) -m benchmarks.rehearsal $(ARGS)

submit:
	@echo ">> submitting submissions/submission.csv to Kaggle (checks first)"
	$(PYTHON) -m pipeline.submit $(ARGS)

kaggle-run:
	@echo ">> kaggle-run: this commit's stages in a private Kaggle GPU kernel, the outputs back into DVC"
	$(PYTHON) -m pipeline.kaggle_run $(ARGS)

profile:
	@echo ">> writing params.yaml: pipeline/profiles/base.yaml + the $(or $(PROFILE),current) profile + params.local.yaml"
	$(PYTHON) -m pipeline.profile $(PROFILE) $(ARGS)

clean:
	@echo ">> removing Python and pytest caches (data, models, preds and submissions are kept)"
	find . -path ./.venv -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
	rm -rf .pytest_cache *.egg-info
