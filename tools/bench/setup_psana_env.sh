#!/usr/bin/env bash
# Build the benchmark-only environment with psana's peakfinder8 (PyPI psana 4.3.4, a cp311
# wheel of LCLS-II psana2), kept OUT of peaknet's own dependencies.
#
#   tools/bench/setup_psana_env.sh [VENV_DIR]      (default: .bench-venv in the repo root)
#
# psana's declared dependencies are installed except lcls-krtc, which does not build here (needs
# libkrb5-dev): psana goes in with --no-deps, then its runtime packages, then a stub `krtc`
# module (psana imports krtc.KerberosTicket at start-up; peakfinder8 never uses it). `import
# psana` loads mpi4py, which needs an MPI library: PyPI mpich provides it. Torch pins come from
# constraints.txt as on every pip call. Takes ~20 s with a warm pip cache.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${1:-$ROOT/.bench-venv}"
PY="${PYTHON:-python3}"

if ! "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    echo "setup_psana_env: psana 4.3.4 ships only a cp311 wheel; set PYTHON to a Python 3.11" >&2
    exit 1
fi

"$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -c "$ROOT/constraints.txt")
"${PIP[@]}" --no-deps "psana==4.3.4"
"${PIP[@]}" amityping h5py kafka-python matplotlib mpi4py mpich numpy prometheus-client psutil \
    pymongo pyzmq requests scipy

SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
if ! "$VENV/bin/python" -c 'from krtc import KerberosTicket' 2>/dev/null; then
    cat > "$SITE/krtc.py" <<'STUB'
"""Stand-in for lcls-krtc (Kerberos tickets for the LCLS calibration database).

psana imports ``krtc.KerberosTicket`` at start-up; peakfinder8 never uses it.
"""


class KerberosTicket:
    def __init__(self, *args, **kwargs):
        raise RuntimeError("krtc stub: Kerberos is not available in the benchmark environment")
STUB
fi

"$VENV/bin/python" - <<'PY'
import numpy as np
from psana.peakfinder8 import peakfinder_8

data = np.zeros((4, 8), np.float32)
out = peakfinder_8(10, data, np.ones_like(data, np.int8), np.ones_like(data), 8, 4, 1, 1,
                   100.0, 6.0, 2, 200, 4)
print("psana peakfinder_8 importable; empty frame ->", len(out[0]), "peaks")
PY
echo "psana benchmark environment ready: $VENV"
