//! nginx as a real mTLS upstream (`ssl_verify_client on`), in the foreground on a free port,
//! killed by pid when dropped. Tests skip with a printed reason when it is not installed.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{Pki, WAIT, free_port};

pub const NGINX: &str = "/usr/sbin/nginx";

/// Whether nginx is installed; prints the skip reason when not.
pub fn installed() -> bool {
    let there = Path::new(NGINX).is_file();
    if !there {
        eprintln!("SKIPPED: {NGINX} is not installed");
    }
    there
}

/// (major, minor, patch) from `nginx -v`.
pub fn version() -> Option<(u32, u32, u32)> {
    let out = Command::new(NGINX).arg("-v").output().ok()?;
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    let v = text.split("nginx/").nth(1)?.split_whitespace().next()?;
    let mut parts = v.split('.').map(|p| p.parse().unwrap_or(0));
    Some((
        parts.next()?,
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
    ))
}

/// What the one server of the nginx under test does.
pub struct Site<'a> {
    /// `ssl_client_certificate`: the CA nginx accepts client certificates from.
    pub client_ca: &'a Path,
    /// Serve HTTP/2 too; the version decides between `http2 on;` and `listen … http2`.
    pub http2: Option<(u32, u32, u32)>,
    /// Access-log format (variables), if the test reads the access log.
    pub log_format: Option<&'a str>,
    /// Body of every `200` answer (nginx variables allowed); a newline is appended.
    pub body: &'a str,
}

/// nginx in the foreground; its logs are shown if the test failed.
pub struct Nginx {
    child: Child,
    pub port: u16,
    pub dir: PathBuf,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            for log in ["error.log", "access.log"] {
                let text = std::fs::read_to_string(self.dir.join(log)).unwrap_or_default();
                eprintln!("=== nginx {log} ===\n{text}");
            }
        }
    }
}

fn conf(dir: &Path, pki: &Pki, site: &Site, port: u16) -> String {
    let d = dir.display();
    let (listen_h2, http2_on) = match site.http2 {
        None => ("", ""),
        Some(v) if v >= (1, 25, 1) => ("", "http2 on;"),
        Some(_) => (" http2", ""),
    };
    let (log_format, log_name) = match site.log_format {
        Some(f) => (format!("log_format mtls '{f}';"), " mtls"),
        None => (String::new(), ""),
    };
    format!(
        r#"
error_log {d}/error.log info;
pid {d}/nginx.pid;
events {{ worker_connections 64; }}
http {{
    {log_format}
    access_log {d}/access.log{log_name};
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    server {{
        listen 127.0.0.1:{port} ssl{listen_h2};
        {http2_on}
        server_name localhost;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_client_certificate {ca};
        ssl_verify_client on;
        ssl_protocols TLSv1.2 TLSv1.3;
        keepalive_requests 1000;
        location / {{
            default_type text/plain;
            return 200 "{body}\n";
        }}
    }}
}}
"#,
        cert = pki.server.cert.display(),
        key = pki.server.key.display(),
        ca = site.client_ca.display(),
        body = site.body,
    )
}

/// True once nginx answers a plain request to its TLS port with its own complaint (so not
/// something else that took the port); false if it exited or nothing answered in time.
fn ready(child: &mut Child, port: u16) -> bool {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Ok(mut probe) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            probe.set_read_timeout(Some(WAIT)).expect("read timeout");
            let _ = probe.write_all(b"GET / HTTP/1.0\r\n\r\n");
            let mut answer = Vec::new();
            let _ = probe.read_to_end(&mut answer);
            return String::from_utf8_lossy(&answer).contains("sent to HTTPS port");
        }
        if matches!(child.try_wait(), Ok(Some(_))) || Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Start nginx in `pki`'s folder under `name`, on a free port, retrying when the port is taken
/// between picking and binding.
pub fn start(pki: &Pki, name: &str, site: &Site) -> Nginx {
    let dir = pki.dir.path().join(name);
    std::fs::create_dir_all(&dir).expect("nginx dir");
    let conf_path = dir.join("nginx.conf");
    let mut last = String::new();
    for _ in 0..5 {
        let port = free_port();
        std::fs::write(&conf_path, conf(&dir, pki, site, port)).expect("nginx.conf");
        let _ = std::fs::remove_file(dir.join("error.log"));
        let child = Command::new(NGINX)
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(&conf_path)
            .arg("-e")
            .arg(dir.join("error.log"))
            .args(["-g", "daemon off; master_process off;"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nginx");
        let mut nginx = Nginx {
            child,
            port,
            dir: dir.clone(),
        };
        if ready(&mut nginx.child, port) {
            return nginx;
        }
        last = std::fs::read_to_string(dir.join("error.log")).unwrap_or_default();
        let exited = matches!(nginx.child.try_wait(), Ok(Some(_)));
        drop(nginx);
        // Unless nginx gave up for a reason other than a taken port, try another port.
        if exited && !last.contains("Address already in use") {
            break;
        }
    }
    panic!("nginx did not start:\n{last}");
}
