# Each target sets up what it needs: a virtualenv in .venv with this package installed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: setup demo test lint clean

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python >= 3.11 needed, found " + sys.version' 
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $@

setup: $(VENV)/.installed

# Quick start 1: the main job end to end on the embedded default (local Ray, ./runs/demo).
demo: setup
	$(PY) -m jobs.pipeline --config jobs/configs/demo.yaml

# Quick start 2: the tests (what CI runs).
test: setup lint
	$(PY) -m pytest -q -p no:cacheprovider

lint: setup
	$(PY) -m ruff check diffinf_ray jobs tests benchmarks

clean:
	rm -rf $(VENV) runs
