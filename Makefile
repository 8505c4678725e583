# Every target sets up .venv (the project + its dev extra) on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test test-fast lint bench clean ensure-prometheus

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/event-datagram run $(ARGS)

# Everything: tests/unit, tests/integration and tests/system (the last two are `slow`).
test: $(STAMP) ensure-prometheus
	$(BIN)/pytest -q $(PYTEST_ARGS)

# The in-process tests only (tests/unit): seconds, no worker processes.
test-fast: $(STAMP)
	$(BIN)/pytest -q tests/unit

# tests/system/test_prometheus.py runs a real Prometheus (Debian's package). Install it
# where we can (root with apt-get); elsewhere say loudly what to do.
ensure-prometheus:
	@command -v prometheus >/dev/null 2>&1 || [ -x /usr/bin/prometheus ] || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian's prometheus for the metrics tests"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	      apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
	  else \
	    echo "*** prometheus is not installed: tests/system/test_prometheus.py will fail."; \
	    echo "*** Install it (sudo apt-get install prometheus), or skip that test"; \
	    echo "*** knowingly with EVENT_DATAGRAM_SKIP_PROMETHEUS=1."; \
	  fi; }

lint: $(STAMP)
	$(BIN)/ruff check engine workers tests
	$(BIN)/ruff format --check engine workers tests
	$(BIN)/mypy
	$(BIN)/lint-imports

bench: $(STAMP)
	$(BIN)/event-datagram bench --json bench.json $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
