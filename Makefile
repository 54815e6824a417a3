# Each target sets up what it needs: a virtualenv in .venv with this package installed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: setup demo test test-fast lint clean

# The install downloads several GB (torch's CUDA build, Ray): uv does it about 3x faster than pip
# and, given pip's configured constraints (pip.conf / PIP_CONSTRAINT, which uv does not read),
# picks the very same versions. `make setup INSTALLER=pip` installs with pip alone (e.g. behind a
# package mirror that only pip is configured for).
INSTALLER ?= uv
PIP_CONSTRAINTS = $(shell $(PYTHON) -m pip config list 2>/dev/null | sed -n "s/^[^=]*\.constraint='\(.*\)'$$/\1/p")

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python >= 3.11 needed, found " + sys.version'
	$(PYTHON) -m venv $(VENV)
ifeq ($(INSTALLER),pip)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
else
	$(PY) -m pip install -q uv
	$(VENV)/bin/uv pip install -q --python $(PY) $(foreach c,$(PIP_CONSTRAINTS),--constraint $(c)) -e '.[test]'
endif
	@touch $@

setup: $(VENV)/.installed

# Quick start 1: the main job end to end on the embedded default (local Ray, ./runs/demo).
demo: setup
	$(PY) -m jobs.pipeline --config jobs/configs/demo.yaml

# Quick start 2: the tests (what CI runs): every test, the heaviest real-Ray ones (marked `slow`:
# a Tune sweep with restore, every baseline method, a sweep and an experiment through `ray job
# submit`) included: 683 tests in 33 minutes from a fresh clone on the idle 2-core build box
# (2026-12-06, setup and lint included), after manifests were read without Ray Data's
# footer-reading actors (54 minutes the day before; see benchmarks/RESULTS.md, "Ray Data's
# parquet reader"). Prints the 25 slowest.
test: setup lint
	$(PY) -m pytest -q -p no:cacheprovider --durations=25

# The tests without the `slow` ones, for a quicker loop (the slow ones are roughly 8 of the 33
# minutes `make test` took from a fresh clone on 2026-12-06, by their reported durations).
test-fast: setup lint
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow"

lint: setup
	$(PY) -m ruff check diffinf_ray jobs tests benchmarks

clean:
	rm -rf $(VENV) runs
