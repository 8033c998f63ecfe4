# Two commands on a fresh machine (RabbitMQ reachable): `make demo` and `make test`.
# The distribution's own Python 3.11+ when there is one (with its venv module), else the first
# `python3` on PATH. Workers run under uids of their own (issue 24; docs/SECURITY.md), so the
# interpreter and the venv must be readable by every uid: an interpreter under a user's home
# (pyenv's under /root, mode 0700) is not. An existing venv is kept as it is: `make clean` first
# to rebuild it from another interpreter.
PYTHON ?= $(firstword $(foreach p,/usr/bin/python3 python3,$(shell $(p) -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1 && echo $(p))) python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-unit drill fuzz bench bench-quick up lint topology clean

# umask 022: the venv is read by the workers' uids too.
$(STAMP): pyproject.toml
	@umask 022; test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@umask 022; $(BIN)/python -m pip install --quiet --upgrade pip
	@umask 022; $(BIN)/python -m pip install --quiet -e ".[dev]"
	@umask 022; $(BIN)/python -m compileall -q events projections services >/dev/null
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/runner demo

# two processes, a test file each at a time (its module's system shared by its tests): most
# tests wait on the broker and on processes, so two fill the two cores
test: $(STAMP)
	$(BIN)/pytest -q -n 2 --dist loadfile

# the fault drills (the chaos drill, a whole-broker outage), kept out of `make test`: they
# take long or stop the shared broker
drill: $(STAMP)
	$(BIN)/pytest -q -m drill

test-unit: $(STAMP)
	$(BIN)/pytest -q tests/unit

# The OpenAPI fuzz run for 5 minutes (`make test` runs it for 30 s).
fuzz: $(STAMP)
	RUNNER_FUZZ_SECONDS=300 RUNNER_FUZZ_SEED= $(BIN)/pytest -q tests/e2e/test_fuzz.py

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
