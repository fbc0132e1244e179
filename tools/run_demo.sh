#!/usr/bin/env bash
# The project's main job on its embedded default (README command 1):
#   bash tools/run_demo.sh [--frames N] [--detector cspad|epix10ka2m|jungfrau4m] [--out DIR] [--section.key=value ...]
# Installs the venv (tools/setup_env.sh: pip -c constraints.txt -e '.[test,mpich]') and runs
# `peaknet demo`: generated frames through every pipeline stage, summary in <out>/summary.json.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
bash tools/setup_env.sh
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
exec "${PEAKNET_VENV:-$REPO/.venv}/bin/peaknet" demo "$@"
