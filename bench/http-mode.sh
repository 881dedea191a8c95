#!/usr/bin/env bash
# Side-by-side benchmark of HTTP mode: apps that open a new connection per request.
#
#   bench/http-mode.sh [BINARY]      (default target/release/mtls-sidecar; run from the repo root)
#
# Needs nginx, wrk and the PKI of ../shared/bench (run its setup.sh first, as root). Starts, on
# 127.0.0.1 only: an nginx mTLS upstream (ssl_verify_client on, HTTP/2 and HTTP/1.1, 128-byte
# body), mtls-sidecar in tcp mode, mtls-sidecar in http mode, and nginx as an HTTP proxy with
# proxy_ssl_certificate and a keepalive upstream pool. Then, for REPS rounds in alternating order,
# `wrk -t2 -c64 -H 'Connection: close'` against each for DURATION seconds. Prints req/s, p50 and
# p99 latency and the proxy's CPU (user+sys of its process tree) per request; medians of the rounds.
# Every process it starts is stopped by pid on exit.
set -euo pipefail
BIN=$(realpath "${1:-target/release/mtls-sidecar}")
PKI=${PKI:-/tmp/mtls-bench/pki/ecdsa}
REPS=${REPS:-3}
DURATION=${DURATION:-5}
W=$(mktemp -d /tmp/http-mode-bench.XXXXXX)
chmod 755 "$W"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT INT TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
UP=$(free_port); TCP=$(free_port); HTTP=$(free_port); NGX=$(free_port)
mkdir -p "$W/www" "$W/up" "$W/px"
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
cat > "$W/px/nginx.conf" <<EOF
worker_processes 1; daemon off; pid $W/px/nginx.pid; error_log $W/px/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  upstream up { server 127.0.0.1:$UP; keepalive 64; }
  server { listen 127.0.0.1:$NGX backlog=4096;
    location / {
      proxy_pass https://up; proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_ssl_certificate $PKI/client.crt; proxy_ssl_certificate_key $PKI/client.key;
      proxy_ssl_trusted_certificate $PKI/ca.crt; proxy_ssl_verify on; proxy_ssl_name localhost;
      proxy_ssl_server_name on; proxy_ssl_session_reuse on; } }
}
EOF
nginx -p "$W/up/" -c "$W/up/nginx.conf" -e "$W/up/error.log" & pids+=($!)
nginx -p "$W/px/" -c "$W/px/nginx.conf" -e "$W/px/error.log" & pids+=($!)
common=(--upstream "127.0.0.1:$UP" --server-name localhost --cert "$PKI/client.crt" --key "$PKI/client.key" --ca "$PKI/ca.crt" --log-level warn)
"$BIN" run --listen "127.0.0.1:$TCP" "${common[@]}" 2>"$W/tcp.log" & pids+=($!); TCP_PID=$!
"$BIN" run --mode http --listen "127.0.0.1:$HTTP" "${common[@]}" 2>"$W/http.log" & pids+=($!); HTTP_PID=$!
NGX_PID=${pids[1]}

for port in $UP $TCP $HTTP $NGX; do
  for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done
done
for port in $TCP $HTTP $NGX; do
  code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/small.bin")
  [ "$code" = 200 ] || { echo "proxy on $port answered $code (tcp=$TCP http=$HTTP nginx=$NGX)"; curl -s "http://127.0.0.1:$port/small.bin" | head -5; cat "$W"/*.log "$W"/*/error.log | tail -5; exit 1; }
done

# CPU (clock ticks) of a process and its children.
tree_ticks() { local t=0; for p in $1 $(pgrep -P "$1" || true); do t=$((t + $(awk '{print $14+$15}' /proc/$p/stat))); done; echo $t; }

declare -A rate p50 p99 cpu
run() {  # run NAME PORT PID
  local before after out n
  before=$(tree_ticks "$3")
  out=$(wrk -t2 -c64 -d"${DURATION}s" --latency -H 'Connection: close' "http://127.0.0.1:$2/small.bin")
  after=$(tree_ticks "$3")
  n=$(echo "$out" | awk '/requests in/{print $1}')
  rate[$1]+="$(echo "$out" | awk '/Requests\/sec/{print $2}') "
  p50[$1]+="$(echo "$out" | awk '$1=="50%"{print $2}') "
  p99[$1]+="$(echo "$out" | awk '$1=="99%"{print $2}') "
  cpu[$1]+="$(echo "scale=1; ($after-$before)*10000/$n" | bc) "
  if echo "$out" | grep -q "Non-2xx\|Socket errors"; then echo "$1: $(echo "$out" | grep 'Non-2xx\|Socket errors')" >&2; fi
}
for r in $(seq "$REPS"); do
  order=("tcp $TCP $TCP_PID" "http $HTTP $HTTP_PID" "nginx $NGX $NGX_PID")
  for i in 0 1 2; do j=$(( (i + r) % 3 )); run ${order[$j]}; done
done
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END{print a[int((NR+1)/2)]}'; }
printf '| proxy | req/s | p50 | p99 | proxy CPU µs/req |\n|---|---|---|---|---|\n'
for k in tcp http nginx; do
  printf '| %s | %s | %s | %s | %s |\n' "$k" "$(echo ${rate[$k]} | median)" "$(echo ${p50[$k]} | median)" \
    "$(echo ${p99[$k]} | median)" "$(echo ${cpu[$k]} | median)"
done
echo "rounds: req/s tcp=[${rate[tcp]}] http=[${rate[http]}] nginx=[${rate[nginx]}]; p99 http=[${p99[http]}] nginx=[${p99[nginx]}]"
