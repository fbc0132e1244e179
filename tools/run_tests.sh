#!/usr/bin/env bash
# The project's test command (README; .ci/run runs exactly this):
#   bash tools/run_tests.sh [pytest args...]
# 1. system packages (apt: munge, Slurm, python3-venv) via tools/install_system.sh
# 2. the venv (.venv, pip -c constraints.txt -e '.[test,mpich]') via tools/setup_env.sh
# 3. the whole pytest suite with a per-test timeout; pytest's exit code is passed through.
# The Slurm/Ray tests start a private cluster under .cluster/ (tools/cluster) and stop it at the
# end; here a missing Slurm is a failure, not a skip (PEAKNET_REQUIRE_CLUSTER=1).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

t0=$SECONDS
if ! bash tools/install_system.sh; then
    echo "run_tests.sh: tools/install_system.sh FAILED: Slurm/munge/python3-venv are not installed" >&2
    exit 1
fi
t1=$SECONDS
if ! bash tools/setup_env.sh; then
    echo "run_tests.sh: tools/setup_env.sh FAILED: no usable .venv" >&2
    exit 1
fi
t2=$SECONDS
echo "run_tests.sh: system packages $((t1 - t0)) s, venv $((t2 - t1)) s; running pytest" >&2

export PEAKNET_REQUIRE_CLUSTER="${PEAKNET_REQUIRE_CLUSTER:-1}"
export PEAKNET_REQUIRE_REAL_DATA="${PEAKNET_REQUIRE_REAL_DATA:-1}" # shared/data/real beside the checkout
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 # loopback Ray head (see tools/cluster/ray_up.sh)
export RAY_USAGE_STATS_ENABLED=0
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" # no network: fail at once instead of retrying
exec "${PEAKNET_VENV:-$REPO/.venv}/bin/python" -m pytest -q --timeout="${PEAKNET_TEST_TIMEOUT:-600}" "$@"
