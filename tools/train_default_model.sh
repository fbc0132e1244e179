#!/usr/bin/env bash
# Reproduce the shipped default model peaknet/data/models/peaknet-small-cpu.safetensors (+ its
# card peaknet-small-cpu.json) from scratch on a CPU:
#   1. simulate the data with fixed seeds: training (a mix of a thermolysin-like CSPAD,
#      Epix10ka2M and Jungfrau 4M, mostly hits), a small threshold-tuning set and held-out frames
#      (other seeds);
#   2. train the small-cpu preset on per-panel 128 x 128 windows
#      (peaknet/data/configs/pretrain-default-model.toml, 1 process, 2 torch threads), then
#      fine-tune it (phase 2: a new cosine cycle at a quarter of the learning rate, 5000 more
#      steps of batch 8, on phase 1's frames plus as many fresh ones, seeds 14-16);
#   3. export: float16 safetensors (float32 would exceed 8 MB), decode threshold tuned on the
#      tuning set, card;
#   4. evaluate on the held-out generated frames and the 4 real thermolysin CSPAD frames, next to
#      peakfinder8 (preset lcls_cspad).
#
#   tools/train_default_model.sh [WORK_DIR]      (default runs/default-model; ~65 min on 2 idle cores)
#
# Environment: PYTHON (default python), PEAKNET_THREADS (torch threads, default 2), SKIP_SIM=1
# reuses simulated data, START_PHASE=N starts training at phase N (the earlier phases' weights
# must exist), REAL_DIR (default ../shared/data/real/thermolysin_cspad, else
# shared/data/real/thermolysin_cspad).
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-runs/default-model}
PY=${PYTHON:-python}
THREADS=${PEAKNET_THREADS:-2}
REAL=${REAL_DIR:-}
if [[ -z "$REAL" ]]; then
  for d in ../shared/data/real/thermolysin_cspad shared/data/real/thermolysin_cspad; do
    [[ -d "$d" ]] && REAL=$d && break
  done
fi
mkdir -p "$W"
sim() {  # sim OUT SEED FRAMES DETECTOR-ARGS...
  local out=$1 seed=$2 frames=$3; shift 3
  $PY -m peaknet.cli simulate "$@" --frames "$frames" --seed "$seed" --out "$out" \
      --run.progress=false --run.overwrite=true
}
CSPAD=(--config peaknet/data/configs/simulate-thermolysin-cspad.toml)
EPIX=(--detector epix10ka2m --crystal.hit_fraction=0.9)
JF=(--detector jungfrau4m --crystal.hit_fraction=0.9)

if [[ "${SKIP_SIM:-0}" != 1 ]]; then
  sim "$W/sim/cspad" 11 240 "${CSPAD[@]}";   sim "$W/sim/epix" 12 160 "${EPIX[@]}"
  sim "$W/sim/jungfrau" 13 160 "${JF[@]}"                              # training
  sim "$W/heldout/cspad" 21 8 "${CSPAD[@]}"; sim "$W/heldout/epix" 22 8 "${EPIX[@]}"
  sim "$W/heldout/jungfrau" 23 8 "${JF[@]}"                           # held out (reported)
  sim "$W/tune/cspad" 31 2 "${CSPAD[@]}";    sim "$W/tune/epix" 32 2 "${EPIX[@]}"
  sim "$W/tune/jungfrau" 33 2 "${JF[@]}"                              # decode-threshold tuning
  sim "$W/sim2/cspad" 14 240 "${CSPAD[@]}";  sim "$W/sim2/epix" 15 160 "${EPIX[@]}"
  sim "$W/sim2/jungfrau" 16 160 "${JF[@]}"                             # phase-2 fresh frames
fi

# --- training: phase 1 from scratch, phase 2 fine-tunes phase 1's weights ---
START=${START_PHASE:-1}
train() {  # train PHASE OUT DATA-GLOBS-JSON [overrides...]
  local phase=$1 out=$2 data=$3; shift 3
  if (( phase >= START )); then
    $PY -m peaknet.cli train --config peaknet/data/configs/pretrain-default-model.toml \
        --run.out="$out" --run.threads="$THREADS" --data.train="$data" "$@"
  fi
}
G1="\"$W/sim/*/shard_*.cxi\"" G2="\"$W/sim2/*/shard_*.cxi\""
train 1 "$W/train" "[$G1]"
train 2 "$W/train2" "[$G1, $G2]" --model.weights="$W/train/model.safetensors" \
    --optim.lr=5e-4 --optim.warmup_steps=100 --run.steps=5000
LAST="$W/train2"

# --- export: float16 safetensors + card, threshold tuned on the tuning set ---
if [[ -f "$LAST/model.safetensors" ]]; then
  SRC=(--weights "$LAST/model.safetensors")
else  # stopped by run.time_limit_min before the last step: the latest checkpoint
  SRC=(--checkpoint "$LAST/checkpoints/$(cat "$LAST/checkpoints/latest")")
fi
$PY -m peaknet.models export "${SRC[@]}" --threads "$THREADS" \
    --heldout "$W/tune/*/shard_*.cxi" --out peaknet/data/models/peaknet-small-cpu.safetensors

# --- evaluate: held-out generated frames and the real frames, model vs peakfinder8 ---
EV=($PY -m peaknet.evaluate --run.threads="$THREADS")
"${EV[@]}" --predictor model --weights default --shards "$W/heldout/*/shard_*.cxi" \
    --out "$W/eval/model-generated"
"${EV[@]}" --predictor peakfinder8 --preset lcls_cspad --shards "$W/heldout/*/shard_*.cxi" \
    --out "$W/eval/pf8-generated"
if [[ -n "$REAL" ]]; then
  "${EV[@]}" --predictor model --weights default --cbf "$REAL/*.cbf" --out "$W/eval/model-real"
  "${EV[@]}" --predictor peakfinder8 --preset lcls_cspad --cbf "$REAL/*.cbf" --out "$W/eval/pf8-real"
  for t in 0.5 0.4 0.3; do  # decode-threshold sensitivity on the real frames (not used for tuning)
    "${EV[@]}" --predictor model --weights default --threshold "$t" --cbf "$REAL/*.cbf" \
        --out "$W/eval-sensitivity/model-real-thr$t"
  done
fi

# --- the figures into the card (peaknet/data/models/peaknet-small-cpu.json) ---
$PY -m peaknet.models add-metrics "$W"/eval/*/ $(ls -d "$W"/eval-sensitivity/*/ 2>/dev/null || true)

# --- the default-model section of docs/benchmarks.md, from the card ---
$PY tools/bench/report_default_model.py --work "$W" --write-docs
