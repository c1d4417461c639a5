# Two commands for a fresh clone:   make demo   (set up, run the main job)   make test   (set up, run the tests)
# Everything goes into a local virtual environment, .venv. On a CPU machine torch is pinned to a
# CPU build; on a GPU machine run e.g.  make demo TORCH=torch  (or install torch first, then make).
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
TRITON ?= triton==3.8.0
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip install -q --disable-pip-version-check

.PHONY: setup demo test test-all bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) "$(TORCH)" -e .
	touch $@

# Tests also run the fused Triton scan in Triton's CPU interpreter. A CUDA build of torch brings
# its own Triton, so only a CPU build gets $(TRITON) here.
$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) -e ".[test]"
	$(PY) -c "import torch, sys; sys.exit(torch.version.cuda is not None)" && $(PIP) "$(TRITON)" || true
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m aaren_rl demo

test: $(VENV)/.installed-test
	$(PY) -m pytest -q

test-all: $(VENV)/.installed-test
	$(PY) -m pytest -q -m ""

bench: setup
	$(PY) -m aaren_rl bench all

clean:
	rm -rf $(VENV) *.egg-info
