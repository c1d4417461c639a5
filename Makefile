# Two commands for a fresh clone:   make demo   (set up, run the main job)   make test   (set up, run the tests)
# Everything goes into a local virtual environment, .venv. On a CPU machine torch is pinned to a
# CPU build; on a GPU machine run e.g.  make demo TORCH=torch  (or install torch first, then make).
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PY      = $(VENV)/bin/python

.PHONY: setup demo test test-all bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)" -e ".[test]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m aaren_rl demo

test: setup
	$(PY) -m pytest -q

test-all: setup
	$(PY) -m pytest -q -m ""

bench: setup
	$(PY) -m aaren_rl bench layer

clean:
	rm -rf $(VENV) *.egg-info
