#!/usr/bin/env bash
# Install the system packages peaknet's tests and tools need (Debian/Ubuntu, apt):
#   munge slurmctld slurmd slurm-client  -> a private single-node Slurm (tools/cluster/)
#   python3-venv                          -> `python3 -m venv` for tools/setup_env.sh
# Idempotent: packages already installed are not touched and `apt-get update` is skipped.
# Quiet on success; on failure prints apt's output and exits non-zero.
# Starts no services (tools/cluster/slurm_up.sh starts private daemons by hand).
set -euo pipefail

PKGS=(munge slurmctld slurmd slurm-client python3-venv ca-certificates procps)

missing=()
for p in "${PKGS[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$p")
    fi
done
[ ${#missing[@]} -eq 0 ] && exit 0

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_system.sh: apt-get not found; install by hand: ${missing[*]}" >&2
    exit 1
fi
SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO=(sudo -n); else
        echo "install_system.sh: not root and no sudo; install by hand: ${missing[*]}" >&2
        exit 1
    fi
fi

log=$(mktemp "${TMPDIR:-/tmp}/install_system.XXXXXX.log")
# policy-rc.d: apt must start no daemons (where systemd runs, it would start munge/slurmd with
# /etc configs); our private daemons are started by tools/cluster/slurm_up.sh.
policy=/usr/sbin/policy-rc.d
made_policy=0
cleanup() {
    rm -f "$log"
    [ $made_policy -eq 0 ] || "${SUDO[@]}" rm -f "$policy"
}
trap cleanup EXIT
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee "$policy" >/dev/null && "${SUDO[@]}" chmod 755 "$policy" && made_policy=1
fi
export DEBIAN_FRONTEND=noninteractive
run() {
    if ! "${SUDO[@]}" "$@" >>"$log" 2>&1; then
        echo "install_system.sh: FAILED: $*" >&2
        tail -n 60 "$log" >&2
        exit 1
    fi
}
run apt-get update -qq
run env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "${missing[@]}"

for b in munged mungekey slurmctld slurmd sbatch srun scontrol sinfo; do
    if ! command -v "$b" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$b" ]; then
        echo "install_system.sh: '$b' still missing after apt-get install" >&2
        exit 1
    fi
done
