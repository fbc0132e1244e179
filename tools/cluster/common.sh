# Shared helpers for tools/cluster/*.sh (sourced, not run).
#
# Layout (everything private, nothing under /etc, /run, /var, ~):
#   $PEAKNET_CLUSTER_DIR            default <repo>/.cluster
#     env.sh                        source it: SLURM_CONF, PATH, RAY_ADDRESS
#     bin/sacct                     sacct stand-in (answers from `scontrol show job -o`)
#     slurm/  ($PEAKNET_SLURM_DIR)  slurm.conf, munge/, state/, spool/, log/, run/*.pid, jobs/
#     ray/    ($PEAKNET_RAY_DIR)    head.pid, address, log/, home/, tmp -> Ray's --temp-dir
# Daemons are started with setsid (own session, survive the caller's Ctrl-C), their pids kept
# in run/*.pid and stopped by pid only.

_PK_HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PK_REPO="$(cd "$_PK_HERE/../.." && pwd)"
PK_ROOT="${PEAKNET_CLUSTER_DIR:-$PK_REPO/.cluster}"
mkdir -p "$PK_ROOT"
PK_ROOT="$(cd "$PK_ROOT" && pwd)"
PK_SLURM="${PEAKNET_SLURM_DIR:-$PK_ROOT/slurm}"
PK_RAY="${PEAKNET_RAY_DIR:-$PK_ROOT/ray}"
PK_BIN="$PK_ROOT/bin"
PK_VENV="${PEAKNET_VENV:-$PK_REPO/.venv}"
PK_TIMEOUT="${PEAKNET_CLUSTER_TIMEOUT:-60}"

for _d in /usr/sbin /sbin /usr/local/sbin; do
    case ":$PATH:" in *":$_d:"*) ;; *) [ -d "$_d" ] && PATH="$PATH:$_d" ;; esac
done
export PATH

pk_die() { echo "$(basename "$0"): $*" >&2; exit 1; }

# pk_alive PIDFILE NAME: the pid in PIDFILE is alive and its command line mentions NAME
# (guards against a recycled pid after a reboot or a crash).
pk_alive() {
    local pidfile=$1 name=$2 pid
    [ -s "$pidfile" ] || return 1
    pid=$(cat "$pidfile" 2>/dev/null) || return 1
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    [ -r "/proc/$pid/cmdline" ] || return 1
    # zombies (not yet reaped by their parent) count as dead
    [ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != "Z" ] || return 1
    { tr '\0' ' ' <"/proc/$pid/cmdline"; } 2>/dev/null | grep -q -- "$name"
}

# pk_stop PIDFILE NAME [GRACE_S]: TERM the pid (and its process group, which setsid made its own),
# wait, then KILL. Only ever signals the pid from PIDFILE and its own process group.
pk_stop() {
    local pidfile=$1 name=$2 grace=${3:-15} pid i
    if pk_alive "$pidfile" "$name"; then
        pid=$(cat "$pidfile")
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < grace * 10; i++)); do
            pk_alive "$pidfile" "$name" || break
            sleep 0.1
        done
        if pk_alive "$pidfile" "$name"; then
            echo "$(basename "$0"): $name (pid $pid) ignored SIGTERM for ${grace}s; SIGKILL" >&2
            kill -KILL "$pid" 2>/dev/null || true
            sleep 0.2
        fi
        # leftovers in the daemon's own session/process group (pk_spawn's setsid made
        # sid == pgid == pid; children that made their own group keep the session id)
        kill -KILL -- "-$pid" 2>/dev/null || true
        local left
        left=$(ps -e -o pid=,sid= 2>/dev/null | awk -v s="$pid" '$2 == s && $1 != s {print $1}')
        [ -z "$left" ] || kill -KILL $left 2>/dev/null || true
    fi
    rm -f "$pidfile"
}

# pk_spawn PIDFILE LOGFILE CMD...: start CMD in its own session in the background, keep its pid.
pk_spawn() {
    local pidfile=$1 log=$2
    shift 2
    setsid "$@" >>"$log" 2>&1 </dev/null &
    echo $! >"$pidfile"
}

# pk_wait TIMEOUT_S DESCRIPTION PIDFILE NAME CMD...: poll CMD every 0.2 s until it succeeds;
# give up at once when the process of PIDFILE/NAME has died (PIDFILE "-": no such check).
pk_wait() {
    local timeout=$1 what=$2 pidfile=$3 name=$4 i
    shift 4
    for ((i = 0; i < timeout * 5; i++)); do
        "$@" >/dev/null 2>&1 && return 0
        if [ "$pidfile" != - ] && ! pk_alive "$pidfile" "$name"; then
            echo "$(basename "$0"): $name exited while waiting for $what" >&2
            return 1
        fi
        sleep 0.2
    done
    echo "$(basename "$0"): timed out after ${timeout}s waiting for $what" >&2
    return 1
}

# pk_show_logs FILE...: print the tail of each log (on failure).
pk_show_logs() {
    local f
    for f in "$@"; do
        [ -e "$f" ] || continue
        echo "----- $f (last 40 lines) -----" >&2
        tail -n 40 "$f" >&2
    done
}

# pk_port_busy PORT: something listens on 127.0.0.1:PORT.
pk_port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# pk_pick_ports SEED N: print the first base port B (B..B+N-1 all free) from a deterministic,
# path-derived start, so that two checkouts on one machine get different ports.
pk_pick_ports() {
    local seed=$1 n=$2 base try k busy
    base=$((20000 + ($(printf '%s' "$seed" | cksum | cut -d' ' -f1) % 2000) * 8))
    for ((try = 0; try < 50; try++)); do
        busy=0
        for ((k = 0; k < n; k++)); do
            if pk_port_busy $((base + k)); then busy=1; break; fi
        done
        [ $busy -eq 0 ] && { echo "$base"; return 0; }
        base=$((base + 8))
        [ $base -gt 36000 ] && base=20000
    done
    return 1
}

# pk_write_env: (re)write $PK_ROOT/env.sh and the sacct stand-in. env.sh reads the Ray address at
# source time, so one file serves Slurm and Ray.
pk_write_env() {
    mkdir -p "$PK_BIN"
    install -m 755 "$_PK_HERE/sacct" "$PK_BIN/sacct.tmp.$$" && mv -f "$PK_BIN/sacct.tmp.$$" "$PK_BIN/sacct"
    local tmp="$PK_ROOT/env.sh.tmp.$$"
    cat >"$tmp" <<EOF
# Generated by tools/cluster; source it:  source $PK_ROOT/env.sh
# Points Slurm clients (sbatch, srun, squeue, submitit) at the private cluster, puts the sacct
# stand-in and the project venv first on PATH, and exports the loopback Ray head's address.
export PEAKNET_CLUSTER_DIR="$PK_ROOT"
export SLURM_CONF="$PK_SLURM/slurm.conf"
case ":\$PATH:" in *":$PK_VENV/bin:"*) ;; *) [ -d "$PK_VENV/bin" ] && export PATH="$PK_VENV/bin:\$PATH" ;; esac
case ":\$PATH:" in *":$PK_BIN:"*) ;; *) export PATH="$PK_BIN:\$PATH" ;; esac
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
if [ -s "$PK_RAY/address" ]; then export RAY_ADDRESS="\$(cat "$PK_RAY/address")"; else unset RAY_ADDRESS; fi
EOF
    mv -f "$tmp" "$PK_ROOT/env.sh"
}
