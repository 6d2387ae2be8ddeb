# Two entry points: `make quickstart` and `make test`. Each creates .venv when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.voxgen-installed
# torch is pinned here (a local CPU build exists for this machine); the package itself asks for torch>=2.4.
TORCH_PIN ?= torch==2.13.0
# Test processes run torch on one thread each (tests/conftest.py): one worker per core.
TEST_WORKERS ?= 2

.PHONY: quickstart test install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_PIN)" -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

quickstart: $(STAMP)
	$(BIN)/voxgen quickstart --out runs/quickstart

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal

clean:
	rm -rf $(VENV) runs build src/*.egg-info
