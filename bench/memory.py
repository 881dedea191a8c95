#!/usr/bin/env python3
"""Memory of mtls-sidecar: a fresh process's RSS, broken down by mapping, and memory per idle
connection (tcp mode, outbound and inbound). Standard library only; Linux /proc. Driven by
bench/memory.sh (see there for usage). Every process started here is stopped by pid; every
wait has a deadline."""

import argparse
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

HOST = "127.0.0.1"
STARTED = []  # Popen objects, stopped at exit


def free_port():
    s = socket.socket()
    s.bind((HOST, 0))
    p = s.getsockname()[1]
    s.close()
    return p


def stop_all():
    for p in STARTED:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in STARTED:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=5)
    STARTED.clear()


def start(cmd, log):
    f = open(log, "w")
    p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    STARTED.append(p)
    return p


def stop(p):
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=5)
    if p in STARTED:
        STARTED.remove(p)


def wait_log(p, log, word, count=1, limit=20):
    end = time.monotonic() + limit
    while time.monotonic() < end:
        with open(log) as f:
            if f.read().count(word) >= count:
                return
        if p.poll() is not None:
            break
        time.sleep(0.05)
    with open(log) as f:
        tail = f.read()[-800:]
    raise RuntimeError(f"no '{word}' line from {p.args[0]} within {limit}s:\n{tail}")


# ---------------------------------------------------------------- /proc readers


def rollup(pid):
    """smaps_rollup as a dict of KiB."""
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            m = re.match(r"^(\w+):\s+(\d+) kB", line)
            if m:
                out[m.group(1)] = int(m.group(2))
    return out


def smaps(pid):
    """Every mapping: perms, name, size and its KiB fields."""
    rows, cur = [], None
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            m = re.match(r"^([0-9a-f]+)-([0-9a-f]+) (\S+) \S+ \S+ \S+\s*(.*)$", line)
            if m:
                cur = {"perm": m.group(3), "name": m.group(4).strip(),
                       "size": (int(m.group(2), 16) - int(m.group(1), 16)) // 1024}
                rows.append(cur)
                continue
            m = re.match(r"^(\w+):\s+(\d+) kB", line)
            if m and cur is not None:
                cur[m.group(1)] = int(m.group(2))
    return rows


def threads(pid):
    names = []
    for t in sorted(os.listdir(f"/proc/{pid}/task")):
        try:
            with open(f"/proc/{pid}/task/{t}/comm") as f:
                names.append(f.read().strip())
        except OSError:
            pass
    return names


def breakdown(pid, binary):
    """RSS by what it is: the binary's code, read-only data and relocated data, shared
    libraries, the brk heap, thread stacks, other anonymous mappings (malloc arenas, mmaps)."""
    rows = smaps(pid)
    real = os.path.realpath(binary)
    cat = {}

    def add(k, v):
        cat[k] = cat.get(k, 0) + v

    prev = None
    for r in rows:
        rss, anon = r.get("Rss", 0), r.get("Anonymous", 0)
        name = r["name"]
        if name == real or name.startswith(real + " "):
            add("binary: code (file)" if "x" in r["perm"] else "binary: read-only data (file)",
                rss - anon)
            add("binary: relocated data, .data, .bss (anon)", anon)
        elif name.startswith("/"):
            add("shared libraries (file)", rss - anon)
            add("shared libraries' data (anon)", anon)
        elif name == "[heap]":
            add("malloc: main heap (brk)", rss)
        elif name == "[stack]":
            add("main thread stack", rss)
        elif name.startswith("["):
            add("vdso, vvar", rss)
        elif prev is not None and prev["perm"] == "---p" and prev["size"] in (4, 8, 16, 32, 64) \
                and r["perm"] == "rw-p" and r["size"] <= 8192:
            add("thread stacks (anon)", rss)  # a guard page below: pthread's stack layout
        else:
            add("other anon: malloc arenas, mmaps", rss)
        prev = r
    return cat


# ---------------------------------------------------------------- fresh process


def settle(pid, limit=5.0):
    """Wait until RSS stops changing (two equal samples 0.3 s apart) or `limit` passes."""
    end, last = time.monotonic() + limit, -1
    while time.monotonic() < end:
        rss = rollup(pid)["Rss"]
        if rss == last:
            return
        last = rss
        time.sleep(0.3)


def fresh(args, pki, name, extra, reps):
    """Start `run` with `extra` reps times; the median RSS sample and its breakdown."""
    samples = []
    for _ in range(reps):
        cmd = [args.bin, "run"] + extra
        with tempfile.NamedTemporaryFile(dir=args.work, suffix=".log", delete=False) as t:
            log = t.name
        p = start(cmd, log)
        try:
            t0 = time.monotonic()
            wait_log(p, log, "listening")
            settle(p.pid)
            first = (rollup(p.pid), breakdown(p.pid, args.bin), threads(p.pid))
            # Later: the file poll (every 5 s by default) has run twice on the blocking pool.
            time.sleep(max(0.0, t0 + args.idle_s - time.monotonic()))
            later = (rollup(p.pid), breakdown(p.pid, args.bin), threads(p.pid))
            samples.append(first + (later,))
        finally:
            stop(p)
    samples.sort(key=lambda s: s[0]["Rss"])
    return name, samples[len(samples) // 2], [s[0]["Rss"] for s in samples]


def fresh_variants(args, pki):
    out = free_port()
    ident = ["--cert", f"{pki}/client.pem", "--key", f"{pki}/client-key.pem"]
    outbound = ["--listen", f"{HOST}:{free_port()}", "--upstream", f"{HOST}:{out}",
                "--server-name", "localhost"] + ident
    ca = ["--ca", f"{pki}/ca.pem"]
    inbound = ["--inbound", "--listen", f"{HOST}:{free_port()}", "--target", f"{HOST}:{out}",
               "--cert", f"{pki}/server.pem", "--key", f"{pki}/server-key.pem",
               "--allow-any-client"] + ca
    admin = ["--admin", f"{HOST}:{free_port()}"]
    return [
        ("outbound tcp, --ca", outbound + ca),
        ("outbound tcp, --ca, --admin", outbound + ca + admin),
        ("outbound tcp, system trust store", outbound),
        ("outbound http, --ca", outbound + ca + ["--mode", "http"]),
        ("inbound tcp", inbound),
    ]


def print_fresh(results, idle_s):
    print("## Fresh process\n")
    print("RSS once the `listening` line is out and RSS stopped moving; then again "
          f"{idle_s:g} s after the start, idle (the certificate files' poll, every 5 s, has run "
          "on the blocking pool by then). Median of the starts.\n")
    print("| route | RSS KiB | samples | anonymous KiB | file-backed KiB | PSS KiB | threads | "
          f"RSS KiB at {idle_s:g} s | threads at {idle_s:g} s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, (roll, _, thr, later), all_rss in results:
        print(f"| {name} | {roll['Rss']:,} | {', '.join(f'{x:,}' for x in all_rss)} | "
              f"{roll.get('Anonymous', 0):,} | {roll['Rss'] - roll.get('Anonymous', 0):,} | "
              f"{roll.get('Pss', 0):,} | {len(thr)} ({', '.join(sorted(set(thr)))}) | "
              f"{later[0]['Rss']:,} | {len(later[2])} |")
    print()
    for title, pick in (("at start", lambda r: r[1][1]), (f"at {idle_s:g} s", lambda r: r[1][3][1])):
        keys = []
        for r in results:
            for k in pick(r):
                if k not in keys:
                    keys.append(k)
        print(f"Breakdown {title} (the median start), KiB of RSS:\n")
        print("| what | " + " | ".join(r[0] for r in results) + " |")
        print("|---|" + "---|" * len(results))
        for k in sorted(keys, key=lambda k: -pick(results[0]).get(k, 0)):
            print(f"| {k} | " + " | ".join(f"{pick(r).get(k, 0):,}" for r in results) + " |")
        print()


# ---------------------------------------------------------------- idle connections


class Sink:
    """A plaintext echo server on its own thread that holds every connection open."""

    def __init__(self):
        self.lsock = socket.socket()
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind((HOST, 0))
        self.lsock.listen(4096)
        self.lsock.setblocking(False)
        self.port = self.lsock.getsockname()[1]
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.lsock, selectors.EVENT_READ)
        self.conns = set()
        self.stopped = threading.Event()
        self.t = threading.Thread(target=self.loop, daemon=True)
        self.t.start()

    def loop(self):
        while not self.stopped.is_set():
            for key, _ in self.sel.select(0.2):
                s = key.fileobj
                if s is self.lsock:
                    try:
                        c, _ = s.accept()
                    except OSError:
                        continue
                    c.setblocking(False)
                    self.conns.add(c)
                    self.sel.register(c, selectors.EVENT_READ)
                    continue
                try:
                    data = s.recv(65536)
                except OSError:
                    data = b""
                if data:
                    try:
                        s.send(data)
                    except OSError:
                        pass
                else:
                    self.sel.unregister(s)
                    self.conns.discard(s)
                    s.close()

    def close(self):
        self.stopped.set()
        self.t.join(timeout=5)
        for c in list(self.conns):
            c.close()
        self.lsock.close()
        self.sel.close()


def established(port):
    """TCP connections in ESTABLISHED whose local port is `port` (IPv4 loopback)."""
    n = 0
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            parts = line.split()
            if parts[3] == "01" and int(parts[1].split(":")[1], 16) == port:
                n += 1
    return n


def echo_once(port, limit=10):
    with socket.create_connection((HOST, port), timeout=limit) as s:
        s.sendall(b"warm\n")
        got = b""
        while len(got) < 5:
            b = s.recv(100)
            if not b:
                raise RuntimeError("warm-up connection closed before its echo")
            got += b


def open_idle(port, n, sink, base, limit=120):
    """n plaintext connections to port, in batches that wait for the chain to reach the sink."""
    socks, end = [], time.monotonic() + limit
    try:
        while len(socks) < n:
            for _ in range(min(200, n - len(socks))):
                s = socket.create_connection((HOST, port), timeout=10)
                socks.append(s)
            while established(sink.port) - base < len(socks):
                if time.monotonic() > end:
                    raise RuntimeError(
                        f"only {established(sink.port) - base} of {len(socks)} reached the sink")
                time.sleep(0.05)
        return socks
    except BaseException:
        for s in socks:
            s.close()
        raise


def quiet(pid, limit=10.0):
    """Wait until the process uses no CPU for 0.5 s (or `limit` passes)."""
    def cpu():
        with open(f"/proc/{pid}/stat") as f:
            v = f.read().rsplit(")", 1)[1].split()
        return int(v[11]) + int(v[12])
    end, last = time.monotonic() + limit, cpu()
    while time.monotonic() < end:
        time.sleep(0.5)
        now = cpu()
        if now == last:
            return
        last = now


def idle_round(args, pki, n):
    """One chain app → A (outbound, tcp) → B (inbound, tcp) → sink: both deltas per connection."""
    sink = Sink()
    a_port, b_port = free_port(), free_port()
    a_log, b_log = f"{args.work}/a.log", f"{args.work}/b.log"
    b = start([args.bin, "run", "--inbound", "--listen", f"{HOST}:{b_port}",
               "--target", f"{HOST}:{sink.port}", "--cert", f"{pki}/server.pem",
               "--key", f"{pki}/server-key.pem", "--ca", f"{pki}/ca.pem",
               "--allow-any-client", "--access-log", "off"], b_log)
    a = start([args.bin, "run", "--listen", f"{HOST}:{a_port}", "--upstream", f"{HOST}:{b_port}",
               "--server-name", "localhost", "--cert", f"{pki}/client.pem",
               "--key", f"{pki}/client-key.pem", "--ca", f"{pki}/ca.pem",
               "--access-log", "off"], a_log)
    try:
        wait_log(a, a_log, "listening")
        wait_log(b, b_log, "listening")
        for _ in range(3):
            echo_once(a_port)
        for p in (a, b):
            quiet(p.pid)
        m0 = {p.pid: rollup(p.pid) for p in (a, b)}
        base = established(sink.port)
        socks = open_idle(a_port, n, sink, base)
        try:
            for p in (a, b):
                quiet(p.pid, limit=20)
            time.sleep(1.0)
            m1 = {p.pid: rollup(p.pid) for p in (a, b)}
            reached = established(sink.port) - base
            detail = {"outbound": smaps(a.pid), "inbound": smaps(b.pid)}
        finally:
            for s in socks:
                s.close()
        res = {}
        for label, p in (("outbound", a), ("inbound", b)):
            d = {k: (m1[p.pid].get(k, 0) - m0[p.pid].get(k, 0)) / n for k in ("Rss", "Pss", "Anonymous")}
            d.update(reached=reached, before=m0[p.pid]["Rss"], at_n=m1[p.pid]["Rss"],
                     threads=len(threads(p.pid)))
            res[label] = d
        return res, detail
    finally:
        stop(a)
        stop(b)
        sink.close()


def print_idle(rounds, n):
    print(f"## Memory per idle connection ({n:,} held, tcp mode)\n")
    print("A fresh chain per round: app → outbound route (A) → inbound route (B) → a plaintext "
          "echo sink; warmed by three echoes; then the connections are opened and held, each "
          "with its sink connection established. KiB per connection = (memory with them − "
          "memory before) / N. Kernel socket buffers are not included.\n")
    print("| route | KiB/conn PSS (median) | rounds | KiB/conn RSS | KiB/conn anonymous | "
          "RSS before, KiB | RSS at N, KiB |")
    print("|---|---|---|---|---|---|---|")
    for label in ("outbound", "inbound"):
        rs = [r[label] for r in rounds]
        med = sorted(rs, key=lambda r: r["Pss"])[len(rs) // 2]
        each = ", ".join(f"{r['Pss']:.2f}" for r in rs)
        print(f"| {label} | {med['Pss']:.2f} | {each} | "
              f"{med['Rss']:.2f} | {med['Anonymous']:.2f} | {med['before']:,} | {med['at_n']:,} |")
    print()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("bin")
    ap.add_argument("--work", required=True)
    ap.add_argument("--what", default="fresh,idle")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--conns", type=int, default=1000)
    ap.add_argument("--limit-kib", type=int, default=5120)
    ap.add_argument("--idle-s", type=float, default=12.0)
    args = ap.parse_args()
    args.bin = os.path.realpath(args.bin)
    pki = f"{args.work}/pki"
    subprocess.run([args.bin, "dev-pki", "--out", pki, "--force"], check=True,
                   stdout=subprocess.DEVNULL, timeout=60)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(130))
    try:
        what = args.what.split(",")
        status = 0
        if "fresh" in what:
            results = [fresh(args, pki, name, extra, args.reps)
                       for name, extra in fresh_variants(args, pki)]
            print_fresh(results, args.idle_s)
            first = results[0][1][0]["Rss"]
            verdict = "PASS" if first <= args.limit_kib else "FAIL"
            print(f"{verdict}: fresh RSS of `{results[0][0]}` {first:,} KiB "
                  f"(limit {args.limit_kib:,} KiB)\n")
            status = 0 if verdict == "PASS" else 1
        if "idle" in what:
            rounds = [idle_round(args, pki, args.conns)[0] for _ in range(args.reps)]
            print_idle(rounds, args.conns)
    finally:
        stop_all()
    sys.exit(status)


if __name__ == "__main__":
    main()
