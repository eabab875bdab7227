# Two commands on a fresh machine: `make run` and `make test`. Each creates the virtual
# environment and installs what it needs on first use; nothing is installed by hand.
# PYTHON picks the interpreter the environment is made with (3.11 or newer), e.g.
# `PYTHON=python3.12 make run`; it counts when .venv is created (`make clean` to change it).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# One stamp per install and per pyproject.toml content: `make run` installs the runtime
# dependencies only, `make test` the dev extra (which holds them too, so it leaves the
# runtime stamp behind as well). A changed pyproject.toml has new stamps: both reinstall.
# So has a changed timeline.proto: the install generates the gRPC code from it (setup.py).
HASH := $(shell cat pyproject.toml timeline/rpc/v1/timeline.proto | cksum | cut -d' ' -f1)
RUNTIME := $(VENV)/.installed-runtime-$(HASH)
DEV := $(VENV)/.installed-dev-$(HASH)
PORT ?= 8000
export PORT

.PHONY: install run test lint mutants proxy bench clean docker up down

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || { \
		echo "timeline needs Python 3.11 or newer: '$(PYTHON)' is missing or older (try PYTHON=python3.11 make ...)" >&2; \
		exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(RUNTIME): | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	rm -f $(VENV)/.installed-* && touch $@

$(DEV): | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-* && touch $@ $(RUNTIME)

## install: the virtual environment with the dev extra (tests, linters, benchmarks).
install: $(DEV)

## run: serve the API on http://127.0.0.1:$(PORT) with 2 gunicorn workers on the embedded
## default (a redis-server and SQLite under var/), unless TIMELINE_* variables say otherwise,
## and the gRPC API on TIMELINE_GRPC_BIND (127.0.0.1:9000 unless set; off: HTTP alone).
run: $(RUNTIME)
	TIMELINE_GRPC_BIND="$${TIMELINE_GRPC_BIND-127.0.0.1:9000}" $(BIN)/gunicorn app:app

## lint: ruff (lint and format) and mypy.
lint: $(DEV)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

## test: lint, then the whole test suite against real redis-server processes.
test: lint
	$(BIN)/pytest

## mutants: the named mutations of tests/mutants.py, each applied to a copy of the tree (the
## working tree and git are never touched); fails if a test lets one survive or one no longer
## applies (about 2 minutes). MUTANTS_ARGS=--all runs the whole suite per mutation (~10 min).
mutants: $(DEV)
	$(BIN)/python tests/mutants.py $(MUTANTS_ARGS)

## proxy: configs/nginx.conf run for real in front of gunicorn (tests/test_proxy.py); needs an
## nginx binary (apt-get install -y nginx), else those tests skip and say so.
proxy: $(DEV)
	$(BIN)/pytest tests/test_proxy.py -ra

## bench: the benchmark suite on this machine (a few minutes); rewrites docs/benchmarks.md.
bench: $(DEV)
	$(BIN)/python -m timeline.bench.suite

## docker: build the image (needs a Docker engine).
docker:
	docker build -t timeline:latest .

## up / down: the whole stack of docker-compose.yml (needs a Docker engine with compose, and
## a .env made from .env.example). `make down` keeps the data volumes.
up: .env
	docker compose up -d --build --wait

down:
	docker compose down

.env:
	@echo "Make .env first: cp .env.example .env, then set its passwords." && exit 1

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
	rm -f timeline/rpc/v1/timeline_pb2*.py* timeline/rpc/v1/timeline_proto.sha256
