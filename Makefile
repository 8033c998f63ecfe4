# Two commands on a fresh machine (RabbitMQ reachable): `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-unit bench bench-quick up lint topology clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install --quiet --upgrade pip
	@$(BIN)/python -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/runner demo

test: $(STAMP)
	$(BIN)/pytest -q

test-unit: $(STAMP)
	$(BIN)/pytest -q tests/unit

bench: $(STAMP)
	$(BIN)/python -m bench.run

bench-quick: $(STAMP)
	$(BIN)/python -m bench.run --quick

up: $(STAMP)
	$(BIN)/runner up

lint: $(STAMP)
	$(BIN)/python -m ruff check events projections services runner_client tests bench

topology: $(STAMP)
	$(BIN)/runner topology export -o rabbitmq/definitions.json

clean:
	rm -rf $(VENV) var .pytest_cache .hypothesis
