# Two commands on a fresh machine: `make run` and `make test`. Each creates the virtual
# environment and installs what it needs on first use; nothing is installed by hand.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cksum < pyproject.toml | cut -d' ' -f1)
PORT ?= 8000
export PORT

.PHONY: install run test lint bench clean docker up down

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

## run: serve the API on http://127.0.0.1:$(PORT) with 2 gunicorn workers on the embedded
## default (a redis-server and SQLite under var/), unless TIMELINE_* variables say otherwise.
run: $(STAMP)
	$(BIN)/gunicorn app:app

## lint: ruff (lint and format) and mypy.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

## test: lint, then the whole test suite against real redis-server processes.
test: lint
	$(BIN)/pytest

## bench: the benchmark suite on this machine (a few minutes); rewrites docs/benchmarks.md.
bench: $(STAMP)
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
