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

$(STAMP): pyproject.toml src/voxgen/reports/web/package-lock.json
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_PIN)" -e '.[dev]'
	@# The volume viewer `voxgen report` inlines (NiiVue, pinned by the lock file). Training does not
	@# need it, so no npm (or no registry) is a warning here; the report command says how to add it later.
	@if command -v npm >/dev/null 2>&1; then \
		npm ci --prefix src/voxgen/reports/web --no-audit --no-fund --loglevel=error >/dev/null \
		|| echo "warning: npm ci --prefix src/voxgen/reports/web failed: voxgen report will not work until it succeeds" >&2; \
	else \
		echo "note: npm not found: voxgen report needs NiiVue (npm ci --prefix src/voxgen/reports/web)" >&2; \
	fi
	touch $(STAMP)

install: $(STAMP)

quickstart: $(STAMP)
	$(BIN)/voxgen quickstart --out runs/quickstart

# pytest lists its slowest tests, so that the suite's time on two cores stays in view.
test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal --durations=15

clean:
	rm -rf $(VENV) runs build src/*.egg-info
