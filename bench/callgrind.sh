#!/bin/bash
# Instruction counts (valgrind --tool=callgrind) per unit of work, for two builds side by side:
# deterministic, unlike CPU time on a shared machine. For each binary and direction:
#   full      per new tcp-mode connection with a full mTLS handshake (no resumption)
#   resumed   per new tcp-mode connection with a resumed handshake
#   keepalive per http-mode request on a kept-alive connection
#   bulk      per MiB relayed in tcp mode (a download through one connection)
#   tcpka     per request/response exchange on a kept-alive connection through a tcp-mode route
#             (the same load as keepalive, relayed as bytes: the bulk routes serve it)
# outbound (app -plain-> proxy -mTLS-> nginx) and inbound (client -mTLS-> proxy -plain-> nginx).
# Only the proxy runs under callgrind; nginx (upstream/target) and the load generator
# (bench/callgrind_load.py) run outside it. Each count is the difference of two runs (processes)
# with LO and HI units of work, divided by HI-LO, so startup and warm-up cancel out.
#
# usage: bench/callgrind.sh OLD_BIN NEW_BIN
#   CG_TESTS="out-full in-keepalive ..."   a subset (default: all ten)
#   CG_KEEP=1                              keep the work dir (callgrind.out files, logs)
#   CG_OLD_ONLY=1 CG_KEEP=1 / CG_REUSE_OLD=DIR   run OLD alone now, reuse its counts from DIR later
#   CG_CONNS="LO HI" CG_REQS="LO HI" CG_MIB="LO HI"   amounts (defaults 100 300, 1000 3000, 8 40)
#   CG_EXTRA_ARGS="..."                    process-wide `run` flags for both (e.g. --log-level warn)
#   CG_ROUTE_TOML='access_log = "off"'     more keys for every measured route (one TOML line)
# needs: valgrind (callgrind_control), nginx, python3. The PKI comes from `NEW_BIN dev-pki`.
# Ports 18651-18653 (nginx), 18661-18666 (the proxy).
set -eu
HERE=$(dirname "$(realpath "$0")")
OLD=$(realpath "$1"); NEW=$(realpath "$2")
TESTS=${CG_TESTS:-out-full out-resumed out-keepalive out-bulk out-tcpka in-full in-resumed in-keepalive in-bulk in-tcpka}
read -r CONN_LO CONN_HI <<< "${CG_CONNS:-100 300}"
read -r REQ_LO REQ_HI <<< "${CG_REQS:-1000 3000}"
read -r MIB_LO MIB_HI <<< "${CG_MIB:-8 40}"
LOAD="python3 $HERE/callgrind_load.py"
W=$(mktemp -d /tmp/cg.XXXXXX)
chmod 755 "$W"  # nginx workers (nobody) read the blobs
"$NEW" dev-pki --out "$W/pki" > /dev/null
P=$W/pki
mkdir -p "$W/www" "$W/tmp"
head -c $((MIB_HI << 20)) /dev/urandom > "$W/www/hi"
head -c $((MIB_LO << 20)) "$W/www/hi" > "$W/www/lo"
chmod 644 "$W/www/hi" "$W/www/lo"

# nginx: 18651 mTLS without resumption, 18652 mTLS with resumption, 18653 plaintext.
locs='location = / { return 200 "ok\n"; } location / { root '"$W"'/www; }'
tls="ssl_protocols TLSv1.2 TLSv1.3; ssl_certificate $P/server.pem; ssl_certificate_key $P/server-key.pem;
    ssl_client_certificate $P/ca.pem; ssl_verify_client on;"
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
  server { listen 127.0.0.1:18651 ssl; $tls ssl_session_cache off; ssl_session_tickets off; $locs }
  server { listen 127.0.0.1:18652 ssl; $tls ssl_session_cache shared:SSL:1m; ssl_session_tickets on; $locs }
  server { listen 127.0.0.1:18653; $locs }
}
NGX
nginx -c "$W/nginx.conf" > "$W/nginx.out" 2>&1 &
NGINX=$!
cleanup() {
  set +e
  [ -n "${SIDECAR:-}" ] && kill -KILL "$SIDECAR" 2>/dev/null
  kill "$NGINX" 2>/dev/null; wait "$NGINX" 2>/dev/null
  if [ -n "${CG_KEEP:-}" ]; then echo "kept $W" >&2; else rm -rf "$W"; fi
}
trap cleanup EXIT
for _ in $(seq 1 100); do
  (exec 3<>/dev/tcp/127.0.0.1/18653) 2>/dev/null && break; sleep 0.1
done
kill -0 "$NGINX" 2>/dev/null || { echo "nginx did not start:" >&2; cat "$W/nginx-error.log" >&2; exit 1; }

# One process per binary and amount serves every measured route (a config file, one route per
# measure), so startup is paid 4 times, not 32. The phases are split by `callgrind_control --dump`
# (each dump holds the instructions since the one before); a measure is the difference of its
# phase between the LO and the HI process. Timeouts are generous: callgrind is ~50x slower.
# Reloads are polled hourly, not every 5 s, so no background work lands in a phase.
port() {
  case $1 in
    out-full) echo 18661 ;; out-resumed) echo 18662 ;; out-keepalive) echo 18663 ;;
    out-bulk | out-tcpka) echo 18664 ;; in-tcp | in-full | in-resumed | in-bulk | in-tcpka) echo 18665 ;;
    in-keepalive) echo 18666 ;;
  esac
}
out_route() {  # name upstream-port mode
  printf '[[route]]\nname = "%s"\nlisten = "127.0.0.1:%s"\nupstream = "localhost:%s"\nmode = "%s"\n' \
    "$1" "$(port "$1")" "$2" "$3"
  printf 'cert = "%s"\nkey = "%s"\nconnect_timeout = "60s"\n%s\n\n' "$P/client.pem" "$P/client-key.pem" "${CG_ROUTE_TOML:-}"
}
in_route() {  # name mode
  printf '[[route]]\nname = "%s"\nlisten = "127.0.0.1:%s"\ninbound = true\ntarget = "127.0.0.1:18653"\n' \
    "$1" "$(port "$1")"
  printf 'mode = "%s"\ncert = "%s"\nkey = "%s"\nhandshake_timeout = "60s"\n' "$2" "$P/server.pem" "$P/server-key.pem"
  printf 'verify_dns_san = ["mtls-sidecar-dev-client"]\n%s\n\n' "${CG_ROUTE_TOML:-}"
}
{
  printf '[defaults]\nca = "%s"\nreload_interval = "1h"\n\n' "$P/ca.pem"
  out_route out-full 18651 tcp; out_route out-resumed 18652 tcp; out_route out-keepalive 18652 http
  out_route out-bulk 18652 tcp; in_route in-tcp tcp; in_route in-keepalive http
} > "$W/routes.toml"
CLIENT_TLS="--tls --cert $P/client.pem --key $P/client-key.pem --ca $P/ca.pem"

# load TEST AMOUNT CONCURRENCY -> the load generator's command.
load() {
  local a="--port $(port "$1") -n $2 -c $3"
  case $1 in
    out-full | out-resumed) echo "$LOAD conns $a" ;;
    in-full) echo "$LOAD conns $a $CLIENT_TLS" ;;
    in-resumed) echo "$LOAD conns $a $CLIENT_TLS --resume" ;;
    out-keepalive | out-tcpka) echo "$LOAD keepalive $a" ;;
    in-keepalive | in-tcpka) echo "$LOAD keepalive $a $CLIENT_TLS" ;;
    out-bulk | in-bulk)
      local f=lo; [ "$2" = "$MIB_HI" ] && f=hi
      local tlsarg=""; [ "$1" = in-bulk ] && tlsarg=$CLIENT_TLS
      echo "$LOAD bulk --port $(port "$1") --path /$f --bytes $(($2 << 20)) $tlsarg" ;;
  esac
}
amount() {  # TEST lo|hi
  case $1 in
    *-full | *-resumed) [ "$2" = lo ] && echo "$CONN_LO" || echo "$CONN_HI" ;;
    *-keepalive | *-tcpka) [ "$2" = lo ] && echo "$REQ_LO" || echo "$REQ_HI" ;;
    *-bulk) [ "$2" = lo ] && echo "$MIB_LO" || echo "$MIB_HI" ;;
  esac
}
unit() { case $1 in *-bulk) echo "MiB" ;; *-keepalive | *-tcpka) echo "request" ;; *) echo "connection" ;; esac; }

# quiet LOG: wait (at most 30 s) until the proxy's log has not grown for 1 s: the last connection's
# teardown and log line belong to its phase, not the next one.
quiet() {
  local last=-1 size
  for _ in $(seq 1 30); do
    size=$(stat -c %s "$1"); [ "$size" = "$last" ] && return 0; last=$size; sleep 1
  done
}

# phases BIN TAG lo|hi: one process, a warm-up phase (one unit on each route), then one phase per
# test; leaves the instruction count of each test's phase in $W/TAG.SIDE.TEST.
phases() {
  local bin=$1 tag=$2 side=$3 out="$W/cg.$2.$3" i=1 t
  # shellcheck disable=SC2086
  valgrind --tool=callgrind --dump-instr=no --collect-jumps=no --callgrind-out-file="$out.out" \
    "$bin" run --config "$W/routes.toml" ${CG_EXTRA_ARGS:-} > "$out.log" 2>&1 &
  SIDECAR=$!
  for _ in $(seq 1 1200); do
    [ "$(grep -c listening "$out.log")" -ge 6 ] && break; kill -0 "$SIDECAR" 2>/dev/null || break; sleep 0.1
  done
  [ "$(grep -c listening "$out.log")" -ge 6 ] || { echo "$tag: not listening" >&2; cat "$out.log" >&2; exit 1; }
  for t in $TESTS; do
    [ "${t#*-}" = bulk ] && continue
    $(load "$t" 1 1) >> "$out.warm" 2>&1 || { echo "$tag $t: warm-up failed" >&2; cat "$out.warm" >&2; exit 1; }
  done
  quiet "$out.log"; callgrind_control --dump=warm-up "$SIDECAR" > /dev/null 2>&1
  for t in $TESTS; do
    if ! $(load "$t" "$(amount "$t" "$side")" 4) > "$out.$t.load" 2>&1; then
      echo "$tag $t $side: load failed:" >&2; cat "$out.$t.load" >&2; exit 1
    fi
    quiet "$out.log"; callgrind_control --dump="$t" "$SIDECAR" > /dev/null 2>&1
    i=$((i + 1))
    awk '/^(totals|summary):/ {t=$2} END {print t}' "$out.out.$i" > "$W/$tag.$side.$t"
    [ -s "$W/$tag.$side.$t" ] || { echo "$tag $t $side: no total in $out.out.$i" >&2; exit 1; }
  done
  kill -INT "$SIDECAR"
  for _ in $(seq 1 600); do kill -0 "$SIDECAR" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$SIDECAR" 2>/dev/null || true
  wait "$SIDECAR" 2>/dev/null || true
  SIDECAR=
}

for tag in old new; do
  bin=$OLD; [ $tag = new ] && bin=$NEW
  if [ $tag = old ] && [ -n "${CG_REUSE_OLD:-}" ]; then
    cp "$CG_REUSE_OLD"/old.lo.* "$CG_REUSE_OLD"/old.hi.* "$W/"; continue
  fi
  [ $tag = new ] && [ -n "${CG_OLD_ONLY:-}" ] && exit 0
  phases "$bin" $tag lo; phases "$bin" $tag hi
done

echo "old: $OLD"
echo "new: $NEW"
echo
echo "| measure | old | new | new/old |"
echo "|---|---:|---:|---:|"
for t in $TESTS; do
  lo=$(amount "$t" lo); hi=$(amount "$t" hi)
  for tag in old new; do
    a=$(cat "$W/$tag.lo.$t"); b=$(cat "$W/$tag.hi.$t")
    echo "$tag $t: $a for $lo, $b for $hi" >&2
    eval "per_$tag=$(( (b - a) / (hi - lo) ))"
  done
  # shellcheck disable=SC2154
  printf '| %s, instructions per %s | %d | %d | %s |\n' "$t" "$(unit "$t")" "$per_old" "$per_new" \
    "$(awk -v o="$per_old" -v n="$per_new" 'BEGIN { printf "%.3f", (o ? n / o : 0) }')"
done
