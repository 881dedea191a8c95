#!/bin/bash
# Instructions per keep-alive http-mode request (issue 16: the request line's cost, and traces off).
# Deterministic, unlike CPU time on a shared machine: the proxy runs under callgrind while
# `ab -k -c 4` sends N requests through it to nginx (mTLS, `return 200`); the difference of the
# totals for N=2000 and N=6000, divided by 4000, is the cost of one request.
# usage: bench/callgrind-http.sh BIN [ACCESS_LOG [LOG_FORMAT]]   (defaults: connection text)
# needs: valgrind, nginx, ab (apache2-utils), openssl-free: the PKI comes from `BIN dev-pki`.
set -eu
BIN=$(realpath "$1"); MODE=${2:-connection}; FMT=${3:-text}
W=$(mktemp -d /tmp/cg-http.XXXXXX)
"$BIN" dev-pki --out "$W/pki" > /dev/null
mkdir -p "$W/tmp"
cat > "$W/nginx.conf" <<NGX
worker_processes 1;
daemon off;
pid $W/nginx.pid;
error_log $W/nginx-error.log warn;
events { worker_connections 1024; }
http {
  access_log off;
  keepalive_requests 1000000;
  client_body_temp_path $W/tmp; proxy_temp_path $W/tmp; fastcgi_temp_path $W/tmp;
  uwsgi_temp_path $W/tmp; scgi_temp_path $W/tmp;
  server {
    listen 127.0.0.1:18643 ssl;
    ssl_certificate $W/pki/server.pem;
    ssl_certificate_key $W/pki/server-key.pem;
    ssl_client_certificate $W/pki/ca.pem;
    ssl_verify_client on;
    location / { return 200 "ok\n"; }
  }
}
NGX
nginx -c "$W/nginx.conf" > "$W/nginx.out" 2>&1 &
NGINX=$!
trap 'kill $NGINX 2>/dev/null; wait $NGINX 2>/dev/null || true' EXIT
total() {
  local n=$1
  valgrind --tool=callgrind --callgrind-out-file="$W/cg.$n.out" "$BIN" run \
    --listen 127.0.0.1:18281 --upstream localhost:18643 --cert "$W/pki/client.pem" \
    --key "$W/pki/client-key.pem" --ca "$W/pki/ca.pem" --mode http \
    --access-log "$MODE" --log-format "$FMT" 2> "$W/log.$n" &
  local pid=$!
  for _ in $(seq 1 600); do curl -s -o /dev/null http://127.0.0.1:18281/ && break; sleep 0.1; done
  ab -q -k -n "$n" -c 4 http://127.0.0.1:18281/ | grep -E "Failed requests" >&2
  kill -INT $pid; wait $pid 2>/dev/null || true
  callgrind_annotate "$W/cg.$n.out" 2>/dev/null | grep -m1 'PROGRAM TOTALS' | awk '{gsub(",","",$1); print $1}'
}
a=$(total 2000); b=$(total 6000)
echo "$(basename "$BIN") access_log=$MODE log_format=$FMT: $(( (b - a) / 4000 )) instructions per request ($a for 2000, $b for 6000)"
rm -rf "$W"
