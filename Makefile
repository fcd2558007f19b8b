# The two commands of the README:
#   make run    API + one worker on local defaults (installs what it needs, starts local services)
#   make test   the whole test suite (likewise)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install services browser run test test-fast lint openapi clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[server,dev]'
	touch $(STAMP)

install: $(STAMP)

services:
	.ci/ensure-services

# Debian's chromium for the dashboard's browser test (Playwright drives it and downloads no browser)
CHROMIUM ?= /usr/bin/chromium
browser:
	@test -x $(CHROMIUM) || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get install -y --no-install-recommends chromium \
	  || { $$SUDO apt-get update && $$SUDO apt-get install -y --no-install-recommends chromium; }; }

run: install services
	$(BIN)/outbox-relay dev

test: install services browser
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# the fast inner loop: no end-to-end or slow suites
test-fast: install services
	$(BIN)/python -m pytest -x -m "not e2e and not slow" $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

openapi: install
	$(BIN)/python -m service.openapi > openapi/openapi.json

clean:
	rm -rf $(VENV) .venv-ci .pytest_cache test-output
