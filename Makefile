# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
WORKDIR ?= workdir/demo
PYTEST_ARGS ?=

.PHONY: demo test install install-test benchmarks clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel

$(VENV)/.installed: setup.py | $(PY)
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: setup.py $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[test]'
	# The BEATs reference port; its own requirements would pull a torchaudio that breaks torch 2.13.
	$(PY) -m pip install --quiet --no-deps 'speechbrain==1.1.2'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: $(VENV)/.installed
	$(VENV)/bin/alm-jax demo --workdir $(WORKDIR)

test: $(VENV)/.installed-test
	$(PY) -m pytest tests $(PYTEST_ARGS)

benchmarks: $(VENV)/.installed-test
	for b in benchmarks/[!_]*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) workdir *.egg-info
