#!/usr/bin/env bash
# The one-GPU check (issue 13), about 8 minutes on one GPU; results go to benchmarks/results/
# (or --out DIR) under the tag gpu-<device name>:
#   1. cifar10-c1 @16 training step: s/step and max_memory_allocated in fp32, TF32 and bf16, each
#      with torch.compile off and on;
#   2. memory: cifar10-c1 @16 vs cifar10-vdvae @32 (paper: 8 GB vs 32 GB), without and with
#      activation checkpointing;
#   3. a 300-step `vdvl train` run of cifar10-c1 on a CIFAR-shaped data set (scikit-learn's digits
#      scaled to 32x32 RGB, made here, nothing downloaded) that must lower the loss and skip nothing;
#   4. encode images/s on that run (benchmarks/encode.py).
# `--dry-run` runs the same stages on the CPU at tiny sizes in seconds (the test suite does, so
# the script cannot rot) and writes under the tag dry-run, into --out DIR or a new temporary
# folder: never into benchmarks/results/, which holds real runs only.
#
#   benchmarks/gpu_check.sh              # on a GPU machine
#   benchmarks/gpu_check.sh --dry-run --out /tmp/check
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"
RESULTS="$ROOT/benchmarks/results"
OUT=""
DRY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUT="$2"; shift ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1' (use --dry-run, --out DIR)." >&2; exit 2 ;;
  esac
  shift
done
if [ "$DRY" = 1 ]; then
  if [ -z "$OUT" ]; then
    OUT="$(mktemp -d "${TMPDIR:-/tmp}/vdvl-gpu-check-dry-run.XXXXXX")"
  elif [ "$(cd "$(dirname "$OUT")" 2>/dev/null && pwd)/$(basename "$OUT")" = "$RESULTS" ]; then
    echo "gpu_check.sh: a dry run does not write into benchmarks/results/ (real runs only); give another --out." >&2
    exit 2
  fi
  echo "gpu_check.sh: dry run; results go to $OUT" >&2
fi
OUT="${OUT:-$RESULTS}"
mkdir -p "$OUT"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
START=$SECONDS

if [ "$DRY" = 1 ]; then
  SMALL=tiny; BIG=digits-cpu; B_SMALL=8; B_BIG=4; STEPS=1; WARMUP=1; TRAIN_STEPS=20; LOG_EVERY=5; VAL_LIMIT=64
  DEVICE=cpu; TAG=dry-run
  DATA=digits; PRECISIONS="fp32"; COMPILE="false"; SMOKE=(--in-process); ENCODE=(--formats zarr --dtypes float16)
else
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || { echo "gpu_check.sh: no CUDA device is available (use --dry-run on a CPU)." >&2; exit 2; }
  SMALL=cifar10-c1; BIG=cifar10-vdvae; B_SMALL=16; B_BIG=32; STEPS=10; WARMUP=3; TRAIN_STEPS=300; LOG_EVERY=10
  VAL_LIMIT=256; DEVICE=cuda
  TAG="gpu-$("$PY" -c "import torch, re; print(re.sub('[^A-Za-z0-9]+', '-', torch.cuda.get_device_name(0)).strip('-'))")"
  DATA="$WORK/digits32.npz"; PRECISIONS="fp32 tf32 bf16"; COMPILE="false true"; SMOKE=(); ENCODE=()
  "$PY" - "$DATA" <<'EOF'
import sys
import numpy as np
from sklearn.datasets import load_digits
d = load_digits()
rng = np.random.default_rng(0)
grey = np.kron(d.images / 16.0, np.ones((4, 4)))                        # 8x8 -> 32x32
tint = rng.uniform(0.4, 1.0, (len(grey), 1, 1, 3))                      # a colour per image
images = np.clip(grey[..., None] * tint * 255 + rng.normal(0, 4, grey.shape + (3,)), 0, 255).astype(np.uint8)
np.savez(sys.argv[1], images=images, labels=d.target)
EOF
fi

# 1. speed and memory of the training step per precision, compile off/on
CASES=()
for p in $PRECISIONS; do
  case "$p" in
    fp32) SETS="train.bf16=false,train.tf32=false" ;;
    tf32) SETS="train.bf16=false,train.tf32=true" ;;
    bf16) SETS="train.bf16=true" ;;
  esac
  for c in $COMPILE; do CASES+=("$SMALL:$B_SMALL:$SETS,train.compile=$c,train.device=$DEVICE"); done
done
"$PY" "$ROOT/benchmarks/train_step.py" --cases "${CASES[@]}" --steps "$STEPS" --warmup "$WARMUP" \
  --results "$OUT" --tag "$TAG-speed" --note "gpu_check.sh stage 1" ${SMOKE[@]+"${SMOKE[@]}"}

# 2. memory: the paper's comparison, without and with activation checkpointing
CASES=()
for ck in false true; do
  CASES+=("$SMALL:$B_SMALL:train.checkpoint_activations=$ck,train.device=$DEVICE")
  CASES+=("$BIG:$B_BIG:train.checkpoint_activations=$ck,train.device=$DEVICE")
done
"$PY" "$ROOT/benchmarks/train_step.py" --cases "${CASES[@]}" --steps "$STEPS" --warmup 1 \
  --results "$OUT" --tag "$TAG-memory" --note "gpu_check.sh stage 2 (paper, Table 3: 8 GB vs 32 GB)" \
  ${SMOKE[@]+"${SMOKE[@]}"}

# 3. a short real training run: the loss must fall and nothing may be skipped
"$PY" -m vdvae_latents train --preset "$SMALL" --data "$DATA" --run-dir "$WORK/run" --steps "$TRAIN_STEPS" \
  --device "$DEVICE" --set train.log_every="$LOG_EVERY" --set train.val_limit="$VAL_LIMIT" --set train.checkpoint_every=100000 --quiet
"$PY" - "$WORK/run/metrics.jsonl" "$OUT/gpu_check-$TAG-train.json" "$SMALL" "$TRAIN_STEPS" <<'EOF'
import json, sys
lines = [json.loads(x) for x in open(sys.argv[1])]
train = [m for m in lines if "loss" in m]
val = [m["validation"] for m in lines if "validation" in m]
first, last = train[0]["loss"], min(m["loss"] for m in train[-3:])
result = {"preset": sys.argv[3], "steps": int(sys.argv[4]), "first_logged_loss": first, "last_logged_loss": last,
          "skips": train[-1]["skips"], "images_per_s": train[-1]["images_per_s"],
          "validation_bits_per_dim": val[-1]["bits_per_dim"] if val else None}
result["passed"] = last < first and result["skips"] == 0
json.dump(result, open(sys.argv[2], "w"), indent=2)
print(json.dumps(result))
sys.exit(0 if result["passed"] else 1)
EOF

# 4. encoding throughput on the trained run
"$PY" "$ROOT/benchmarks/encode.py" --ckpt "$WORK/run" --data "$DATA" --split test --repeats 1 \
  --results "$OUT" --tag "$TAG" ${ENCODE[@]+"${ENCODE[@]}"}

echo "gpu_check.sh: done in $((SECONDS - START)) s; results in $OUT (tag $TAG)"
