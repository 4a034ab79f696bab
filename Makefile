# The two commands: `make bench` (the main job) and `make test`. Each sets itself up.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup test test-gpu bench clean

setup:
	VENV=$(VENV) ./scripts/setup.sh

# CPU suite: every Triton kernel runs under TRITON_INTERPRET=1 (tests/conftest.py sets it).
test: setup
	$(PY) -m pytest -q

# On a CUDA machine: the GPU conformance tests, with real kernels (no interpreter).
test-gpu: setup
	TRITON_INTERPRET=0 $(PY) -m pytest -q tests/gpu

bench: setup
	$(PY) -m pytest -q bench --benchmark-only --benchmark-group-by=param:case --benchmark-columns=min,median,mean,rounds

clean:
	rm -rf $(VENV) .pytest_cache .benchmarks
