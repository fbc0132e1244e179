#!/usr/bin/env bash
# Stop the Ray head started by ray_up.sh: SIGTERM to the kept pid of `ray start --block`
# (it stops its raylet, GCS and workers), SIGKILL to its process group after a grace period.
# Never `ray stop` (that kills every Ray on the machine by name). Idempotent; quiet on success.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

D="$PK_RAY"
pk_stop "$D/head.pid" ray 20
rm -f "$D/address" "$D/owner"
[ -d "$PK_ROOT" ] && [ -e "$PK_ROOT/env.sh" ] && pk_write_env
pk_alive "$D/head.pid" ray && pk_die "the Ray head is still running"
exit 0
