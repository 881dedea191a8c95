#!/usr/bin/env python3
"""Scaling: new connections/s and keep-alive requests/s with 1 and 2 tokio worker threads.

    bench/scaling.py [--bin target/release/mtls-sidecar] [--reps 3] [--out FILE]   (from the repo root)

The runtime is tokio's multi-thread runtime built without an explicit worker count, so tokio reads
TOKIO_WORKER_THREADS (default: the CPUs this process may use). Each worker count is one `--custom`
adapter (`env TOKIO_WORKER_THREADS=N BIN run ...`, `env` execs, so the measured pid is the proxy),
and both run in ONE harness run so they alternate within every repetition:

  1. outbound tcp mode: ../shared/bench/bench.py, workloads newconn (ab -c16, one full mTLS
     handshake per connection) and keepalive (wrk -t2 -c64), beside the plaintext `relay` baseline;
  2. inbound tcp mode: bench/inbound/bench.py, workloads newconn and keepalive, beside `plain`;
  3. outbound http mode (like bench/http-mode.sh): an nginx mTLS upstream, `run --mode http` with
     N workers, wrk -t2 -c64 with keep-alive and with `Connection: close`, alternating per round.

Client, proxy and upstream share this machine's cores, so rates say little about the proxy; the
figure that does not depend on how the cores were shared is the proxy's CPU per unit (user+sys of
its process, all threads). The summary prints both, for every worker count, and the CPU ratio
against the first worker count. Needs what ../shared/bench/setup.sh installs. It makes its own
PKI (setup.sh with SKIP_APT=1) under --work, so it does not race other runs for
/tmp/mtls-bench/pki. Every process it starts is stopped by pid; the harnesses stop theirs.
About 3 minutes with the defaults (185 s on 2026-12-03).
"""

import argparse, json, os, re, shlex, shutil, signal, socket, statistics, subprocess, sys, tempfile, time

HOST = "127.0.0.1"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TICK = os.sysconf("SC_CLK_TCK")
NOTES = []  # lines for the summary

OUT_TMPL = ("env TOKIO_WORKER_THREADS={n} {bin} run --listen {{listen_host}}:{{listen_port}} "
            "--upstream {{upstream_host}}:{{upstream_port}} --server-name {{server_name}} "
            "--cert {{cert}} --key {{key}} --ca {{ca}}")
IN_TMPL = ("env TOKIO_WORKER_THREADS={n} {bin} run --inbound --listen 127.0.0.1:{{listen_port}} "
           "--target {{target_host}}:{{target_port}} --cert {{cert}} --key {{key}} --ca {{ca}} "
           "--allow-any-client")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--bin", default=os.path.join(REPO, "target/release/mtls-sidecar"), help="binary (%(default)s)")
    a("--workers", default="1,2", help="TOKIO_WORKER_THREADS values (%(default)s)")
    a("--reps", type=int, default=3, help="repetitions, each figure is their median (%(default)s)")
    a("--duration", type=int, default=3, help="seconds per measurement (%(default)s)")
    a("--parts", default="outbound,inbound,http", help="which parts run (%(default)s)")
    a("--shared-bench", default=os.path.join(os.path.dirname(REPO), "shared/bench"),
      help="folder of the outbound harness (%(default)s)")
    a("--work", default=os.environ.get("SCALING_WORK", "/tmp/mtls-bench-scaling"),
      help="scratch folder; its pki/ is made once and kept (%(default)s)")
    a("--out", help="also write the summary (Markdown) here")
    a("--keep", action="store_true", help="keep the raw harness reports and JSON under --work")
    args = p.parse_args()
    args.bin = os.path.abspath(args.bin)
    args.workers = [int(x) for x in args.workers.split(",") if x]
    args.parts = [x for x in args.parts.split(",") if x]
    return args


def ensure_pki(args):
    pki = os.path.join(args.work, "pki")
    if not os.path.exists(os.path.join(pki, "rsa", "client.pem")):
        env = dict(os.environ, SKIP_APT="1", BENCH_WORK=args.work)
        subprocess.run([os.path.join(args.shared_bench, "setup.sh"), pki], env=env, check=True,
                       stdout=subprocess.DEVNULL, timeout=120)
    return pki


def run_harness(args, log, name, cmd, run_dir):
    """Run one harness with its report and JSON in run_dir; return the parsed JSON."""
    out, js = os.path.join(run_dir, f"{name}.md"), os.path.join(run_dir, f"{name}.json")
    cmd = cmd + ["--out", out, "--json", js]
    shown = shlex.join(["python3", os.path.relpath(cmd[1], REPO)] + cmd[2:])
    log(f"{name}: {shown}")
    with open(os.path.join(run_dir, f"{name}.log"), "w") as err:
        r = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=err, timeout=1200)
    if r.returncode != 0:
        sys.exit(f"{name} harness failed (exit {r.returncode}); see {err.name}")
    with open(js) as f:
        return json.load(f), shown


def outbound(args, log, run_dir):
    cmd = [sys.executable, os.path.join(args.shared_bench, "bench.py"), "--work", args.work,
           "--adapters", "relay", "--workloads", "newconn,keepalive", "--skip-limits",
           "--reps", str(args.reps), "--duration", str(args.duration), "--title", "scaling: outbound"]
    for n in args.workers:
        cmd += ["--custom", f"w{n}=" + OUT_TMPL.format(n=n, bin=args.bin)]
    return run_harness(args, log, "outbound", cmd, run_dir)


def inbound(args, log, run_dir):
    cmd = [sys.executable, os.path.join(REPO, "bench/inbound/bench.py"), "--work", args.work,
           "--pki", os.path.join(args.work, "pki"), "--adapters", "plain",
           "--workloads", "newconn,keepalive", "--reps", str(args.reps),
           "--duration", str(args.duration + 1), "--title", "scaling: inbound"]
    for n in args.workers:
        cmd += ["--custom", f"w{n}=" + IN_TMPL.format(n=n, bin=args.bin)]
    return run_harness(args, log, "inbound", cmd, run_dir)


# ----------------------------------------------------------------------------- http mode

def free_port():
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_port(port, proc, limit=15.0):
    end = time.monotonic() + limit
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"process on port {port} exited with {proc.returncode}")
        try:
            socket.create_connection((HOST, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port} after {limit} s")


def cpu_ticks(pid):
    """utime+stime of the process, all its threads (fields 14 and 15 of /proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def busy_s():
    """CPU seconds the machine spent in processes or stolen (as the harnesses count it)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return (v[0] + v[1] + v[2] + v[7]) / TICK


def ours_s(procs):
    """CPU seconds of this script, its finished children (wrk) and the started processes with
    their children (nginx workers)."""
    t, total = os.times(), 0
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, ValueError):
            continue
        if int(d) in procs or int(fields[1]) in procs:
            total += sum(int(x) for x in fields[11:15])
    return t.user + t.system + t.children_user + t.children_system + total / TICK


def switches(pid):
    """Context switches (voluntary + involuntary) of all the process's threads so far: a
    worker that parks and is woken by another costs one each time."""
    total = 0
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{t}/status") as f:
                total += sum(int(l.split()[1]) for l in f if "ctxt_switches:" in l)
        except OSError:
            pass  # a thread that ended meanwhile
    return total


def workers_of(pid):
    names = []
    for t in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{t}/comm") as f:
            names.append(f.read().strip())
    return sum(1 for n in names if n.startswith("tokio-r"))  # tokio-rt-worker (1.54) / tokio-runtime-w


def wrk(port, duration, close):
    cmd = ["wrk", "-t2", "-c64", f"-d{duration}s", "--latency", "--timeout", "10s"]
    cmd += ["-H", "Connection: close"] if close else []
    out = subprocess.run(cmd + [f"http://{HOST}:{port}/small.bin"], capture_output=True, text=True,
                         timeout=duration + 60, check=True).stdout
    n = int(re.search(r"(\d+) requests in", out).group(1))
    errors = sum(int(x) for x in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    errors += int((re.search(r"Non-2xx or 3xx responses: (\d+)", out) or [0, 0])[1])
    return n, float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)), errors


def start(cmd, log_path, env=None):
    with open(log_path, "w") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def nginx_upstream(d, pki, port):
    os.makedirs(os.path.join(d, "www"))
    with open(os.path.join(d, "www", "small.bin"), "w") as f:
        f.write("x" * 128)
    conf = f"""worker_processes 1; daemon off; pid {d}/nginx.pid; error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off; root {d}/www; keepalive_requests 100000000; keepalive_timeout 900s;
  server {{ listen {HOST}:{port} ssl http2 backlog=4096;
    ssl_certificate {pki}/server.crt; ssl_certificate_key {pki}/server.key;
    ssl_client_certificate {pki}/ca.crt; ssl_verify_client on;
    ssl_protocols TLSv1.2 TLSv1.3; ssl_session_cache off; ssl_session_tickets off; }}
}}
"""
    with open(os.path.join(d, "nginx.conf"), "w") as f:
        f.write(conf)
    os.chmod(d, 0o755)
    for root, dirs, files in os.walk(d):
        for x in dirs + files:
            os.chmod(os.path.join(root, x), 0o755)
    return ["nginx", "-p", d + "/", "-c", os.path.join(d, "nginx.conf"), "-e", os.path.join(d, "error.log")]


def http_mode(args, log, run_dir):
    """samples[workload][w{n}] = [{value, cpu_per, errors}], rounds in rotating order."""
    pki = os.path.join(args.work, "pki", "ecdsa")
    procs, up = [], free_port()
    try:
        procs.append(start(nginx_upstream(os.path.join(run_dir, "up"), pki, up),
                           os.path.join(run_dir, "nginx.log")))
        wait_port(up, procs[-1])
        px = {}
        for n in args.workers:
            port = free_port()
            cmd = [args.bin, "run", "--mode", "http", "--listen", f"{HOST}:{port}", "--upstream",
                   f"{HOST}:{up}", "--server-name", "localhost", "--cert", f"{pki}/client.crt",
                   "--key", f"{pki}/client.key", "--ca", f"{pki}/ca.crt"]
            procs.append(start(cmd, os.path.join(run_dir, f"http-w{n}.log"),
                               dict(os.environ, TOKIO_WORKER_THREADS=str(n))))
            wait_port(port, procs[-1])
            px[f"w{n}"] = (port, procs[-1].pid)
            end = time.monotonic() + 5  # a new thread names itself once it runs: poll
            while (got := workers_of(procs[-1].pid)) != n and time.monotonic() < end:
                time.sleep(0.05)
            log(f"http w{n}: pid {procs[-1].pid}, {got} tokio worker threads")
            NOTES.append(f"`TOKIO_WORKER_THREADS={n}`: {got} `tokio-rt-worker` thread(s) in /proc/PID/task.")
            if got != n:
                sys.exit(f"TOKIO_WORKER_THREADS={n} gave {got} worker threads")
        wrk(px[f"w{args.workers[0]}"][0], 1, False)  # warm: pools dial
        samples = {"keepalive": {}, "close": {}}
        names = list(px)
        for rep in range(args.reps):
            for w in samples:
                for name in names[rep % len(names):] + names[:rep % len(names)]:
                    port, pid = px[name]
                    live = {p.pid for p in procs}
                    c0, t0, b0, o0 = cpu_ticks(pid), time.monotonic(), busy_s(), ours_s(live)
                    s0 = switches(pid)
                    n, rate, errors = wrk(port, args.duration, w == "close")
                    time.sleep(0.3)  # let the last closes finish
                    cpu = (cpu_ticks(pid) - c0) / TICK / n * 1e6
                    cs = (switches(pid) - s0) / n
                    load = max(0.0, (busy_s() - b0 - (ours_s(live) - o0)) / (time.monotonic() - t0))
                    samples[w].setdefault(name, []).append(
                        {"value": rate, "cpu_per": cpu, "errors": errors, "other_load": load, "switches": cs})
                    log(f"rep {rep + 1} http {w:9s} {name}: {rate:10,.1f} req/s  cpu {cpu:.1f} µs/req  "
                        f"{cs:.2f} context switches/req  "
                        f"other load {load:.2f}"
                        + (f"  ERRORS {errors}" if errors else ""))
        return samples
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


# ----------------------------------------------------------------------------- summary

def med(samples, key):
    xs = [s[key] for s in samples if s.get(key) is not None and "error" not in s]
    return statistics.median(xs) if xs else None


def fmt(v, nd=0):
    return "–" if v is None else f"{v:,.{nd}f}"


def rows_for(label, unit, per_unit, results, workers, baseline):
    """One table row per adapter: rate, p99, CPU per unit, CPU vs the first worker count."""
    out, first = [], med(results.get(f"w{workers[0]}", []), "cpu_per")
    for name in [f"w{n}" for n in workers] + ([baseline] if baseline in results else []):
        s = results.get(name, [])
        cpu = med(s, "cpu_per")
        who = f"{name[1:]} worker{'s' if name != 'w1' else ''}" if name.startswith("w") else f"{name} (baseline)"
        ratio = fmt(cpu / first, 2) if cpu and first and name.startswith("w") else ""
        errors = sum(x.get("errors", 0) for x in s) + sum(1 for x in s if "error" in x)
        load = med(s, "other_load")
        out.append(f"| {label} | {who} | {fmt(med(s, 'value'))} {unit} | {fmt(cpu, 1)} {per_unit} | {ratio} "
                   f"| {fmt(med(s, 'switches'), 2)} | {fmt(load, 2)} | {errors} |")
    return out


def summary(args, parts, started, elapsed):
    lines = [f"# Scaling: 1 and 2 tokio worker threads", "",
             f"Run {started} UTC, {elapsed:.0f} s, {os.cpu_count()} CPUs; binary `{args.bin}`; "
             f"medians of {args.reps} repetitions, {args.duration} s per measurement (inbound "
             f"{args.duration + 1} s).", "",
             "Command: `" + shlex.join(["bench/scaling.py"] + sys.argv[1:]) + "`", "",
             "| workload | proxy | rate | proxy CPU per unit | CPU vs 1 worker | context switches per unit "
             "| other load (cores) | errors |",
             "|---|---|---|---|---|---|---|---|"]
    names = {"newconn": ("new connections", "conn/s", "µs/conn"), "keepalive": ("keep-alive", "req/s", "µs/req"),
             "close": ("`Connection: close`", "req/s", "µs/req")}
    for part, (data, _cmd, baseline) in parts.items():
        for w, res in data.items():
            label, unit, per = names[w]
            lines += rows_for(f"{part}, {label}", unit, per, res, args.workers, baseline)
    lines += ["", "Context switches (voluntary and involuntary, all threads of the proxy, from "
              "/proc/PID/task/*/status) are counted only for the http-mode part, whose processes "
              "the script starts itself."]
    lines += [""] + NOTES if NOTES else []
    lines += ["", "Harness commands (run by the script):", ""]
    lines += [f"- {part}: `{cmd}`" for part, (_d, cmd, _b) in parts.items() if cmd]
    return "\n".join(lines)


def main():
    args = parse_args()
    for tool in ("nginx", "wrk", "ab", "env"):
        if not shutil.which(tool):
            sys.exit(f"{tool} not found: run ../shared/bench/setup.sh first")
    if not os.access(args.bin, os.X_OK):
        sys.exit(f"{args.bin} is not an executable: cargo build --release --locked")
    signal.signal(signal.SIGTERM, lambda num, _f: sys.exit(128 + num))
    os.makedirs(args.work, exist_ok=True)
    t0 = time.monotonic()
    started = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    log = lambda m: print(f"[{time.monotonic() - t0:5.0f}s] {m}", file=sys.stderr, flush=True)
    ensure_pki(args)
    run_dir = tempfile.mkdtemp(prefix="scaling-", dir=args.work)
    os.chmod(run_dir, 0o755)
    parts = {}
    try:
        if "outbound" in args.parts:
            data, cmd = outbound(args, log, run_dir)
            parts["outbound tcp"] = (data["results"], cmd, "relay")
        if "inbound" in args.parts:
            data, cmd = inbound(args, log, run_dir)
            parts["inbound tcp"] = (data["results"], cmd, "plain")
        if "http" in args.parts:
            parts["outbound http"] = (http_mode(args, log, run_dir), "", None)
        text = summary(args, parts, started, time.monotonic() - t0)
        print(text)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text + "\n")
    finally:
        if args.keep:
            print(f"raw reports kept: {run_dir}", file=sys.stderr)
        else:
            shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
