# Two commands do all set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
CONFIG ?= experiments/quickstart.yaml
RUN_STAMP := $(shell date +%Y%m%d-%H%M%S)
RUN_OUT ?= runs/$(notdir $(basename $(CONFIG)))-$(RUN_STAMP)
# threat models the quickstart's releases (global model, FedDDPM auxiliary set) must meet
AUDIT_THREATS ?= external_released_model external_released_synthetic
# pytest workers (2 cores here); each worker uses one torch thread
WORKERS ?= 2

.PHONY: venv run test test-unit test-slow lint typecheck bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

## quickstart on the embedded digits dataset (creates the environment if missing), then its
## privacy audit against AUDIT_THREATS (fails if a required defence or criterion fails)
run: $(STAMP)
	$(VENV)/bin/securefed run $(CONFIG) --out $(RUN_OUT) $(foreach t,$(AUDIT_THREATS),--threat-model $(t))
	$(VENV)/bin/securefed audit $(RUN_OUT) $(foreach t,$(AUDIT_THREATS),--threat-model $(t))

## the WHOLE test suite, what CI runs (creates the environment if missing): slow and deploy
## tests included
test: $(STAMP)
	OMP_NUM_THREADS=1 $(VENV)/bin/pytest -n $(WORKERS) --dist loadfile -q

## the fast inner loop: everything but the slow tests and the Flower deployment tests
test-unit: $(STAMP)
	OMP_NUM_THREADS=1 $(VENV)/bin/pytest -n $(WORKERS) --dist loadfile -q -m 'not slow and not deploy'

## only the slow tests
test-slow: $(STAMP)
	OMP_NUM_THREADS=1 $(VENV)/bin/pytest -n $(WORKERS) --dist loadfile -q -m slow

## ruff, and the layer contracts of .importlinter (imports go downward only)
lint: $(STAMP)
	$(VENV)/bin/ruff check securefed tests experiments
	$(VENV)/bin/lint-imports

typecheck: $(STAMP)
	$(VENV)/bin/mypy securefed

bench: $(STAMP)
	$(PY) experiments/benchmarks/round_cost.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
