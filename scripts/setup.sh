#!/usr/bin/env bash
# Creates .venv with tritonclip installed (editable) and its test and bench extras.
# Where python3 already has torch and triton (a GPU machine), the venv sees them through
# --system-site-packages and nothing installs another torch. Elsewhere it installs
# $TORCH_SPEC (default: the CPU-tested torch==2.13.0; TORCH_SPEC=torch takes the newest), from
# $TORCH_INDEX_URL when set (https://download.pytorch.org/whl/cpu: the CPU build; the default
# package index serves the multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
stamp="$VENV/.tritonclip-installed"

if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ]; then
  exit 0
fi

if "$PYTHON" -c "import torch, triton" >/dev/null 2>&1; then
  echo "setup: reusing the torch and triton of $PYTHON"
  "$PYTHON" -m venv --system-site-packages "$VENV"
  # Such a machine may be offline: build with its setuptools, and if the small extras cannot
  # be fetched (it usually has pytest already), install tritonclip alone.
  if ! "$VENV/bin/pip" install --quiet --no-build-isolation -e ".[test,bench]"; then
    echo "setup: could not install the extras; installing tritonclip alone"
    "$VENV/bin/pip" install --quiet --no-deps --no-build-isolation -e .
  fi
else
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install --quiet ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$TORCH_SPEC"
  "$VENV/bin/pip" install --quiet -e ".[test,bench]"
fi
touch "$stamp"
