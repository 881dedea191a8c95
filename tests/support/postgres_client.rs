//! The clients of a [`super::postgres::Postgres`]: bounded runs of `psql` and `pgbench` (of the
//! newest installed version, libpq's variables cleared) and the processes they run as.

use std::io::{Read, Write};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::postgres::{PG_USER, bin_dir};

/// Removes libpq's variables (`PGHOST`, `PGSSLMODE`, `PGPASSWORD`, ...) from a developer's
/// shell, so that only what a test says counts; no psqlrc either (`-X` is passed too).
pub fn clean_env(cmd: &mut Command) {
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("PG") {
            cmd.env_remove(&key);
        }
    }
    cmd.env("PSQLRC", "/dev/null").env("LC_ALL", "C");
}

/// What a finished (or killed) client printed.
pub struct Done {
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stdout_bytes: Vec<u8>,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Done {
    pub fn success(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }

    /// Exit status, stdout and stderr, for assertion messages.
    pub fn output(&self) -> String {
        format!(
            "exit: {:?} after {:?}\n=== stdout ===\n{}\n=== stderr ===\n{}",
            self.status,
            self.elapsed,
            truncate(&self.stdout),
            self.stderr
        )
    }

    /// stdout and stderr together.
    pub fn all(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }
}

fn truncate(s: &str) -> &str {
    match s.char_indices().nth(4000) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// A started client process whose stdout and stderr are collected in threads.
pub struct Running {
    child: Child,
    what: String,
    start: Instant,
    out: Option<std::thread::JoinHandle<Vec<u8>>>,
    err: Option<std::thread::JoinHandle<Vec<u8>>>,
}

impl Running {
    /// Sends `sig` (e.g. `libc::SIGINT`) to the process.
    pub fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on our own child, not yet reaped (we hold the Child).
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
        assert_eq!(rc, 0, "kill({}, {sig}) failed", self.child.id());
    }

    /// Waits up to `limit`; on expiry kills it (then `status` is `None`).
    pub fn wait(mut self, limit: Duration) -> Done {
        let deadline = self.start + limit;
        let status = loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                break Some(status);
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                eprintln!("{} still running after {limit:?}: killed", self.what);
                break None;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let elapsed = self.start.elapsed();
        let join = |h: Option<std::thread::JoinHandle<Vec<u8>>>| {
            h.and_then(|h| h.join().ok()).unwrap_or_default()
        };
        let stdout_bytes = join(self.out.take());
        let stderr = String::from_utf8_lossy(&join(self.err.take())).into_owned();
        Done {
            status,
            stdout: String::from_utf8_lossy(&stdout_bytes).into_owned(),
            stdout_bytes,
            stderr,
            elapsed,
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn collect(mut pipe: impl Read + Send + 'static) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = pipe.read_to_end(&mut buf);
        buf
    })
}

/// Starts `cmd` with piped output, feeding `stdin` (then closing it) from a thread.
pub fn spawn_client(mut cmd: Command, stdin: Option<Vec<u8>>, what: &str) -> Running {
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    if let (Some(data), Some(mut pipe)) = (stdin, child.stdin.take()) {
        std::thread::spawn(move || {
            let _ = pipe.write_all(&data);
        });
    }
    let out = Some(collect(child.stdout.take().expect("piped stdout")));
    let err = Some(collect(child.stderr.take().expect("piped stderr")));
    Running {
        child,
        what: what.to_owned(),
        start: Instant::now(),
        out,
        err,
    }
}

/// Runs `cmd` to completion within `limit` (killed after it).
pub fn run_bounded(cmd: Command, stdin: Option<Vec<u8>>, limit: Duration, what: &str) -> Done {
    spawn_client(cmd, stdin, what).wait(limit)
}

/// A `psql` (of the server's version, `-X`, libpq variables cleared) against a conninfo string.
pub struct Psql {
    cmd: Command,
    stdin: Option<Vec<u8>>,
}

impl Psql {
    /// Any installed server's `psql` will do: the one of the newest version.
    pub fn new(conninfo: &str) -> Psql {
        let mut cmd = Command::new(bin_dir().join("psql"));
        clean_env(&mut cmd);
        cmd.arg("-X").arg("-d").arg(conninfo);
        Psql { cmd, stdin: None }
    }

    pub fn args<I: IntoIterator<Item = S>, S: AsRef<std::ffi::OsStr>>(mut self, args: I) -> Psql {
        self.cmd.args(args);
        self
    }

    pub fn stdin(mut self, data: Vec<u8>) -> Psql {
        self.stdin = Some(data);
        self
    }

    pub fn spawn(self) -> Running {
        spawn_client(self.cmd, self.stdin, "psql")
    }

    pub fn run(self, limit: Duration) -> Done {
        self.spawn().wait(limit)
    }
}

/// libpq conninfo for the sidecar's listener at `addr` as [`PG_USER`] with `sslmode`.
pub fn conninfo(addr: std::net::SocketAddr, sslmode: &str) -> String {
    format!(
        "host={} port={} sslmode={sslmode} user={PG_USER} dbname=postgres connect_timeout=15",
        addr.ip(),
        addr.port()
    )
}

/// `pgbench` of the server's version towards the sidecar at `addr`, `args` before the dbname.
pub fn pgbench(addr: std::net::SocketAddr, args: &[&str]) -> Command {
    let mut cmd = Command::new(bin_dir().join("pgbench"));
    clean_env(&mut cmd);
    cmd.env("PGSSLMODE", "disable")
        .env("PGCONNECT_TIMEOUT", "15")
        .arg("-h")
        .arg(addr.ip().to_string())
        .arg("-p")
        .arg(addr.port().to_string())
        .args(["-U", PG_USER])
        .args(args)
        .arg("postgres");
    cmd
}
