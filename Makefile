# `make demo` and `make test` work on a fresh clone: each sets up .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# pytest workers: two on the 2-core CI machine
JOBS   ?= 2

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	@touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/python samples/demo.py

test: install
	$(BIN)/python -m pytest -n $(JOBS) --durations=15 tests

bench: install
	$(BIN)/python -m pytest -s tests/benchmarks

clean:
	rm -rf $(VENV) samples/out .pytest_cache
