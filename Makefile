# `make run` and `make test` do all set-up on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
CONFIG ?= etc/ccp.ini

.PHONY: run test bench clean

$(BIN)/.installed: setup.py setup.cfg constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt --upgrade pip 'setuptools>=64' wheel
	# "compat" editable mode puts the checkout itself on sys.path, which is what lets
	# twistd find twisted/plugins/ccpd_plugin.py (the default mode hides it).
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test]' --config-settings editable_mode=compat
	$(BIN)/twistd --help | grep -q ' ccpd ' || { echo "twistd does not list the ccpd plugin" >&2; exit 1; }
	touch $@

run: $(BIN)/.installed
	$(BIN)/twistd -n ccpd --config $(CONFIG)

test: $(BIN)/.installed
	$(BIN)/python -m pytest

bench: $(BIN)/.installed
	$(BIN)/python scripts/bench/run_all.py --runs 3

clean:
	rm -rf $(VENV) *.egg-info twisted/plugins/dropin.cache
