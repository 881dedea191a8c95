#!/usr/bin/env bash
# Memory of mtls-sidecar (issue 18): the RSS of a fresh `run` process and what it is made of, and
# the memory each idle connection costs, outbound and inbound (tcp mode). The gate for "a fresh
# process takes at most 5 MiB" (a timed, machine-dependent check, so not a test of the suite).
#
#   bench/memory.sh [BINARY] [CONNS]
#       BINARY defaults to target/release/mtls-sidecar; CONNS (idle connections held) to 1000.
#
# Env: REPS (default 3; medians are reported), WHAT (default fresh,idle), LIMIT_KIB (default 5120:
# the exit code is 1 when the median fresh RSS of the plain outbound route is above it),
# KEEP=1 keeps the work folder.
#
# Fresh process: `run` with an outbound route (`--ca`; with and without `--admin`; with the
# system trust store instead; http mode) and an inbound route, each started REPS times; RSS is
# read from /proc/PID/smaps_rollup once the `listening` line is out and RSS stopped moving, and
# split by mapping from /proc/PID/smaps: the binary's code and read-only data (file-backed),
# its relocated data, shared libraries, the brk heap, thread stacks, other anonymous mappings
# (malloc's per-thread arenas), the main stack. Threads are listed from /proc/PID/task.
#
# Idle connections: a chain app -> outbound route -> inbound route -> a plaintext echo sink (all
# this binary, on 127.0.0.1, dev PKI from `BINARY dev-pki`), warmed by three echoes; CONNS
# connections are opened in batches of 200 and held, each until its sink connection is
# established; per connection = (memory with them - memory before) / CONNS, for each route.
# Needs Python 3 (standard library). Every process started here is stopped by pid.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
BIN=$(realpath "${1:-target/release/mtls-sidecar}")
CONNS=${2:-1000}
REPS=${REPS:-3}
WHAT=${WHAT:-fresh,idle}
LIMIT_KIB=${LIMIT_KIB:-5120}
PY=${PYTHON:-python3}
export PYTHONDONTWRITEBYTECODE=1   # leave no __pycache__ in bench/

[ -x "$BIN" ] || { echo "memory: $BIN is not executable (cargo build --release)" >&2; exit 2; }
need=$((2 * CONNS + 200))
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt "$need" ]; then
  ulimit -n "$need" 2>/dev/null || { echo "memory: need ulimit -n >= $need" >&2; exit 2; }
fi
W=$(mktemp -d /tmp/mtls-memory.XXXXXX)
cleanup() {
  if [ "${KEEP:-0}" = 1 ]; then echo "memory: work folder kept: $W" >&2; else rm -rf "$W"; fi
}
trap cleanup EXIT

echo "# mtls-sidecar memory: $(basename "$BIN"), $(date -u +%Y-%m-%dT%H:%M:%SZ)"
echo
echo "Binary: $BIN ($(stat -c %s "$BIN") bytes); $(uname -srm); $(nproc) CPUs; REPS=$REPS."
echo
"$PY" "$HERE/memory.py" "$BIN" --work "$W" --what "$WHAT" --reps "$REPS" --conns "$CONNS" \
  --limit-kib "$LIMIT_KIB"
