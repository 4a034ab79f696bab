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
	mkdir -p bench-out
	$(PY) -m pytest -q bench -p no:randomly --benchmark-only --benchmark-columns=median,min,max,rounds \
		--benchmark-sort=name --benchmark-json=bench-out/benchmark.json
	$(PY) bench/report.py bench-out/benchmark.json

clean:
	rm -rf $(VENV) .pytest_cache .benchmarks
