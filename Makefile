# Two commands on a fresh machine: `make run` and `make test`. Each creates the virtual
# environment and installs what it needs on first use; nothing is installed by hand.
# PYTHON picks the interpreter the environment is made with (3.11 or newer), e.g.
# `PYTHON=python3.12 make run`; it counts when .venv is created (`make clean` to change it).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# What every install takes: exact versions, each with its hashes, from the lock files of
# requirements/ (made by `make lock`; see "Dependencies" in the README). pip refuses anything
# the lock does not name or whose hash differs. The project itself is installed from the
# checkout, built without isolation by the locked setuptools and grpcio-tools.
PIP := $(BIN)/python -m pip --disable-pip-version-check
INSTALL := $(PIP) install --quiet --require-hashes --only-binary=:all:
PROJECT := $(PIP) install --quiet --no-deps --no-build-isolation -e .
# A changed lock makes a new environment: what a fresh machine would get, nothing left
# over from the old lock. A changed pyproject.toml or timeline.proto (whose gRPC code the
# project's install generates: setup.py) only installs the project again.
LOCK_HASH := $(shell cat requirements/*.txt | cksum | cut -d' ' -f1)
LOCKED := $(VENV)/.lock-$(LOCK_HASH)
HASH := $(shell cat pyproject.toml timeline/rpc/v1/timeline.proto | cksum | cut -d' ' -f1)-$(LOCK_HASH)
# One stamp per install: `make run` installs the runtime lock, `make test` the dev lock
# (which holds the runtime's, at the same versions, so it leaves the runtime stamp too).
# Their names hold the lock's hash too: a new environment never looks installed.
RUNTIME := $(VENV)/.installed-runtime-$(HASH)
DEV := $(VENV)/.installed-dev-$(HASH)
PORT ?= 8000
export PORT
# make lock: one lock for every platform and Python 3.11+ (markers where they differ).
UV_COMPILE := --quiet --universal --python-version 3.11 --generate-hashes --custom-compile-command "make lock"
# make smoke: its environment, and the lock it installs.
SMOKE_VENV ?= .venv-smoke
SMOKE_LOCK ?= requirements/lowest.txt

.PHONY: install run test lint mutants proxy bench smoke lock clean docker up down release-checks

$(LOCKED):
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || { \
		echo "timeline needs Python 3.11 or newer: '$(PYTHON)' is missing or older (try PYTHON=python3.11 make ...)" >&2; \
		exit 1; }
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	touch $@

$(RUNTIME): | $(LOCKED)
	$(INSTALL) -r requirements/runtime.txt
	$(PROJECT)
	rm -f $(VENV)/.installed-* && touch $@

$(DEV): | $(LOCKED)
	$(INSTALL) -r requirements/dev.txt
	$(PROJECT)
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

## lock: compile requirements/*.txt from pyproject.toml with uv, then list what changed.
## dev.txt and runtime.txt keep the versions they pin where pyproject.toml still allows them
## (uv prefers an output file's pins); UPGRADE=1 takes the newest releases instead.
## lowest.txt is always computed afresh: the lowest release each range allows. Run it after
## changing a dependency in pyproject.toml, and (UPGRADE=1) to take upstream releases.
lock: $(DEV)
	$(BIN)/python -c 'import tomllib; print("\n".join(["# pyproject.toml [build-system] requires, and the installer (make lock writes this file)", *tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"], "pip>=24.0"]))' > requirements/build.in
	$(BIN)/uv pip compile $(UV_COMPILE) $(if $(UPGRADE),--upgrade) --extra dev pyproject.toml requirements/build.in -o requirements/dev.txt
	$(BIN)/uv pip compile $(UV_COMPILE) pyproject.toml requirements/build.in -c requirements/dev.txt -o requirements/runtime.txt
	$(BIN)/uv pip compile $(UV_COMPILE) --upgrade --resolution lowest-direct --no-emit-package pip pyproject.toml requirements/build.in -o requirements/lowest.txt
	@git diff --no-color -U0 -- requirements/*.txt | grep -E '^[-+][A-Za-z0-9_.-]+==' || echo "make lock: no version changed"

## smoke: a wheel built from the checkout, installed alone (no editable install, no
## checkout on the path) in $(SMOKE_VENV) with the lowest versions pyproject.toml allows
## (requirements/lowest.txt; SMOKE_LOCK=requirements/runtime.txt for the lock's), serves
## the seed scenario over HTTP and gRPC from another directory (tests/smoke.py).
smoke: $(DEV)
	rm -rf build $(SMOKE_VENV) && mkdir -p build
	$(PIP) wheel --quiet --no-deps --no-build-isolation -w build/wheel .
	$(PYTHON) -m venv $(SMOKE_VENV)
	$(SMOKE_VENV)/bin/python -m pip --disable-pip-version-check install --quiet --require-hashes --only-binary=:all: -r $(SMOKE_LOCK)
	$(SMOKE_VENV)/bin/python -m pip --disable-pip-version-check install --quiet --no-deps build/wheel/timeline-*.whl
	cd build && ../$(SMOKE_VENV)/bin/python $(CURDIR)/tests/smoke.py

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

## release-checks: before a release, scripts/mongo-release-checks.sh against a throwaway
## three-member replica set of its own (rollback, write concern errors with duplicate keys, an
## index build on 3,000,000 documents with a member down); needs a Docker engine with compose
## 2.24+, about 20 minutes and 10 GB of disk; removes its stack at the end.
release-checks:
	bash scripts/mongo-release-checks.sh

.env:
	@echo "Make .env first: cp .env.example .env, then set its passwords." && exit 1

clean:
	rm -rf $(VENV) $(SMOKE_VENV) build .pytest_cache .mypy_cache .ruff_cache *.egg-info
	rm -f timeline/rpc/v1/timeline_pb2*.py* timeline/rpc/v1/timeline_proto.sha256
