# Phyllome: `make up` sets up this host and runs the stack; `make test` sets up and tests.
.PHONY: up down test lint unit bench docs setup clean

PY := .venv/bin/python
SETUP := deploy/setup.sh

setup:
	@$(SETUP) packages venv

up: setup
	@$(SETUP) libvirt tiny
	@.venv/bin/phyllome up --detach --build-debian

down:
	@.venv/bin/phyllome down

lint: setup
	@.venv/bin/ruff check --quiet shared services cli tests bench deploy
	@.venv/bin/mypy
	@.venv/bin/mypy --strict shared cli  # what every agent and user builds on

test: setup lint
	@$(SETUP) libvirt
	@$(PY) -m pytest -m "not bench" -q

unit: setup
	@$(PY) -m pytest -m unit -q

bench: setup
	@$(SETUP) libvirt
	@$(PY) -m bench.run

docs: setup
	@$(PY) -m shared.contracts > docs/contracts.md

clean:
	rm -rf .venv build .pytest_cache .mypy_cache .ruff_cache
