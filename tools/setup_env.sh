#!/usr/bin/env bash
# Create the project venv (<repo>/.venv, or $PEAKNET_VENV) if missing and install peaknet into it:
#   pip install -c constraints.txt -e '.[test,mpich]'
# Idempotent and fast: skipped when the stamp in the venv matches the hash of pyproject.toml,
# constraints.txt, the repo path and the interpreter. Quiet on success; prints pip's log on failure.
# Environment: PYTHON (interpreter for a new venv, default python3), PEAKNET_VENV,
#              PEAKNET_SETUP_FORCE=1 (install even if the stamp matches).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PEAKNET_VENV:-$REPO/.venv}"
PY="${PYTHON:-python3}"
STAMP="$VENV/.peaknet-setup.stamp"
cd "$REPO"

hash="$( (cat pyproject.toml constraints.txt; echo "$REPO"; echo "$VENV") | sha256sum | cut -d' ' -f1)"
if [ "${PEAKNET_SETUP_FORCE:-0}" != 1 ] && [ -x "$VENV/bin/python" ] && [ -f "$STAMP" ] &&
    [ "$(cat "$STAMP")" = "$hash" ]; then
    exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
    command -v "$PY" >/dev/null 2>&1 || { echo "setup_env.sh: $PY not found" >&2; exit 1; }
    if ! "$PY" -m venv "$VENV" >/tmp/peaknet-venv.$$.log 2>&1; then
        echo "setup_env.sh: '$PY -m venv $VENV' failed (python3-venv missing? run tools/install_system.sh):" >&2
        cat /tmp/peaknet-venv.$$.log >&2
        rm -f /tmp/peaknet-venv.$$.log
        exit 1
    fi
    rm -f /tmp/peaknet-venv.$$.log
fi

log="$VENV/pip-install.log"
rm -f "$STAMP"
if ! "$VENV/bin/python" -m pip install --disable-pip-version-check -q \
    -c constraints.txt -e '.[test,mpich]' >"$log" 2>&1; then
    echo "setup_env.sh: pip install -c constraints.txt -e '.[test,mpich]' FAILED; last lines of $log:" >&2
    tail -n 60 "$log" >&2
    exit 1
fi
if ! "$VENV/bin/python" -c 'import peaknet, mpi4py, ray, submitit, pytest, pytest_timeout' >>"$log" 2>&1; then
    echo "setup_env.sh: the venv does not import the project's packages; $log:" >&2
    tail -n 30 "$log" >&2
    exit 1
fi
echo "$hash" >"$STAMP"
