# paddy-pipeline: every target says what it does before doing it.
PYTHON ?= python
PROFILE ?= demo
# make train-parallel: GPUS lists the devices (default: every GPU nvidia-smi lists, none on a CPU machine);
# JOBS members train at once (default: one per GPU, else 1), each seeing one GPU through CUDA_VISIBLE_DEVICES
# (more JOBS than GPUS share them round-robin).
GPUS ?= $(shell nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null)
JOBS ?= $(if $(strip $(GPUS)),$(words $(GPUS)),1)
.DEFAULT_GOAL := help

.PHONY: help install demo repro train-parallel test bench submit profile clean

help:
	@echo "make install   install the pipeline and its pinned dependencies into the current Python"
	@echo "make demo      install, then run the whole DAG (dvc repro) on the active profile"
	@echo "make repro     run the whole DAG (dvc repro); a second run with nothing changed runs nothing"
	@echo "make train-parallel JOBS=2   like make repro, but train@<member> stages run JOBS at a time, one GPU each"
	@echo "make test      install with test extras, then run the test suite (CPU, a few minutes)"
	@echo "make bench     benchmarks: training throughput, collab vs collab_learner, demo DAG wall time"
	@echo "make submit    upload submissions/submission.csv to Kaggle (refuses synthetic or stale outputs)"
	@echo "               make submit ARGS=--force re-uploads a file that was submitted before"
	@echo "make profile PROFILE=competition|demo   switch params.yaml to a profile"
	@echo "make clean     remove caches of Python and pytest (never data, models, preds or submissions)"

install:
	@echo ">> installing paddy-pipeline and its pinned dependencies (torch + torchvision from PyPI)"
	$(PYTHON) -m pip install -e ".[dev]"

demo: install repro

repro:
	@echo ">> dvc repro: rebuilding every stage whose code, params or inputs changed"
	dvc repro

# DVC runs one stage at a time per `dvc repro`, but several `dvc repro` processes may share a workspace: each holds the
# repo lock (.dvc/tmp/lock) except while a stage's command runs, and `--wait-for-lock` makes them queue for it instead
# of failing. A stage holds per-path read/write locks (.dvc/tmp/rwlock) for its whole run, and `dvc repro train@m`
# also visits the up-to-date upstream stages, taking write locks on their outputs (data/paddy), which the members
# being trained are reading: so the upstream (data and every member's probe) is built first, and each member then
# runs as `--single-item`. xargs -P keeps JOBS of them going; its process slot picks the GPU.
train-parallel:
	@echo ">> dvc repro, training $(JOBS) members at a time on GPUs: $(or $(strip $(GPUS)),none (CPU))"
	dvc repro probe
	dvc stage list --name-only train | xargs -I{} -P $(JOBS) --process-slot-var=SLOT sh -c \
	  'stage=$$1; shift; if [ $$# -gt 0 ]; then shift $$((SLOT % $$#)); export CUDA_VISIBLE_DEVICES=$$1; fi; \
	   echo ">> $$stage: CUDA_VISIBLE_DEVICES=$${CUDA_VISIBLE_DEVICES-unset}"; \
	   exec dvc --wait-for-lock repro --single-item "$$stage"' member {} $(GPUS)
	dvc repro

test: install
	@echo ">> running the test suite"
	$(PYTHON) -m pytest

bench:
	@echo ">> benchmarks (results in bench/): see README 'Benchmarks'"
	$(PYTHON) -m pipeline.bench

submit:
	@echo ">> submitting submissions/submission.csv to Kaggle (checks first)"
	$(PYTHON) -m pipeline.submit $(ARGS)

profile:
	@echo ">> switching params.yaml to the $(PROFILE) profile"
	$(PYTHON) -m pipeline.profile $(PROFILE)

clean:
	@echo ">> removing Python and pytest caches (data, models, preds and submissions are kept)"
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
	rm -rf .pytest_cache *.egg-info
