# Sourced by the peaknet sbatch templates (bash). Sets REPO, VENV, PY and ARGS, cds into REPO.
#   REPO: $PEAKNET_REPO, else the submit directory.   VENV: $PEAKNET_VENV, else $REPO/.venv.
#   $PEAKNET_SITE_ENV (optional): a file sourced first, for `module load ...` and site settings.
#   Arguments: a bare first argument is the config file; the rest are --section.key=value overrides.
REPO="${PEAKNET_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}"
VENV="${PEAKNET_VENV:-$REPO/.venv}"
if [ -n "${PEAKNET_SITE_ENV:-}" ]; then
    # shellcheck disable=SC1090
    source "$PEAKNET_SITE_ENV"
fi
PY="${PEAKNET_PYTHON:-$VENV/bin/python}"
[ -x "$PY" ] || { echo "peaknet sbatch: no python at $PY (set PEAKNET_VENV or PEAKNET_REPO)" >&2; exit 2; }
cd "$REPO"
ARGS=()
if [ $# -gt 0 ] && [[ "$1" != --* ]]; then
    ARGS+=(--config "$1")
    shift
fi
ARGS+=("$@")
export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"
export MKL_NUM_THREADS="$OMP_NUM_THREADS" NUMBA_NUM_THREADS="$OMP_NUM_THREADS"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
peaknet_banner() {
    echo "$1: job ${SLURM_JOB_ID:-?} on ${SLURM_JOB_NODELIST:-$(hostname)}, ${SLURM_NTASKS:-1} task(s) x ${OMP_NUM_THREADS} thread(s): $PY ${*:2}"
}
