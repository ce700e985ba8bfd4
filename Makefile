# The two set-up commands of the README: `make demo` and `make test`.
VENV ?= .venv
BIN := $(VENV)/bin
PYTHON ?= python3

$(BIN)/spikgpt: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU wheel first: an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e ".[test]"
	touch $@

.PHONY: install demo test lint bench
install: $(BIN)/spikgpt

demo: install
	$(BIN)/spikgpt demo --out demo_out

# pytest-xdist: a worker per core (at most 4), one torch/BLAS thread each (tests/conftest.py)
test: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -n auto --maxprocesses 4 --dist worksteal

bench: install
	$(BIN)/spikgpt bench --out bench_out
