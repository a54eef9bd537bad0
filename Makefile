# Set-up, test and demo targets; the README's two commands are `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup demo test test-services

# torch first, pinned to the CPU build file this kind of machine carries, so that the
# package's own range (torch>=2.1) installs nothing more.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet torch==2.13.0
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/testbed run scenarios/lowband.yaml

# What the tests need besides Python packages: a real Mosquitto broker (Debian package).
test-services:
	@command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || \
		($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq mosquitto >/dev/null)

test: setup test-services
	$(VENV)/bin/pytest
