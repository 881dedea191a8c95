//! `mtls_sidecar::inbound::proxy_protocol` headers read by real PROXY protocol parsers: HAProxy
//! (`bind … accept-proxy`, answering with the `src`/`src_port`/`dst`/`dst_port` it parsed) and
//! nginx (`listen … proxy_protocol`, answering with `$proxy_protocol_*`; from nginx 1.23.2 also
//! the `$proxy_protocol_tlv_ssl_*` values it read from our `PP2_TYPE_SSL` TLV). Each test writes
//! our header and one HTTP request over plain TCP on 127.0.0.1 and checks the answer; each
//! server runs in a temp dir on a free port and is killed when the test ends. A test skips,
//! with the reason printed, only when the server binary is not installed.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mtls_sidecar::inbound::proxy_protocol::{TlsFacts, v1, v2};

use crate::support::nginx::NGINX;
use crate::support::{WAIT, free_port};

pub(crate) const HAPROXY: &str = "/usr/sbin/haproxy";

/// A server in the foreground, killed by pid on drop; its log is shown if the test failed.
pub(crate) struct Server {
    child: Child,
    pub(crate) port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            eprintln!("=== {} ===\n{text}", self.log.display());
        }
    }
}

pub(crate) fn installed(path: &str) -> bool {
    let there = Path::new(path).is_file();
    if !there {
        eprintln!("SKIPPED: {path} is not installed");
    }
    there
}

/// Sends `header` and a GET, returns the whole answer (the server closes after it).
fn ask(port: u16, header: &[u8]) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(WAIT)).expect("read timeout");
    s.set_write_timeout(Some(WAIT)).expect("write timeout");
    s.write_all(header).expect("write header");
    // A server that refuses the header may reset before the request is written.
    let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

/// Starts `argv` with a config from `conf(port)` until it answers `PROXY UNKNOWN` + GET with a
/// 200 (a few ports are tried in case one is taken between picking and binding).
fn start(
    name: &str,
    conf: &dyn Fn(&Path, u16) -> String,
    argv: &dyn Fn(&Path) -> Command,
) -> Server {
    let mut last = String::new();
    for _ in 0..5 {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        std::fs::write(
            dir.path().join(format!("{name}.conf")),
            conf(dir.path(), port),
        )
        .expect("write config");
        let log = dir.path().join(format!("{name}.log"));
        let child = argv(dir.path())
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.path().join("stdout.log")).expect("stdout"))
            .stderr(std::fs::File::create(&log).expect("stderr"))
            .spawn()
            .expect("start server");
        let mut server = Server {
            child,
            port,
            log,
            _dir: dir,
        };
        let deadline = Instant::now() + WAIT;
        loop {
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                if ask(port, b"PROXY UNKNOWN\r\n").starts_with("HTTP/1.1 200") {
                    return server;
                }
                break;
            }
            if matches!(server.child.try_wait(), Ok(Some(_))) || Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        last = std::fs::read_to_string(&server.log).unwrap_or_default();
        let _ = server.child.kill();
        if !last.contains("in use") && !last.contains("cannot bind") {
            break;
        }
    }
    panic!("{name} did not start:\n{last}");
}

pub(crate) fn haproxy() -> Server {
    let conf = |_: &Path, port: u16| {
        format!(
            r#"
global
    maxconn 64
defaults
    mode http
    timeout connect 5s
    timeout client 15s
    timeout server 15s
frontend pp
    bind 127.0.0.1:{port} accept-proxy
    http-request return status 200 content-type text/plain lf-string "src=%[src] src_port=%[src_port] dst=%[dst] dst_port=%[dst_port]\n"
"#
        )
    };
    let argv = |dir: &Path| {
        let mut c = Command::new(HAPROXY);
        c.arg("-db").arg("-f").arg(dir.join("haproxy.conf"));
        c
    };
    start("haproxy", &conf, &argv)
}

/// Whether this nginx exposes the v2 SSL TLV as variables (1.23.2 and later).
fn nginx_reads_tlvs() -> bool {
    crate::support::nginx::version().is_some_and(|v| v >= (1, 23, 2))
}

fn nginx() -> Server {
    let conf = |dir: &Path, port: u16| {
        let d = dir.display();
        let tlv = if nginx_reads_tlvs() {
            " cn=$proxy_protocol_tlv_ssl_cn verify=$proxy_protocol_tlv_ssl_verify \
             version=$proxy_protocol_tlv_ssl_version cipher=$proxy_protocol_tlv_ssl_cipher"
        } else {
            ""
        };
        format!(
            r#"
error_log {d}/nginx.log info;
pid {d}/nginx.pid;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    server {{
        listen 127.0.0.1:{port} proxy_protocol;
        location / {{
            default_type text/plain;
            return 200 "src=$proxy_protocol_addr src_port=$proxy_protocol_port dst=$proxy_protocol_server_addr dst_port=$proxy_protocol_server_port{tlv}\n";
        }}
    }}
}}
"#
        )
    };
    let argv = |dir: &Path| {
        let mut c = Command::new(NGINX);
        c.arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .arg("-e")
            .arg(dir.join("nginx.log"))
            .args(["-g", "daemon off; master_process off;"]);
        c
    };
    start("nginx", &conf, &argv)
}

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("socket address")
}

fn facts() -> TlsFacts {
    TlsFacts {
        version: "TLSv1.3".into(),
        cipher: "TLS_AES_256_GCM_SHA384".into(),
        cn: Some("client-a.example".into()),
        cert_verified: true,
        resumed: false,
    }
}

/// The answer's body line, or a panic showing the whole answer.
pub(crate) fn body(answer: &str) -> &str {
    assert!(answer.starts_with("HTTP/1.1 200"), "answer: {answer:?}");
    answer
        .split("\r\n\r\n")
        .nth(1)
        .map(str::trim_end)
        .unwrap_or_else(|| panic!("no body in {answer:?}"))
}

#[test]
fn haproxy_reads_v1_tcp4_tcp6_and_unknown() {
    if !installed(HAPROXY) {
        return;
    }
    let hap = haproxy();
    let h = v1(addr("192.0.2.10:51234"), addr("198.51.100.5:8443"));
    let got = ask(hap.port, &h);
    assert_eq!(
        body(&got),
        "src=192.0.2.10 src_port=51234 dst=198.51.100.5 dst_port=8443"
    );
    let h = v1(addr("[2001:db8::7]:40000"), addr("[2001:db8::1]:443"));
    let got = ask(hap.port, &h);
    assert_eq!(
        body(&got),
        "src=2001:db8::7 src_port=40000 dst=2001:db8::1 dst_port=443"
    );
    // Mixed families: UNKNOWN, so HAProxy keeps the real (loopback) addresses.
    let h = v1(addr("192.0.2.10:1"), addr("[2001:db8::1]:2"));
    let got = ask(hap.port, &h);
    assert!(body(&got).starts_with("src=127.0.0.1 "), "{got}");
}

#[test]
fn haproxy_reads_v2_with_the_ssl_tlv() {
    if !installed(HAPROXY) {
        return;
    }
    let hap = haproxy();
    let tls = facts();
    let h = v2(
        addr("192.0.2.10:51234"),
        addr("198.51.100.5:8443"),
        Some(&tls),
    );
    assert_eq!(
        body(&ask(hap.port, &h)),
        "src=192.0.2.10 src_port=51234 dst=198.51.100.5 dst_port=8443"
    );
    let h = v2(
        addr("[2001:db8::7]:40000"),
        addr("[2001:db8::1]:443"),
        Some(&tls),
    );
    assert_eq!(
        body(&ask(hap.port, &h)),
        "src=2001:db8::7 src_port=40000 dst=2001:db8::1 dst_port=443"
    );
    // Mixed families: IPv4 mapped into IPv6.
    let h = v2(addr("192.0.2.10:1"), addr("[2001:db8::1]:2"), None);
    assert_eq!(
        body(&ask(hap.port, &h)),
        "src=::ffff:192.0.2.10 src_port=1 dst=2001:db8::1 dst_port=2"
    );
    // A header whose length is one byte short is refused: the check above can fail.
    let mut bad = v2(addr("192.0.2.10:1"), addr("198.51.100.5:2"), Some(&tls));
    let len = u16::from_be_bytes([bad[14], bad[15]]) + 1;
    bad[14..16].copy_from_slice(&len.to_be_bytes());
    let got = ask(hap.port, &bad);
    assert!(!got.contains("src=192.0.2.10"), "{got}");
}

#[test]
fn nginx_reads_v1_and_v2() {
    if !installed(NGINX) {
        return;
    }
    let ngx = nginx();
    let h = v1(addr("192.0.2.10:51234"), addr("198.51.100.5:8443"));
    assert_eq!(
        body(&ask(ngx.port, &h)),
        "src=192.0.2.10 src_port=51234 dst=198.51.100.5 dst_port=8443"
    );
    let h = v1(addr("[2001:db8::7]:40000"), addr("[2001:db8::1]:443"));
    assert_eq!(
        body(&ask(ngx.port, &h)),
        "src=2001:db8::7 src_port=40000 dst=2001:db8::1 dst_port=443"
    );
    let tls = facts();
    let h = v2(
        addr("192.0.2.10:51234"),
        addr("198.51.100.5:8443"),
        Some(&tls),
    );
    let got = ask(ngx.port, &h);
    let line = body(&got);
    assert!(
        line.starts_with("src=192.0.2.10 src_port=51234 dst=198.51.100.5 dst_port=8443"),
        "{line}"
    );
    if nginx_reads_tlvs() {
        assert!(
            line.ends_with(
                " cn=client-a.example verify=0 version=TLSv1.3 cipher=TLS_AES_256_GCM_SHA384"
            ),
            "{line}"
        );
    } else {
        eprintln!("NOTE: nginx older than 1.23.2 has no $proxy_protocol_tlv_* variables");
    }
    let h = v2(
        addr("[2001:db8::7]:40000"),
        addr("[2001:db8::1]:443"),
        Some(&tls),
    );
    assert!(
        body(&ask(ngx.port, &h))
            .starts_with("src=2001:db8::7 src_port=40000 dst=2001:db8::1 dst_port=443"),
    );
}
