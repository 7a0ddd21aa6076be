# Two-command Quickstart: `make demo` and `make test` (each sets up .venv if missing).
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test lint venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# the exact tested set (constraints.txt): torch and torchvision as the registry's matching pair (install pitfall)
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test]"
	$(PY) -c "import torch, torchvision; from torchvision.ops import nms; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) -m defend.demo --out runs/demo

test: $(STAMP)
	$(PY) -m pytest tests -p no:cacheprovider

lint: $(STAMP)
	$(VENV)/bin/ruff check attacks defend tests benchmarks

clean:
	rm -rf runs/demo .pytest_cache
