# kvmagent: `make run` serves on 127.0.0.1:7070, `make test` runs the test suite.
# Both install what is missing first (Debian packages, the venv, libvirtd/virtlogd/dockerd).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STATE_DIR ?= .state
LISTEN ?= 127.0.0.1:7070
# TCG works everywhere (also in VMs without nested virtualisation); use kvm on real hosts.
DOMAIN_TYPE ?= qemu
PYTEST_ARGS ?=

.PHONY: setup packages services venv run test bench lint guest clean

setup: packages venv services

packages:
	scripts/setup-host.sh packages

services:
	scripts/setup-host.sh services

venv: $(VENV)/.installed

$(VENV)/.installed: setup.cfg setup.py
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test,lint]'
	touch $@

guest: venv
	$(PY) -m tests.guest.build

run: setup
	$(VENV)/bin/kvmagent serve --listen $(LISTEN) --state-dir $(STATE_DIR) \
		--domain-type $(DOMAIN_TYPE) --log-level INFO

test: setup
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

bench: setup
	$(PY) -m bench.run $(BENCH)

lint: venv
	$(VENV)/bin/ruff check kvmagent plugins tests bench

clean:
	rm -rf $(VENV) $(STATE_DIR) .pytest_cache .hypothesis *.egg-info
