# Everything installs itself into ./.venv on first use; `make test` and `make demo` work on a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test test-all demo bench lint mutation

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# The test suite: fast tests on the CPU, offline. `make test-all` adds the slow ones.
test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -m "not slow"

test-all: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest

lint: $(STAMP)
	$(PY) -m ruff check src tests bench scripts experiments

# The main job: teacher -> baseline student -> SAD student on built-in data, results in outputs/demo.
demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/hf-sad demo --output_dir outputs/demo

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) bench/run.py

# Mutation testing of the core modules with mutmut (settings in pyproject.toml; not part of CI; about N min on 2 CPU
# cores). Prints each module's score and the mutants no test killed; tests/README.md says how to read them.
mutation: $(STAMP)
	$(PY) -m pip install --quiet "mutmut>=3.8,<4"
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 HF_SAD_SHARED=$(abspath ../shared) $(VENV)/bin/mutmut run --max-children 2 > /dev/null
	$(PY) tests/mutation_report.py
