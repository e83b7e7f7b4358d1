# `make demo` and `make test` work on a fresh clone: each sets up .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# pytest workers: two on the 2-core CI machine; --dist loadfile keeps a test file on one worker, so a
# module fixture (a tiny model trained once for the file) is not trained again on the other worker
JOBS   ?= 2

.PHONY: install demo test test-beam bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	@touch $(STAMP)

install: $(STAMP)

# A serving-only venv with apache-beam (no TensorFlow, as on a Beam worker) for the Beam
# handler's test: apache-beam needs protobuf < 7, which the main .venv does not pin.
BEAM_VENV  := .venv-beam
BEAM_STAMP := $(BEAM_VENV)/.installed-stamp
$(BEAM_STAMP): pyproject.toml
	@test -x $(BEAM_VENV)/bin/python || $(PYTHON) -m venv $(BEAM_VENV)
	$(BEAM_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(BEAM_VENV)/bin/python -m pip install --quiet --no-deps -e .
	$(BEAM_VENV)/bin/python -c "import tomllib; x = tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']; print(*x['serve'], *x['beam'], *x['test'], sep='\\n')" > $(BEAM_VENV)/requirements.txt
	$(BEAM_VENV)/bin/python -m pip install --quiet -r $(BEAM_VENV)/requirements.txt
	@touch $(BEAM_STAMP)

test-beam: $(BEAM_STAMP)
	$(BEAM_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/beam

demo: install
	$(BIN)/python samples/demo.py

# The two venvs install side by side (pip waits on downloads and unpacking more than on the cores;
# on a fresh machine this takes the serving venv's install off the critical path), then the tests run.
test:
	$(MAKE) --no-print-directory -j2 install $(BEAM_STAMP)
	$(MAKE) --no-print-directory test-beam
	$(BIN)/python -m pytest -n $(JOBS) --dist loadfile --durations=15 tests

# Benchmarks are scripts, run on demand; each prints its table (see its --help for baselines).
bench: install
	@for script in tests/benchmarks/bench_*.py; do echo "== $$script"; $(BIN)/python $$script || exit 1; done

clean:
	rm -rf $(VENV) $(BEAM_VENV) samples/out .pytest_cache
