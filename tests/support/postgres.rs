//! A throwaway PostgreSQL cluster per test: `initdb` in a temp dir, `postgres -D` in the
//! foreground on a free loopback port, as an unprivileged user when the tests run as root
//! (initdb refuses root), killed by pid when dropped. Its clients: `support::postgres_client`.
//!
//! Every test gets its own cluster: no test sees another's tables, sessions or cancels. `initdb`
//! runs once (~0.9 s idle, 10 s and more when ten run at once on a loaded 2-core machine) into
//! a template under `CARGO_TARGET_TMPDIR`, kept between runs; each cluster is a copy of it
//! (`cp -a`, ~0.1 s) and its server is ready ~0.1 s after the start.
//!
//! PostgreSQL is required, not optional: when it is missing the test fails with a message
//! saying that `.ci/run` must install the `postgresql` package.

use std::fs::{self, File};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::Pki;
use super::free_port;
use super::pki::Identity;
pub use super::postgres_client::*;

/// The database role the test client certificate maps to (`cert` auth: CN = user name).
pub const PG_USER: &str = "pgapp";

/// Where Debian's `postgresql` package puts the server binaries: `/usr/lib/postgresql/N/bin`.
const PG_LIB: &str = "/usr/lib/postgresql";

/// How long a cluster may take to initialise or start on a loaded 2-core machine.
const START_LIMIT: Duration = Duration::from_secs(60);

/// The newest installed `/usr/lib/postgresql/N/bin` (with `initdb` and `postgres`). Panics,
/// saying what CI must install, when there is none.
pub fn bin_dir() -> PathBuf {
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir(PG_LIB)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            (bin.join("initdb").is_file() && bin.join("postgres").is_file()).then_some((v, bin))
        })
        .collect();
    versions.sort();
    match versions.pop() {
        Some((_, bin)) => bin,
        None => panic!(
            "PostgreSQL is not installed (no {PG_LIB}/N/bin/initdb): these tests run a real \
             server; .ci/run must install the `postgresql` package (apt-get install postgresql)"
        ),
    }
}

/// (uid, gid) to run the server as: the `postgres` user when we are root, else nobody else
/// (`None`: run as ourselves).
fn server_user() -> Option<(u32, u32)> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let id = |flag: &str| -> u32 {
        let out = Command::new("id")
            .args([flag, "postgres"])
            .output()
            .expect("run id");
        assert!(
            out.status.success(),
            "tests run as root and initdb refuses root, but there is no `postgres` user to run \
             the server as (the Debian `postgresql` package creates it; .ci/run installs it)"
        );
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("numeric id")
    };
    Some((id("-u"), id("-g")))
}

/// What a [`Postgres`] serves.
#[derive(Clone, Copy)]
pub struct PgConfig<'a> {
    /// `ssl = on` with the test PKI's server certificate, client certificates from `client_ca`
    /// required (`hostssl … cert clientcert=verify-full`); `false`: `ssl = off`, `host … trust`.
    pub ssl: bool,
    /// The CA whose client certificates the server accepts (`ssl_ca_file`).
    pub client_ca: &'a Path,
}

/// A running throwaway cluster. Dropping it stops the server (fast shutdown, then SIGKILL) and
/// removes its files; if the test is panicking, the server's log is printed.
pub struct Postgres {
    child: Child,
    /// The TCP port on 127.0.0.1.
    pub port: u16,
    /// The unix socket directory (setup as the superuser goes through it, `local … trust`).
    pub sock: PathBuf,
    log: PathBuf,
    // Kept for its Drop (removes the cluster); declared last so the server stops first.
    _dir: TempDir,
}

impl Postgres {
    /// `ssl = on`, client certificates of the test CA, a role [`PG_USER`] that may create
    /// tables in `postgres`'s public schema.
    pub fn start(pki: &Pki) -> Postgres {
        Postgres::start_with(
            pki,
            PgConfig {
                ssl: true,
                client_ca: &pki.ca.pem,
            },
        )
    }

    /// `ssl = off`: the server answers `N` to an SSLRequest.
    pub fn start_without_ssl(pki: &Pki) -> Postgres {
        Postgres::start_with(
            pki,
            PgConfig {
                ssl: false,
                client_ca: &pki.ca.pem,
            },
        )
    }

    pub fn start_with(pki: &Pki, config: PgConfig<'_>) -> Postgres {
        let bin = bin_dir();
        let user = server_user();
        let dir = tempfile::Builder::new()
            .prefix("mtls-sidecar-pg")
            .tempdir()
            .expect("create temp dir");
        let root = dir.path();
        let sock = root.join("sock");
        fs::create_dir(&sock).expect("mkdir sock");
        // The server reads its key, certificate and CA as its own user: copies in its dir.
        copy_private(&pki.server, root);
        fs::copy(config.client_ca, root.join("ca.crt")).expect("copy CA");
        if let Some((uid, gid)) = user {
            for path in [
                root,
                &sock,
                &root.join("server.key"),
                &root.join("server.crt"),
            ] {
                std::os::unix::fs::chown(path, Some(uid), Some(gid)).expect("chown to postgres");
            }
            fs::set_permissions(root.join("ca.crt"), fs::Permissions::from_mode(0o644))
                .expect("chmod CA");
        }
        let data = root.join("data");
        let started = Instant::now();
        copy_template(&bin, &data, user);
        let copy_took = started.elapsed();
        // A port taken between free_port() and the server's bind: try again with another.
        let mut last_log = String::new();
        for _ in 0..3 {
            let port = free_port();
            write_config(&data, root, port, config.ssl);
            let log = root.join(format!("postgres-{port}.log"));
            let mut child = server_command(&bin, &data, user, &log);
            match wait_ready(&bin, &mut child, &sock, port) {
                Ok(()) => {
                    let pg = Postgres {
                        child,
                        port,
                        sock,
                        log,
                        _dir: dir,
                    };
                    pg.create_role();
                    eprintln!(
                        "postgres on 127.0.0.1:{port} ready in {:?} (data dir {copy_took:?})",
                        started.elapsed()
                    );
                    return pg;
                }
                Err(why) => {
                    stop(&mut child);
                    last_log = format!("{why}\n{}", fs::read_to_string(&log).unwrap_or_default());
                }
            }
        }
        panic!("PostgreSQL did not start (3 tries):\n{last_log}");
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs `sql` as the superuser over the unix socket; panics on any error; returns stdout
    /// (`-At`: unaligned, tuples only).
    pub fn admin(&self, sql: &str) -> String {
        let conninfo = format!(
            "host={} port={} user=postgres dbname=postgres",
            self.sock.display(),
            self.port
        );
        let done = Psql::new(&conninfo)
            .args(["-At", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .run(Duration::from_secs(30));
        assert!(
            done.success(),
            "admin psql failed: {sql}\n{}\n=== server log ===\n{}",
            done.output(),
            self.log()
        );
        done.stdout
    }

    fn create_role(&self) {
        self.admin(&format!(
            "CREATE ROLE {PG_USER} LOGIN; GRANT ALL ON SCHEMA public TO {PG_USER};"
        ));
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        stop(&mut self.child);
        if std::thread::panicking() {
            eprintln!(
                "=== postgres log ({}) ===\n{}",
                self.log.display(),
                self.log()
            );
        }
    }
}

/// SIGINT (fast shutdown: backends are told to exit, no waiting for clients), bounded wait,
/// then SIGKILL.
fn stop(child: &mut Child) {
    if matches!(child.try_wait(), Ok(Some(_))) {
        return;
    }
    // SAFETY: kill(2) on our own child's pid, which has not been reaped yet.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// `server.crt` and `server.key` (0600) in `dir`.
fn copy_private(server: &Identity, dir: &Path) {
    fs::copy(&server.cert, dir.join("server.crt")).expect("copy server cert");
    let key = dir.join("server.key");
    fs::copy(&server.key, &key).expect("copy server key");
    fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).expect("chmod key");
}

fn as_user(cmd: &mut Command, user: Option<(u32, u32)>) {
    if let Some((uid, gid)) = user {
        // std drops the supplementary groups (setgroups(0)) when root sets a uid.
        cmd.uid(uid).gid(gid);
    }
}

/// A fresh data dir at `data`: a copy of the template (made by `initdb` once, see
/// [`template`]), owned by the server's user.
fn copy_template(bin: &Path, data: &Path, user: Option<(u32, u32)>) {
    let template = template(bin, user);
    let mut cp = Command::new("cp");
    cp.arg("-a").arg(template).arg(data);
    let done = run_bounded(cp, None, START_LIMIT, "cp -a");
    assert!(
        done.success(),
        "copying the template failed:\n{}",
        done.output()
    );
    if let Some((uid, gid)) = user {
        let mut chown = Command::new("chown");
        chown.arg("-R").arg(format!("{uid}:{gid}")).arg(data);
        let done = run_bounded(chown, None, START_LIMIT, "chown -R");
        assert!(done.success(), "chown -R failed:\n{}", done.output());
    }
}

/// The template data dir for this PostgreSQL version, made by `initdb` on first use (once per
/// test process, and kept in `CARGO_TARGET_TMPDIR` for the next runs). Made under a temporary
/// name and renamed, so a concurrent test process never sees half a template.
fn template(bin: &Path, user: Option<(u32, u32)>) -> &'static Path {
    static TEMPLATE: OnceLock<PathBuf> = OnceLock::new();
    TEMPLATE.get_or_init(|| {
        let version = bin
            .parent()
            .and_then(|p| p.file_name())
            .map(|v| v.to_string_lossy().into_owned())
            .unwrap_or_default();
        // The suffix changes when the initdb options below do.
        let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
        // Owned by the server's user: one template per user the server runs as.
        let owner = user.map_or_else(|| "self".to_owned(), |(uid, _)| uid.to_string());
        let path = tmp.join(format!("postgres-template-{version}-v1-{owner}"));
        if path.join("PG_VERSION").is_file() && path.join("global").is_dir() {
            return path;
        }
        fs::create_dir_all(tmp).expect("create CARGO_TARGET_TMPDIR");
        let work = tempfile::Builder::new()
            .prefix("postgres-template")
            .tempdir_in(tmp)
            .expect("temp dir for initdb");
        if let Some((uid, gid)) = user {
            std::os::unix::fs::chown(work.path(), Some(uid), Some(gid)).expect("chown");
        }
        let data = work.path().join("data");
        initdb(bin, &data, user, work.path());
        // Lost a race with another test process: theirs is as good as ours.
        if fs::rename(&data, &path).is_err() && !path.join("PG_VERSION").is_file() {
            panic!("cannot move the template into {}", path.display());
        }
        path
    })
}

fn initdb(bin: &Path, data: &Path, user: Option<(u32, u32)>, cwd: &Path) {
    let mut cmd = Command::new(bin.join("initdb"));
    cmd.arg("-D")
        .arg(data)
        .args(["-U", "postgres", "-A", "trust", "--no-sync", "-E", "UTF8"])
        .arg("--no-locale")
        .current_dir(cwd);
    clean_env(&mut cmd);
    as_user(&mut cmd, user);
    let done = run_bounded(cmd, None, START_LIMIT, "initdb");
    assert!(done.success(), "initdb failed:\n{}", done.output());
}

/// postgresql.conf additions and the whole pg_hba.conf.
fn write_config(data: &Path, root: &Path, port: u16, ssl: bool) {
    let r = root.display();
    let mut conf = format!(
        "\n# mtls-sidecar tests\nlisten_addresses = '127.0.0.1'\nport = {port}\n\
         unix_socket_directories = '{r}/sock'\nfsync = off\nsynchronous_commit = off\n\
         full_page_writes = off\nshared_buffers = 16MB\nmax_connections = 40\n\
         log_connections = on\nlog_disconnections = on\n"
    );
    let hba = if ssl {
        conf.push_str(&format!(
            "ssl = on\nssl_cert_file = '{r}/server.crt'\nssl_key_file = '{r}/server.key'\n\
             ssl_ca_file = '{r}/ca.crt'\n"
        ));
        "local all all trust\nhostssl all all 127.0.0.1/32 cert clientcert=verify-full\n"
    } else {
        conf.push_str("ssl = off\n");
        "local all all trust\nhost all all 127.0.0.1/32 trust\n"
    };
    // Rewritten on a retry: the base file from initdb, then ours.
    let base = data.join("postgresql.conf");
    let orig = data.join("postgresql.conf.initdb");
    if !orig.exists() {
        fs::copy(&base, &orig).expect("keep initdb's postgresql.conf");
    }
    let mut text = fs::read_to_string(&orig).expect("read postgresql.conf");
    text.push_str(&conf);
    fs::write(&base, text).expect("write postgresql.conf");
    fs::write(data.join("pg_hba.conf"), hba).expect("write pg_hba.conf");
}

fn server_command(bin: &Path, data: &Path, user: Option<(u32, u32)>, log: &Path) -> Child {
    let out = File::create(log).expect("create postgres log");
    let err = out.try_clone().expect("dup log fd");
    let mut cmd = Command::new(bin.join("postgres"));
    cmd.arg("-D")
        .arg(data)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    clean_env(&mut cmd);
    as_user(&mut cmd, user);
    cmd.spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.join("postgres").display()))
}

/// Polls `pg_isready` on the unix socket until the server accepts connections.
fn wait_ready(bin: &Path, child: &mut Child, sock: &Path, port: u16) -> Result<(), String> {
    let deadline = Instant::now() + START_LIMIT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("postgres exited: {status}"));
        }
        let mut cmd = Command::new(bin.join("pg_isready"));
        cmd.arg("-q")
            .arg("-h")
            .arg(sock)
            .arg("-p")
            .arg(port.to_string())
            .args(["-U", "postgres", "-t", "2"]);
        clean_env(&mut cmd);
        if run_bounded(cmd, None, Duration::from_secs(10), "pg_isready").success() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!("not ready after {START_LIMIT:?}"));
        }
        std::thread::sleep(Duration::from_millis(30));
    }
}
