# One place for set-up and checks; README and .ci/run call these targets.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install test test-fast demo bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/install.sh
	./scripts/install.sh
	touch $@

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow and not fault and not rtsp"

clean:
	rm -rf $(VENV) .fallwatch .pytest_cache
