#!/usr/bin/env python3
"""Side-by-side benchmark of inbound (server-mode) mTLS proxies.

Each proxy terminates mTLS on 127.0.0.1 (client certificate required and verified
against one CA) and forwards plaintext to one nginx HTTP target on 127.0.0.1 that
serves a small and a large file.  The same clients, with the same client
certificate, drive every proxy:

  newconn    Python ssl, several processes: one new connection (one full mTLS
             handshake, no resumption) per HTTP/1.0 request
  keepalive  Python ssl, several processes, several keep-alive connections each
  bulk       curl --cert: one download of a large file on one connection
  memory     N idle mTLS connections held open by this script

The figures are the proxy's own process tree's CPU per unit of work (user+sys,
threads and reaped children included), medians of the repetitions, and PSS per
idle connection.  Standard library only.  See README.md.  Peers: nginx stream
(ssl_verify_client on), HAProxy (verify required), stunnel (server mode).
A proxy under test plugs in with --custom NAME=TEMPLATE.
"""
import argparse, ctypes, datetime, json, multiprocessing, os, platform, random, re, resource
import shlex, shutil, signal, socket, ssl, statistics, subprocess, sys, tempfile, time

HOST = "127.0.0.1"          # the only address traffic ever goes to
SERVER_NAME = "localhost"   # name in the proxies' server certificate (SAN also has IP 127.0.0.1)
CLK = os.sysconf("SC_CLK_TCK")

# ----------------------------------------------------------------------------- processes, /proc
# (the helpers below are copied from the outbound harness, /work/shared/bench/bench.py)

STARTED = []  # every process we started; stopped (by pid) at exit


def die_with_parent(sig):
    """Linux prctl(PR_SET_PDEATHSIG): get sig when the parent process dies."""
    ctypes.CDLL(None).prctl(1, int(sig), 0, 0, 0)


def spawn(cmd, log_path, env=None):
    with open(log_path, "ab") as log:
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                             start_new_session=True, env=env,
                             preexec_fn=lambda: die_with_parent(signal.SIGKILL))
    STARTED.append(p)
    return p


def proc_table():
    """{pid: (ppid, user+sys CPU ticks incl. reaped children)} for every process."""
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


def tree(pid, table=None):
    """pid and its live descendants."""
    kids = {}
    for p, (ppid, _) in (table or proc_table()).items():
        kids.setdefault(ppid, []).append(p)
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def started_at(pid):
    """Start time of a live process (None if gone or a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return None if fields[0] == "Z" else fields[19]
    except (OSError, IndexError):
        return None


def stop(p, grace=5.0):
    """SIGTERM, then SIGKILL, to p and its descendants, by pid; a pid is signalled only
    while it is still the same process (same start time)."""
    pids = {pid: started_at(pid) for pid in tree(p.pid)} if p.poll() is None else {}
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid, t0 in pids.items():
            try:
                if t0 and started_at(pid) == t0:
                    os.kill(pid, sig)
            except ProcessLookupError:
                pass
        try:
            p.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        end = time.monotonic() + grace
        while any(t0 and started_at(pid) == t0 for pid, t0 in pids.items()) and time.monotonic() < end:
            time.sleep(0.05)
    if p in STARTED:
        STARTED.remove(p)


def mem_kib(pid):
    """(RSS, PSS, processes) of the whole tree, KiB."""
    rss = pss = n = 0
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Rss:"):
                        rss += int(line.split()[1])
                    elif line.startswith("Pss:"):
                        pss += int(line.split()[1])
            n += 1
        except OSError:
            pass
    return rss, pss, n


def cpu_s(pid, table=None):
    """user+sys CPU seconds of the tree (threads and reaped children included)."""
    table = table or proc_table()
    return sum(table[p][1] for p in tree(pid, table) if p in table) / CLK


def busy_s():
    """CPU seconds the machine spent in processes (user, nice, system) or stolen."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return (v[0] + v[1] + v[2] + v[7]) / CLK


def ours_s():
    """CPU seconds used by this harness, its reaped clients (workers, curl) and all started trees."""
    t, table = os.times(), proc_table()
    return t.user + t.system + t.children_user + t.children_system + sum(
        cpu_s(p.pid, table) for p in STARTED if p.poll() is None)


def wait_quiet(pid, limit=15.0, window=0.5):
    """Wait (bounded) until the tree uses under 2 % of a core."""
    end = time.monotonic() + limit
    while time.monotonic() < end:
        c0 = cpu_s(pid)
        time.sleep(window)
        if cpu_s(pid) - c0 <= 0.02 * window + 1.0 / CLK:
            return


def tcp_states(port):
    """States (hex, '01' established, '0A' listen) of the TCP sockets whose local port is port."""
    out = []
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as f:
                next(f)
                for line in f:
                    parts = line.split(None, 4)
                    if int(parts[1].rsplit(":", 1)[1], 16) == port:
                        out.append(parts[3])
        except OSError:
            pass
    return out


def established(port):
    return tcp_states(port).count("01")


def wait_listen(proc, port, what, limit=15.0):
    end = time.monotonic() + limit
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        if "0A" in tcp_states(port):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {port} within {limit}s")


class Ports:
    def __init__(self, base):
        self.next = base

    def get(self):
        for _ in range(2000):
            port, self.next = self.next, self.next + 1
            with socket.socket() as s:
                try:
                    s.bind((HOST, port))
                    return port
                except OSError:
                    pass
        raise RuntimeError("no free port")


def run_tool(cmd, timeout):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{cmd[0]} exit {r.returncode}: {(r.stderr or r.stdout).strip()[-300:]}")
    return r.stdout


# ----------------------------------------------------------------------------- PKI

def make_pki(d):
    """ECDSA P-256 CA, server cert (SAN DNS:localhost, IP:127.0.0.1) and client cert
    (CN mtls-bench-client), in d/ecdsa; a client cert from another CA in d/rogue."""
    def ossl(*a):
        run_tool(["openssl"] + list(a), 60)

    for sub, who in (("ecdsa", ("server", "client")), ("rogue", ("client",))):
        p = os.path.join(d, sub)
        os.makedirs(p)
        ossl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", f"{p}/ca.key")
        ossl("req", "-x509", "-new", "-key", f"{p}/ca.key", "-sha256", "-days", "30",
             "-subj", f"/CN=mtls-bench inbound test CA ({sub})",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", "-out", f"{p}/ca.crt")
        for w in who:
            cn, ext = (("localhost", "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth")
                       if w == "server" else
                       ("mtls-bench-client", "subjectAltName=DNS:mtls-bench-client\nextendedKeyUsage=clientAuth"))
            with open(f"{p}/{w}.ext", "w") as f:
                f.write(ext + "\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n")
            ossl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", f"{p}/{w}.key")
            ossl("req", "-new", "-key", f"{p}/{w}.key", "-subj", f"/CN={cn}", "-out", f"{p}/{w}.csr")
            ossl("x509", "-req", "-in", f"{p}/{w}.csr", "-CA", f"{p}/ca.crt", "-CAkey", f"{p}/ca.key",
                 "-CAcreateserial", "-days", "30", "-sha256", "-extfile", f"{p}/{w}.ext", "-out", f"{p}/{w}.crt")
            with open(f"{p}/{w}.pem", "w") as f:
                f.write(open(f"{p}/{w}.crt").read() + open(f"{p}/{w}.key").read())
    return d


def pki_paths(pki):
    """server cert/key/pem, client cert/key, CA; a client cert/key signed by another CA."""
    e = os.path.join(pki, "ecdsa")
    rogue = os.path.join(pki, "rsa" if os.path.exists(os.path.join(pki, "rsa", "client.crt")) else "rogue")
    return {"cert": f"{e}/server.crt", "key": f"{e}/server.key", "pem": f"{e}/server.pem", "ca": f"{e}/ca.crt",
            "client_cert": f"{e}/client.crt", "client_key": f"{e}/client.key",
            "rogue_cert": f"{rogue}/client.crt", "rogue_key": f"{rogue}/client.key"}


def client_ctx(pki, cert=True, rogue=False):
    c = ssl.create_default_context(cafile=pki["ca"])
    if cert:
        c.load_cert_chain(pki["rogue_cert" if rogue else "client_cert"], pki["rogue_key" if rogue else "client_key"])
    return c


# ----------------------------------------------------------------------------- target and proxies

def nginx_cmd(d, conf_text):
    os.makedirs(d, exist_ok=True)
    conf = os.path.join(d, "nginx.conf")
    with open(conf, "w") as f:
        f.write(conf_text)
    return ["nginx", "-p", d + "/", "-c", conf, "-e", os.path.join(d, "error.log")]


def nginx_head(d, nofile, workers="auto"):
    return (f"worker_processes {workers};\nworker_rlimit_nofile {nofile};\ndaemon off;\n"
            f"pid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n"
            f"events {{ worker_connections {nofile - 1000}; }}\n")


class Target:
    """The plaintext app: nginx (2 workers) serving /small.bin and /bulk.bin (sparse)."""

    def __init__(self, args, ports, run):
        self.args, self.run, self.port = args, run, ports.get()
        self.docroot = os.path.join(run, "docroot")
        os.makedirs(self.docroot)
        for d in (run, self.docroot):
            os.chmod(d, 0o755)  # nginx workers run as nobody
        with open(os.path.join(self.docroot, "small.bin"), "wb") as f:
            f.write(b"x" * args.small_bytes)
        with open(os.path.join(self.docroot, "bulk.bin"), "wb") as f:
            f.truncate(args.bulk_bytes)
        with open(os.path.join(self.docroot, "bulk.bin"), "rb") as f:
            while f.read(1 << 20):  # page cache now, not during the first measurement
                pass
        for n in ("small.bin", "bulk.bin"):
            os.chmod(os.path.join(self.docroot, n), 0o644)

    def start(self):
        d = os.path.join(self.run, "target")
        conf = nginx_head(d, self.args.nofile) + (
            "http {\n  access_log off; default_type application/octet-stream; sendfile on;\n"
            f"  root {self.docroot};\n  keepalive_requests 100000000; keepalive_timeout 900s;\n"
            "  client_header_timeout 900s;\n"
            f"  server {{ listen {HOST}:{self.port} backlog=4096; }}\n}}\n")
        self.proc = spawn(nginx_cmd(d, conf), os.path.join(d, "stderr.log"))
        wait_listen(self.proc, self.port, "target nginx")


def conf_nginx(i):
    m = re.search(r"--modules-path=(\S+)", subprocess.run(["nginx", "-V"], capture_output=True,
                                                          text=True).stderr)
    return nginx_cmd(i.dir, f"load_module {m.group(1)}/ngx_stream_module.so;\n" + nginx_head(i.dir, i.nofile)
                     + f"""stream {{
  server {{
    listen {HOST}:{i.listen} ssl backlog=4096;
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_certificate {i.cert};
    ssl_certificate_key {i.key};
    ssl_client_certificate {i.ca};
    ssl_verify_client on;
    proxy_pass {HOST}:{i.target};
    proxy_timeout 900s;
  }}
}}
""")


def conf_haproxy(i):
    maxconn = (i.nofile - 500) // 2
    return ["haproxy", "-db", "-f", i.write("haproxy.cfg", f"""global
  maxconn {maxconn}
defaults
  mode tcp
  timeout connect 10s
  timeout client 900s
  timeout server 900s
frontend fe
  bind {HOST}:{i.listen} ssl crt {i.pem} ca-file {i.ca} verify required
  maxconn {maxconn}
  default_backend be
backend be
  server app {HOST}:{i.target}
""")]


def conf_stunnel(i):
    return ["stunnel4", i.write("stunnel.conf", f"""foreground = yes
pid =
syslog = no
debug = 4
[inbound]
accept = {HOST}:{i.listen}
connect = {HOST}:{i.target}
cert = {i.cert}
key = {i.key}
CAfile = {i.ca}
requireCert = yes
verifyChain = yes
""")]


class Adapter:
    """role: baseline | peer | candidate.  build(instance) -> argv, or template (str)."""

    def __init__(self, name, role, build=None, template=None):
        self.name, self.role, self.build, self.template, self.inst = name, role, build, template, None

    @property
    def proxy(self):
        return bool(self.build or self.template)

    def command(self, i):
        if self.build:
            return self.build(i)
        return shlex.split(self.template.format(
            listen_port=i.listen, listen_host=HOST, target_port=i.target, target_host=HOST,
            cert=i.cert, key=i.key, ca=i.ca, pem=i.pem, dir=i.dir))


class Instance:
    """One running proxy: mTLS on 127.0.0.1:listen -> plaintext 127.0.0.1:target."""

    def __init__(self, adapter, ctx, tag):
        self.adapter, self.target = adapter, ctx.target.port
        self.listen, self.nofile = ctx.ports.get(), ctx.args.nofile
        self.dir = os.path.join(ctx.run, f"{adapter.name}-{tag}")
        os.makedirs(self.dir)
        self.cert, self.key, self.pem, self.ca = (ctx.pki[k] for k in ("cert", "key", "pem", "ca"))
        self.proc = None

    def write(self, name, text):
        path = os.path.join(self.dir, name)
        with open(path, "w") as f:
            f.write(text)
        return path

    def start(self):
        cmd = self.adapter.command(self)
        self.write("command.txt", shlex.join(cmd) + "\n")
        self.proc = spawn(cmd, os.path.join(self.dir, "output.log"))
        wait_listen(self.proc, self.listen, self.adapter.name)
        return self

    def stop(self):
        if self.proc:
            stop(self.proc)
            self.proc = None


def make_adapters(args):
    builtin = {"plain": Adapter("plain", "baseline"), "nginx": Adapter("nginx", "peer", conf_nginx),
               "haproxy": Adapter("haproxy", "peer", conf_haproxy),
               "stunnel": Adapter("stunnel", "peer", conf_stunnel)}
    out = []
    for n in args.adapters.split(","):
        if n and n not in builtin:
            sys.exit(f"unknown adapter {n!r}; built-ins: {', '.join(builtin)}")
        if n:
            out.append(builtin[n])
    for role, specs in (("peer", args.peer), ("candidate", args.custom)):
        for spec in specs:
            name, _, tmpl = spec.partition("=")
            if not re.fullmatch(r"[\w.-]+", name) or not tmpl:
                sys.exit(f"want NAME=TEMPLATE, got {spec!r}")
            out.append(Adapter(name, role, template=tmpl))
    return out


# ----------------------------------------------------------------------------- clients

def connect(port, tls, timeout=10):
    s = socket.create_connection((HOST, port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return tls.wrap_socket(s, server_hostname=SERVER_NAME) if tls else s


def read_response(s, buf=b""):
    """Read one HTTP response with a Content-Length body; (status, body length, leftover)."""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            raise RuntimeError("closed before the response headers")
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    m = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
    if not m:
        raise RuntimeError("no Content-Length")
    n = int(m.group(1))
    while len(body) < n:
        chunk = s.recv(65536)
        if not chunk:
            raise RuntimeError("closed in the body")
        body += chunk
    return int(head.split()[1]), n, body[n:]


def get_once(port, tls, path="/small.bin"):
    """One request on a new connection: (status, body length)."""
    s = connect(port, tls)
    try:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {SERVER_NAME}\r\nConnection: close\r\n\r\n".encode())
        st, n, _ = read_response(s)
        return st, n
    finally:
        s.close()


def refusal(port, tls):
    """How the proxy answers a client that it must refuse: a string; 'ACCEPTED' if it served it."""
    try:
        st, _ = get_once(port, tls)
        return f"ACCEPTED (HTTP {st})"
    except ssl.SSLError as e:
        return f"refused: {e.reason or e}"
    except (OSError, RuntimeError) as e:
        return f"refused: {type(e).__name__}: {e}"


def newconn_worker(port, tls, deadline, small, q):
    """Until deadline: new connection, full handshake, GET (HTTP/1.0), read to EOF, close."""
    n, err, lat = 0, 0, []
    req = f"GET /small.bin HTTP/1.0\r\nHost: {SERVER_NAME}\r\n\r\n".encode()
    while time.monotonic() < deadline:
        t0 = time.perf_counter()
        try:
            s = connect(port, tls)
            try:
                s.sendall(req)
                st, got, _ = read_response(s)
            finally:
                s.close()
            if st != 200 or got != small:
                raise RuntimeError(f"HTTP {st}, {got} bytes")
            n += 1
            lat.append(time.perf_counter() - t0)
        except (OSError, RuntimeError):
            err += 1
            time.sleep(0.01)
    q.put((n, err, lat))


def keepalive_worker(port, tls, deadline, small, conns, q):
    """conns keep-alive connections; each round sends one request on each, then reads each
    answer: conns requests in flight per process."""
    n, err, lat = 0, 0, []
    req = f"GET /small.bin HTTP/1.1\r\nHost: {SERVER_NAME}\r\n\r\n".encode()
    socks = []
    try:
        socks = [connect(port, tls) for _ in range(conns)]
        while time.monotonic() < deadline:
            t0 = time.perf_counter()
            for s in socks:
                s.sendall(req)
            for s in socks:
                st, got, left = read_response(s)
                if st != 200 or got != small or left:
                    raise RuntimeError(f"HTTP {st}, {got} bytes")
            n += conns
            lat.append(time.perf_counter() - t0)
    except (OSError, RuntimeError):
        err += 1
    finally:
        for s in socks:
            s.close()
    q.put((n, err, lat))


def run_workers(target, argsets, duration):
    """Start one process per argset, each runs until the deadline; sum their counts."""
    mp = multiprocessing.get_context("fork")
    q = mp.Queue()
    deadline = time.monotonic() + duration
    procs = [mp.Process(target=target, args=a[:2] + (deadline,) + a[2:] + (q,), daemon=True) for a in argsets]
    t0 = time.monotonic()
    for p in procs:
        p.start()
    got = []
    try:
        for _ in procs:
            got.append(q.get(timeout=duration + 60))
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    elapsed = time.monotonic() - t0
    lat = sorted(x for g in got for x in g[2])
    pct = lambda f: lat[min(len(lat) - 1, int(f * len(lat)))] * 1e3 if lat else None
    n = sum(g[0] for g in got)
    return {"value": n / elapsed, "units": n, "errors": sum(g[1] for g in got), "p50": pct(0.5), "p99": pct(0.99)}


# ----------------------------------------------------------------------------- workloads

def endpoint(ctx, a):
    if a.proxy:
        return a.inst.listen, ctx.tls
    return ctx.target.port, None


def w_newconn(ctx, a):
    port, tls = endpoint(ctx, a)
    return run_workers(newconn_worker, [(port, tls, ctx.args.small_bytes)] * ctx.args.nc_procs,
                       ctx.args.duration)


def w_keepalive(ctx, a):
    port, tls = endpoint(ctx, a)
    return run_workers(keepalive_worker, [(port, tls, ctx.args.small_bytes, ctx.args.ka_conns)]
                       * ctx.args.ka_procs, ctx.args.duration)


def w_bulk(ctx, a):
    port, tls = endpoint(ctx, a)
    p = ctx.pki
    if tls:
        cmd = ["curl", "-sS", "--fail", "--resolve", f"{SERVER_NAME}:{port}:{HOST}", "--cacert", p["ca"],
               "--cert", p["client_cert"], "--key", p["client_key"], f"https://{SERVER_NAME}:{port}/bulk.bin"]
    else:
        cmd = ["curl", "-sS", "--fail", f"http://{HOST}:{port}/bulk.bin"]
    out = run_tool(cmd + ["-o", "/dev/null", "-w", "%{http_code} %{size_download} %{time_total}"], 300)
    code, got, t = out.split()
    if code != "200" or int(got) != ctx.args.bulk_bytes:
        raise RuntimeError(f"HTTP {code}, {got} bytes")
    return {"value": int(got) / float(t) / 1e6, "units": int(got)}


# name: (function, proxy CPU reported per this many units, unit, cpu unit, title, meaning)
WORKLOADS = {
    "newconn": (w_newconn, 1e6, "conn/s", "CPU us/handshake", "New connection per request: full mTLS handshake",
                "{nc_procs} Python ssl client processes, each in a loop: connect, full TLS handshake with the "
                "client certificate (no resumption offered), one HTTP/1.0 GET of {small_bytes} bytes, read to "
                "EOF, close. `proxy CPU` per connection is the proxy's CPU per full mTLS handshake (plus one tiny "
                "request and the target connection). Latency is per connection, connect included."),
    "keepalive": (w_keepalive, 1e6, "req/s", "CPU us/req", "Keep-alive requests",
                  "{ka_procs} Python ssl client processes x {ka_conns} keep-alive connections each, one "
                  "request in flight per connection ({in_flight} in all), {small_bytes}-byte responses. Latency "
                  "is per round (one request on every connection of a process)."),
    "bulk": (w_bulk, 1e9, "MB/s", "CPU s/GB", "Bulk download, 1 connection",
             "curl --cert: one GET of a {bulk_bytes:,}-byte file, timed by curl (connect to last byte)."),
}


def measure(ctx, a, w):
    """One measurement with the proxy's CPU per unit of work and the CPU used meanwhile by
    processes outside the benchmark (cores)."""
    fn, per = WORKLOADS[w][:2]
    proc = a.inst.proc if a.proxy else None
    t0, b0, o0 = time.monotonic(), busy_s(), ours_s()
    c0 = cpu_s(proc.pid) if proc else 0
    r = fn(ctx, a)
    if proc:  # let it finish closing so that its CPU is counted
        wait_quiet(proc.pid, limit=3, window=0.2)
        r["cpu_per"] = (cpu_s(proc.pid) - c0) / r["units"] * per if r["units"] else None
    r["other_load"] = max(0.0, (busy_s() - b0 - (ours_s() - o0)) / (time.monotonic() - t0))
    return r


def memory_test(ctx, a, n):
    """A fresh instance: its memory warm, then with n idle mTLS connections held through it
    (each handshake finished and its target connection established)."""
    inst = Instance(a, ctx, f"mem{n}-{len(os.listdir(ctx.run))}").start()
    socks = []
    try:
        wait_quiet(inst.proc.pid, limit=5)
        rss0, pss0, procs0 = mem_kib(inst.proc.pid)
        st, _ = get_once(inst.listen, ctx.tls)  # warm it once
        if st != 200:
            raise RuntimeError(f"HTTP {st}")
        end = time.monotonic() + 10
        while established(inst.target) and time.monotonic() < end:
            time.sleep(0.05)
        base = established(inst.target)
        wait_quiet(inst.proc.pid, limit=5)
        rss1, pss1, _ = mem_kib(inst.proc.pid)
        end = time.monotonic() + 120
        for _ in range(n):
            if time.monotonic() > end:
                raise RuntimeError(f"opening {n} connections took over 120 s ({len(socks)} open)")
            socks.append(connect(inst.listen, ctx.tls, timeout=30))
        end = time.monotonic() + 60
        while established(inst.target) - base < n and time.monotonic() < end:
            time.sleep(0.1)
        reached = established(inst.target) - base
        if reached < n:
            raise RuntimeError(f"only {reached} of {n} target connections established")
        wait_quiet(inst.proc.pid, limit=20)
        time.sleep(1.0)
        rss2, pss2, procs2 = mem_kib(inst.proc.pid)
        held = established(inst.listen)  # server-side sockets of the proxy still open
        return {"conns": n, "idle_rss": rss0, "idle_pss": pss0, "idle_procs": procs0, "reached": reached,
                "held": held, "procs": procs2, "rss_at_n": rss2,
                "value": (pss2 - pss1) / n, "rss_per": (rss2 - rss1) / n}
    finally:
        for s in socks:
            s.close()
        inst.stop()
        end = time.monotonic() + 30
        while established(ctx.target.port) and time.monotonic() < end:
            time.sleep(0.2)


# ----------------------------------------------------------------------------- report

def fmt(v, nd=0):
    return "-" if v is None or v != v else f"{v:,.{nd}f}"


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summarize(samples, adapters, key="value", higher=True):
    """One row per adapter: medians of the good samples, and key's ratio to the best peer."""
    rows = []
    for a in adapters:
        s = samples.get(a.name, [])
        good = [x for x in s if "error" not in x]
        r = {"a": a, "n": len(good), "fail": next((x["error"] for x in s if "error" in x), "not run")}
        if good:
            vals = [x["value"] for x in good]
            r.update(med=med(vals), min=min(vals), max=max(vals), errors=sum(x.get("errors", 0) for x in good))
            for k in set().union(*good) - {"value", "error", "errors"}:
                if all(isinstance(x.get(k), (int, float)) for x in good):
                    r[k] = med(x[k] for x in good)
            r["cpu_all"] = [x.get("cpu_per") for x in good]
        rows.append(r)
    kv = lambda r: r["med"] if key == "value" else r.get(key)
    peers = [kv(r) for r in rows if r["a"].role == "peer" and r["n"] and kv(r) is not None]
    best = (max(peers) if higher else min(peers)) if peers else None
    for r in rows:
        r["ratio"] = kv(r) / best if best and r["n"] and kv(r) is not None else None
    return rows, best


def table(L, title, meaning, rows, cols):
    L += [f"### {title}", "", meaning, "", "| " + " | ".join(c for c, _ in cols) + " |",
          "|" + "---|" * len(cols)]
    for r in rows:
        cells = [f(r) if (r["n"] or i < 2) else "-" for i, (_, f) in enumerate(cols[:-1])]
        last = cols[-1][1](r) if r["n"] else f"FAILED: {r['fail'][:150]}"
        L.append("| " + " | ".join(cells + [last]) + " |")
    L.append("")


TARGETS = {"newconn": (0.5, "CPU per full mTLS handshake", "at most 0.5x the best peer's"),
           "keepalive": (1.0, "keep-alive CPU per request", "no more than the best peer's"),
           "bulk": (1.0, "bulk CPU per GB", "no more than the best peer's")}


def report(ctx, results, checks):
    args, ads = ctx.args, ctx.adapters
    loads = [x["other_load"] for w in results.values() for s in w.values() for x in s if "other_load" in x]
    L = [f"# Inbound mTLS proxy benchmark: {args.title}", "",
         f"Run {ctx.started} UTC, {ctx.elapsed:.0f} s. {os.cpu_count()} cores ({ctx.cpu_model}), "
         f"{platform.platform()}.  " + "; ".join(ctx.versions) + ".", "",
         f"Command: `{ctx.command}`", "",
         f"Settings: {args.reps} repetitions; {args.duration} s per newconn/keep-alive measurement; bulk "
         f"{args.bulk_bytes:,} B; idle connections {args.idle_conns}; PKI {args.pki} (ECDSA P-256 server "
         f"and client certificates, one CA); RLIMIT_NOFILE {args.nofile}. Every proxy keeps its default "
         "TLS settings (session tickets, cache, ciphers); the clients never resume, so each new connection "
         "is a full mTLS handshake.", "",
         "How to read: each figure is the median over the repetitions (min..max = spread of the rate). "
         "`proxy CPU` = user+sys CPU of the proxy's process tree (threads and reaped children included) "
         "per unit of work; it does not depend on how the 2 shared cores were split between client, "
         "proxy and target, so it is the figure to compare. `CPU vs best peer` = this proxy CPU / the "
         "lowest peer's. `other load` = CPU (cores) used meanwhile by processes outside this benchmark; "
         "a high value flags a disturbed figure. Roles: peer = existing proxy doing the same job, "
         "candidate = proxy under test, `plain` = client straight to the plaintext target (no TLS, no "
         "proxy). MB = 10^6 bytes.", "",
         f"Other load over all measurements: median {fmt(med(loads), 2)}, max "
         f"{fmt(max(loads) if loads else None, 2)} cores.", "", "### Checks", "",
         "Each proxy, at start: a client with the certificate gets the 128-byte file; a client without a "
         "certificate, and a client whose certificate another CA signed, must be refused:", ""]
    L += [f"- {a.name}: {checks.get(a.name, '-')}" for a in ads if a.proxy] + [""]
    verdicts = []
    fill = dict(vars(args), in_flight=args.ka_procs * args.ka_conns)
    first = [("adapter", lambda r: r["a"].name), ("role", lambda r: r["a"].role)]
    for w, samples in results.items():
        if w not in WORKLOADS:
            continue
        _, _, unit, cpu, title, meaning = WORKLOADS[w]
        rows, best = summarize(samples, ads, key="cpu_per", higher=False)
        lat = [("p50 ms", lambda r: fmt(r.get("p50"), 2)), ("p99 ms", lambda r: fmt(r.get("p99"), 2))] \
            if w != "bulk" else []
        table(L, title, meaning.format(**fill), rows, first + [
            (unit, lambda r: fmt(r["med"], 1 if r["med"] < 100 else 0)),
            ("min..max", lambda r: f"{fmt(r['min'])}..{fmt(r['max'])}")] + lat + [
            (f"proxy {cpu}", lambda r: fmt(r.get("cpu_per"), 1)),
            ("all reps", lambda r: ", ".join(fmt(x, 1) for x in r.get("cpu_all", []))),
            ("CPU vs best peer", lambda r: fmt(r["ratio"], 2)),
            ("other load", lambda r: fmt(r.get("other_load"), 2)), ("errors", lambda r: str(r["errors"]))])
        for r in rows:
            if r["a"].role == "candidate" and w in TARGETS:
                lim, what, text = TARGETS[w]
                ok = r["ratio"] is not None and r["ratio"] <= lim
                verdicts.append(f"- {r['a'].name}, {what}: {fmt(r['ratio'], 2)}x the best peer's "
                                f"(target: {text}): {'met' if ok else 'NOT met'}")
    mem = results.get("memory")
    if mem:
        proxies = [a for a in ads if a.proxy]
        idle = {k: [dict(x, value=x["idle_rss"]) for x in v if "error" not in x] for k, v in mem.items()}
        rows, _ = summarize(idle, proxies, higher=False)
        table(L, "Memory at start", "Freshly started proxy, whole process tree, before any connection; "
              "median over its fresh starts. Lower is better.", rows,
              first + [("RSS KiB", lambda r: fmt(r["med"])), ("PSS KiB", lambda r: fmt(r.get("idle_pss"))),
                       ("processes", lambda r: fmt(r.get("idle_procs"))), ("samples", lambda r: str(r["n"]))])
        for n in args.idle_conns:
            sub = {k: [x for x in v if x.get("conns") == n] for k, v in mem.items()}
            rows, _ = summarize(sub, proxies, higher=False)
            hap = next((r["med"] for r in rows if r["a"].name == "haproxy" and r["n"]), None)
            for r in rows:
                r["vs_haproxy"] = r["med"] / hap if hap and r["n"] else None
            table(L, f"Memory per idle connection, {n:,} held open",
                  f"A fresh instance, warmed by one request; then {n:,} mTLS connections opened by this script "
                  "(handshake finished, client certificate sent) and held idle, each with its target "
                  f"connection established; (tree memory with them - memory just before) / {n:,}. PSS counts "
                  "shared pages once (forked nginx workers are not overcounted); kernel socket buffers are not "
                  "included. Lower is better.", rows,
                  first + [("KiB/conn (PSS)", lambda r: fmt(r["med"], 1)),
                           ("min..max", lambda r: f"{fmt(r['min'], 1)}..{fmt(r['max'], 1)}"),
                           ("KiB/conn (RSS)", lambda r: fmt(r.get("rss_per"), 1)),
                           ("RSS at N, MiB", lambda r: fmt(r["rss_at_n"] / 1024, 1)),
                           ("target conns", lambda r: fmt(r.get("reached"))),
                           ("held by proxy", lambda r: fmt(r.get("held"))),
                           ("processes", lambda r: fmt(r.get("procs"))),
                           ("vs haproxy", lambda r: fmt(r.get("vs_haproxy"), 2))])
            for r in rows:
                if r["a"].role == "candidate":
                    ok = r["vs_haproxy"] is not None and r["vs_haproxy"] <= 0.5
                    verdicts.append(f"- {r['a'].name}, memory per idle connection at {n:,}: "
                                    f"{fmt(r['vs_haproxy'], 2)}x HAProxy's (target: at most 0.5x): "
                                    f"{'met' if ok else 'NOT met'}")
    if verdicts:
        L += ["### Issue 14 targets", ""] + verdicts + [""]
    return "\n".join(L)


# ----------------------------------------------------------------------------- main

def size(text):
    m = re.fullmatch(r"(\d+)\s*([KMG]i?)?B?", str(text).strip(), re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r}")
    mult = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "KI": 2**10, "MI": 2**20, "GI": 2**30}
    return int(m.group(1)) * mult[(m.group(2) or "").upper()]


def versions():
    def v(cmd, pat=r"(\d+\.\d+[\w.\-+~]*)"):
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            m = re.search(pat, r.stdout + r.stderr)
            return f"{cmd[0]} {m.group(1) if m else '?'}"
        except (OSError, subprocess.TimeoutExpired):
            return f"{cmd[0]} missing"
    return [v(["openssl", "version"]), v(["stunnel4", "-version"], r"stunnel (\S+)"), v(["nginx", "-v"]),
            v(["haproxy", "-v"]), v(["curl", "--version"]), f"python {platform.python_version()} "
            f"({ssl.OPENSSL_VERSION})"]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--work", default=os.environ.get("BENCH_WORK", "/tmp/mtls-bench"), help="scratch folder (%(default)s)")
    a("--pki", help="PKI folder with ecdsa/{ca,server,client}.{crt,key} (default WORK/pki if it exists, "
                    "else a new one made with openssl in the run folder)")
    a("--adapters", default="plain,nginx,haproxy,stunnel", help="built-ins (%(default)s)")
    a("--custom", action="append", default=[], metavar="NAME=TEMPLATE",
      help="a proxy under test: command template with {listen_port} {target_host} {target_port} {cert} "
           "{key} {ca} (also {pem} {listen_host} {dir}); repeatable")
    a("--peer", action="append", default=[], metavar="NAME=TEMPLATE", help="like --custom, counted as a peer")
    a("--workloads", default="newconn,keepalive,bulk,memory", help="(%(default)s)")
    a("--reps", type=int, default=3, help="repetitions of each measurement (%(default)s)")
    a("--duration", type=int, default=4, help="seconds per newconn/keepalive measurement (%(default)s)")
    a("--bulk-bytes", type=size, default="1GiB", help="bulk download size (%(default)s)")
    a("--small-bytes", type=int, default=128, help="small response body, bytes (%(default)s)")
    a("--nc-procs", type=int, default=4, help="new-connection client processes (%(default)s)")
    a("--ka-procs", type=int, default=2, help="keep-alive client processes (%(default)s)")
    a("--ka-conns", type=int, default=8, help="keep-alive connections per process (%(default)s)")
    a("--idle-conns", default="2000", help="idle connection counts for memory, comma-separated (%(default)s)")
    a("--base-port", type=int, default=19000, help="first port tried (%(default)s)")
    a("--seed", type=int, default=1, help="seed of the adapter order (%(default)s)")
    a("--title", default="peers")
    a("--out", help="also write the Markdown report here")
    a("--json", help="write every raw sample here")
    a("--keep", action="store_true", help="keep the run's scratch folder (configs, logs)")
    args = p.parse_args()
    args.idle_conns = [int(x) for x in args.idle_conns.split(",") if x]
    bad = [w for w in args.workloads.split(",") if w not in list(WORKLOADS) + ["memory"]]
    if bad:
        p.error(f"unknown workload {bad[0]!r}: choose from {', '.join(list(WORKLOADS) + ['memory'])}")
    return args


def start_and_check(ctx, a):
    """Start a's main instance; check that it serves a client with a certificate and refuses
    one without and one from another CA.  Returns the check line."""
    if a.proxy:
        a.inst = Instance(a, ctx, "main").start()
    port, tls = endpoint(ctx, a)
    st, n = get_once(port, tls)
    if st != 200 or n != ctx.args.small_bytes:
        raise RuntimeError(f"with a client certificate: HTTP {st}, {n} bytes")
    if not a.proxy:
        return "plaintext"
    no_cert = refusal(port, client_ctx(ctx.pki, cert=False))
    rogue = refusal(port, client_ctx(ctx.pki, rogue=True))
    if "ACCEPTED" in no_cert + rogue:
        raise RuntimeError(f"does not enforce client certificates: no cert {no_cert}; other CA {rogue}")
    s = connect(port, tls)
    try:
        proto = f"{s.version()} {s.cipher()[0]}"
    finally:
        s.close()
    return f"served ({proto}); no certificate: {no_cert}; other CA: {rogue}"


def run_all(ctx, log):
    checks, ready = {}, []
    for a in ctx.adapters:
        try:
            checks[a.name] = start_and_check(ctx, a)
            ready.append(a)
        except Exception as e:  # report it, go on without this adapter
            checks[a.name] = f"FAILED: {type(e).__name__}: {e}"
            if a.inst:
                a.inst.stop()
        log(f"{a.name}: {checks[a.name]}")
    args, rng = ctx.args, random.Random(ctx.args.seed)
    chosen = args.workloads.split(",")
    timed = [w for w in chosen if w in WORKLOADS]
    results = {w: {} for w in timed}
    for rep in range(args.reps):
        for w in timed:
            order = list(ready)
            rng.shuffle(order)  # a new order each time spreads drift over all adapters
            for a in order:
                try:
                    r = measure(ctx, a, w)
                except Exception as e:
                    r = {"error": f"{type(e).__name__}: {e}"}
                results[w].setdefault(a.name, []).append(r)
                log(f"rep {rep + 1} {w:9s} {a.name:9s} " + (r.get("error") or
                    f"{r['value']:10,.1f}  cpu {fmt(r.get('cpu_per'), 1)}  other load {r['other_load']:.2f}"))
        if "memory" in chosen:
            results.setdefault("memory", {})
            for n in args.idle_conns:
                order = [a for a in ready if a.proxy]
                rng.shuffle(order)
                for a in order:
                    try:
                        r = memory_test(ctx, a, n)
                    except Exception as e:
                        r = {"error": f"{type(e).__name__}: {e}", "conns": n}
                    results["memory"].setdefault(a.name, []).append(r)
                    log(f"rep {rep + 1} memory {n:5d} {a.name:9s} " + (r.get("error") or
                        f"start {r['idle_rss']:,} KiB RSS; {r['value']:.1f} KiB/conn PSS; target {r['reached']}"))
    for a in ready:
        if a.inst:
            a.inst.stop()
    return results, checks


def main():
    args = parse_args()
    for tool in ("nginx", "stunnel4", "haproxy", "openssl", "curl"):
        if not shutil.which(tool):
            sys.exit(f"{tool} not found (Debian: nginx libnginx-mod-stream haproxy stunnel4 openssl curl)")
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # children inherit it
    args.nofile = hard
    if 2 * max(args.idle_conns, default=0) + 1000 > hard:
        print(f"warning: a proxy needs 2 fds per idle connection; RLIMIT_NOFILE hard limit is {hard}",
              file=sys.stderr)
    die_with_parent(signal.SIGTERM)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda num, _frame: sys.exit(128 + num))
    os.makedirs(args.work, exist_ok=True)
    run = tempfile.mkdtemp(prefix="inbound-", dir=args.work)
    t_start = time.monotonic()
    log = lambda m: print(f"[{time.monotonic() - t_start:5.0f}s] {m}", file=sys.stderr, flush=True)
    try:
        default_pki = os.path.join(args.work, "pki")
        if not args.pki:
            args.pki = default_pki if os.path.exists(os.path.join(default_pki, "ecdsa", "client.key")) \
                else make_pki(os.path.join(run, "pki"))
        args.pki = os.path.abspath(args.pki)
        pki = pki_paths(args.pki)
        ctx = argparse.Namespace(
            args=args, run=run, ports=Ports(args.base_port), adapters=make_adapters(args), pki=pki,
            versions=versions(), tls=client_ctx(pki), command=shlex.join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
            started=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
            cpu_model=next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
                            if l.startswith("model name")), "?"))
        ctx.target = Target(args, ctx.ports, run)
        ctx.target.start()
        log(f"target nginx on {ctx.target.port}; PKI {args.pki}")
        results, checks = run_all(ctx, log)
        ctx.elapsed = time.monotonic() - t_start
        text = report(ctx, results, checks)
        print(text)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text + "\n")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"settings": vars(args), "checks": checks, "results": results}, f, indent=1, default=str)
    finally:
        for p in list(reversed(STARTED)):
            stop(p)
        if args.keep:
            print(f"scratch folder kept: {run}", file=sys.stderr)
        else:
            shutil.rmtree(run, ignore_errors=True)


if __name__ == "__main__":
    main()
