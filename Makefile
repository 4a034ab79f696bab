# The two commands: `make bench` (the main job) and `make test`. Each sets itself up.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup test test-gpu bench bench-full bench-pytest bench-host clean

setup:
	VENV=$(VENV) ./scripts/setup.sh

# CPU suite: every Triton kernel runs under TRITON_INTERPRET=1 (tests/conftest.py sets it).
test: setup
	$(PY) -m pytest -q

# On a CUDA machine: the GPU conformance tests, with real kernels (no interpreter).
test-gpu: setup
	TRITON_INTERPRET=0 $(PY) -m pytest -q tests/gpu

# The main job: tritonclip vs torch on this machine's device, in under a minute.
bench: setup
	$(PY) -m tritonclip.bench --quick --out bench-out

# Every case, dtype and baseline (torch.compile included): minutes, and tens of GB on a GPU.
bench-full: setup
	$(PY) -m tritonclip.bench --dtype all --out bench-out

# The same cases as a pytest-benchmark suite.
bench-pytest: setup
	$(PY) -m pytest -q bench --benchmark-only --benchmark-columns=median,min,max,rounds \
		--benchmark-sort=name --benchmark-json=bench-out/pytest-benchmark.json

# Host work per call on any machine (kernels compiled, launched into a null driver).
bench-host: setup
	$(PY) -m tritonclip.bench.host

clean:
	rm -rf $(VENV) .pytest_cache .benchmarks
