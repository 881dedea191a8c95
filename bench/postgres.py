#!/usr/bin/env python3
"""pgbench through mtls-sidecar `--protocol postgres` beside stunnel `protocol = pgsql` (issue 17).

    bench/postgres.py [--bin target/release/mtls-sidecar] [--reps 3] [--duration 15]
                      [--targets sidecar,stunnel,plain,direct-tls] [--out FILE.md]

Run from the repository root, as root (PostgreSQL runs as the unprivileged `postgres` user).
Self-contained: a throwaway PKI from `BIN dev-pki`, a throwaway PostgreSQL cluster (initdb in a
scratch folder; `ssl = on`, `hostssl all all 127.0.0.1/32 cert clientcert=verify-full`, the role is
the client certificate's CN; `hostnossl ... trust` for the plaintext baseline), `pgbench -i -s 1`
once. Then, for REPS rounds, in an order that rotates every round, `pgbench -n -S -c 8 -j 2 -T
DURATION` with `-C` (a new connection, and so a new upstream mTLS handshake, per transaction) and
without, against every target:

- `sidecar`: `BIN run --protocol postgres ...`, app on sslmode=disable (default logging: one
  access line per connection, to a file);
- `sidecar-quiet`, `sidecar-w8`: the same with `--log-level warn`, or with 8 tokio worker
  threads (`TOKIO_WORKER_THREADS=8`) instead of one per core;
- `stunnel`: stunnel4 `client = yes`, `protocol = pgsql`, verifyChain, checkHost (default
  `debug = 5`: five notice lines per connection, to a file), app on sslmode=disable;
  `stunnel-quiet`: `debug = 4`;
- `plain`: pgbench straight to the server, no TLS, no proxy (`hostnossl`);
- `direct-tls`: pgbench straight to the server over TLS with the client certificate (libpq
  sslmode=verify-full): the server's own TLS cost, with no proxy.

Measured per run: tps, the proxy's CPU (user+sys of its process tree: every thread, live
children, and reaped children via cutime/cstime) per transaction, which with -C is per new
connection; the server's (postmaster tree, backends reaped into cutime) and pgbench's CPU per
transaction; and `other load`, CPU used meanwhile by processes outside the benchmark. Medians over
the rounds, and ours/stunnel ratios taken round by round. Every process it starts is stopped by
pid on exit, also on failure or Ctrl-C. Standard library only; loopback only.
"""
import argparse, ctypes, datetime, os, platform, pwd, re, resource, shutil, signal, socket
import statistics, subprocess, sys, tempfile, time

HOST = "127.0.0.1"
CLK = os.sysconf("SC_CLK_TCK")
ROLE = "mtls-sidecar-dev-client"  # the CN of `dev-pki`'s client certificate
STARTED = []  # (name, Popen) of every long-running process we started


def die_with_parent():
    """prctl(PR_SET_PDEATHSIG, SIGKILL): the child dies if this harness is killed."""
    ctypes.CDLL(None).prctl(1, int(signal.SIGKILL), 0, 0, 0)


def as_user(user):
    """preexec_fn that drops to user (for initdb and postgres, which refuse root)."""
    pw = pwd.getpwnam(user)

    def drop():
        os.setgroups([])
        os.setgid(pw.pw_gid)
        os.setuid(pw.pw_uid)
        die_with_parent()  # after setuid, which clears it
    return drop


def spawn(name, cmd, log, preexec=die_with_parent, env=None):
    """Start a long-running process, output to log; remembered for stop_all."""
    with open(log, "ab") as f:
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=f, env=env,
                             start_new_session=True, preexec_fn=preexec)
    STARTED.append((name, p))
    return p


def stop(p, sig=signal.SIGTERM, grace=10.0):
    """Signal p by pid, wait (bounded), then SIGKILL."""
    if p.poll() is None:
        try:
            p.send_signal(sig)
            p.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=grace)


def stop_all():
    # postgres: SIGINT = fast shutdown (backends are stopped by the postmaster).
    for name, p in reversed(STARTED):
        stop(p, signal.SIGINT if name == "postgres" else signal.SIGTERM)
    STARTED.clear()


def run(cmd, timeout=120, check=True, **kw):
    """A short command; its output; raises with the output on failure."""
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {r.returncode}:\n{r.stdout}{r.stderr}")
    return r.stdout


def free_port():
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def listening(port):
    """Whether a TCP socket listens on port (from /proc/net/tcp: no probe connection, which the
    sidecar would log as a failed app connection)."""
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as f:
                next(f)
                for line in f:
                    parts = line.split(None, 4)
                    if int(parts[1].rsplit(":", 1)[1], 16) == port and parts[3] == "0A":
                        return True
        except (OSError, IndexError, ValueError, StopIteration):
            pass
    return False


def wait_port(p, port, what, limit=30.0):
    end = time.monotonic() + limit
    while time.monotonic() < end:
        if p.poll() is not None:
            raise RuntimeError(f"{what} exited with {p.returncode}")
        if listening(port):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} is not listening on {port} after {limit} s")


# ----------------------------------------------------------------------------- CPU from /proc

def proc_table():
    """{pid: (ppid, utime+stime+cutime+cstime ticks)}: threads included (the process line sums
    them, exited threads too) and reaped children (cutime/cstime)."""
    table = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                table[int(d)] = (int(fields[1]), sum(int(x) for x in fields[11:15]))
            except (OSError, IndexError, ValueError):
                pass
    return table


def tree_cpu(pid, table):
    """CPU seconds of pid and its live descendants."""
    kids = {}
    for p, (ppid, _) in table.items():
        kids.setdefault(ppid, []).append(p)
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        total += table.get(p, (0, 0))[1]
        todo.extend(kids.get(p, []))
    return total / CLK


def busy_s():
    """CPU seconds the machine spent in user, nice, system and steal."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return (v[0] + v[1] + v[2] + v[7]) / CLK


def children_s():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def wait_quiet(pid, limit=5.0, window=0.3):
    """Wait (bounded) until the tree uses under 2 % of a core: closes and logging finish."""
    end = time.monotonic() + limit
    while time.monotonic() < end:
        c0 = tree_cpu(pid, proc_table())
        time.sleep(window)
        if tree_cpu(pid, proc_table()) - c0 <= 0.02 * window + 1.0 / CLK:
            return


def wait_backends_gone(server_pid, limit=15.0):
    """Wait (bounded) until no backend of ROLE is left under the postmaster, so that every
    backend's CPU has been reaped into the postmaster's cutime/cstime."""
    end = time.monotonic() + limit
    while time.monotonic() < end:
        table, left = proc_table(), False
        for p, (ppid, _) in table.items():
            if ppid == server_pid:
                try:
                    with open(f"/proc/{p}/cmdline", "rb") as f:
                        left = left or ROLE.encode() in f.read()
                except OSError:
                    pass
        if not left:
            return
        time.sleep(0.05)
    sys.stderr.write(f"backends still alive {limit} s after pgbench ended\n")


# ----------------------------------------------------------------------------- setup

def make_pki(binary, w):
    pki = os.path.join(w, "pki")
    run([binary, "dev-pki", "--out", pki])
    subj = run(["openssl", "x509", "-in", f"{pki}/client.pem", "-noout", "-subject"])
    if ROLE not in subj:
        raise RuntimeError(f"dev-pki's client certificate is not CN={ROLE}: {subj}")
    return pki


def start_postgres(w, pki):
    """initdb + start a cluster as `postgres`; returns (Popen, port, socket dir, bin dir)."""
    bindir = sorted(d for d in (f"/usr/lib/postgresql/{v}/bin" for v in
                                os.listdir("/usr/lib/postgresql")) if os.path.isdir(d))[-1]
    pw = pwd.getpwnam("postgres")
    data, sock = os.path.join(w, "data"), os.path.join(w, "sock")
    for d in (data, sock):
        os.mkdir(d, 0o700)
        os.chown(d, pw.pw_uid, pw.pw_gid)
    run([f"{bindir}/initdb", "-D", data, "-U", "postgres", "-A", "trust", "--no-sync",
         "-E", "UTF8", "--locale", "C"], preexec_fn=as_user("postgres"))
    for name in ("server.pem", "server-key.pem", "ca.pem"):
        shutil.copy(f"{pki}/{name}", f"{data}/{name}")
        os.chown(f"{data}/{name}", pw.pw_uid, pw.pw_gid)
        os.chmod(f"{data}/{name}", 0o600)
    port = free_port()
    with open(f"{data}/postgresql.conf", "a") as f:
        f.write(f"""
listen_addresses = '{HOST}'
port = {port}
unix_socket_directories = '{sock}'
max_connections = 60
ssl = on
ssl_cert_file = 'server.pem'
ssl_key_file = 'server-key.pem'
ssl_ca_file = 'ca.pem'
fsync = off
synchronous_commit = off
full_page_writes = off
""")
    with open(f"{data}/pg_hba.conf", "w") as f:
        f.write("local all all trust\n"
                f"hostssl all all {HOST}/32 cert clientcert=verify-full\n"
                f"hostnossl all all {HOST}/32 trust\n")
    p = spawn("postgres", [f"{bindir}/postgres", "-D", data], os.path.join(w, "postgres.log"),
              preexec=as_user("postgres"))
    wait_port(p, port, "postgres")
    return p, port, sock, bindir


def init_db(sock, port):
    psql = ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", sock, "-p", str(port)]
    run(psql + ["-U", "postgres", "-d", "postgres", "-c", f'CREATE ROLE "{ROLE}" LOGIN',
                "-c", f'CREATE DATABASE bench OWNER "{ROLE}"'])
    run(["pgbench", "-i", "-s", "1", "-q", "-h", sock, "-p", str(port), "-U", ROLE, "bench"],
        timeout=300)


def start_sidecar(binary, w, pki, pg_port, log_level, wrap=(), tag="sidecar", workers=None):
    port = free_port()
    cmd = list(wrap) + [binary, "run", "--protocol", "postgres", "--listen", f"{HOST}:{port}",
           "--upstream", f"{HOST}:{pg_port}", "--cert", f"{pki}/client.pem",
           "--key", f"{pki}/client-key.pem", "--ca", f"{pki}/ca.pem", "--server-name", "localhost"]
    if log_level:
        cmd += ["--log-level", log_level]
    with open(os.path.join(w, f"{tag}.command.txt"), "w") as f:
        f.write(" ".join(cmd) + "\n")
    env = dict(os.environ, TOKIO_WORKER_THREADS=str(workers)) if workers else None
    p = spawn("sidecar", cmd, os.path.join(w, f"{tag}.log"), env=env)
    wait_port(p, port, "mtls-sidecar", 120 if wrap else 30)
    return p, port


def start_stunnel(w, pki, pg_port, debug, wrap=(), tag="stunnel"):
    port = free_port()
    conf = os.path.join(w, f"{tag}.conf")
    with open(conf, "w") as f:
        f.write(f"""foreground = yes
pid =
syslog = no
debug = {debug}
[pgsql]
client = yes
protocol = pgsql
accept = {HOST}:{port}
connect = {HOST}:{pg_port}
cert = {pki}/client.pem
key = {pki}/client-key.pem
CAfile = {pki}/ca.pem
verifyChain = yes
checkHost = localhost
sni = localhost
""")
    p = spawn("stunnel", list(wrap) + ["stunnel4", conf], os.path.join(w, f"{tag}.log"))
    wait_port(p, port, "stunnel", 120 if wrap else 30)
    return p, port


# ----------------------------------------------------------------------------- measuring

SSL_QUERY = ("SELECT ssl, coalesce(version, '-'), coalesce(cipher, '-'), coalesce(client_dn, '-')"
             " FROM pg_stat_ssl WHERE pid = pg_backend_pid()")


def check_target(t):
    """What the server saw for one session through t: TLS or not, version, cipher, client DN."""
    out = run(["psql", "-X", "-At", "-F", " ", t["conninfo"], "-c", SSL_QUERY], timeout=30)
    return out.strip()


def parse_pgbench(out):
    def num(pattern):
        m = re.search(pattern, out)
        return float(m.group(1)) if m else None
    return {"txns": num(r"transactions actually processed: (\d+)"),
            "failed": num(r"number of failed transactions: (\d+)") or 0,
            "tps": num(r"tps = ([\d.]+)"),
            "lat_ms": num(r"latency average = ([\d.]+) ms"),
            "conn_ms": num(r"average connection time = ([\d.]+) ms")}


def measure(t, server, new_conn, args):
    """One pgbench run against target t; returns the figures."""
    cmd = ["pgbench", "-n", "-S", "-c", str(args.clients), "-j", str(args.threads),
           "-T", str(args.duration)] + (["-C"] if new_conn else []) + [t["conninfo"]]
    table = proc_table()
    px0 = tree_cpu(t["proc"].pid, table) if t["proc"] else 0.0
    srv0, busy0, kids0 = tree_cpu(server.pid, table), busy_s(), children_s()
    self0, wall0 = sum(os.times()[:2]), time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=args.duration * 4 + 60)
    wait_backends_gone(server.pid)
    if t["proc"]:
        wait_quiet(t["proc"].pid)
    table = proc_table()
    px1 = tree_cpu(t["proc"].pid, table) if t["proc"] else 0.0
    srv1, busy1, kids1 = tree_cpu(server.pid, table), busy_s(), children_s()
    self1, wall = sum(os.times()[:2]), time.monotonic() - wall0
    res = parse_pgbench(r.stdout)
    if r.returncode != 0 or not res["txns"]:
        sys.stderr.write(f"pgbench against {t['name']} exited {r.returncode}:\n{r.stdout}{r.stderr}\n")
        res["failed"] = res["failed"] or 1
    n = res["txns"] or float("nan")
    ours = (px1 - px0) + (srv1 - srv0) + (kids1 - kids0) + (self1 - self0)
    res.update(proxy_us=(px1 - px0) * 1e6 / n if t["proc"] else None,
               server_us=(srv1 - srv0) * 1e6 / n, client_us=(kids1 - kids0) * 1e6 / n,
               other=max(0.0, (busy1 - busy0) - ours) / wall, rc=r.returncode)
    return res


# ----------------------------------------------------------------------------- report

def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(x, digits=1):
    if x is None:
        return "-"
    return f"{x:,.{digits}f}"


MODES = [("new", True, "-C (new connection per transaction)"), ("kept", False, "kept connections")]


def headline(rows, ours, peer):
    """Medians of ours and peer and the median of the round-by-round ratios."""
    out = ["| figure | " + ours + " | " + peer + " | ours / " + peer + " |", "|---|---|---|---|"]
    for mode, _, label in MODES:
        for key, what in (("proxy_us", "proxy CPU µs per " + ("new connection" if mode == "new"
                                                                else "transaction")),
                          ("tps", "tps")):
            a = {r["round"]: r[key] for r in rows if r["target"] == ours and r["mode"] == mode}
            b = {r["round"]: r[key] for r in rows if r["target"] == peer and r["mode"] == mode}
            ratios = [a[k] / b[k] for k in a if a.get(k) and b.get(k)]
            out.append(f"| {what}, {label} | {fmt(med(a.values()))} | {fmt(med(b.values()))} | "
                       f"**{fmt(med(ratios), 2)}** ({', '.join(fmt(x, 2) for x in ratios)}) |")
    return out


def report(args, rows, checks, names, info):
    lines = [f"# pgbench through mtls-sidecar `--protocol postgres` and stunnel `protocol = pgsql`",
             "", f"Run {info['start']} UTC, {info['secs']:.0f} s. {info['machine']}", "",
             f"Command: `{info['command']}`", "",
             f"Load average before {info['load0']}, after {info['load1']}. Versions: {info['versions']}.",
             "", f"Each run: `pgbench -n -S -c {args.clients} -j {args.threads} -T {args.duration}` "
             "with `-C` and without, select-only on a scale-1 database; "
             f"{args.reps} rounds, target order rotated and mode order alternated every round; "
             "figures are medians. `proxy CPU` = user+sys CPU of the proxy's process tree (all "
             "threads, reaped children) per transaction; with -C every transaction is a new app "
             "connection and a new full mTLS handshake upstream (PostgreSQL resumes no sessions). "
             "`server CPU` = the postmaster tree (backends reaped into it), `pgbench CPU` = the "
             "client. `other load` = cores used meanwhile by processes outside the benchmark (the "
             "machine is shared): a high value flags a disturbed run.", "", "## What the server saw", "",
             "One `psql` session per target, `pg_stat_ssl` for its own backend (ssl, version, "
             "cipher, client DN):", ""]
    lines += [f"- {n}: `{checks[n]}`" for n in names]
    if "sidecar" in names and "stunnel" in names and rows:
        lines += ["", "## Headline: mtls-sidecar vs stunnel, same run", ""]
        lines += headline(rows, "sidecar", "stunnel")
        lines += ["", "Ratios: median of the per-round ratios (each round's pair, in brackets)."]
    if info["callgrind"]:
        lines += ["", "## Instructions per new connection (callgrind)", "",
                  "Each proxy alone under `valgrind --tool=callgrind`, fresh process per run, "
                  "`pgbench -n -S -C -c 2 -j 1` for N1 and then N2 connections; "
                  "(total(N2) - total(N1)) / (N2 - N1). Deterministic: the machine's load does "
                  "not change it. Includes the proxy's whole work per connection: accept, the "
                  "PostgreSQL opening, the mTLS handshake, relaying one select, logging, close.", ""]
        lines += info["callgrind"]
    if rows:
        lines += ["", "## All targets (medians)", "",
                  "| target | mode | tps | min..max | latency ms | proxy CPU µs/txn | server CPU µs/txn "
                  "| pgbench CPU µs/txn | other load | failed |", "|---|---|---|---|---|---|---|---|---|---|"]
        for mode, _, label in MODES:
            for n in names:
                rs = [r for r in rows if r["target"] == n and r["mode"] == mode]
                tps = [r["tps"] for r in rs if r["tps"]]
                lines.append(
                    f"| {n} | {label} | {fmt(med(tps))} | {fmt(min(tps, default=None))}.."
                    f"{fmt(max(tps, default=None))} | {fmt(med(r['lat_ms'] for r in rs), 2)} | "
                    f"{fmt(med(r['proxy_us'] for r in rs))} | {fmt(med(r['server_us'] for r in rs))} | "
                    f"{fmt(med(r['client_us'] for r in rs))} | {fmt(med(r['other'] for r in rs), 2)} | "
                    f"{sum(int(r['failed']) for r in rs)} |")
        lines += ["", "## Raw rounds", "",
                  "| round | mode | target | tps | transactions | proxy CPU µs/txn | server CPU µs/txn "
                  "| pgbench CPU µs/txn | other load | pgbench exit |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['round']} | {r['mode']} | {r['target']} | {fmt(r['tps'])} | "
                         f"{fmt(r['txns'], 0)} | {fmt(r['proxy_us'])} | {fmt(r['server_us'])} | "
                         f"{fmt(r['client_us'])} | {fmt(r['other'], 2)} | {r['rc']} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main

def versions(binary):
    def v(cmd, word=""):
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            return [x for x in (r.stdout + r.stderr).strip().splitlines() if word in x][0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "?"
    try:
        commit = run(["git", "-C", os.path.dirname(binary), "rev-parse", "--short", "HEAD"]).strip()
    except (RuntimeError, OSError):
        commit = "?"
    return "; ".join([f"{v([binary, '--version'])} (git {commit})", v(["stunnel4", "-version"], "stunnel "),
                      v(["pgbench", "--version"]), v(["openssl", "version"])])


PROXIES = ("sidecar", "sidecar-quiet", "sidecar-w8", "stunnel", "stunnel-quiet")


def proxy_conninfo(port):
    return (f"host={HOST} port={port} dbname=bench user={ROLE} gssencmode=disable "
            "connect_timeout=60 sslmode=disable")


def start_proxy(name, args, w, pki, pg_port, wrap=(), tag=None):
    """Start the proxy target name; (Popen, port)."""
    quiet = name.endswith("-quiet")
    if name.startswith("sidecar"):  # sidecar-w8: 8 tokio worker threads instead of one per core
        return start_sidecar(args.bin, w, pki, pg_port, "warn" if quiet else None, wrap, tag or name,
                             8 if name == "sidecar-w8" else None)
    return start_stunnel(w, pki, pg_port, 4 if quiet else 5, wrap, tag or name)


def callgrind_total(path):
    """The total instructions (Ir) of a callgrind output file."""
    with open(path) as f:
        for line in f:
            if line.startswith(("totals:", "summary:")):
                return int(line.split()[1])
    raise RuntimeError(f"no totals in {path}")


def callgrind(args, w, pki, pg_port, names):
    """Instructions per new connection of each proxy under callgrind: the difference of the
    totals of two fresh runs (pgbench -C, select-only) of N1 and N2 connections / (N2 - N1).
    Deterministic, unlike CPU time on a shared machine; the files stay in the scratch folder."""
    lines = ["| proxy | instructions per new connection (Ir) | totals at " +
             f"{args.callgrind[0]} / {args.callgrind[1]} connections |", "|---|---|---|"]
    for name in names:
        totals = []
        for n in args.callgrind:
            out = os.path.join(w, f"callgrind.out.{name}.{n}")
            wrap = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
            p, port = start_proxy(name, args, w, pki, pg_port, wrap, f"cg-{name}-{n}")
            run(["pgbench", "-n", "-S", "-C", "-c", "2", "-j", "1", "-t", str(n // 2),
                 proxy_conninfo(port)], timeout=1200)
            stop(p, grace=120)
            totals.append(callgrind_total(out))
        per = (totals[1] - totals[0]) / (args.callgrind[1] - args.callgrind[0])
        lines.append(f"| {name} | {per:,.0f} | {totals[0]:,} / {totals[1]:,} |")
        print(lines[-1], file=sys.stderr)
    return lines


def targets(args, w, pki, pg_port):
    """name -> {name, conninfo, proc (None when no proxy)}."""
    base = f"dbname=bench user={ROLE} gssencmode=disable connect_timeout=10"
    plain = f"host={HOST} {base} sslmode=disable"
    out = {}
    for name in args.targets.split(","):
        if name in PROXIES:
            p, port = start_proxy(name, args, w, pki, pg_port)
        elif name == "plain":
            p, port = None, pg_port
        elif name == "direct-tls":
            out[name] = {"name": name, "proc": None, "conninfo": (
                f"host=localhost hostaddr={HOST} port={pg_port} {base} sslmode=verify-full "
                f"sslcert={pki}/client.pem sslkey={pki}/client-key.pem sslrootcert={pki}/ca.pem")}
            continue
        else:
            raise SystemExit(f"unknown target {name}")
        out[name] = {"name": name, "proc": p, "conninfo": f"{plain} port={port}" if p is None
                     else proxy_conninfo(port)}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", default="target/release/mtls-sidecar")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--duration", type=int, default=15)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--targets", default="sidecar,stunnel,plain,direct-tls",
                    help="from sidecar, sidecar-quiet (--log-level warn), sidecar-w8 "
                         "(TOKIO_WORKER_THREADS=8), stunnel, stunnel-quiet "
                         "(debug = 4), plain, direct-tls (default %(default)s)")
    ap.add_argument("--callgrind", metavar="N1,N2", type=lambda v: [int(x) for x in v.split(",")],
                    help="also count each proxy's instructions per new connection under callgrind "
                         "(fresh runs of N1 and N2 connections; e.g. 100,300; --reps 0 for only this)")
    ap.add_argument("--out", help="write the Markdown report here too")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder (logs, configs)")
    args = ap.parse_args()
    args.bin = os.path.realpath(args.bin)
    if "--protocol" not in run([args.bin, "run", "--help"]):
        drop = [t for t in args.targets.split(",") if t.startswith("sidecar")]
        print(f"{args.bin} has no --protocol: leaving out {drop}", file=sys.stderr)
        args.targets = ",".join(t for t in args.targets.split(",") if t not in drop)
    w = tempfile.mkdtemp(prefix="pg-bench.")
    os.chmod(w, 0o755)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda s, f: sys.exit(128 + s))
    try:
        text = bench(args, w)
    finally:
        stop_all()
        if args.keep:
            print(f"kept {w}", file=sys.stderr)
        else:
            shutil.rmtree(w, ignore_errors=True)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


def bench(args, w):
    start, t0 = datetime.datetime.utcnow().strftime("%Y-%m-%d %H:%M"), time.monotonic()
    info = {"start": start, "command": " ".join(sys.argv), "load0": os.getloadavg(),
            "versions": versions(args.bin),
            "machine": f"{os.cpu_count()} cores, {platform.platform()}."}
    pki = make_pki(args.bin, w)
    server, pg_port, sock, _ = start_postgres(w, pki)
    init_db(sock, pg_port)
    ts = targets(args, w, pki, pg_port)
    names = list(ts)
    checks = {n: check_target(ts[n]) for n in names}
    for n in names:
        print(f"{n}: {checks[n]}", file=sys.stderr)
    rows = []
    for rnd in range(1, args.reps + 1):
        modes = MODES if rnd % 2 else MODES[::-1]
        order = names[rnd % len(names):] + names[:rnd % len(names)]
        for mode, new_conn, _ in modes:
            for n in order:
                res = measure(ts[n], server, new_conn, args)
                res.update(round=rnd, mode=mode, target=n)
                rows.append(res)
                print(f"round {rnd} {mode:4} {n:14} tps {fmt(res['tps'])} proxy "
                      f"{fmt(res['proxy_us'])} µs/txn server {fmt(res['server_us'])} other "
                      f"{fmt(res['other'], 2)}", file=sys.stderr)
    cg = []
    if args.callgrind:
        cg = callgrind(args, w, pki, pg_port, [n for n in names if n in PROXIES])
    info.update(load1=os.getloadavg(), secs=time.monotonic() - t0, callgrind=cg)
    info["load0"] = " ".join(f"{x:.2f}" for x in info["load0"])
    info["load1"] = " ".join(f"{x:.2f}" for x in info["load1"])
    return report(args, rows, checks, names, info)


if __name__ == "__main__":
    main()
