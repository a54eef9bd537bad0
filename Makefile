# Set-up, test and demo targets; the README's two commands are `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup demo test test-services

# torch first, pinned to the CPU build file this kind of machine carries, so that the
# package's own range (torch>=2.1) installs nothing more.
# PIP_TORCH_INDEX=https://download.pytorch.org/whl/cpu takes it from the CPU index instead (where the
# default index would pull a CUDA build).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet $(if $(PIP_TORCH_INDEX),--index-url $(PIP_TORCH_INDEX)) torch==2.13.0
	$(VENV)/bin/pip install --quiet -e '.[test,fast]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/testbed run scenarios/lowband.yaml

# What the tests need besides Python packages (Debian packages): a real Mosquitto broker, a real
# Prometheus that scrapes a live run, and headless Chromium that renders the HTML report.
TEST_SERVICE_PACKAGES := mosquitto prometheus prometheus-pushgateway chromium
test-services:
	@missing=""; for package in $(TEST_SERVICE_PACKAGES); do \
		command -v $$package >/dev/null 2>&1 || [ -x /usr/sbin/$$package ] || missing="$$missing $$package"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "installing$$missing"; \
		$(SUDO) apt-get update -qq && $(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

test: setup test-services
	$(VENV)/bin/pytest
