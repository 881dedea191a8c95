#!/usr/bin/env bash
# Soak test: long mixed load through one tcp route and one http route while identities rotate, the
# upstream restarts and slow clients come in bursts; samples the proxy's resources and checks every byte.
#
#   DURATION=1200 bench/soak.sh [BINARY] [OUT.md]
#       BINARY defaults to target/release/mtls-sidecar; OUT.md to bench/results-soak-<date>.md.
#
# Env (seconds): DURATION 1200, ROTATE 15 (identity swap), RESTART 120 (upstream restart),
# RESTART_DOWN 1 (how long it stays down), RESTART_GRACE 5 (after the upstream is back, failures still
# count as explained this long), SLOW_INTERVAL 60, SLOW_N 100, SLOW_HOLD 30, SAMPLE 10,
# RELOAD_INTERVAL 5s (the proxy's --reload-interval). Load concurrency: SOAK_ECHO 4, SOAK_BULK 2,
# SOAK_CHURN 4, SOAK_KA 4, SOAK_HCHURN 2 (see bench/soak.py); WRK=1 adds `wrk -t1 -c$WRK_CONNECTIONS`
# (default 8) on the http route for extra request load. KEEP=1 keeps the work folder.
#
# What runs, all on 127.0.0.1: a PKI from the binary's own `dev-pki` (run twice: identity A's CA signs
# the upstream's certificate, identity B comes from a second CA that the upstream also trusts, since
# dev-pki writes no CA key to sign a second client with); the client identity lives in a
# Kubernetes-style folder (`tls.crt -> ..data/tls.crt`, `..data -> ..vA`) and every ROTATE seconds
# `..data` is swapped by one atomic rename, so certificate and key change together. The upstream is
# `bench/soak.py upstream` (Python ssl, client certificate required), killed and started again every
# RESTART seconds on the same ports. The proxy runs `run --config` with both routes and `--admin`.
# `bench/soak.py load` drives the load; this script samples RSS, fds, threads and active connections
# every SAMPLE seconds, then `bench/soak.py report` writes OUT.md and decides. Exit 0 only if every
# verdict passes; 1 otherwise; 2 when the setup fails. Every process started here is stopped by pid.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
BIN=$(realpath "${1:-target/release/mtls-sidecar}")
OUT=$(realpath -m "${2:-$HERE/results-soak-$(date -u +%Y-%m-%d).md}")
DURATION=${DURATION:-1200}
ROTATE=${ROTATE:-15}
RESTART=${RESTART:-120}
RESTART_DOWN=${RESTART_DOWN:-1}
RESTART_GRACE=${RESTART_GRACE:-5}
SLOW_INTERVAL=${SLOW_INTERVAL:-60}
SLOW_N=${SLOW_N:-100}
SLOW_HOLD=${SLOW_HOLD:-30}
SAMPLE=${SAMPLE:-10}
RELOAD_INTERVAL=${RELOAD_INTERVAL:-5s}
PY=${PYTHON:-python3}
export PYTHONDONTWRITEBYTECODE=1   # leave no __pycache__ in bench/

[ -x "$BIN" ] || { echo "soak: binary $BIN is not executable (build it: cargo build --release)" >&2; exit 2; }
W=$(mktemp -d /tmp/mtls-soak.XXXXXX)
pids=()      # background loops and the proxy; the upstream's current pid is in $W/upstream.pid
cleanup() {
  local p
  for p in "${pids[@]}"; do
    pkill -P "$p" 2>/dev/null || true   # a loop's current `sleep`/`curl`, by parent pid
    kill "$p" 2>/dev/null || true
  done
  [ -s "$W/upstream.pid" ] && kill "$(cat "$W/upstream.pid")" 2>/dev/null || true
  wait 2>/dev/null || true
  if [ "${KEEP:-0}" = 1 ]; then echo "soak: work folder kept: $W" >&2; else rm -rf "$W"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

now() { date +%s.%N; }
free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# wait_port PORT SECONDS: until something accepts on 127.0.0.1:PORT; 1 if the deadline passes.
wait_port() {
  local end=$((SECONDS + $2))
  while [ $SECONDS -lt $end ]; do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  return 1
}
# sleep_until EPOCH: in slices of at most 1 s, so a killed loop leaves no long sleep behind.
sleep_until() {
  local left
  while left=$(awk -v t="$1" -v n="$(now)" 'BEGIN { d = t - n; if (d > 1) d = 1; if (d > 0) printf "%.3f", d }') && [ -n "$left" ]; do
    sleep "$left"
  done
}

# ---- PKI: two dev-pki runs, the client identities A and B, a Kubernetes-style folder
"$BIN" dev-pki --out "$W/pkiA" >/dev/null
"$BIN" dev-pki --out "$W/pkiB" >/dev/null
cat "$W/pkiA/ca.pem" "$W/pkiB/ca.pem" > "$W/upstream-clients-ca.pem"
mkdir -p "$W/id/..vA" "$W/id/..vB"
cp "$W/pkiA/client.pem" "$W/id/..vA/tls.crt"; cp "$W/pkiA/client-key.pem" "$W/id/..vA/tls.key"
cp "$W/pkiB/client.pem" "$W/id/..vB/tls.crt"; cp "$W/pkiB/client-key.pem" "$W/id/..vB/tls.key"
ln -s ..vA "$W/id/..data"
ln -s ..data/tls.crt "$W/id/tls.crt"
ln -s ..data/tls.key "$W/id/tls.key"

# ---- upstream (restartable)
UP_TCP=$(free_port); UP_HTTP=$(free_port)
start_upstream() {
  "$PY" "$HERE/soak.py" upstream --tcp-port "$UP_TCP" --http-port "$UP_HTTP" \
    --cert "$W/pkiA/server.pem" --key "$W/pkiA/server-key.pem" --ca "$W/upstream-clients-ca.pem" \
    2>>"$W/upstream.log" &
  echo $! > "$W/upstream.pid"
  wait_port "$UP_TCP" 10 && wait_port "$UP_HTTP" 10
}
stop_upstream() {
  local p; p=$(cat "$W/upstream.pid")
  kill "$p" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$p" 2>/dev/null || true
  wait "$p" 2>/dev/null || true
}
start_upstream || { echo "soak: the upstream did not start; $W/upstream.log:" >&2; cat "$W/upstream.log" >&2; exit 2; }

# ---- proxy
cat > "$W/soak.toml" <<EOF
[defaults]
cert = "$W/id/tls.crt"
key = "$W/id/tls.key"
ca = "$W/pkiA/ca.pem"
server_name = "localhost"
reload_interval = "$RELOAD_INTERVAL"

[[route]]
name = "tcp"
listen = "127.0.0.1:0"
upstream = "127.0.0.1:$UP_TCP"

[[route]]
name = "http"
listen = "127.0.0.1:0"
upstream = "127.0.0.1:$UP_HTTP"
mode = "http"
EOF
"$BIN" run --config "$W/soak.toml" --admin 127.0.0.1:0 --log-level info 2>"$W/proxy.log" &
PROXY=$!; pids+=("$PROXY")
addr_of() { sed -n "s/.*$1.*addr=\([0-9.]*:[0-9]*\).*/\1/p" "$W/proxy.log" | head -1; }
TCP=; HTTP=; ADMIN=
for _ in $(seq 100); do
  TCP=$(addr_of 'listening route=tcp'); HTTP=$(addr_of 'listening route=http'); ADMIN=$(addr_of 'admin listening')
  [ -n "$TCP" ] && [ -n "$HTTP" ] && [ -n "$ADMIN" ] && break
  kill -0 "$PROXY" 2>/dev/null || break
  sleep 0.1
done
if [ -z "$TCP" ] || [ -z "$HTTP" ] || [ -z "$ADMIN" ]; then
  echo "soak: the proxy did not report its listeners; $W/proxy.log:" >&2; tail -20 "$W/proxy.log" >&2; exit 2
fi
echo "soak: proxy pid $PROXY tcp=$TCP http=$HTTP admin=$ADMIN upstream tcp=$UP_TCP http=$UP_HTTP; ${DURATION}s, result in $OUT" >&2

START=$(now)
END=$(awk -v s="$START" -v d="$DURATION" 'BEGIN { printf "%.3f", s + d }')
at() { awk -v s="$START" -v d="$1" 'BEGIN { printf "%.3f", s + d }'; }
ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat" 2>/dev/null || echo 0; }
PROXY_TICKS0=$(ticks "$PROXY")

loops=()     # rotation, restarts, samples: they end by the same deadline as the load
# ---- identity rotation: swap ..data between ..vA and ..vB by one atomic rename
(
  k=1; cur=A
  while :; do
    t=$(at $((k * ROTATE)))
    awk -v t="$t" -v e="$END" 'BEGIN { exit !(t < e) }' || break
    sleep_until "$t"
    if [ $cur = A ]; then cur=B; else cur=A; fi
    ln -sfn "..v$cur" "$W/id/..data.tmp" && mv -T "$W/id/..data.tmp" "$W/id/..data"
    echo "$(now) $cur" >> "$W/rotations.tsv"
    k=$((k + 1))
  done
) & pids+=($!); loops+=($!)

# ---- upstream restarts: record stop and ready times
(
  k=1
  while :; do
    t=$(at $((k * RESTART)))
    awk -v t="$t" -v e="$END" 'BEGIN { exit !(t < e) }' || break
    sleep_until "$t"
    stop=$(now)
    stop_upstream
    sleep "$RESTART_DOWN"
    if start_upstream; then echo "$stop $(now)" >> "$W/restarts.tsv"
    else echo "$stop $(now) not-ready" >> "$W/restarts.tsv"; fi
    k=$((k + 1))
  done
) & pids+=($!); loops+=($!)

# ---- samples: t, RSS KiB, fds, threads, active connections
(
  echo "# t rss_kib fds threads active" > "$W/samples.tsv"
  k=0
  while :; do
    t=$(at $((k * SAMPLE)))
    awk -v t="$t" -v e="$END" 'BEGIN { exit !(t <= e) }' || break
    sleep_until "$t"
    [ -r "/proc/$PROXY/status" ] || break
    rss=$(awk '/^VmRSS/{print $2}' "/proc/$PROXY/status")
    thr=$(awk '/^Threads/{print $2}' "/proc/$PROXY/status")
    fds=$(ls "/proc/$PROXY/fd" | wc -l)
    act=$(curl -s -m 2 "http://$ADMIN/metrics" | awk '/^mtls_sidecar_active_connections[{ ]/{ s += $NF } END { print s + 0 }')
    echo "$((k * SAMPLE)) $rss $fds $thr $act" >> "$W/samples.tsv"
    k=$((k + 1))
  done
) & pids+=($!); loops+=($!)

# ---- optional extra request load: WRK=1 (wrk at full speed takes a core; its errors cannot be
# matched to restart windows, so they are reported, not judged)
if [ "${WRK:-0}" = 1 ] && command -v wrk >/dev/null; then
  timeout -k 5 "$((DURATION + 10))" wrk -t1 -c"${WRK_CONNECTIONS:-8}" -d"${DURATION}s" \
    "http://$HTTP/bytes?n=1024&seed=1" > "$W/wrk.txt" 2>&1 & pids+=($!)
fi

# ---- the load, bounded by its own deadline, `timeout` as a backstop; in the background so that a
# signal to this script is handled at once (bash runs traps only between foreground commands)
LOAD_LIMIT=$(awk -v d="$DURATION" -v h="$SLOW_HOLD" 'BEGIN { printf "%d", d + h + 120 }')
timeout -k 5 "$LOAD_LIMIT" "$PY" "$HERE/soak.py" load --tcp "$TCP" --http "$HTTP" --duration "$DURATION" \
  --slow-interval "$SLOW_INTERVAL" --slow-n "$SLOW_N" --slow-hold "$SLOW_HOLD" --out "$W" 2>"$W/load.log" &
LOAD=$!; pids+=("$LOAD")
LOAD_RC=0; wait "$LOAD" || LOAD_RC=$?
[ $LOAD_RC = 0 ] || { echo "soak: load generator exited $LOAD_RC:" >&2; tail -20 "$W/load.log" >&2; }

# Let the loops end by their own deadline (a restart in progress finishes), at most 30 s each.
for p in "${loops[@]}"; do
  for _ in $(seq 300); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
  kill -0 "$p" 2>/dev/null || wait "$p" 2>/dev/null || true   # reaped, so `times` counts its CPU
done
# The last rotation must have been polled before the reload counters are read.
sleep "$(awk -v r="$RELOAD_INTERVAL" 'BEGIN { v = r + 0; if (r ~ /ms$/) v = v / 1000; else if (r ~ /m$/) v = v * 60; printf "%d", v + 2 }')"
curl -s -m 5 "http://$ADMIN/metrics" > "$W/metrics-final.txt" || true
PROXY_CPU=$(awk -v a="$PROXY_TICKS0" -v b="$(ticks "$PROXY")" -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "%.1f", (b - a) / hz }')
# Graceful shutdown after the soak: SIGTERM must end the process with 0 well within --drain-timeout
# (25 s): a task or connection that never finishes would show here.
PROXY_EXIT=alive-before-sigterm
if kill -0 "$PROXY" 2>/dev/null; then
  SHUT0=$SECONDS
  kill -TERM "$PROXY"
  for _ in $(seq 400); do kill -0 "$PROXY" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$PROXY" 2>/dev/null; then PROXY_EXIT="still running 40 s after SIGTERM"
  else PROXY_EXIT=0; wait "$PROXY" || PROXY_EXIT=$?; PROXY_EXIT="exit $PROXY_EXIT after $((SECONDS - SHUT0)) s"; fi
else
  PROXY_EXIT=0; wait "$PROXY" || PROXY_EXIT=$?; PROXY_EXIT="died during the soak (exit $PROXY_EXIT)"
fi
# CPU of the load generator and the restarted upstreams (reaped children; the last upstream is not in it).
times > "$W/times.txt"   # not in $(…): a subshell's children times are its own
OTHER_CPU=$(awk 'NR == 2 { split($1, u, "m"); split($2, s, "m"); printf "%.1f", u[1] * 60 + u[2] + s[1] * 60 + s[2] }' "$W/times.txt")
{
  echo "lines by level:"
  awk '{ for (i = 1; i <= NF; i++) if ($i ~ /^(ERROR|WARN|INFO|DEBUG|TRACE)$/) { c[$i]++; break } } END { for (k in c) printf "  %s %d\n", k, c[k] }' "$W/proxy.log" | sort
  echo "access lines by route and outcome:"
  grep -o 'route=[a-z]* .*outcome=[a-z_]*' "$W/proxy.log" | sed 's/route=\([a-z]*\) .*outcome=\([a-z_]*\)/  route=\1 outcome=\2/' | sort | uniq -c | sort -rn | head -20
  echo "warn and error messages (first 5 of each kind):"
  grep -E ' (WARN|ERROR) ' "$W/proxy.log" | sed -E 's/^[^ ]+ +//' | awk '{ k = $0; sub(/ [a-z_]+=.*/, "", k); if (n[k]++ < 5) print "  " $0 }' | cut -c1-300 | head -40
} > "$W/log-summary.txt" 2>/dev/null || true

cat > "$W/meta.json" <<EOF
{"date": "$(date -u +%Y-%m-%dT%H:%M:%SZ)", "binary": "$BIN",
 "commit": "$(git -C "$HERE" rev-parse --short HEAD 2>/dev/null || echo unknown)", "cpus": $(nproc),
 "start": $START, "duration": $DURATION, "rotate": $ROTATE, "restart": $RESTART,
 "restart_down": $RESTART_DOWN, "restart_grace": $RESTART_GRACE, "slow_interval": $SLOW_INTERVAL,
 "slow_n": $SLOW_N, "slow_hold": $SLOW_HOLD, "sample": $SAMPLE, "reload_interval": "$RELOAD_INTERVAL",
 "load_env": "echo ${SOAK_ECHO:-4}, bulk ${SOAK_BULK:-2}, churn ${SOAK_CHURN:-4}, keep-alive ${SOAK_KA:-4}, http churn ${SOAK_HCHURN:-2} workers",
 "proxy_cpu_s": $PROXY_CPU, "other_cpu_s": $OTHER_CPU, "proxy_exit": "$PROXY_EXIT", "load_rc": $LOAD_RC}
EOF
set +e
"$PY" "$HERE/soak.py" report --dir "$W" --out "$OUT"
RC=$?
set -e
echo "soak: result written to $OUT" >&2
exit $RC
