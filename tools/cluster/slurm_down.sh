#!/usr/bin/env bash
# Stop the private Slurm started by slurm_up.sh: slurmd, slurmctld, munged, each by the pid kept
# in $PEAKNET_SLURM_DIR/run (TERM, then KILL after a grace period). Never kills by name.
# Keeps configuration, state (job ids continue) and logs; `rm -rf .cluster/slurm` for a clean slate.
# Idempotent; quiet on success; exits 1 if a daemon survives.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

RUN="$PK_SLURM/run"
pk_stop "$RUN/slurmd.pid" slurmd 15
pk_stop "$RUN/slurmctld.pid" slurmctld 15
pk_stop "$RUN/munged.pid" munged 10
rm -f "$RUN/owner" "$RUN"/*.daemon.pid 2>/dev/null || true

left=()
for n in slurmd slurmctld munged; do
    pk_alive "$RUN/$n.pid" "$n" && left+=("$n")
done
[ ${#left[@]} -eq 0 ] || pk_die "still running: ${left[*]}"
