#!/bin/bash
# Syscalls and CPU per keep-alive request through a tcp-mode route, next to an nginx stream relay
# (plaintext, the issue's `relay` baseline), counted with `perf stat` tracepoints on the proxy
# process only (all its threads; low overhead, unlike strace, so batching stays as it is).
# The load is the shared bench's keepalive workload: wrk, 64 connections, a 128-byte body, against
# an nginx upstream (mTLS for us, plaintext for the relay) on this machine's loopback.
#
# usage: bench/syscalls-keepalive.sh BIN [BIN2 ...]
#   SK_SECS=5 SK_CONNS=64 SK_THREADS=2   wrk duration, connections and threads
# Outbound only: wrk cannot present a client certificate, so an inbound route is not driven here
# (bench/callgrind.sh in-tcpka counts that side's instructions).
# needs: perf (tracepoints readable: run as root), wrk, nginx. Ports 18701-18703 and 18711-18719.
set -eu
SECS=${SK_SECS:-5}; CONNS=${SK_CONNS:-64}; THREADS=${SK_THREADS:-2}
W=$(mktemp -d /tmp/sk.XXXXXX)
chmod 755 "$W"
FIRST=$(realpath "$1")
"$FIRST" dev-pki --out "$W/pki" > /dev/null
P=$W/pki
mkdir -p "$W/www" "$W/tmp"
head -c 128 /dev/urandom > "$W/www/small.bin"
chmod 644 "$W/www/small.bin"
MODS=$(nginx -V 2>&1 | sed -n 's/.*--modules-path=\([^ ]*\).*/\1/p')
cat > "$W/nginx.conf" <<NGX
load_module $MODS/ngx_stream_module.so;
worker_processes 1;
daemon off;
pid $W/nginx.pid;
error_log $W/nginx-error.log warn;
events { worker_connections 4096; }
http {
  access_log off; keepalive_requests 100000000; keepalive_timeout 900s;
  client_body_temp_path $W/tmp; proxy_temp_path $W/tmp; fastcgi_temp_path $W/tmp;
  uwsgi_temp_path $W/tmp; scgi_temp_path $W/tmp;
  server { listen 127.0.0.1:18701 ssl; ssl_certificate $P/server.pem;
    ssl_certificate_key $P/server-key.pem; ssl_client_certificate $P/ca.pem;
    ssl_verify_client on; root $W/www; }
  server { listen 127.0.0.1:18702; root $W/www; }
}
NGX
# The relay baseline runs as its own nginx process so that only it is counted.
cat > "$W/relay.conf" <<NGX
load_module $MODS/ngx_stream_module.so;
worker_processes 1;
daemon off;
master_process off;
pid $W/relay.pid;
error_log $W/relay-error.log warn;
events { worker_connections 4096; }
stream { server { listen 127.0.0.1:18703; proxy_pass 127.0.0.1:18702; proxy_timeout 900s; } }
NGX
nginx -c "$W/nginx.conf" > "$W/nginx.out" 2>&1 &
NGINX=$!
PROXY=
cleanup() {
  set +e
  [ -n "$PROXY" ] && kill -KILL "$PROXY" 2>/dev/null
  kill "$NGINX" 2>/dev/null; wait "$NGINX" 2>/dev/null
  rm -rf "$W"
}
trap cleanup EXIT
wait_port() {
  for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done
  echo "port $1 did not open" >&2; exit 1
}
wait_port 18702

EVENTS=task-clock
for s in epoll_wait epoll_pwait futex recvfrom sendto read write readv writev sendmsg recvmsg sched_yield; do
  EVENTS="$EVENTS,syscalls:sys_enter_$s"
done
EVENTS="$EVENTS,raw_syscalls:sys_enter"

# measure NAME PID PORT: wrk through PORT with perf stat on PID; prints one table row per event.
measure() {
  local name=$1 pid=$2 port=$3
  wrk -t "$THREADS" -c "$CONNS" -d 1s "http://127.0.0.1:$port/small.bin" > /dev/null  # warm-up
  local t0
  t0=$(awk '{print $14, $15}' "/proc/$pid/stat")
  perf stat -x, -e "$EVENTS" -p "$pid" -o "$W/perf.$name" &
  local perf=$!
  sleep 0.2
  wrk -t "$THREADS" -c "$CONNS" -d "${SECS}s" "http://127.0.0.1:$port/small.bin" > "$W/wrk.$name"
  kill -INT "$perf"; wait "$perf" 2>/dev/null || true
  local t1
  t1=$(awk '{print $14, $15}' "/proc/$pid/stat")
  local reqs
  reqs=$(awk '/requests in/ {print $1}' "$W/wrk.$name")
  grep -q "Non-2xx" "$W/wrk.$name" && { echo "$name: non-2xx answers" >&2; cat "$W/wrk.$name" >&2; exit 1; }
  echo "## $name: $reqs requests in ${SECS}s ($(awk '/Requests\/sec/ {print $2}' "$W/wrk.$name") req/s)"
  echo "| event | total | per request |"
  echo "|---|---:|---:|"
  awk -F, -v n="$reqs" '$3 != "" && $1 ~ /^[0-9.]+$/ {
      e = $3; sub(/^syscalls:sys_enter_/, "", e); sub(/^raw_syscalls:sys_enter/, "all syscalls", e)
      if (e == "task-clock") printf "| CPU (task-clock, us) | %.0f | %.2f |\n", $1 * 1000, $1 * 1000 / n
      else if ($1 > 0) printf "| %s | %d | %.3f |\n", e, $1, $1 / n }' "$W/perf.$name"
  # user and system CPU from /proc (clock ticks), over the whole wrk run
  echo "$t0 $t1" | awk -v n="$reqs" -v hz="$(getconf CLK_TCK)" '{
      printf "| user CPU (us) | %.0f | %.2f |\n| system CPU (us) | %.0f | %.2f |\n",
        ($3 - $1) * 1e6 / hz, ($3 - $1) * 1e6 / hz / n, ($4 - $2) * 1e6 / hz, ($4 - $2) * 1e6 / hz / n }'
  echo
}

nginx -c "$W/relay.conf" > "$W/relay.out" 2>&1 &
PROXY=$!
wait_port 18703
measure relay "$PROXY" 18703
kill "$PROXY"; wait "$PROXY" 2>/dev/null || true
PROXY=

i=0
for bin in "$@"; do
  bin=$(realpath "$bin"); i=$((i + 1))
  echo "bin$i: $bin"
  "$bin" run --listen 127.0.0.1:18711 --upstream localhost:18701 --cert "$P/client.pem" \
    --key "$P/client-key.pem" --ca "$P/ca.pem" > "$W/proxy.log" 2>&1 &
  PROXY=$!
  wait_port 18711
  measure "bin$i" "$PROXY" 18711
  kill -INT "$PROXY"; wait "$PROXY" 2>/dev/null || true
  PROXY=
done
