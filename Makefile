# Every target sets up .venv (the project + its dev extra) on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test test-fast lint bench clean ensure-prometheus ensure-rabbitmq

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/event-datagram run $(ARGS)

# Everything: tests/unit, tests/integration and tests/system (the last two are `slow`).
test: $(STAMP) ensure-prometheus ensure-rabbitmq
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

# The broker tests (tests/system/test_broker.py, the `rabbitmq` fixtures) start private
# RabbitMQ nodes of their own (engine/testing/broker.py) from Debian's rabbitmq-server.
# Install it where we can (root with apt-get), without starting the package's own
# service (a policy-rc.d refusing it, unless the machine has one already); elsewhere
# say loudly what to do. Nothing here depends on a system broker on 5672.
ensure-rabbitmq:
	@[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || command -v rabbitmq-server >/dev/null 2>&1 \
	  || [ -x /usr/sbin/rabbitmq-server ] || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian's rabbitmq-server for the broker tests (its service stays off)"; \
	    policy=/usr/sbin/policy-rc.d; made=; \
	    if [ ! -e $$policy ]; then printf '#!/bin/sh\nexit 101\n' >$$policy; chmod 755 $$policy; made=1; fi; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	      apt-get install -y -qq --no-install-recommends rabbitmq-server >/dev/null; status=$$?; \
	    [ -z "$$made" ] || rm -f $$policy; \
	    exit $$status; \
	  else \
	    echo "*** rabbitmq-server is not installed: the broker tests will fail."; \
	    echo "*** Install it (sudo apt-get install --no-install-recommends rabbitmq-server;"; \
	    echo "*** its service need not run), or skip those tests knowingly with"; \
	    echo "*** EVENT_DATAGRAM_SKIP_RABBITMQ=1."; \
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
