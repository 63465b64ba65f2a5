# One place for set-up and checks; README and .ci/run call these targets.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install test test-deps test-fast lint faults demo clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/install.sh
	./scripts/install.sh
	touch $@

test: install test-deps
	$(PY) -m pytest -q

# System packages some tests need (GStreamer's RTSP server, docker-compose); idempotent.
test-deps:
	./scripts/install-test-deps.sh

# ruff, configured in pyproject.toml; .ci/run runs it before the tests.
lint: install
	$(VENV)/bin/ruff check .

test-fast: install
	$(PY) -m pytest -q -m "not slow and not fault and not rtsp"

# Fault-injection and security tests on real processes; prints the table of docs/reliability.md.
faults: install
	mkdir -p .fallwatch && rm -f .fallwatch/faults.jsonl
	FALLWATCH_FAULT_REPORT=.fallwatch/faults.jsonl $(PY) -m pytest -q tests/test_faults.py tests/test_faults_network.py \
		tests/test_faults_failover.py tests/test_faults_oom.py tests/test_security.py
	$(PY) -m tests.faults table .fallwatch/faults.jsonl

# The end-to-end demo: synthetic data, tiny models, DMD, the live pipeline on an embedded Redis.
demo: install
	$(VENV)/bin/fallwatch demo --json-out .fallwatch/demo/summary.json

clean:
	rm -rf $(VENV) .fallwatch .pytest_cache
