#!/usr/bin/env bash
# Side-by-side benchmark of egress through an HTTP CONNECT proxy: apps that open a new
# connection per request, as legacy clients behind a corporate proxy do.
#
#   bench/proxy-connect.sh [BINARY]      (default target/release/mtls-sidecar; run from the repo root)
#
# Needs nginx, wrk, stunnel4, tinyproxy (`apt-get install -y tinyproxy`) and the PKI of
# ../shared/bench (run its setup.sh first). Starts, on 127.0.0.1 only: an nginx mTLS upstream
# (ssl_verify_client on, 128-byte body), tinyproxy as the CONNECT proxy, and in front of it
#   - mtls-sidecar tcp mode with --proxy,
#   - mtls-sidecar http mode with --proxy (pooled tunnels),
#   - stunnel client mode with `protocol = connect` (the one peer that tunnels through CONNECT;
#     nginx and HAProxy cannot, Envoy needs a second listener),
#   - mtls-sidecar tcp mode straight to the upstream (what the proxy hop costs).
# Then, for REPS rounds in rotating order, `wrk -t2 -c32 -H 'Connection: close'` against each for
# DURATION seconds. Prints req/s, p50/p99 latency and the CPU of the tunnelling process (user+sys)
# per request; medians of the rounds. Every process it starts is stopped by pid on exit.
set -euo pipefail
BIN=$(realpath "${1:-target/release/mtls-sidecar}")
PKI=${PKI:-/tmp/mtls-bench/pki/ecdsa}
REPS=${REPS:-3}
DURATION=${DURATION:-5}
W=$(mktemp -d /tmp/proxy-connect-bench.XXXXXX)
chmod 755 "$W"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT INT TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
UP=$(free_port); PX=$(free_port); TCP=$(free_port); HTTP=$(free_port); ST=$(free_port); DIRECT=$(free_port)
mkdir -p "$W/www" "$W/up"
head -c 128 /dev/zero | tr '\0' x > "$W/www/small.bin"
chmod -R a+rX "$W"

cat > "$W/up/nginx.conf" <<EOF
worker_processes 1; daemon off; pid $W/up/nginx.pid; error_log $W/up/error.log warn;
events { worker_connections 4096; }
http {
  access_log off; root $W/www; keepalive_requests 100000000; keepalive_timeout 900s;
  server { listen 127.0.0.1:$UP ssl http2 backlog=4096;
    ssl_certificate $PKI/server.crt; ssl_certificate_key $PKI/server.key;
    ssl_client_certificate $PKI/ca.crt; ssl_verify_client on;
    ssl_protocols TLSv1.2 TLSv1.3; ssl_session_cache off; ssl_session_tickets off; }
}
EOF
cat > "$W/tinyproxy.conf" <<EOF
Port $PX
Listen 127.0.0.1
Timeout 600
MaxClients 1024
LogLevel Critical
ConnectPort $UP
Allow 127.0.0.1
EOF
cat > "$W/stunnel.conf" <<EOF
foreground = yes
pid =
debug = 3
[c]
client = yes
accept = 127.0.0.1:$ST
connect = 127.0.0.1:$PX
protocol = connect
protocolHost = 127.0.0.1:$UP
sni = localhost
cert = $PKI/client.crt
key = $PKI/client.key
CAfile = $PKI/ca.crt
verifyChain = yes
checkHost = localhost
EOF
nginx -p "$W/up/" -c "$W/up/nginx.conf" -e "$W/up/error.log" & pids+=($!)
tinyproxy -d -c "$W/tinyproxy.conf" >"$W/tinyproxy.log" 2>&1 & pids+=($!)
stunnel4 "$W/stunnel.conf" >"$W/stunnel.log" 2>&1 & pids+=($!); ST_PID=$!
common=(--upstream "127.0.0.1:$UP" --server-name localhost --cert "$PKI/client.crt" --key "$PKI/client.key" --ca "$PKI/ca.crt" --log-level warn)
"$BIN" run --listen "127.0.0.1:$TCP" --proxy "http://127.0.0.1:$PX" "${common[@]}" 2>"$W/tcp.log" & pids+=($!); TCP_PID=$!
"$BIN" run --mode http --listen "127.0.0.1:$HTTP" --proxy "http://127.0.0.1:$PX" "${common[@]}" 2>"$W/http.log" & pids+=($!); HTTP_PID=$!
"$BIN" run --listen "127.0.0.1:$DIRECT" "${common[@]}" 2>"$W/direct.log" & pids+=($!); DIRECT_PID=$!

for port in $UP $PX $TCP $HTTP $ST $DIRECT; do
  for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done
done
for port in $TCP $HTTP $ST $DIRECT; do
  code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/small.bin" || true)
  [ "$code" = 200 ] || { echo "port $port answered $code (tcp=$TCP http=$HTTP stunnel=$ST direct=$DIRECT)"; tail -5 "$W"/*.log; exit 1; }
done

# CPU (clock ticks) of a process and its children.
tree_ticks() { local t=0; for p in $1 $(pgrep -P "$1" || true); do t=$((t + $(awk '{print $14+$15}' /proc/$p/stat))); done; echo $t; }

declare -A rate p50 p99 cpu
run() {  # run NAME PORT PID
  local before after out n
  before=$(tree_ticks "$3")
  out=$(wrk -t2 -c32 -d"${DURATION}s" --latency -H 'Connection: close' "http://127.0.0.1:$2/small.bin")
  after=$(tree_ticks "$3")
  n=$(echo "$out" | awk '/requests in/{print $1}')
  rate[$1]+="$(echo "$out" | awk '/Requests\/sec/{print $2}') "
  p50[$1]+="$(echo "$out" | awk '$1=="50%"{print $2}') "
  p99[$1]+="$(echo "$out" | awk '$1=="99%"{print $2}') "
  cpu[$1]+="$(echo "scale=1; ($after-$before)*10000/$n" | bc) "
  if echo "$out" | grep -q "Non-2xx\|Socket errors"; then echo "$1: $(echo "$out" | grep 'Non-2xx\|Socket errors')" >&2; fi
}
names=(tcp http stunnel direct)
for r in $(seq "$REPS"); do
  order=("tcp $TCP $TCP_PID" "http $HTTP $HTTP_PID" "stunnel $ST $ST_PID" "direct $DIRECT $DIRECT_PID")
  for i in 0 1 2 3; do j=$(( (i + r) % 4 )); run ${order[$j]}; done
done
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END{print a[int((NR+1)/2)]}'; }
printf '| client | req/s | p50 | p99 | its CPU µs/req |\n|---|---|---|---|---|\n'
for k in "${names[@]}"; do
  printf '| %s | %s | %s | %s | %s |\n' "$k" "$(echo ${rate[$k]} | median)" "$(echo ${p50[$k]} | median)" \
    "$(echo ${p99[$k]} | median)" "$(echo ${cpu[$k]} | median)"
done
for k in "${names[@]}"; do echo "rounds $k: req/s [${rate[$k]}] cpu [${cpu[$k]}]"; done
