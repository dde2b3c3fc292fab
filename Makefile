# paddy-pipeline: every target says what it does before doing it.
PYTHON ?= python
PROFILE ?= demo
.DEFAULT_GOAL := help

.PHONY: help install demo repro test bench submit profile clean

help:
	@echo "make install   install the pipeline and its pinned dependencies into the current Python"
	@echo "make demo      install, then run the whole DAG (dvc repro) on the active profile"
	@echo "make repro     run the whole DAG (dvc repro); a second run with nothing changed runs nothing"
	@echo "make test      install with test extras, then run the test suite (CPU, a few minutes)"
	@echo "make bench     benchmarks: training throughput, collab vs collab_learner, demo DAG wall time"
	@echo "make submit    upload submissions/submission.csv to Kaggle (refuses synthetic or stale outputs)"
	@echo "               make submit ARGS=--force re-uploads a file that was submitted before"
	@echo "make profile PROFILE=competition|demo   switch params.yaml to a profile, carrying your edits over"
	@echo "               make profile PROFILE=... ARGS=--force lets the profile win where your edits collide"
	@echo "make clean     remove caches of Python and pytest (never data, models, preds or submissions)"

install:
	@echo ">> installing paddy-pipeline and its pinned dependencies (torch + torchvision from PyPI)"
	$(PYTHON) -m pip install -e ".[dev]"

demo: install repro

repro:
	@echo ">> dvc repro: rebuilding every stage whose code, params or inputs changed"
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
	$(PYTHON) -m pipeline.profile $(PROFILE) $(ARGS)

clean:
	@echo ">> removing Python and pytest caches (data, models, preds and submissions are kept)"
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
	rm -rf .pytest_cache *.egg-info
