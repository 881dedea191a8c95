#!/usr/bin/env python3
"""Load generator for bench/callgrind.sh: runs OUTSIDE callgrind, so only the proxy is counted.

Every mode checks what it gets back (status 200, the body length) and exits 1 on any failure, so a
count is never taken over a run that did not do its work. Loopback only; every wait is bounded.

  conns     N new connections (C at a time): connect, optional TLS (client certificate, optional
            session resumption), GET / with Connection: close, read to EOF.
  keepalive N requests over C keep-alive connections (GET /, Content-Length bodies).
  bulk      one GET of PATH, read to EOF, check the byte count.
"""
import argparse
import socket
import ssl
import sys
import threading
import time

TIMEOUT = 120.0


def tls_context(a):
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=a.ca)
    ctx.load_cert_chain(a.cert, a.key)
    return ctx


def dial(a, ctx, session=None):
    s = socket.create_connection(("127.0.0.1", a.port), timeout=TIMEOUT)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if ctx is None:
        return s
    return ctx.wrap_socket(s, server_hostname="localhost", session=session)


def read_to_eof(s, limit):
    got = bytearray()
    while True:
        b = s.recv(1 << 16)
        if not b:
            return bytes(got)
        if len(got) + len(b) > limit:
            raise RuntimeError("response larger than expected")
        got += b


def head_and_body_len(data):
    i = data.find(b"\r\n\r\n")
    if i < 0 or not data.startswith(b"HTTP/1.1 200"):
        raise RuntimeError("bad response: %r" % data[:80])
    return len(data) - i - 4


def conns(a, ctx):
    counts = {"ok": 0, "reused": 0, "failed": 0}
    lock = threading.Lock()
    per = [a.n // a.c + (1 if i < a.n % a.c else 0) for i in range(a.c)]

    def worker(k):
        session = None
        for _ in range(k):
            try:
                s = dial(a, ctx, session if a.resume else None)
                s.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                head_and_body_len(read_to_eof(s, 1 << 16))
                reused = ctx is not None and s.session_reused
                if ctx is not None and a.resume:
                    session = s.session
                s.close()
                with lock:
                    counts["ok"] += 1
                    counts["reused"] += int(reused)
            except Exception as e:  # noqa: BLE001 - counted and reported
                with lock:
                    counts["failed"] += 1
                print("conn failed: %s" % e, file=sys.stderr)

    run_threads(worker, per)
    return counts


def read_response(s, buf):
    """One keep-alive response from s (buf: bytes already read); returns the rest of buf."""
    deadline = time.monotonic() + TIMEOUT
    while b"\r\n\r\n" not in buf:
        buf += recv_some(s, deadline)
    head, rest = buf.split(b"\r\n\r\n", 1)
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError("bad response: %r" % head[:80])
    length = None
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == b"content-length":
            length = int(v.strip())
    if length is None:
        raise RuntimeError("no Content-Length")
    while len(rest) < length:
        rest += recv_some(s, deadline)
    return rest[length:]


def recv_some(s, deadline):
    if time.monotonic() > deadline:
        raise RuntimeError("response timed out")
    b = s.recv(1 << 16)
    if not b:
        raise RuntimeError("connection closed mid-response")
    return b


def keepalive(a, ctx):
    counts = {"ok": 0, "failed": 0}
    lock = threading.Lock()
    per = [a.n // a.c + (1 if i < a.n % a.c else 0) for i in range(a.c)]

    def worker(k):
        try:
            s = dial(a, ctx)
            buf = b""
            for _ in range(k):
                s.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
                buf = read_response(s, buf)
                with lock:
                    counts["ok"] += 1
            s.close()
        except Exception as e:  # noqa: BLE001 - counted and reported
            with lock:
                counts["failed"] += 1
            print("keep-alive connection failed: %s" % e, file=sys.stderr)

    run_threads(worker, per)
    return counts


def bulk(a, ctx):
    s = dial(a, ctx)
    s.sendall(("GET %s HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n" % a.path).encode())
    got = 0
    head = b""
    while b"\r\n\r\n" not in head:
        b = s.recv(1 << 16)
        if not b:
            raise RuntimeError("closed before the head")
        head += b
    got = head_and_body_len(head)
    while True:
        b = s.recv(1 << 18)
        if not b:
            break
        got += len(b)
    s.close()
    ok = got == a.bytes
    if not ok:
        print("bulk: got %d bytes, expected %d" % (got, a.bytes), file=sys.stderr)
    return {"ok": int(ok), "failed": int(not ok), "bytes": got}


def run_threads(worker, per):
    ts = [threading.Thread(target=worker, args=(k,), daemon=True) for k in per if k]
    for t in ts:
        t.start()
    for t in ts:
        t.join(TIMEOUT * 10)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("mode", choices=["conns", "keepalive", "bulk"])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("-n", type=int, default=1)
    p.add_argument("-c", type=int, default=1)
    p.add_argument("--tls", action="store_true", help="TLS with a client certificate (inbound)")
    p.add_argument("--cert")
    p.add_argument("--key")
    p.add_argument("--ca")
    p.add_argument("--resume", action="store_true", help="resume the previous TLS session")
    p.add_argument("--path", default="/blob")
    p.add_argument("--bytes", type=int, default=0)
    a = p.parse_args()
    ctx = tls_context(a) if a.tls else None
    r = {"conns": conns, "keepalive": keepalive, "bulk": bulk}[a.mode](a, ctx)
    print(" ".join("%s=%d" % kv for kv in r.items()))
    if r["failed"] or (a.mode == "conns" and a.resume and a.tls and r["reused"] < a.n - a.c):
        sys.exit(1)


if __name__ == "__main__":
    main()
