//! Real third-party TLS servers as the upstream: nginx and `openssl s_server`, both requiring
//! our client certificate. Skipped, with a printed reason, only when the tool is not installed.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;

use crate::support::pki::CLIENT_CN;
use crate::support::*;

/// How often to retry when the port picked for a peer was taken in the meantime.
const PORT_ATTEMPTS: usize = 5;

fn find_tool(name: &str) -> Option<std::path::PathBuf> {
    if name.starts_with('/') {
        return Path::new(name).is_file().then(|| name.into());
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    })
}

/// Output lines of both pipes, how many pipes reached end of file, and a signal on change.
type Output = (Mutex<(Vec<String>, usize)>, Condvar);

/// A third-party process whose output is collected line by line; killed (by pid) when dropped,
/// and its command and output shown if the test failed.
struct Peer {
    child: Child,
    stdin: Option<ChildStdin>,
    what: String,
    output: Arc<Output>,
}

impl Peer {
    fn spawn(mut command: Command) -> Peer {
        let what = format!("{command:?}");
        command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        let output: Arc<Output> = Arc::new((Mutex::new((Vec::new(), 0)), Condvar::new()));
        let pipes: [Box<dyn std::io::Read + Send>; 2] = [
            Box::new(child.stdout.take().unwrap()),
            Box::new(child.stderr.take().unwrap()),
        ];
        for pipe in pipes {
            let output = Arc::clone(&output);
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).split(b'\n') {
                    let Ok(line) = line else { break };
                    let line = String::from_utf8_lossy(&line).trim_end().to_string();
                    output.0.lock().unwrap().0.push(line);
                    output.1.notify_all();
                }
                output.0.lock().unwrap().1 += 1;
                output.1.notify_all();
            });
        }
        Peer {
            stdin: child.stdin.take(),
            child,
            what,
            output,
        }
    }

    fn text(&self) -> String {
        self.output.0.lock().unwrap().0.join("\n")
    }

    /// Waits for an output line matching `pred`; `None` if the process ended its output first
    /// or `timeout` passed.
    fn wait_for(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let (lock, changed) = &*self.output;
        let mut out = lock.lock().unwrap();
        loop {
            if let Some(line) = out.0.iter().find(|l| pred(l)) {
                return Some(line.clone());
            }
            let now = Instant::now();
            if out.1 == 2 || now >= deadline {
                return None;
            }
            out = changed.wait_timeout(out, deadline - now).unwrap().0;
        }
    }

    fn expect(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        self.wait_for(WAIT, pred).unwrap_or_else(|| {
            panic!(
                "{} never printed {what}; output:\n{}",
                self.what,
                self.text()
            )
        })
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("=== {} ===\n{}\n===", self.what, self.text());
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn nginx_sees_our_client_certificate() {
    if !nginx::installed() {
        return;
    }
    let pki = Pki::new();
    let site = nginx::Site {
        client_ca: &pki.ca.pem,
        http2: None,
        log_format: None,
        body: "$ssl_client_s_dn $ssl_client_verify",
    };
    let nginx = nginx::start(&pki, "nginx", &site);
    let port = nginx.port;
    let mut proxy = run_cmd(&pki, format!("localhost:{port}")).start();

    let mut stream = connect(proxy.addr()).await;
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .expect("write request");
    let response = String::from_utf8_lossy(&read_to_end(&mut stream).await).to_string();
    drop(stream);
    assert!(
        response.starts_with("HTTP/1.1 200"),
        "nginx answered:\n{response}"
    );
    let body = response.split("\r\n\r\n").nth(1).unwrap_or_default();
    assert!(
        body.contains("SUCCESS"),
        "nginx did not verify our cert:\n{response}"
    );
    assert!(
        body.contains(&format!("CN={CLIENT_CN}")),
        "client DN:\n{response}"
    );

    let line = &proxy.wait_conn_lines(1)[0];
    assert_eq!(field(line, "outcome"), Some("ok"), "{line}");
}

/// Starts `openssl s_server` requiring a client certificate, retrying on a taken port.
fn start_s_server(openssl: &Path, pki: &Pki) -> (Peer, u16) {
    let mut last = String::new();
    for _ in 0..PORT_ATTEMPTS {
        let port = free_port();
        let mut command = Command::new(openssl);
        command
            .arg("s_server")
            .arg("-accept")
            .arg(format!("127.0.0.1:{port}"))
            .arg("-cert")
            .arg(&pki.server.cert)
            .arg("-key")
            .arg(&pki.server.key)
            .arg("-CAfile")
            .arg(&pki.ca.pem)
            .args(["-Verify", "1", "-verify_return_error", "-naccept", "1"]);
        let peer = Peer::spawn(command);
        if peer.wait_for(WAIT, |l| l.contains("ACCEPT")).is_some() {
            return (peer, port);
        }
        last = peer.text();
        if !last.contains("in use") {
            break;
        }
    }
    panic!("openssl s_server did not start:\n{last}");
}

#[tokio::test(flavor = "multi_thread")]
async fn openssl_s_server_session_both_ways() {
    let Some(openssl) = find_tool("openssl") else {
        eprintln!("SKIPPED: openssl is not installed");
        return;
    };
    let pki = Pki::new();
    let (mut server, port) = start_s_server(&openssl, &pki);
    let proxy = run_cmd(&pki, format!("127.0.0.1:{port}"))
        .args(["--server-name", "localhost"])
        .start();

    let mut stream = connect(proxy.addr()).await;
    stream
        .write_all(b"hello from the app\n")
        .await
        .expect("write");
    server.expect("the app's line", |l| l.contains("hello from the app"));
    server.expect("our client certificate's subject", |l| {
        l.starts_with("subject=") && l.replace(' ', "").contains(&format!("CN={CLIENT_CN}"))
    });

    let stdin = server.stdin.as_mut().expect("s_server stdin");
    stdin.write_all(b"hello from s_server\n").unwrap();
    stdin.flush().unwrap();
    let want = b"hello from s_server\n";
    assert_eq!(read_exact(&mut stream, want.len()).await, want);
}
