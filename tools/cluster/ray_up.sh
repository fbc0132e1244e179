#!/usr/bin/env bash
# Start a loopback-only Ray head in the background (`ray start --head --block`), pid kept.
#
#   bash tools/cluster/ray_up.sh && source .cluster/env.sh && python -c 'import ray; ray.init()'
#
# Binds 127.0.0.1 only (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, --node-ip-address=127.0.0.1);
# Ray's temp dir, HOME and logs are under $PEAKNET_RAY_DIR (default <repo>/.cluster/ray).
# The address (127.0.0.1:PORT) is written to $PEAKNET_RAY_DIR/address and exported by env.sh as
# RAY_ADDRESS; connect with ray.init(address=...) explicitly (address="auto" finds ANY Ray here).
# Idempotent: a running head (checked by pid) is kept. Quiet on success; prints logs on failure.
# Environment:
#   PEAKNET_RAY_CPUS          CPUs the head offers (default: nproc)
#   PEAKNET_RAY_OBJECT_STORE  object store bytes (default: Ray's choice)
#   PEAKNET_RAY_DASHBOARD=1   start the dashboard too (off by default: ~100 MB less)
#   PEAKNET_RAY              the `ray` executable (default: the project venv's)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

RAY="${PEAKNET_RAY:-$PK_VENV/bin/ray}"
[ -x "$RAY" ] || RAY="$(command -v ray || true)"
[ -n "$RAY" ] && [ -x "$RAY" ] || pk_die "ray not found (tools/setup_env.sh installs it into .venv)"

D="$PK_RAY"
mkdir -p "$D/log" "$D/home"
PIDF="$D/head.pid"
OUTF="$D/log/head.out"

fail() {
    echo "ray_up.sh: $*" >&2
    pk_show_logs "$OUTF" "$D"/tmp/session_latest/logs/raylet.err "$D"/tmp/session_latest/logs/gcs_server.err \
        "$D"/tmp/session_latest/logs/raylet.out "$D"/tmp/session_latest/logs/gcs_server.out
    exit 1
}

if pk_alive "$PIDF" "ray" && [ -s "$D/address" ]; then
    pk_write_env
    exit 0
fi
pk_stop "$PIDF" ray 10 # a half-dead head from before
rm -f "$D/address"

# Ray's unix sockets live under --temp-dir; AF_UNIX paths are limited to 107 bytes, so a long
# checkout path gets a short temp dir under /tmp (named after the folder) linked from $D/tmp.
tmpdir="$D/tmp"
if [ ${#tmpdir} -gt 48 ]; then
    tmpdir="/tmp/peaknet-ray-$(printf '%s' "$D" | cksum | cut -d' ' -f1)"
    mkdir -p "$tmpdir"
    ln -sfn "$tmpdir" "$D/tmp"
else
    [ -L "$tmpdir" ] && rm -f "$tmpdir"
    mkdir -p "$tmpdir"
fi

base=$(pk_pick_ports "$D/ray" 6) || fail "no free TCP ports for the Ray head"
args=(start --head --block
    --node-ip-address=127.0.0.1
    --port="$base"
    --ray-client-server-port=$((base + 1))
    --dashboard-agent-listen-port=$((base + 2))
    --dashboard-agent-grpc-port=$((base + 3))
    --metrics-export-port=$((base + 4))
    --runtime-env-agent-port=$((base + 5))
    --num-cpus="${PEAKNET_RAY_CPUS:-$(nproc)}"
    --temp-dir="$tmpdir"
    --disable-usage-stats)
if [ "${PEAKNET_RAY_DASHBOARD:-0}" = 1 ]; then
    args+=(--include-dashboard=true --dashboard-host=127.0.0.1)
else
    args+=(--include-dashboard=false)
fi
[ -n "${PEAKNET_RAY_OBJECT_STORE:-}" ] && args+=(--object-store-memory="$PEAKNET_RAY_OBJECT_STORE")

: >"$OUTF"
pk_spawn "$PIDF" "$OUTF" env HOME="$D/home" RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 \
    RAY_USAGE_STATS_ENABLED=0 "$RAY" "${args[@]}"

ready() {
    pk_alive "$PIDF" ray || return 2
    grep -q "Ray runtime started" "$OUTF"
}
for ((i = 0; i < PK_TIMEOUT * 5; i++)); do
    if ready; then break; fi
    pk_alive "$PIDF" ray || fail "ray start --head exited"
    sleep 0.2
done
ready || { pk_stop "$PIDF" ray 10; fail "timed out after ${PK_TIMEOUT}s waiting for the Ray head"; }

echo "127.0.0.1:$base" >"$D/address"
pk_write_env
