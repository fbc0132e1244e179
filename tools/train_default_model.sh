#!/usr/bin/env bash
# Reproduce the shipped default model peaknet/data/models/peaknet-small-cpu.safetensors (+ its
# card peaknet-small-cpu.json) from scratch on a CPU:
#   1. simulate the data with fixed seeds: training (a mix of a thermolysin-like CSPAD,
#      Epix10ka2M and Jungfrau 4M, mostly hits), a small threshold-tuning set and held-out frames
#      (other seeds);
#   2. train the small-cpu preset on per-panel 128 x 128 windows
#      (peaknet/data/configs/pretrain-default-model.toml, 1 process, 2 torch threads);
#   3. export: float16 safetensors (float32 would exceed 8 MB), decode threshold tuned on the
#      tuning set, card;
#   4. evaluate on the held-out generated frames and the 4 real thermolysin CSPAD frames, next to
#      peakfinder8 (preset lcls_cspad).
#
#   tools/train_default_model.sh [WORK_DIR]      (default runs/default-model; ~45 min on 2 cores)
#
# Environment: PYTHON (default python), PEAKNET_THREADS (torch threads, default 2), SKIP_SIM=1
# reuses simulated data, REAL_DIR (default ../shared/data/real/thermolysin_cspad, else
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
  sim "$W/sim/cspad" 11 80 "${CSPAD[@]}";    sim "$W/sim/epix" 12 60 "${EPIX[@]}"
  sim "$W/sim/jungfrau" 13 60 "${JF[@]}"                              # training
  sim "$W/heldout/cspad" 21 8 "${CSPAD[@]}"; sim "$W/heldout/epix" 22 8 "${EPIX[@]}"
  sim "$W/heldout/jungfrau" 23 8 "${JF[@]}"                           # held out (reported)
  sim "$W/tune/cspad" 31 2 "${CSPAD[@]}";    sim "$W/tune/epix" 32 2 "${EPIX[@]}"
  sim "$W/tune/jungfrau" 33 2 "${JF[@]}"                              # decode-threshold tuning
fi

# --- train (1 process) ---
$PY -m peaknet.cli train --config peaknet/data/configs/pretrain-default-model.toml \
    --run.out="$W/train" --run.threads="$THREADS" \
    --data.train="[\"$W/sim/*/shard_*.cxi\"]"

# --- export: float16 safetensors + card, threshold tuned on the tuning set ---
if [[ -f "$W/train/model.safetensors" ]]; then
  SRC=(--weights "$W/train/model.safetensors")
else  # stopped by run.time_limit_min before the last step: the latest checkpoint
  SRC=(--checkpoint "$W/train/checkpoints/$(cat "$W/train/checkpoints/latest")")
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
  for t in 0.4 0.3; do  # decode-threshold sensitivity on the real frames (not used for tuning)
    "${EV[@]}" --predictor model --weights default --threshold "$t" --cbf "$REAL/*.cbf" \
        --out "$W/eval-sensitivity/model-real-thr$t"
  done
fi

# --- the figures into the card (peaknet/data/models/peaknet-small-cpu.json) ---
$PY -m peaknet.models add-metrics "$W"/eval/*/ $(ls -d "$W"/eval-sensitivity/*/ 2>/dev/null || true)
