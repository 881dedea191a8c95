#!/bin/bash
# Part of the issue-12 bulk re-measure (see bench/results-issue12-nocopy-2026-12-02.md). Needs ../shared/bench/setup.sh PKI and /tmp/cg/blob (head -c 67108864 /dev/urandom > /tmp/cg/blob).
BIN=$1; L=$2; P=/tmp/mtls-bench/pki/ecdsa
cd /tmp/cg
openssl s_server -accept 127.0.0.1:19443 -cert $P/server.crt -key $P/server.key -CAfile $P/ca.crt -Verify 1 -WWW -quiet > /dev/null 2>&1 &
SP=$!
$BIN run --listen 127.0.0.1:19080 --upstream localhost:19443 --cert $P/client.crt --key $P/client.key --ca $P/ca.crt > /tmp/cg/slog.$L 2>&1 &
VP=$!
for i in $(seq 1 100); do grep -q listening /tmp/cg/slog.$L && break; sleep 0.1; done
strace -c -f -p $VP -o /tmp/cg/strace.$L 2>/dev/null &
STP=$!
sleep 0.5
curl -s -o /tmp/cg/out.$L http://127.0.0.1:19080/blob --http1.0
cmp /tmp/cg/out.$L blob && echo "$L bytes ok"
kill -INT $STP; wait $STP 2>/dev/null
kill -INT $VP; wait $VP 2>/dev/null
kill $SP; wait $SP 2>/dev/null
head -14 /tmp/cg/strace.$L
