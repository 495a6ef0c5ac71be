#!/usr/bin/env bash
# Fashion-MNIST end to end on a CPU: train -> KL analysis + pruning sweep -> encode the active 3%
# of train and test -> probe against baselines -> figures -> one HTML report. Needs the Debian package
# dataset-fashion-mnist (apt-get install dataset-fashion-mnist); nothing is downloaded.
#
#   bash examples/fashion_mnist.sh                 # OUT=fashion-out STEPS=5000 by default
#   STEPS=20000 OUT=/tmp/fm bash examples/fashion_mnist.sh
#   GRANULARITY=variate bash examples/fashion_mnist.sh   # the paper's unit: whole channels
#   PRESET=fashion-mnist-deep GRANULARITY=variate STEPS=6000 OUT=deep-out bash examples/fashion_mnist.sh
#                                                  # the polarized regime at the paper's unit (issue 19)
#
# GRANULARITY=element (the default here) ranks single latent scalars: fashion-mnist-cpu has
# only 96 variates, so 3% of variates is 3 channels, while 3% of its 20,400 scalars is 612.
# fashion-mnist-deep has 20 latent layers of 32 variates (640), so 3% of them is 19 channels.
# Every checkpoint the run keeps (one per CHECKPOINT_EVERY steps) is ranked again at the end by
# examples/polarization.py: how the per-variate KL polarizes over training.
#
# Re-running resumes the training run and reuses finished steps (encode is redone with --overwrite).
# The last step encodes the same active set as int8 (train_int8.zarr, test_int8.zarr) and probes the
# float16 and int8 stores with all 54,000 training rows, the float16 one against the raw pixels and
# random dimensions with all rows too (COMPACT=0 skips it).
set -euo pipefail
cd "$(dirname "$0")/.."
VDVL=${VDVL:-.venv/bin/vdvl}
PYTHON=${PYTHON:-.venv/bin/python}
OUT=${OUT:-fashion-out}
STEPS=${STEPS:-5000}
KEEP=${KEEP:-3%}
PRESET=${PRESET:-fashion-mnist-cpu}
CHECKPOINT_EVERY=${CHECKPOINT_EVERY:-1000}
GRANULARITY=${GRANULARITY:-element}
BASELINES=${BASELINES:-pixels,full,random,random-unpruned,pca}
mkdir -p "$OUT"
trap 'echo "interrupted"; exit 130' INT TERM
log() { echo "[$(date +%H:%M:%S)] $*"; }

log "train $PRESET for $STEPS steps"
/usr/bin/time -f "train: %e s wall" $VDVL train --preset "$PRESET" --data fashion-mnist \
    --run-dir "$OUT/run" --steps "$STEPS" --set train.log_every=200 --set train.checkpoint_every="$CHECKPOINT_EVERY" \
    --set train.keep_checkpoints=$(( STEPS / CHECKPOINT_EVERY + 1 ))
$VDVL eval "$OUT/run" --data fashion-mnist --split test --json > "$OUT/eval_test.json"

log "KL analysis on the train split, pruning sweep on the test split"
/usr/bin/time -f "analyze-kl: %e s wall" $VDVL analyze-kl "$OUT/run" --data fashion-mnist --split train \
    --granularity "$GRANULARITY" --keep "$KEEP" --out "$OUT/active.json" --plot "$OUT/kl.png" --sweep 2.5,3,4,5,7,100 --json > "$OUT/analyze.json"

log "encode the active set of train and test"
for split in train test; do
    $VDVL encode "$OUT/run" --data fashion-mnist --split $split --active "$OUT/active.json" \
        --out "$OUT/$split.zarr" --overwrite --json > "$OUT/encode_$split.json"
done
$VDVL decode "$OUT/test.zarr" --rows 0:32 --out "$OUT/decoded.png"
$VDVL reconstruct "$OUT/run" --data fashion-mnist --split test --n 32 --out "$OUT/reconstructions.png"
$VDVL sample "$OUT/run" --n 64 --temperature 0.9 --out "$OUT/samples.png"

log "probe: logistic regression on the active dims against $BASELINES"
/usr/bin/time -f "probe: %e s wall" $VDVL probe "$OUT/train.zarr" --test-store "$OUT/test.zarr" \
    --baselines "$BASELINES" --max-train "${MAX_TRAIN:-5000}" --seeds "${SEEDS:-2}" --plot "$OUT/probe.png" --json > "$OUT/probe.json"
if [ "${COMPACT:-1}" = 1 ]; then
    log "compact stores: int8, then both dtypes probed with every training row"
    for split in train test; do
        $VDVL encode "$OUT/run" --data fashion-mnist --split $split --active "$OUT/active.json" --dtype int8 \
            --out "$OUT/${split}_int8.zarr" --overwrite --json > "$OUT/encode_${split}_int8.json"
        $VDVL verify "$OUT/${split}_int8.zarr"
    done
    # With every training row: the float16 store against the raw pixels and random variates (or
    # scalars) of the same count, the int8 store alone.
    for store in train train_int8; do
        test_store=${store/train/test}
        if [ "$store" = train ]; then baselines=${BASELINES_ALL_ROWS:-pixels,random}; else baselines=none; fi
        /usr/bin/time -f "probe $store: %e s wall" $VDVL probe "$OUT/$store.zarr" --test-store "$OUT/$test_store.zarr" \
            --baselines "$baselines" --seeds "${SEEDS:-2}" --json > "$OUT/probe_all_rows_$store.json"
    done
fi
log "polarization over training: every kept checkpoint ranked at the $GRANULARITY unit"
"$PYTHON" examples/polarization.py "$OUT/run" --data fashion-mnist --split train --limit 2000 \
    --granularity "$GRANULARITY" --out "$OUT/polarization"
log "one page with all of it: $OUT/report.html"
stores=(--store "$OUT/train.zarr" --store "$OUT/test.zarr")
if [ "${COMPACT:-1}" = 1 ]; then
    stores+=(--store "$OUT/train_int8.zarr" --store "$OUT/test_int8.zarr")
fi
$VDVL report "$OUT/run" --active "$OUT/active.json" "${stores[@]}" --probe "$OUT/probe.json" --out "$OUT/report.html"
log "done in $SECONDS s: outputs in $OUT/"
