#!/usr/bin/env bash
# Checks the systemd units in deploy/systemd/ (run by CI from the repo root after cargo build):
#  1. `systemd-analyze verify` on the service and socket units, alone and with each drop-in, with
#     no output allowed; `systemd-analyze security` exposure of the service must stay "OK" (<= 2.0);
#  2. the env file only sets variables that are flags of `mtls-sidecar run`;
#  3. starts the binary as the unit would: the ExecStart line, the env file (test values for
#     addresses), a CREDENTIALS_DIRECTORY holding the LoadCredential= names, NOTIFY_SOCKET and
#     WATCHDOG_USEC, umask 0077, no new privileges, no capabilities and (as root) an unprivileged
#     uid; then checks READY=1, /readyz, WATCHDOG=1, SIGHUP -> RELOADING=1 + READY=1, and
#     SIGTERM -> STOPPING=1 and exit 0;
#  4. the same through socket activation (systemd-socket-activate, the .socket unit's
#     FileDescriptorName and the socket-activation.conf drop-in);
#  5. the inbound unit (mtls-sidecar-inbound.service/.socket/.env) socket-activated the same
#     way: a client without a certificate is refused, the dev client reaches a plain app
#     behind it, SIGHUP reloads, SIGTERM stops it.
# Usage: bash deploy/systemd/verify.sh   (MTLS_SIDECAR_BIN=path overrides target/debug/mtls-sidecar)
set -euo pipefail

cd "$(dirname "$0")/../.."
DIR=deploy/systemd
BIN=$(readlink -f "${MTLS_SIDECAR_BIN:-target/debug/mtls-sidecar}")
START=$SECONDS

fail() { echo "deploy/systemd/verify.sh: FAIL: $*" >&2; exit 1; }
step() { echo "-- $*"; }

[ -x "$BIN" ] || fail "no binary at $BIN (run cargo build first, or set MTLS_SIDECAR_BIN)"
command -v systemd-analyze >/dev/null || fail "systemd-analyze is not installed (Debian: apt-get install systemd)"
command -v python3 >/dev/null || fail "python3 is needed for the notify socket listener"

TMP=$(mktemp -d)
chmod 0755 "$TMP" # the test process may run as nobody: it must reach the notify socket and creds
PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- 1. systemd-analyze
# verify insists that ExecStart's binary exists: check copies that point at the built one.
# The drop-ins are found in NAME.service.d/ next to the copied unit.
analyze() { # unit name (without .service/.socket), label, drop-ins...
    local unit=$1 label=$2 units="$TMP/units-$2" out f
    shift 2
    mkdir -p "$units/$unit.service.d"
    for f in "$unit.service" "$unit.socket"; do
        sed "s#/usr/local/bin/mtls-sidecar#$BIN#g" "$DIR/$f" >"$units/$f"
    done
    for f in "$@"; do
        sed "s#/usr/local/bin/mtls-sidecar#$BIN#g" "$DIR/$f" >"$units/$unit.service.d/$f"
    done
    out=$(cd "$units" && systemd-analyze verify --man=no "$units/$unit.service" "$units/$unit.socket" 2>&1) ||
        fail "systemd-analyze verify ($label):"$'\n'"$out"
    [ -z "$out" ] || fail "systemd-analyze verify ($label) printed warnings:"$'\n'"$out"
    out=$(systemd-analyze security --offline=yes --threshold=20 "$units/$unit.service" 2>&1) ||
        fail "systemd-analyze security ($label): exposure above 2.0:"$'\n'"$(tail -n 3 <<<"$out")"
    step "systemd-analyze verify ($label): clean; security: ${out##*exposure level for $unit.service: }"
}
analyze mtls-sidecar units
analyze mtls-sidecar socket-activation socket-activation.conf
analyze mtls-sidecar hot-rotation hot-rotation.conf
analyze mtls-sidecar-inbound inbound

# ---------------------------------------------------------------- 2. env file
HELP=$("$BIN" run --help 2>&1) || fail "mtls-sidecar run --help failed"
read_env() { # env file; sets ENV_VARS to its settings, each a flag of `mtls-sidecar run`
    local line flag
    ENV_VARS=()
    while IFS= read -r line || [ -n "$line" ]; do
        case "$line" in '' | '#'*) continue ;; esac
        [[ $line =~ ^(MTLS_SIDECAR_[A-Z0-9_]+)=(.*)$ ]] || fail "$1: not a MTLS_SIDECAR_<FLAG>=value line: $line"
        flag=--$(tr 'A-Z_' 'a-z-' <<<"${BASH_REMATCH[1]#MTLS_SIDECAR_}")
        grep -qE -- "(^|[ ,])$flag([ =,<]|$)" <<<"$HELP" || fail "$1: ${BASH_REMATCH[1]}: mtls-sidecar run has no $flag"
        ENV_VARS+=("$line")
    done <"$1"
}
read_env "$DIR/mtls-sidecar-inbound.env"
INBOUND_ENV_VARS=("${ENV_VARS[@]}")
step "inbound env file: ${#INBOUND_ENV_VARS[@]} settings, all flags of mtls-sidecar run"
read_env "$DIR/mtls-sidecar.env"
step "env file: ${#ENV_VARS[@]} settings, all flags of mtls-sidecar run"

# ---------------------------------------------------------------- 3. run it as the unit would
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Credentials: a dev PKI whose file names are the LoadCredential= IDs, owned and protected as
# systemd would (directory 0500, files 0400, owned by the service's user).
CREDS=$TMP/credentials
"$BIN" dev-pki --out "$CREDS" >/dev/null || fail "mtls-sidecar dev-pki failed"
for unit in mtls-sidecar.service mtls-sidecar-inbound.service; do
    mapfile -t CRED_IDS < <(sed -n 's/^LoadCredential=\([^:]*\):.*/\1/p' "$DIR/$unit")
    [ "${#CRED_IDS[@]}" -gt 0 ] || fail "no LoadCredential= in $unit"
    for id in "${CRED_IDS[@]}"; do [ -f "$CREDS/$id" ] || fail "$unit: credential $id: dev-pki writes no such file"; done
done

RUN_AS=()
if command -v setpriv >/dev/null; then
    RUN_AS=(setpriv --no-new-privs)
    if [ "$(id -u)" = 0 ]; then
        RUN_AS+=(--reuid=65534 --regid=65534 --clear-groups --inh-caps=-all --bounding-set=-all)
        chown -R 65534:65534 "$CREDS"
    fi
fi
chmod 0400 "$CREDS"/*
chmod 0500 "$CREDS"

# The ExecStart= line (with its continuation lines), ${VAR}/$VAR expanded as systemd does
# (${VAR} as one word, $VAR split on whitespace), binary replaced by the built one.
exec_start() { # unit file
    CREDENTIALS_DIRECTORY=$CREDS python3 - "$1" "$BIN" <<'PY'
import os, re, shlex, sys
text = open(sys.argv[1]).read().replace("\\\n", " ")
lines = [l[len("ExecStart="):] for l in text.splitlines() if l.startswith("ExecStart=")]
lines = [l for l in lines if l.strip()]
if len(lines) != 1:
    sys.exit("want exactly one non-empty ExecStart=, found %d" % len(lines))
out = []
for word in shlex.split(lines[0]):
    if re.fullmatch(r"\$[A-Za-z_][A-Za-z0-9_]*", word):
        out += os.environ.get(word[1:], "").split()
        continue
    def sub(m):
        if m.group(1) not in os.environ:
            sys.exit("ExecStart uses ${%s}, which the test does not set" % m.group(1))
        return os.environ[m.group(1)]
    out.append(re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", sub, word))
if out[0] != "/usr/local/bin/mtls-sidecar":
    sys.exit("ExecStart runs %s, not /usr/local/bin/mtls-sidecar" % out[0])
out[0] = sys.argv[2]
sys.stdout.write("\0".join(out) + "\0")
PY
}
mapfile -d '' CMD < <(exec_start "$DIR/mtls-sidecar.service") || true
[ "${#CMD[@]}" -gt 1 ] || fail "could not read ExecStart= of mtls-sidecar.service"

NOTIFY_LOG=$TMP/notify.log
start_notify_listener() { # socket path; messages, one field a line, appended to $NOTIFY_LOG
    : >"$NOTIFY_LOG"
    python3 - "$1" "$NOTIFY_LOG" <<'PY' &
import os, socket, sys, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(sys.argv[1])
os.chmod(sys.argv[1], 0o777)
s.settimeout(0.5)
end = time.time() + 120
with open(sys.argv[2], "a") as f:
    while time.time() < end:
        try:
            d = s.recv(4096)
        except socket.timeout:
            continue
        f.write(d.decode(errors="replace").strip("\n") + "\n")
        f.flush()
PY
    PIDS+=($!)
    for _ in $(seq 50); do [ -S "$1" ] && return 0; sleep 0.1; done
    fail "notify listener did not start"
}

count() { grep -c -x -- "$1" "$NOTIFY_LOG" || true; }
wait_notify() { # message, how many, seconds, pid
    local i
    for i in $(seq $(($3 * 10))); do
        [ "$(count "$1")" -ge "$2" ] && return 0
        kill -0 "$4" 2>/dev/null || fail "process exited before sending $1; its log:"$'\n'"$(tail -n 20 "$TMP/stderr")"
        sleep 0.1
    done
    fail "no $1 (#$2) on NOTIFY_SOCKET within $3s; got: $(tr '\n' ' ' <"$NOTIFY_LOG")"
}
stop_and_check() { # pid, label
    local pid=$1 rc=0 i
    kill -TERM "$pid"
    for i in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && fail "$2: still running 10s after SIGTERM"
    wait "$pid" || rc=$?
    [ "$rc" = 0 ] || fail "$2: exit code $rc after SIGTERM (want 0); its log:"$'\n'"$(tail -n 20 "$TMP/stderr")"
    [ "$(count STOPPING=1)" -ge 1 ] || fail "$2: no STOPPING=1 at shutdown"
}

# Test values: free ports, an upstream that refuses (it is dialled per connection, never at start).
ADMIN_PORT=$(free_port)
TEST_ENV=("${ENV_VARS[@]}"
    MTLS_SIDECAR_LISTEN=127.0.0.1:0
    MTLS_SIDECAR_ADMIN=127.0.0.1:$ADMIN_PORT
    MTLS_SIDECAR_UPSTREAM=127.0.0.1:9
    MTLS_SIDECAR_SERVER_NAME=localhost)

start_notify_listener "$TMP/notify.sock"
(
    umask 0077
    exec env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin "${TEST_ENV[@]}" \
        CREDENTIALS_DIRECTORY="$CREDS" NOTIFY_SOCKET="$TMP/notify.sock" WATCHDOG_USEC=2000000 \
        "${RUN_AS[@]}" "${CMD[@]}"
) 2>"$TMP/stderr" &
PID=$!
PIDS+=($PID)
wait_notify READY=1 1 10 "$PID"
"$BIN" wait --admin "127.0.0.1:$ADMIN_PORT" --timeout 10s >/dev/null 2>&1 ||
    fail "/readyz on 127.0.0.1:$ADMIN_PORT did not answer 200 within 10s; log:"$'\n'"$(tail -n 20 "$TMP/stderr")"
head -n 1 "$TMP/stderr" | grep -q '^{' || fail "MTLS_SIDECAR_LOG_FORMAT=json did not give JSON lines: $(head -n 1 "$TMP/stderr")"
grep -q listening "$TMP/stderr" || fail "no listening line in the log"
wait_notify WATCHDOG=1 1 5 "$PID"
kill -HUP "$PID" # ExecReload=
wait_notify RELOADING=1 1 10 "$PID"
wait_notify READY=1 2 10 "$PID"
grep -q '^MONOTONIC_USEC=[0-9]*$' "$NOTIFY_LOG" || fail "RELOADING=1 came without MONOTONIC_USEC"
stop_and_check "$PID" "service"
step "service: ran as ${RUN_AS[*]:-the current user} with ExecStart, env file and credentials:" \
    "READY=1, /readyz 200, WATCHDOG=1, SIGHUP -> RELOADING=1 + READY=1, SIGTERM -> STOPPING=1, exit 0"

# ---------------------------------------------------------------- 4. socket activation
FDNAME=$(sed -n 's/^FileDescriptorName=//p' "$DIR/mtls-sidecar.socket")
DROPIN_ENV=$(sed -n 's/^Environment=//p' "$DIR/socket-activation.conf")
[ "$DROPIN_ENV" = "MTLS_SIDECAR_LISTEN=systemd:$FDNAME" ] ||
    fail "socket-activation.conf sets '$DROPIN_ENV', want MTLS_SIDECAR_LISTEN=systemd:$FDNAME (FileDescriptorName= of mtls-sidecar.socket)"
for v in "${ENV_VARS[@]}"; do
    [[ $v == MTLS_SIDECAR_LISTEN=* ]] && fail "mtls-sidecar.env sets MTLS_SIDECAR_LISTEN, which would win over socket-activation.conf"
done
if command -v systemd-socket-activate >/dev/null; then
    DATA_PORT=$(free_port)
    ADMIN_PORT=$(free_port)
    SA_ENV=()
    for v in "${ENV_VARS[@]}" MTLS_SIDECAR_ADMIN=127.0.0.1:$ADMIN_PORT MTLS_SIDECAR_UPSTREAM=127.0.0.1:9 \
        MTLS_SIDECAR_SERVER_NAME=localhost "$DROPIN_ENV" CREDENTIALS_DIRECTORY="$CREDS" \
        NOTIFY_SOCKET="$TMP/notify2.sock" PATH=/usr/sbin:/usr/bin:/sbin:/bin; do
        SA_ENV+=(-E "$v")
    done
    NOTIFY_LOG=$TMP/notify2.log
    start_notify_listener "$TMP/notify2.sock"
    (
        umask 0077
        exec systemd-socket-activate -l "127.0.0.1:$DATA_PORT" --fdname="$FDNAME" "${SA_ENV[@]}" "${RUN_AS[@]}" "${CMD[@]}"
    ) 2>"$TMP/stderr" &
    PID=$!
    PIDS+=($PID)
    # systemd-socket-activate execs the service on the first connection, as a .socket unit does.
    for _ in $(seq 50); do grep -q Listening "$TMP/stderr" && break; sleep 0.1; done
    python3 -c 'import socket,sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5).close()' "$DATA_PORT" ||
        fail "socket activation: could not connect to 127.0.0.1:$DATA_PORT"
    wait_notify READY=1 1 10 "$PID"
    "$BIN" wait --admin "127.0.0.1:$ADMIN_PORT" --timeout 10s >/dev/null 2>&1 ||
        fail "socket activation: /readyz did not answer 200 within 10s; log:"$'\n'"$(tail -n 20 "$TMP/stderr")"
    grep -q "listening.*127.0.0.1:$DATA_PORT" "$TMP/stderr" ||
        fail "socket activation: the process did not take the passed socket 127.0.0.1:$DATA_PORT; log:"$'\n'"$(tail -n 20 "$TMP/stderr")"
    stop_and_check "$PID" "socket activation"
    step "socket activation: --listen systemd:$FDNAME took the passed socket; READY=1, /readyz 200, exit 0"
else
    step "socket activation: SKIPPED (systemd-socket-activate is not installed)"
fi

# ---------------------------------------------------------------- 5. the inbound unit
# Socket-activated as mtls-sidecar-inbound.socket would start it: an mTLS client with the dev
# client certificate reaches the app behind it; a client without a certificate does not.
mapfile -d '' CMD < <(exec_start "$DIR/mtls-sidecar-inbound.service") || true
[ "${#CMD[@]}" -gt 1 ] || fail "could not read ExecStart= of mtls-sidecar-inbound.service"
FDNAME=$(sed -n 's/^FileDescriptorName=//p' "$DIR/mtls-sidecar-inbound.socket")
printf '%s\n' "${CMD[@]}" | grep -qx "systemd:$FDNAME" ||
    fail "mtls-sidecar-inbound.service does not --listen systemd:$FDNAME (FileDescriptorName= of its .socket)"
grep -qx 'ListenStream=443' "$DIR/mtls-sidecar-inbound.socket" || fail "mtls-sidecar-inbound.socket does not listen on 443"
for v in "${INBOUND_ENV_VARS[@]}"; do
    [[ $v == MTLS_SIDECAR_LISTEN=* ]] && fail "mtls-sidecar-inbound.env sets MTLS_SIDECAR_LISTEN: the socket is the listener"
done
if command -v systemd-socket-activate >/dev/null && command -v curl >/dev/null; then
    DATA_PORT=$(free_port)
    ADMIN_PORT=$(free_port)
    APP_PORT=$(free_port)
    # The app: plain HTTP on loopback, one fixed answer.
    python3 - "$APP_PORT" <<'PY' &
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"inbound-app-ok\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
PY
    PIDS+=($!)
    SA_ENV=()
    # The dev client certificate carries DNS SAN mtls-sidecar-dev-client: added to the env
    # file's rule so that it may connect.
    for v in "${INBOUND_ENV_VARS[@]}" MTLS_SIDECAR_ADMIN=127.0.0.1:$ADMIN_PORT \
        MTLS_SIDECAR_TARGET=127.0.0.1:$APP_PORT MTLS_SIDECAR_VERIFY_DNS_SAN=mtls-sidecar-dev-client \
        CREDENTIALS_DIRECTORY="$CREDS" NOTIFY_SOCKET="$TMP/notify3.sock" PATH=/usr/sbin:/usr/bin:/sbin:/bin; do
        SA_ENV+=(-E "$v")
    done
    NOTIFY_LOG=$TMP/notify3.log
    start_notify_listener "$TMP/notify3.sock"
    (
        umask 0077
        exec systemd-socket-activate -l "127.0.0.1:$DATA_PORT" --fdname="$FDNAME" "${SA_ENV[@]}" "${RUN_AS[@]}" "${CMD[@]}"
    ) 2>"$TMP/stderr" &
    PID=$!
    PIDS+=($PID)
    for _ in $(seq 50); do grep -q Listening "$TMP/stderr" && break; sleep 0.1; done
    # The first connection makes systemd-socket-activate start the service; it has no client
    # certificate, so it is refused.
    if curl -sS --max-time 10 --cacert "$CREDS/ca.pem" "https://localhost:$DATA_PORT/" >/dev/null 2>&1; then
        fail "inbound unit: a client without a certificate got an answer"
    fi
    wait_notify READY=1 1 10 "$PID"
    "$BIN" wait --admin "127.0.0.1:$ADMIN_PORT" --timeout 10s >/dev/null 2>&1 ||
        fail "inbound unit: /readyz did not answer 200 within 10s; log:"$'\n'"$(tail -n 20 "$TMP/stderr")"
    got=$(curl -sS --max-time 10 --cacert "$CREDS/ca.pem" --cert "$CREDS/client.pem" --key "$CREDS/client-key.pem" \
        "https://localhost:$DATA_PORT/" 2>&1) || fail "inbound unit: curl with the client certificate failed: $got; log:"$'\n'"$(tail -n 20 "$TMP/stderr")"
    [ "$got" = inbound-app-ok ] || fail "inbound unit: the app's answer did not come through: $got"
    grep -q "listening.*127.0.0.1:$DATA_PORT" "$TMP/stderr" ||
        fail "inbound unit: the process did not take the passed socket 127.0.0.1:$DATA_PORT; log:"$'\n'"$(tail -n 20 "$TMP/stderr")"
    grep -q 'no_client_cert' "$TMP/stderr" || fail "inbound unit: no reason=no_client_cert line for the refused client"
    kill -HUP "$PID"
    wait_notify RELOADING=1 1 10 "$PID"
    wait_notify READY=1 2 10 "$PID"
    stop_and_check "$PID" "inbound unit"
    step "inbound unit: --inbound --listen systemd:$FDNAME took the passed socket; no certificate refused," \
        "the dev client reached the app; READY=1, /readyz 200, SIGHUP -> RELOADING=1 + READY=1, exit 0"
else
    step "inbound unit: run SKIPPED (systemd-socket-activate or curl is not installed)"
fi

echo "PASS deploy/systemd/verify.sh ($((SECONDS - START))s)"
