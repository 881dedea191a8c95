//! Running the real binary: a command builder, and a handle that collects stderr lines in the
//! background, finds the bound address, sends signals, and kills the process when dropped.

use std::ffi::{OsStr, OsString};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::{WAIT, field, is_conn_line};

pub const BIN: &str = env!("CARGO_BIN_EXE_mtls-sidecar");

/// Arguments and environment for one run of the binary.
#[derive(Clone, Default)]
pub struct Cmd {
    args: Vec<OsString>,
    envs: Vec<(OsString, OsString)>,
}

impl Cmd {
    pub fn new() -> Cmd {
        Cmd::default()
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Cmd {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    pub fn args<I: IntoIterator<Item = S>, S: AsRef<OsStr>>(mut self, args: I) -> Cmd {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Cmd {
        self.envs
            .push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    fn display(&self) -> String {
        let mut s = String::new();
        for (k, v) in &self.envs {
            s.push_str(&format!("{}={} ", k.to_string_lossy(), v.to_string_lossy()));
        }
        s.push_str(BIN);
        for a in &self.args {
            s.push(' ');
            s.push_str(&a.to_string_lossy());
        }
        s
    }

    /// Starts the process and returns at once.
    pub fn spawn(&self) -> Sidecar {
        let mut command = Command::new(BIN);
        command
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped());
        self.spawn_command(command, self.display())
    }

    /// Starts the process the way systemd starts a socket-activated service: `sockets` become
    /// fds 3, 4, ... (at most two), with `LISTEN_FDS`, `LISTEN_FDNAMES` (the names given, joined
    /// by `:`) and `LISTEN_PID` (the process's own pid) in its environment.
    ///
    /// Without `unsafe`: the sockets reach a `sh` wrapper as its stdin and stdout, the wrapper
    /// moves them to 3 and 4 (stdout then goes to the stderr pipe, which is collected too) and
    /// `exec`s the binary, so `$$` is the binary's pid.
    pub fn spawn_activated(&self, sockets: Vec<(&str, OwnedFd)>) -> Sidecar {
        assert!(
            (1..=2).contains(&sockets.len()),
            "spawn_activated passes one or two sockets"
        );
        let names: Vec<&str> = sockets.iter().map(|(n, _)| *n).collect();
        let mut fds = sockets.into_iter().map(|(_, fd)| fd);
        let mut script = String::from("exec 3<&0 0</dev/null");
        let mut command = Command::new("sh");
        command.stdin(Stdio::from(fds.next().expect("one socket")));
        match fds.next() {
            Some(second) => {
                command.stdout(Stdio::from(second));
                script.push_str(" 4>&1 1>&2");
            }
            None => {
                command.stdout(Stdio::piped());
            }
        }
        script.push_str("; LISTEN_PID=$$ exec \"$0\" \"$@\"");
        command
            .arg("-c")
            .arg(&script)
            .arg(BIN)
            .args(&self.args)
            .env("LISTEN_FDS", names.len().to_string())
            .env("LISTEN_FDNAMES", names.join(":"));
        let display = format!(
            "LISTEN_FDS={} LISTEN_FDNAMES={} (sockets as fd 3..) {}",
            names.len(),
            names.join(":"),
            self.display()
        );
        self.spawn_command(command, display)
    }

    /// Starts the process with `hosts` in place of `/etc/hosts`, seen by it alone: a private
    /// mount namespace (`unshare -m`, root only) in which the file is bind-mounted, then `exec`
    /// of the binary (same pid). The network is the host's, so loopback peers stay reachable.
    /// `None` when this cannot be done here (not root, no `unshare`).
    pub fn spawn_with_hosts(&self, hosts: &std::path::Path) -> Option<Sidecar> {
        let root = Command::new("id").arg("-u").output().ok()?;
        if String::from_utf8_lossy(&root.stdout).trim() != "0" {
            return None;
        }
        let probe = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "--", "true"])
            .status()
            .ok()?;
        if !probe.success() {
            return None;
        }
        let mut command = Command::new("unshare");
        command
            .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
            .arg("mount --bind \"$0\" /etc/hosts && exec \"$@\"")
            .arg(hosts)
            .arg(BIN)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped());
        let display = format!("(/etc/hosts = {}) {}", hosts.display(), self.display());
        Some(self.spawn_command(command, display).listening())
    }

    /// `command` has its arguments and stdin/stdout; this sets stderr, the environment and the
    /// log collectors.
    fn spawn_command(&self, mut command: Command, cmdline: String) -> Sidecar {
        command.stderr(Stdio::piped());
        // A variable set in the developer's shell must not change what a test means.
        for (key, _) in std::env::vars_os() {
            let k = key.to_string_lossy();
            // NO_COLOR too: "no ANSI colours" must hold without it.
            let trust = k == "SSL_CERT_FILE" || k == "SSL_CERT_DIR" || k == "NO_COLOR";
            // The service manager's variables, so that only a test that sets them means them.
            let systemd = matches!(
                &*k,
                "NOTIFY_SOCKET"
                    | "WATCHDOG_USEC"
                    | "WATCHDOG_PID"
                    | "LISTEN_FDS"
                    | "LISTEN_PID"
                    | "LISTEN_FDNAMES"
            );
            // Egress proxy settings, which `--proxy-from-env` reads: only a test that sets them
            // means them.
            let egress = matches!(
                &*k.to_ascii_uppercase(),
                "HTTPS_PROXY" | "HTTP_PROXY" | "ALL_PROXY" | "NO_PROXY"
            );
            if k.starts_with("MTLS_SIDECAR_") || k == "RUST_LOG" || systemd || trust || egress {
                command.env_remove(&key);
            }
        }
        for (k, v) in &self.envs {
            command.env(k, v);
        }
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmdline}: {e}"));
        // Closes the parent's copies of any sockets handed to the child.
        drop(command);
        let log = Arc::new(Log::default());
        let stderr = child.stderr.take().expect("piped stderr");
        let err_log = Arc::clone(&log);
        std::thread::spawn(move || err_log.collect(stderr, true));
        match child.stdout.take() {
            Some(stdout) => {
                let out_log = Arc::clone(&log);
                std::thread::spawn(move || out_log.collect(stdout, false));
            }
            // stdout was handed a socket and the wrapper sent it to stderr: nothing to read.
            None => log.lines.lock().unwrap().closed += 1,
        }
        Sidecar {
            pid: child.id(),
            child,
            cmdline,
            log,
            addr: None,
            status: None,
        }
    }

    /// Starts the process and waits for its `listening route=default addr=` line.
    pub fn start(&self) -> Sidecar {
        self.spawn().listening()
    }

    /// Runs the process, which must exit with code 2 (bad usage, config or material) without
    /// ever listening; returns its stderr.
    pub fn startup_error(&self) -> String {
        self.spawn().startup_error()
    }

    /// Runs the process to completion (it must exit within `timeout`): (exit code, stderr).
    pub fn run_to_exit(&self, timeout: Duration) -> (Option<i32>, String) {
        let mut sidecar = self.spawn();
        let status = sidecar.wait_exit(timeout);
        sidecar.wait_output_closed();
        (status.code(), sidecar.stderr())
    }
}

#[derive(Default)]
struct Lines {
    /// stderr lines, in order
    err: Vec<String>,
    /// stdout lines, kept apart: only reports (`check`, `dev-pki`) are printed there
    out: Vec<String>,
    /// how many of the two pipes reached end of file
    closed: usize,
}

#[derive(Default)]
struct Log {
    lines: Mutex<Lines>,
    changed: Condvar,
}

impl Log {
    fn collect(&self, pipe: impl std::io::Read, is_stderr: bool) {
        let reader = BufReader::new(pipe);
        for line in reader.split(b'\n') {
            let Ok(line) = line else { break };
            let line = String::from_utf8_lossy(&line).trim_end().to_string();
            let mut lines = self.lines.lock().unwrap();
            if is_stderr {
                lines.err.push(line);
            } else {
                lines.out.push(line);
            }
            self.changed.notify_all();
        }
        self.lines.lock().unwrap().closed += 1;
        self.changed.notify_all();
    }
}

/// A running `mtls-sidecar`. Dropping it kills the process; if the test is panicking, the command
/// line and everything the process printed are shown.
pub struct Sidecar {
    child: Child,
    pid: u32,
    cmdline: String,
    log: Arc<Log>,
    addr: Option<SocketAddr>,
    status: Option<ExitStatus>,
}

impl Sidecar {
    /// Waits for the `listening route=default addr=` line of a spawned process and records the
    /// address for [`Sidecar::addr`].
    pub fn listening(self) -> Sidecar {
        let mut sidecar = self;
        let line = sidecar.wait_for_line("the listening line", WAIT, |l| {
            l.contains("listening") && l.contains("route=default") && field(l, "addr").is_some()
        });
        let addr = field(&line, "addr").expect("addr field");
        let addr: SocketAddr = addr
            .parse()
            .unwrap_or_else(|e| sidecar.fail(&format!("addr={addr} is no socket address: {e}")));
        sidecar.addr = Some(addr);
        sidecar
    }

    /// The process id (for `prlimit --pid`, memory use from /proc and the like).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The plaintext listener's bound address (from the `listening` line).
    pub fn addr(&self) -> SocketAddr {
        self.addr
            .unwrap_or_else(|| self.fail("addr() called on a sidecar that was not start()ed"))
    }

    pub fn stderr_lines(&self) -> Vec<String> {
        self.log.lines.lock().unwrap().err.clone()
    }

    pub fn stderr(&self) -> String {
        self.stderr_lines().join("\n")
    }

    /// Everything printed on stdout so far (reports such as `check`'s).
    pub fn stdout(&self) -> String {
        self.log.lines.lock().unwrap().out.join("\n")
    }

    fn dump(&self) -> String {
        let lines = self.log.lines.lock().unwrap();
        format!(
            "\n=== command ===\n{}\n=== stderr ({} lines) ===\n{}\n=== stdout ===\n{}\n===============\n",
            self.cmdline,
            lines.err.len(),
            lines.err.join("\n"),
            lines.out.join("\n"),
        )
    }

    /// Panics with `msg`, the command line and the output so far.
    pub fn fail(&self, msg: &str) -> ! {
        panic!("{msg}{}", self.dump())
    }

    /// Waits for the first stderr line matching `pred`; fails after `timeout`, or as soon as the
    /// process has exited and closed its output without printing one.
    pub fn wait_for_line(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> String {
        self.wait_for_lines(what, 1, timeout, pred).remove(0)
    }

    /// Waits until `n` stderr lines match `pred` and returns them all (possibly more than `n`).
    pub fn wait_for_lines(
        &mut self,
        what: &str,
        n: usize,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        let mut lines = self.log.lines.lock().unwrap();
        loop {
            let found: Vec<String> = lines.err.iter().filter(|l| pred(l)).cloned().collect();
            if found.len() >= n {
                return found;
            }
            let now = Instant::now();
            if lines.closed == 2 || now >= deadline {
                let why = if lines.closed == 2 {
                    "the process closed its output"
                } else {
                    "timed out"
                };
                drop(lines);
                self.fail(&format!(
                    "waiting for {n} x {what} (after {timeout:?}): {why}, found {}",
                    found.len()
                ));
            }
            lines = self
                .log
                .changed
                .wait_timeout(lines, deadline - now)
                .unwrap()
                .0;
        }
    }

    /// How many stderr lines so far match `pred`.
    pub fn count_lines(&self, pred: impl Fn(&str) -> bool) -> usize {
        self.log
            .lines
            .lock()
            .unwrap()
            .err
            .iter()
            .filter(|l| pred(l))
            .count()
    }

    /// Waits until at least `n` connection lines were logged.
    pub fn wait_conn_lines(&mut self, n: usize) -> Vec<String> {
        self.wait_for_lines("connection log line", n, WAIT, is_conn_line)
    }

    /// Sends a signal by name (`TERM`, `INT`, ...) with kill(1).
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .arg("-s")
            .arg(sig)
            .arg(self.pid.to_string())
            .status()
            .unwrap_or_else(|e| self.fail(&format!("cannot run kill: {e}")));
        if !status.success() {
            self.fail(&format!("kill -s {sig} {} failed: {status}", self.pid));
        }
    }

    /// The process, spawned by the test (with sockets passed, say), must exit with code 2 (bad
    /// usage, config or material) without ever listening; returns its stderr.
    pub fn startup_error(mut self) -> String {
        let deadline = Instant::now() + WAIT;
        let status = loop {
            if let Some(status) = self.try_exit() {
                break status;
            }
            // The listening log line, not an error message that says "listening".
            if self.count_lines(|l| l.contains("listening") && field(l, "addr").is_some()) > 0 {
                self.fail("it started listening instead of refusing to start");
            }
            if Instant::now() >= deadline {
                self.fail("still running: expected a startup error");
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        self.wait_output_closed();
        if status.code() != Some(2) {
            self.fail(&format!("exit status {status}, expected code 2"));
        }
        // A listening line written just before the exit, after the loop's last look.
        if self.count_lines(|l| l.contains("listening") && field(l, "addr").is_some()) > 0 {
            self.fail("it listened before exiting");
        }
        self.stderr()
    }

    /// The exit status if the process has exited, without waiting.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().expect("try_wait");
        }
        self.status
    }

    /// Waits for the process to exit; fails if it is still running after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit() {
                return status;
            }
            if Instant::now() >= deadline {
                self.fail(&format!("process still running after {timeout:?}"));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// After exit: waits (bounded) until the reader threads saw end of file on both pipes.
    pub fn wait_output_closed(&self) {
        let deadline = Instant::now() + WAIT;
        let mut lines = self.log.lines.lock().unwrap();
        while lines.closed < 2 {
            let now = Instant::now();
            if now >= deadline {
                drop(lines);
                self.fail("output pipes still open after exit");
            }
            lines = self
                .log
                .changed
                .wait_timeout(lines, deadline - now)
                .unwrap()
                .0;
        }
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        if self.try_exit().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!("{}", self.dump());
        }
    }
}
