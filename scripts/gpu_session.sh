#!/usr/bin/env bash
# Everything a lent GPU machine should run, in one call of under ten minutes, writing at most
# eight files to $OUT (default: gpu-out/): versions and the commit, the GPU tests, the launch
# check and `make bench` (quick, bf16), the training-step benchmark (GPT-2, Llama-style 1B),
# then the fp16 one-tensor and many-small sweep if time is left. The machine has torch and
# triton but no network: tritonclip installs without deps.
#
#   COMMIT=$(git rev-parse --short HEAD) bash scripts/gpu_session.sh
#   COMMIT=... bash scripts/gpu_session.sh tune    # a second call: the launch-config sweep
#
# (The device copy of the repository may carry stale git metadata: pass the commit in.)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
start=$SECONDS
strip() { tr '\r' '\n' | grep -v '^\s*$' | grep -v 'it/s\]$\|s/case\]$'; }

{
  echo "commit ${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null)}"
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'triton', triton.__version__); print(torch.cuda.get_device_name())"
  nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem --format=csv,noheader
} > "$OUT/versions.txt" 2>&1
pip install --quiet --no-deps --no-build-isolation -e . >> "$OUT/versions.txt" 2>&1

if [ "${1:-}" = tune ]; then
  TRITON_INTERPRET=0 timeout 560 python -m tritonclip.bench.tune --out "$OUT/tune" 2>&1 \
    | strip > "$OUT/tune.txt"
  echo "done in $((SECONDS - start)) s" >> "$OUT/versions.txt"
  exit 0
fi

TRITON_INTERPRET=0 timeout 240 python -m pytest -q -p no:cacheprovider tests/gpu \
  tests/test_launch.py 2>&1 | strip | tail -40 > "$OUT/gpu-tests.txt"

TRITON_INTERPRET=0 timeout 200 python -m tritonclip.bench --quick --out "$OUT/quick" 2>&1 \
  | strip > "$OUT/quick-bf16.txt"

# The whole training step (issue 15's target: the overlapped clip within 1.02x of no clip).
TRITON_INTERPRET=0 timeout 150 python -m tritonclip.bench.train_step --model gpt2,llama-1b \
  --out "$OUT/train" 2>&1 | strip > "$OUT/train-step.txt"

if [ $((SECONDS - start)) -lt 330 ]; then
  TRITON_INTERPRET=0 timeout $((560 - (SECONDS - start))) python -m tritonclip.bench \
    --cases one-tensor,many-small --dtype fp16 --ops active,inactive,value,amp --no-compile \
    --out "$OUT/fp16" 2>&1 | strip > "$OUT/fp16-sweep.txt"
fi
# Plots are redrawn from results.json where the files land (tritonclip.bench.plot): at most
# eight files come back from a lent machine.
rm -f "$OUT"/quick/*.png "$OUT"/fp16/*.png
echo "done in $((SECONDS - start)) s" >> "$OUT/versions.txt"
