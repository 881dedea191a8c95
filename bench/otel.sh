#!/usr/bin/env bash
# What OpenTelemetry traces cost in http mode, keep-alive apps:
#
#   bench/otel.sh BASELINE_BINARY OTEL_BINARY
#
# BASELINE_BINARY: built without the `otel` feature (`cargo build --release --no-default-features`);
# OTEL_BINARY: with it (the default). Needs nginx and wrk. Starts on 127.0.0.1 only: an nginx mTLS
# upstream (128-byte body) and, on another port, an nginx that answers every OTLP/HTTP export with
# 200; then three sidecars in http mode: the baseline, the otel build with no endpoint, and the
# otel build exporting to that nginx (every request sampled). For REPS rounds in rotating order,
# `wrk -t2 -c16` (keep-alive) for DURATION seconds against each. Prints req/s, p50/p99 and the
# sidecar's CPU (user+sys) per request; medians of the rounds. Processes it starts are stopped by
# pid on exit.
set -euo pipefail
BASE=$(realpath "$1"); OTEL=$(realpath "$2")
REPS=${REPS:-5}
DURATION=${DURATION:-5}
W=$(mktemp -d /tmp/otel-bench.XXXXXX)
chmod 755 "$W"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT INT TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
UP=$(free_port); COL=$(free_port); A=$(free_port); B=$(free_port); C=$(free_port)
"$OTEL" dev-pki --out "$W/pki" >/dev/null
PKI=$W/pki
mkdir -p "$W/www" "$W/up"
head -c 128 /dev/zero | tr '\0' x > "$W/www/small.bin"
chmod -R a+rX "$W"
cat > "$W/up/nginx.conf" <<CONF
worker_processes 1; daemon off; pid $W/up/nginx.pid; error_log $W/up/error.log warn;
events { worker_connections 4096; }
http {
  access_log off; root $W/www; keepalive_requests 100000000; keepalive_timeout 900s;
  server { listen 127.0.0.1:$UP ssl http2 backlog=4096;
    ssl_certificate $PKI/server.pem; ssl_certificate_key $PKI/server-key.pem;
    ssl_client_certificate $PKI/ca.pem; ssl_verify_client on; }
  server { listen 127.0.0.1:$COL; client_max_body_size 64m; access_log $W/col.log;
    location / { return 200; } }
}
CONF
nginx -p "$W/up/" -c "$W/up/nginx.conf" -e "$W/up/error.log" & pids+=($!)
common=(--mode http --upstream "127.0.0.1:$UP" --server-name localhost --cert "$PKI/client.pem"
        --key "$PKI/client-key.pem" --ca "$PKI/ca.pem" --log-level warn)
"$BASE" run --listen "127.0.0.1:$A" "${common[@]}" 2>"$W/a.log" & pids+=($!); A_PID=$!
"$OTEL" run --listen "127.0.0.1:$B" "${common[@]}" 2>"$W/b.log" & pids+=($!); B_PID=$!
OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:$COL" \
  "$OTEL" run --listen "127.0.0.1:$C" "${common[@]}" 2>"$W/c.log" & pids+=($!); C_PID=$!
for port in $UP $COL $A $B $C; do
  for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done
done
for port in $A $B $C; do
  code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/small.bin")
  [ "$code" = 200 ] || { echo "sidecar on $port answered $code"; tail -5 "$W"/*.log; exit 1; }
done
ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
declare -A rate p50 p99 cpu
run() {  # run NAME PORT PID
  local before after out n
  before=$(ticks "$3")
  out=$(wrk -t2 -c16 -d"${DURATION}s" --latency "http://127.0.0.1:$2/small.bin")
  after=$(ticks "$3")
  n=$(echo "$out" | awk '/requests in/{print $1}')
  rate[$1]+="$(echo "$out" | awk '/Requests\/sec/{print $2}') "
  p50[$1]+="$(echo "$out" | awk '$1=="50%"{print $2}') "
  p99[$1]+="$(echo "$out" | awk '$1=="99%"{print $2}') "
  cpu[$1]+="$(echo "scale=2; ($after-$before)*10000/$n" | bc) "
  if echo "$out" | grep -q "Non-2xx\|Socket errors"; then echo "$1: $(echo "$out" | grep 'Non-2xx\|Socket errors')" >&2; fi
}
names=(baseline otel-off otel-on)
for r in $(seq "$REPS"); do
  order=("baseline $A $A_PID" "otel-off $B $B_PID" "otel-on $C $C_PID")
  for i in 0 1 2; do j=$(( (i + r) % 3 )); run ${order[$j]}; done
done
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END{print a[int((NR+1)/2)]}'; }
printf '| sidecar | req/s | p50 | p99 | CPU µs/req |\n|---|---|---|---|---|\n'
for k in "${names[@]}"; do
  printf '| %s | %s | %s | %s | %s |\n' "$k" "$(echo ${rate[$k]} | median)" "$(echo ${p50[$k]} | median)" \
    "$(echo ${p99[$k]} | median)" "$(echo ${cpu[$k]} | median)"
done
for k in "${names[@]}"; do echo "rounds $k: req/s [${rate[$k]}] cpu µs/req [${cpu[$k]}]"; done
echo "exports received by the collector: $(grep -c 'POST /v1/traces' "$W/col.log" || true)"
grep -h "opentelemetry" "$W/c.log" | head -3 || true
