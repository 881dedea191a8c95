#!/usr/bin/env bash
# What --pool-max-lifetime costs in http mode: the same binary three times, `--pool-max-lifetime
# 0` (forever), `10m` (the default) and `1s` (a pool turnover every second), against one nginx
# mTLS upstream (HTTP/2 and HTTP/1.1, 128-byte body), apps opening a connection per request.
#
#   bench/pool-lifetime.sh [BINARY]      (default target/release/mtls-sidecar; from the repo root)
#
# Needs nginx and wrk. A throwaway PKI from `dev-pki`. For REPS rounds in alternating order,
# `wrk -t2 -c64 -H 'Connection: close'` against each for DURATION seconds; prints req/s, p99 and
# the sidecar's CPU (user+sys) per request, medians of the rounds. Every process it starts is
# stopped by pid on exit.
set -euo pipefail
BIN=$(realpath "${1:-target/release/mtls-sidecar}")
REPS=${REPS:-3}
DURATION=${DURATION:-5}
W=$(mktemp -d /tmp/pool-lifetime-bench.XXXXXX)
chmod 755 "$W"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT INT TERM

"$BIN" dev-pki --out "$W/pki" >/dev/null
PKI=$W/pki
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
UP=$(free_port)
mkdir -p "$W/www" "$W/up"
head -c 128 /dev/zero | tr '\0' x > "$W/www/small.bin"
chmod -R a+rX "$W"
cat > "$W/up/nginx.conf" <<EOF
worker_processes 1; daemon off; pid $W/up/nginx.pid; error_log $W/up/error.log warn;
events { worker_connections 4096; }
http {
  access_log off; root $W/www; keepalive_requests 100000000; keepalive_timeout 900s;
  server { listen 127.0.0.1:$UP ssl http2 backlog=4096;
    ssl_certificate $PKI/server.pem; ssl_certificate_key $PKI/server-key.pem;
    ssl_client_certificate $PKI/ca.pem; ssl_verify_client on;
    ssl_protocols TLSv1.2 TLSv1.3; ssl_session_cache off; ssl_session_tickets off; }
}
EOF
nginx -p "$W/up/" -c "$W/up/nginx.conf" -e "$W/up/error.log" & pids+=($!)

declare -A port pid
for life in 0 10m 1s; do
  port[$life]=$(free_port)
  "$BIN" run --mode http --listen "127.0.0.1:${port[$life]}" --upstream "127.0.0.1:$UP" \
    --server-name localhost --cert "$PKI/client.pem" --key "$PKI/client-key.pem" \
    --ca "$PKI/ca.pem" --log-level warn --pool-max-lifetime "$life" 2>"$W/$life.log" &
  pids+=($!); pid[$life]=$!
done
for p in $UP "${port[@]}"; do
  for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$p) 2>/dev/null && break; sleep 0.1; done
done
for life in 0 10m 1s; do
  code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:${port[$life]}/small.bin")
  [ "$code" = 200 ] || { echo "lifetime $life answered $code"; cat "$W/$life.log" | tail -5; exit 1; }
done

ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
declare -A rate p99 cpu
run() {  # run LIFETIME
  local before after out n
  before=$(ticks "${pid[$1]}")
  out=$(wrk -t2 -c64 -d"${DURATION}s" --latency -H 'Connection: close' "http://127.0.0.1:${port[$1]}/small.bin")
  after=$(ticks "${pid[$1]}")
  n=$(echo "$out" | awk '/requests in/{print $1}')
  rate[$1]+="$(echo "$out" | awk '/Requests\/sec/{print $2}') "
  p99[$1]+="$(echo "$out" | awk '$1=="99%"{print $2}') "
  cpu[$1]+="$(awk -v t=$((after - before)) -v n="$n" -v hz="$(getconf CLK_TCK)" 'BEGIN{printf "%.1f", t/hz*1e6/n}') "
}
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END{print a[int((NR+1)/2)]}'; }
for r in $(seq "$REPS"); do
  if [ $((r % 2)) = 1 ]; then order="0 10m 1s"; else order="1s 10m 0"; fi
  for life in $order; do run "$life"; done
done
echo "| --pool-max-lifetime | req/s | p99 | sidecar CPU per request (µs) |"
echo "|---|---|---|---|"
for life in 0 10m 1s; do
  echo "| $life | $(echo "${rate[$life]}" | median) | $(echo "${p99[$life]}" | median | tr -d ' ') | $(echo "${cpu[$life]}" | median) |"
done
