#!/usr/bin/env python3
"""Helpers of bench/soak.sh (Python 3 standard library only, so every checksum is ours).

    soak.py upstream --tcp-port P --http-port P --cert C --key K --ca CA
        an mTLS upstream (client certificate required) on 127.0.0.1 serving two protocols:
        tcp port:  first line "ECHO N\\n" -> the next N bytes are echoed, then the upstream closes (a
                   length, not the client's half-close, ends it: Python's asyncio TLS cannot half-close);
                   first line "BULK N\\n" -> N random bytes, then their SHA-256 (32 raw bytes), close.
        http port: HTTP/1.1 keep-alive; POST /echo answers the body back, GET /bytes?n=N&seed=S
                   answers random.Random(S).randbytes(N); both with an X-Sha256 header of the body.
    soak.py load --tcp ADDR --http ADDR --duration S --out DIR
        the mixed load (see LOAD KINDS below); writes DIR/load.json and DIR/failures.jsonl.
    soak.py report --dir DIR --out FILE.md
        reads what soak.sh and the load wrote, writes the Markdown result, exits 1 if a verdict fails.

Every wait is bounded (asyncio.wait_for); timestamps are wall-clock seconds so failures can be matched
to the upstream restart windows that soak.sh records.
"""
import argparse
import asyncio
import hashlib
import json
import os
import random
import ssl
import statistics
import sys
import time
from urllib.parse import parse_qs, urlsplit

CHUNK = 64 * 1024
IO_TIMEOUT = 20.0  # no single read or write of the load may take longer (the proxy must not stall)


# ----------------------------------------------------------------------------------------- upstream


def server_context(cert, key, ca, alpn):
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    ctx.load_verify_locations(ca)
    ctx.verify_mode = ssl.CERT_REQUIRED  # like nginx ssl_verify_client on
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


async def up_tcp(reader, writer):
    try:
        line = await asyncio.wait_for(reader.readline(), 60)
        parts = line.split()
        if parts[:1] == [b"ECHO"] and len(parts) == 2:
            left = int(parts[1])
            while left > 0:
                data = await asyncio.wait_for(reader.read(min(CHUNK, left)), 120)
                if not data:
                    break
                left -= len(data)
                writer.write(data)
                await writer.drain()
        elif parts[:1] == [b"BULK"] and len(parts) == 2:
            n = int(parts[1])
            h = hashlib.sha256()
            rnd = random.Random()
            while n > 0:
                block = rnd.randbytes(min(CHUNK, n))
                h.update(block)
                writer.write(block)
                await writer.drain()
                n -= len(block)
            writer.write(h.digest())
            await writer.drain()
    except (OSError, asyncio.TimeoutError, ValueError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


async def read_http_head(reader):
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 120)
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    return method, target, headers


async def read_http_body(reader, headers):
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = bytearray()
        while True:
            size = int((await asyncio.wait_for(reader.readline(), 60)).split(b";")[0], 16)
            if size == 0:
                await asyncio.wait_for(reader.readuntil(b"\r\n"), 60)  # no trailers are sent
                return bytes(body)
            body += await asyncio.wait_for(reader.readexactly(size + 2), 60)
            del body[-2:]
    n = int(headers.get("content-length", "0"))
    return await asyncio.wait_for(reader.readexactly(n), 60) if n else b""


async def up_http(reader, writer):
    try:
        while True:
            try:
                method, target, headers = await read_http_head(reader)
            except asyncio.IncompleteReadError:
                break  # the pool closed an idle connection
            body = await read_http_body(reader, headers)
            url = urlsplit(target)
            status = "200 OK"
            if method == "POST" and url.path == "/echo":
                out = body
            elif method == "GET" and url.path == "/bytes":
                q = parse_qs(url.query)
                out = random.Random(int(q["seed"][0])).randbytes(int(q["n"][0]))
            else:
                status, out = "404 Not Found", b"not found\n"
            close = headers.get("connection", "").lower() == "close"
            writer.write(
                (
                    f"HTTP/1.1 {status}\r\nContent-Length: {len(out)}\r\n"
                    f"X-Sha256: {hashlib.sha256(out).hexdigest()}\r\n"
                    f"Connection: {'close' if close else 'keep-alive'}\r\n\r\n"
                ).encode()
            )
            writer.write(out)
            await writer.drain()
            if close:
                break
    except (OSError, asyncio.TimeoutError, ValueError, KeyError, asyncio.IncompleteReadError,
            asyncio.LimitOverrunError):
        pass
    finally:
        writer.close()


async def upstream_main(a):
    tcp_ctx = server_context(a.cert, a.key, a.ca, None)
    http_ctx = server_context(a.cert, a.key, a.ca, ["http/1.1"])
    servers = [
        await asyncio.start_server(up_tcp, "127.0.0.1", a.tcp_port, ssl=tcp_ctx, backlog=1024,
                                   ssl_handshake_timeout=10, reuse_address=True),
        await asyncio.start_server(up_http, "127.0.0.1", a.http_port, ssl=http_ctx, backlog=1024,
                                   ssl_handshake_timeout=10, reuse_address=True),
    ]
    await asyncio.gather(*(s.serve_forever() for s in servers))


# --------------------------------------------------------------------------------------------- load
#
# LOAD KINDS (concurrency from env, defaults in brackets):
#   tcp_echo [SOAK_ECHO=4]     1..16 rounds of a 1 KiB..256 KiB random block per connection, each echoed
#                              block's SHA-256 compared; then the upstream's close must arrive as a clean EOF
#   tcp_bulk [SOAK_BULK=2]     BULK of 1..8 MiB, the digest the upstream announces after the data compared
#   tcp_churn [SOAK_CHURN=4]   one short connection per 64-byte echo
#   http_keepalive [SOAK_KA=4] one connection, POST /echo (0..64 KiB) and GET /bytes (0..256 KiB) in turn,
#                              body checked against our own digest and the upstream's X-Sha256
#   http_churn [SOAK_HCHURN=2] one connection per GET /bytes (Connection: close)
#   slow (every SLOW_INTERVAL s, SLOW_N connections for SLOW_HOLD s, in four equal parts): tcp dribble
#                              (ECHO, one byte a second, echo checked), tcp silent, http dribble (the request
#                              head one byte a second), http silent. A slow http client that the proxy cuts
#                              (header timeout) is counted as "cut", not as a failure.


class Failure(Exception):
    """A transfer that did not complete; `corrupt` when the bytes arrived but were wrong."""

    def __init__(self, msg, corrupt=False):
        super().__init__(msg)
        self.corrupt = corrupt


class Load:
    def __init__(self, a):
        self.a = a
        self.deadline = time.time() + a.duration
        self.stats = {}
        self.fail_file = open(os.path.join(a.out, "failures.jsonl"), "w")

    def st(self, kind):
        return self.stats.setdefault(kind, {
            "ok": 0, "failed": 0, "corrupt": 0, "cut": 0, "bytes_sent": 0, "bytes_received": 0,
            "bytes_verified": 0,
        })

    def record_failure(self, kind, start, err):
        s = self.st(kind)
        corrupt = isinstance(err, Failure) and err.corrupt
        s["corrupt" if corrupt else "failed"] += 1
        msg = f"{type(err).__name__}: {err}" if not isinstance(err, Failure) else str(err)
        self.fail_file.write(json.dumps({"kind": kind, "start": start, "end": time.time(),
                                         "corrupt": corrupt, "error": msg[:300]}) + "\n")
        self.fail_file.flush()

    async def connect(self, addr):
        host, port = addr.rsplit(":", 1)
        return await asyncio.wait_for(asyncio.open_connection(host, int(port)), IO_TIMEOUT)

    async def read_exactly(self, r, n, kind):
        try:
            data = await asyncio.wait_for(r.readexactly(n), IO_TIMEOUT)
        except asyncio.IncompleteReadError as e:
            self.st(kind)["bytes_received"] += len(e.partial)
            raise Failure(f"truncated: got {len(e.partial)} of {n} bytes")
        self.st(kind)["bytes_received"] += len(data)
        return data

    async def expect_eof(self, r, kind):
        rest = await asyncio.wait_for(r.read(), IO_TIMEOUT)
        if rest:
            self.st(kind)["bytes_received"] += len(rest)
            raise Failure(f"{len(rest)} unexpected bytes after the end", corrupt=True)

    async def worker(self, kind, fn, pause):
        while time.time() < self.deadline:
            start = time.time()
            try:
                await fn(kind)
                self.st(kind)["ok"] += 1
            except Exception as e:  # noqa: BLE001 - every kind of failure is counted, none ends a worker
                self.record_failure(kind, start, e)
                await asyncio.sleep(0.2)  # do not spin while the upstream is away
            await asyncio.sleep(pause)

    async def tcp_echo(self, kind, rounds=None):
        r, w = await self.connect(self.a.tcp)
        try:
            s = self.st(kind)
            sizes = [random.randint(1024, 256 * 1024) for _ in range(rounds or random.randint(1, 16))]
            w.write(f"ECHO {sum(sizes)}\n".encode())
            for size in sizes:
                block = random.randbytes(size)
                w.write(block)
                s["bytes_sent"] += len(block)
                # Read while writing: a 256 KiB block does not fit the socket buffers both ways.
                got = await asyncio.gather(asyncio.wait_for(w.drain(), IO_TIMEOUT),
                                           self.read_exactly(r, len(block), kind))
                if hashlib.sha256(got[1]).digest() != hashlib.sha256(block).digest():
                    raise Failure("echo digest mismatch", corrupt=True)
                s["bytes_verified"] += len(block)
            await self.expect_eof(r, kind)
        finally:
            w.close()

    async def tcp_churn(self, kind):
        r, w = await self.connect(self.a.tcp)
        try:
            block = random.randbytes(64)
            w.write(b"ECHO 64\n" + block)
            self.st(kind)["bytes_sent"] += len(block)
            got = await self.read_exactly(r, len(block), kind)
            if got != block:
                raise Failure("churn echo mismatch", corrupt=True)
            self.st(kind)["bytes_verified"] += len(block)
            await self.expect_eof(r, kind)
        finally:
            w.close()

    async def tcp_bulk(self, kind):
        r, w = await self.connect(self.a.tcp)
        try:
            n = random.randint(1, 8) * 1024 * 1024
            w.write(f"BULK {n}\n".encode())
            h = hashlib.sha256()
            left = n
            while left:
                part = await self.read_exactly(r, min(CHUNK, left), kind)
                h.update(part)
                left -= len(part)
            announced = await self.read_exactly(r, 32, kind)
            if announced != h.digest():
                raise Failure(f"bulk digest mismatch ({n} bytes)", corrupt=True)
            self.st(kind)["bytes_verified"] += n
            await self.expect_eof(r, kind)
        finally:
            w.close()

    async def http_request(self, kind, r, w, method, path, body=b"", close=False):
        """One request on an open connection; returns whether the server keeps it open."""
        s = self.st(kind)
        w.write((f"{method} {path} HTTP/1.1\r\nHost: soak\r\nContent-Length: {len(body)}\r\n"
                 f"{'Connection: close' + chr(13) + chr(10) if close else ''}\r\n").encode() + body)
        s["bytes_sent"] += len(body)
        await asyncio.wait_for(w.drain(), IO_TIMEOUT)
        try:
            head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), IO_TIMEOUT)
        except asyncio.IncompleteReadError as e:
            raise Failure(f"connection closed before the response head ({len(e.partial)} bytes)")
        lines = head.decode("latin-1").split("\r\n")
        status = lines[0].split(" ", 2)
        headers = {k.strip().lower(): v.strip() for k, v in
                   (line.split(":", 1) for line in lines[1:] if ":" in line)}
        if "content-length" not in headers:
            raise Failure(f"response without content-length: {lines[0]!r} {headers}")
        got = await self.read_exactly(r, int(headers["content-length"]), kind)
        if status[1] != "200":
            raise Failure(f"status {status[1]}: {got[:120]!r}")
        return headers, got

    def check_body(self, kind, headers, got, want):
        if hashlib.sha256(got).hexdigest() != headers.get("x-sha256") or got != want:
            raise Failure(f"http body mismatch ({len(got)} of {len(want)} bytes)", corrupt=True)
        self.st(kind)["bytes_verified"] += len(got)

    async def http_keepalive(self, kind):
        r, w = await self.connect(self.a.http)
        try:
            # Many requests per connection; one connection is one "ok".
            for i in range(random.randint(20, 200)):
                if time.time() >= self.deadline:
                    break
                if i % 2 == 0:
                    body = random.randbytes(random.randint(0, 64 * 1024))
                    headers, got = await self.http_request(kind, r, w, "POST", "/echo", body)
                    self.check_body(kind, headers, got, body)
                else:
                    n, seed = random.randint(0, 256 * 1024), random.randint(0, 2**31)
                    headers, got = await self.http_request(kind, r, w, "GET", f"/bytes?n={n}&seed={seed}")
                    self.check_body(kind, headers, got, random.Random(seed).randbytes(n))
                self.st(kind)["requests"] = self.st(kind).get("requests", 0) + 1
                await asyncio.sleep(0.01)
        finally:
            w.close()

    async def http_churn(self, kind):
        r, w = await self.connect(self.a.http)
        try:
            n, seed = random.randint(0, 4096), random.randint(0, 2**31)
            headers, got = await self.http_request(kind, r, w, "GET", f"/bytes?n={n}&seed={seed}", close=True)
            self.check_body(kind, headers, got, random.Random(seed).randbytes(n))
            await self.expect_eof(r, kind)
        finally:
            w.close()

    # ---- slow clients

    async def slow_one(self, kind, hold):
        start = time.time()
        try:
            addr = self.a.tcp if kind.startswith("slow_tcp") else self.a.http
            r, w = await self.connect(addr)
            try:
                if kind == "slow_tcp_dribble":
                    w.write(f"ECHO {int(hold)}\n".encode())
                    sent = bytearray()
                    for _ in range(int(hold)):
                        b = random.randbytes(1)
                        w.write(b)
                        sent += b
                        self.st(kind)["bytes_sent"] += 1
                        await asyncio.wait_for(w.drain(), IO_TIMEOUT)
                        await asyncio.sleep(1)
                    got = await self.read_exactly(r, len(sent), kind)
                    if got != bytes(sent):
                        raise Failure("dribbled echo mismatch", corrupt=True)
                    self.st(kind)["bytes_verified"] += len(sent)
                    await self.expect_eof(r, kind)
                elif kind == "slow_tcp_silent":
                    # Nothing to say: the proxy must keep the connection (tcp mode has no idle timeout).
                    try:
                        data = await asyncio.wait_for(r.read(1), hold)
                        raise Failure(f"silent tcp connection ended early ({data!r})")
                    except asyncio.TimeoutError:
                        pass
                elif kind == "slow_http_silent":
                    try:
                        await asyncio.wait_for(r.read(1), hold)
                    except asyncio.TimeoutError:
                        pass  # still open: no header timeout, or a longer one
                    except ConnectionResetError:
                        return self.cut(kind, start)
                    else:
                        return self.cut(kind, start)  # closed by the proxy (header timeout): wanted
                else:
                    head = b"GET /bytes?n=16&seed=7 HTTP/1.1\r\nHost: soak\r\nX-Pad: " + b"a" * 8 + b"\r\n\r\n"
                    # One byte a second for `hold` seconds, then the rest of the head at once.
                    slow = min(int(hold), len(head) - 1)
                    pieces = [head[i:i + 1] for i in range(slow)] + [head[slow:]]
                    for i, piece in enumerate(pieces):
                        try:
                            w.write(piece)
                            await asyncio.wait_for(w.drain(), IO_TIMEOUT)
                        except OSError:
                            return self.cut(kind, start)
                        if i < slow:
                            await asyncio.sleep(1)
                    try:
                        headers, got = await self.http_request_response(kind, r)
                    except (Failure, ConnectionResetError) as e:
                        # A proxy that closed a slow head: EOF, an RST for the bytes sent after it, or 408.
                        if isinstance(e, ConnectionResetError) or "(0 bytes)" in str(e) or "408" in str(e):
                            return self.cut(kind, start)
                        raise
                    self.check_body(kind, headers, got, random.Random(7).randbytes(16))
                self.st(kind)["ok"] += 1
            finally:
                w.close()
        except Exception as e:  # noqa: BLE001 - counted, never lost
            self.record_failure(kind, start, e)

    def cut(self, kind, start):
        """A slow client the proxy closed: wanted (header timeout), counted apart from failures."""
        s = self.st(kind)
        s["cut"] += 1
        after = round(time.time() - start, 1)
        s["cut_after_min_s"] = min(s.get("cut_after_min_s", after), after)
        s["cut_after_max_s"] = max(s.get("cut_after_max_s", after), after)

    async def http_request_response(self, kind, r):
        try:
            head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), IO_TIMEOUT)
        except asyncio.IncompleteReadError as e:
            raise Failure(f"connection closed before the response head ({len(e.partial)} bytes)")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, v in
                   (line.split(":", 1) for line in lines[1:] if ":" in line)}
        got = await self.read_exactly(r, int(headers.get("content-length", "0")), kind)
        if lines[0].split(" ", 2)[1] != "200":
            raise Failure(f"slow request answered {lines[0]!r}")
        return headers, got

    async def slow_bursts(self):
        interval, n, hold = self.a.slow_interval, self.a.slow_n, self.a.slow_hold
        kinds = ["slow_tcp_dribble", "slow_tcp_silent", "slow_http_dribble", "slow_http_silent"]
        tasks = []
        nxt = time.time() + min(interval, 10)
        while nxt + hold < self.deadline:
            await asyncio.sleep(max(0, nxt - time.time()))
            with open(os.path.join(self.a.out, "bursts.tsv"), "a") as f:
                f.write(f"{time.time()}\n")  # so the report can tell burst samples from quiet ones
            for i in range(n):
                tasks.append(asyncio.create_task(self.slow_one(kinds[i % 4], hold)))
            nxt += interval
        if tasks:
            await asyncio.wait(tasks, timeout=hold + 3 * IO_TIMEOUT)

    async def run(self):
        env = os.environ.get
        jobs = []
        for kind, fn, env_name, default, pause in [
            ("tcp_echo", self.tcp_echo, "SOAK_ECHO", 4, 0.05),
            ("tcp_bulk", self.tcp_bulk, "SOAK_BULK", 2, 0.2),
            ("tcp_churn", self.tcp_churn, "SOAK_CHURN", 4, 0.01),
            ("http_keepalive", self.http_keepalive, "SOAK_KA", 4, 0.01),
            ("http_churn", self.http_churn, "SOAK_HCHURN", 2, 0.01),
        ]:
            self.st(kind)
            for _ in range(int(env(env_name, default))):
                jobs.append(asyncio.create_task(self.worker(kind, fn, pause)))
        jobs.append(asyncio.create_task(self.slow_bursts()))
        # Workers stop starting new work at the deadline; what is in flight gets a bounded end.
        done, pending = await asyncio.wait(jobs, timeout=self.a.duration + self.a.slow_hold + 4 * IO_TIMEOUT)
        for t in pending:
            t.cancel()
        with open(os.path.join(self.a.out, "load.json"), "w") as f:
            json.dump({"stats": self.stats, "unfinished_workers": len(pending)}, f, indent=1)


# ------------------------------------------------------------------------------------------- report


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def read_tsv(path):
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                if line.strip() and not line.startswith("#"):
                    rows.append(line.split())
    return rows


def metric_sum(metrics, name, **labels):
    total = 0.0
    for line in metrics.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def report(a):
    d = a.dir
    meta = json.load(open(os.path.join(d, "meta.json")))
    samples = [[float(x) for x in row] for row in read_tsv(os.path.join(d, "samples.tsv"))]
    restart_rows = read_tsv(os.path.join(d, "restarts.tsv"))
    restarts = [(float(r[0]), float(r[1])) for r in restart_rows if len(r) >= 2]
    rotations = len(read_tsv(os.path.join(d, "rotations.tsv")))
    load = json.load(open(os.path.join(d, "load.json"))) if os.path.exists(os.path.join(d, "load.json")) else {"stats": {}, "unfinished_workers": "load.json missing"}
    failures = [json.loads(line) for line in open(os.path.join(d, "failures.jsonl"))] if os.path.exists(os.path.join(d, "failures.jsonl")) else []
    metrics = open(os.path.join(d, "metrics-final.txt")).read() if os.path.exists(os.path.join(d, "metrics-final.txt")) else ""
    grace = meta["restart_grace"]
    duration = meta["duration"]
    verdicts = []

    out = []
    p = out.append
    p(f"# Soak result ({meta['date']})\n")
    p(f"Binary `{meta['binary']}` (commit `{meta['commit']}`), {meta['cpus']} CPUs, run by `bench/soak.sh`.\n")
    p(f"Duration {duration} s; identity rotation every {meta['rotate']} s; upstream restart every "
      f"{meta['restart']} s (down {meta['restart_down']} s); slow burst of {meta['slow_n']} every "
      f"{meta['slow_interval']} s for {meta['slow_hold']} s; sample every {meta['sample']} s; "
      f"reload interval {meta['reload_interval']}.\n")
    p(f"Load concurrency: {meta['load_env']}. CPU used by the proxy: {meta.get('proxy_cpu_s', '?')} s; "
      f"by the load generator + upstream: {meta.get('other_cpu_s', '?')} s.\n")

    p("How to read it: every interval is counted from the start, so with the default intervals (rotation "
      "15 s, restart 120 s, slow burst 60 s, sample 10 s, 1200 s) each quarter holds the same phases of "
      "every cycle and quarter medians are comparable. A failure is *explained* when the connection or "
      "request was open at some moment between an upstream stop (minus 1 s) and the upstream being back "
      f"plus {grace} s; anything else, and any checksum mismatch, fails the run.\n")

    # ---- resources
    p("## Resources\n")
    t0 = meta["start"]
    bursts = [float(r[0]) - t0 for r in read_tsv(os.path.join(d, "bursts.tsv"))]

    def phase(t):
        if any(b - 1 <= t <= b + meta["slow_hold"] + 3 for b in bursts):
            return "slow burst"
        if any(stop - t0 - 1 <= t <= ready - t0 + grace for stop, ready in restarts):
            return "restart"
        return ""

    p("| t (s) | RSS KiB | fds | threads | active connections | phase |")
    p("|---:|---:|---:|---:|---:|---|")
    for s in samples:
        p(f"| {s[0]:.0f} | {s[1]:.0f} | {s[2]:.0f} | {s[3]:.0f} | {s[4]:.0f} | {phase(s[0])} |")
    p("")
    # A burst of slow clients adds two fds per connection for `slow_hold` of every `slow_interval`
    # seconds: half of the samples with the defaults, so a median over all samples would flip between
    # the two levels by timing jitter alone. The trend is judged on the quiet samples (no burst, no
    # restart): a leak of anything, burst connections included, stays and shows there.
    quiet = [s for s in samples if not phase(s[0])]
    p(f"Quarter medians over the {len(quiet)} quiet samples (outside slow bursts and restart windows):\n")
    q = [[s for s in quiet if k * duration / 4 <= s[0] < (k + 1) * duration / 4 + (1 if k == 3 else 0)]
         for k in range(4)]
    p("| metric | Q1 median | Q2 median | Q3 median | Q4 median | Q4 / Q2 | verdict (Q4 ≤ Q2 + 5%; counts: + 1 at least) |")
    p("|---|---:|---:|---:|---:|---:|---|")
    for col, name in [(1, "RSS KiB"), (2, "fds"), (3, "threads")]:
        meds = [median([s[col] for s in qq]) for qq in q]
        ratio = meds[3] / meds[1] if meds[1] else float("nan")
        # Counts move by whole units: with 6 threads one more is +17%, so one unit is always tolerated
        # (it cannot be told from noise, and a leak grows by more than one over a whole quarter).
        slack = max(meds[1] * 0.05, 0 if col == 1 else 1)
        ok = bool(q[1] and q[3] and meds[3] <= meds[1] + slack)
        verdicts.append((f"{name}: last quarter's median within 5% of the second quarter's"
                         + ("" if col == 1 else " (at least one unit tolerated)"), ok))
        p(f"| {name} | {meds[0]:.0f} | {meds[1]:.0f} | {meds[2]:.0f} | {meds[3]:.0f} | {ratio:.3f} | "
          f"{'PASS' if ok else 'FAIL'} |")
    p("")

    # ---- bytes
    p("## Bytes and checksums per load kind\n")
    p("| kind | completed | failed | corrupt | cut by proxy | bytes sent | bytes received | bytes verified |")
    p("|---|---:|---:|---:|---:|---:|---:|---:|")
    corrupt_total = 0
    for kind, s in sorted(load["stats"].items()):
        corrupt_total += s["corrupt"]
        extra = f" ({s['requests']} requests)" if "requests" in s else ""
        cut = f"{s['cut']}" + (f" (after {s['cut_after_min_s']}..{s['cut_after_max_s']} s)" if s["cut"] else "")
        p(f"| {kind} | {s['ok']}{extra} | {s['failed']} | {s['corrupt']} | {cut} | {s['bytes_sent']} | "
          f"{s['bytes_received']} | {s['bytes_verified']} |")
    p("")
    p("*bytes verified*: bytes of completed transfers whose SHA-256 matched (echo: what we sent; bulk: the "
      "digest the upstream announced; http: our own digest and the upstream's `X-Sha256`). A transfer that "
      "ends early is a failure (listed below), one with wrong bytes is *corrupt*.\n")
    verdicts.append(("zero corrupted bytes (checksum mismatches)", corrupt_total == 0))
    verdicts.append(("load generator finished in time", load.get("unfinished_workers") == 0))

    # ---- failures vs restart windows
    p("## Failures and upstream restarts\n")
    p(f"Restart windows (stop − 1 s .. ready + {grace} s), {len(restarts)} restarts:\n")
    p("| # | stopped at (s) | ready at (s) | failures explained |")
    p("|---:|---:|---:|---:|")
    explained_by = [0] * len(restarts)
    unexplained = []
    for f in failures:
        if f.get("corrupt"):
            unexplained.append(f)
            continue
        hit = None
        for i, (stop, ready) in enumerate(restarts):
            if f["start"] <= ready + grace and f["end"] >= stop - 1:
                hit = i
                break
        if hit is None:
            unexplained.append(f)
        else:
            explained_by[hit] += 1
    for i, (stop, ready) in enumerate(restarts):
        p(f"| {i + 1} | {stop - t0:.1f} | {ready - t0:.1f} | {explained_by[i]} |")
    p("")
    p(f"Failed connections/requests: {len(failures)}; explained by a restart: {sum(explained_by)}; "
      f"**unexplained: {len(unexplained)}**.\n")
    if unexplained:
        p("| kind | started (s) | ended (s) | error |")
        p("|---|---:|---:|---|")
        for f in unexplained[:50]:
            p(f"| {f['kind']} | {f['start'] - t0:.1f} | {f['end'] - t0:.1f} | {f['error'].replace('|', '/')} |")
        if len(unexplained) > 50:
            p(f"| … {len(unexplained) - 50} more in failures.jsonl | | | |")
        p("")
    verdicts.append(("every failure falls in an upstream restart window", not unexplained))
    verdicts.append(("the upstream came back after every restart (harness)",
                     all(len(r) == 2 for r in restart_rows)))
    kinds = {}
    for f in failures:
        key = (f["kind"], f["error"].split(":")[0][:60])
        kinds[key] = kinds.get(key, 0) + 1
    if kinds:
        p("Failures by kind and error:\n")
        p("| kind | error | count |")
        p("|---|---|---:|")
        for (k, e), n in sorted(kinds.items()):
            p(f"| {k} | {e.replace('|', '/')} | {n} |")
        p("")

    # ---- reloads and metrics
    ok_r = metric_sum(metrics, "mtls_sidecar_reloads_total", result="success")
    bad_r = metric_sum(metrics, "mtls_sidecar_reloads_total", result="failure")
    p("## Identity rotation\n")
    p(f"Rotations (atomic swap of the `..data` symlink between two client identities): {rotations}. "
      f"`reloads_total` from `/metrics`: success {ok_r:.0f}, failure {bad_r:.0f}.\n")
    verdicts.append(("no failed reload", bad_r == 0))
    verdicts.append(("every rotation reloaded (successes ≥ rotations)", ok_r >= rotations))
    p("## Proxy counters at the end\n")
    p("```")
    for line in metrics.splitlines():
        if line.startswith(("mtls_sidecar_connections_total", "mtls_sidecar_http_requests_total",
                            "mtls_sidecar_bytes_total", "mtls_sidecar_connection_failures_total",
                            "mtls_sidecar_active_connections")):
            p(line)
    p("```\n")
    if os.path.exists(os.path.join(d, "wrk.txt")):
        p("Extra request load (`wrk`, WRK=1; its errors include the restart windows and are not judged):\n")
        p("```")
        p(open(os.path.join(d, "wrk.txt")).read().rstrip())
        p("```\n")
    if os.path.exists(os.path.join(d, "log-summary.txt")):
        p("Proxy log (level of each line, and `outcome=` of access lines):\n")
        p("```")
        p(open(os.path.join(d, "log-summary.txt")).read().rstrip())
        p("```\n")

    p("## Shutdown\n")
    p(f"After the soak, SIGTERM: {meta['proxy_exit']}.\n")
    verdicts.append(("the proxy ran throughout and SIGTERM ended it with exit 0",
                     meta["proxy_exit"].startswith("exit 0 ")))
    verdicts.append(("the load generator exited 0", meta["load_rc"] == 0))
    p("## Verdict\n")
    for name, ok in verdicts:
        p(f"- {'PASS' if ok else 'FAIL'}: {name}")
    passed = all(ok for _, ok in verdicts)
    p(f"\n**{'PASS' if passed else 'FAIL'}**\n")
    with open(a.out, "w") as f:
        f.write("\n".join(out))
    print("\n".join(f"{'PASS' if ok else 'FAIL'}: {n}" for n, ok in verdicts))
    return 0 if passed else 1


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    u = sub.add_parser("upstream")
    u.add_argument("--tcp-port", type=int, required=True)
    u.add_argument("--http-port", type=int, required=True)
    u.add_argument("--cert", required=True)
    u.add_argument("--key", required=True)
    u.add_argument("--ca", required=True)
    ld = sub.add_parser("load")
    ld.add_argument("--tcp", required=True)
    ld.add_argument("--http", required=True)
    ld.add_argument("--duration", type=float, required=True)
    ld.add_argument("--slow-interval", type=float, default=60)
    ld.add_argument("--slow-n", type=int, default=100)
    ld.add_argument("--slow-hold", type=float, default=30)
    ld.add_argument("--out", required=True)
    rp = sub.add_parser("report")
    rp.add_argument("--dir", required=True)
    rp.add_argument("--out", required=True)
    a = ap.parse_args()
    if a.cmd == "upstream":
        asyncio.run(upstream_main(a))
    elif a.cmd == "load":
        asyncio.run(Load(a).run())
    else:
        sys.exit(report(a))


if __name__ == "__main__":
    main()
