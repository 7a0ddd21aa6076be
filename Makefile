# Two-command Quickstart: `make demo` and `make test` (each sets up .venv if missing).
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# TORCH=cpu: torch and torchvision from PyTorch's CPU index (no CUDA libraries: a venv of about 1.5 GB instead of
# 6.3 GB), as the matching pair that constraints.txt pins (+cpu builds); everything else from the usual index.
# Use it on a fresh venv: `rm -rf .venv && make test TORCH=cpu`.
TORCH  ?=
# pytest worker processes (pytest-xdist; 0 runs the suite in this process). Each worker gets cores / workers torch
# threads (tests/conftest.py), so 2 workers on CI's 2 cores run one thread each, whatever OMP_NUM_THREADS says.
TEST_WORKERS ?= 2
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_CPU_PAIR  := $(foreach p,torch torchvision,$(p)==$(shell sed -n 's/^$(p)==//p' constraints.txt)+cpu)
# the least free disk a new venv needs, in GB: the installed venv (6.4 GB measured with the CUDA wheels; wheels pip
# downloads need more on top); checked before any work starts, so a full disk fails in one line, not mid-install
NEED_GB := $(if $(filter cpu,$(TORCH)),2,7)

.PHONY: demo test lint venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || { free=$$(df -Pk . | awk 'NR==2 {print int($$4 / 1048576)}'); \
	  if [ "$$free" -lt $(NEED_GB) ]; then echo "make: a new $(VENV) needs at least $(NEED_GB) GB of free disk, $$free GB are free here: free some space (or use TORCH=cpu, about 2 GB)" >&2; exit 1; fi; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
ifeq ($(TORCH),cpu)
	$(PY) -m pip install --quiet --no-deps --index-url $(TORCH_CPU_INDEX) $(TORCH_CPU_PAIR)
else ifneq ($(TORCH),)
	$(error TORCH=$(TORCH) is not known: leave it unset (the default CUDA-enabled wheels) or use TORCH=cpu)
endif
	# the exact tested set (constraints.txt): torch and torchvision as the registry's matching pair (install pitfall)
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test]"
	$(PY) -c "import torch, torchvision; from torchvision.ops import nms; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) -m defend.demo --out runs/demo

test: $(STAMP)
	$(PY) -m pytest tests -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile

lint: $(STAMP)
	$(VENV)/bin/ruff check attacks defend tests benchmarks

clean:
	rm -rf runs/demo .pytest_cache
