//! `--protocol postgres` against a real PostgreSQL (`support::postgres`: a cluster per test with
//! `ssl = on` and `hostssl all all 127.0.0.1/32 cert clientcert=verify-full`), driven by the real
//! `psql` and `pgbench`: queries, a COPY of a few MB both ways, `pg_stat_ssl`, both `sslmode`s a
//! plaintext app uses, both ways to cancel a query, a server without TLS, a server that injects
//! bytes after its `S`, a client certificate the server refuses, and pgbench under load.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use crate::support::pki::{Identity, LeafSpec};
use crate::support::postgres::{
    Done, PG_USER, Postgres, Psql, Running, conninfo, pgbench, run_bounded,
};
use crate::support::*;

/// A query that would take a minute unless cancelled.
const SLEEP: &str = "select pg_sleep(60)";
/// What the server says when a query is cancelled.
const CANCELLED: &str = "canceling statement due to user request";
/// What libpq says when a server closes without an ErrorResponse; the sidecar must never make
/// psql print it.
const BARE_CLOSE: &str = "server closed the connection unexpectedly";

/// How long one psql command may take here (the server is local; only a hang reaches it).
const PSQL_LIMIT: Duration = Duration::from_secs(30);

/// The test PKI, a client certificate `CN=pgapp` (the role `cert` auth maps it to), a server.
fn setup() -> (Pki, Identity, Postgres) {
    let pki = Pki::new();
    let client = pki.leaf(&pki.ca, "pg-client", LeafSpec::client(PG_USER));
    let pg = Postgres::start(&pki);
    (pki, client, pg)
}

/// `mtls-sidecar run --protocol postgres` towards `upstream` with `client`'s identity.
fn sidecar(pki: &Pki, client: &Identity, upstream: impl std::fmt::Display) -> Sidecar {
    run_cmd_files(upstream, &client.cert, &client.key, &pki.ca.pem)
        .args(["--protocol", "postgres", "--server-name", "localhost"])
        .start()
}

fn upstream_of(pg: &Postgres) -> String {
    format!("127.0.0.1:{}", pg.port)
}

/// Runs `sql` through the sidecar with `sslmode`; must succeed; returns stdout (`-At`).
fn query(proxy: &Sidecar, sslmode: &str, sql: &str) -> String {
    let done = Psql::new(&conninfo(proxy.addr(), sslmode))
        .args(["-At", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .run(PSQL_LIMIT);
    if !done.success() {
        proxy.fail(&format!("psql failed: {sql}\n{}", done.output()));
    }
    done.stdout.trim_end().to_owned()
}

/// Every access line so far: none may be `outcome=error` (or any failure).
fn assert_no_failed_lines(proxy: &Sidecar) {
    for line in proxy.stderr_lines().iter().filter(|l| is_conn_line(l)) {
        if field(line, "outcome") != Some("ok") {
            proxy.fail(&format!("a connection failed: {line}"));
        }
    }
}

#[test]
fn queries_and_pg_stat_ssl_with_sslmode_disable_and_prefer() {
    let (pki, client, pg) = setup();
    let mut proxy = sidecar(&pki, &client, upstream_of(&pg));
    for (i, sslmode) in ["disable", "prefer"].into_iter().enumerate() {
        assert_eq!(query(&proxy, sslmode, "select 1"), "1");
        let sql = "select 6 * 7, current_user, inet_server_addr()";
        assert_eq!(
            query(&proxy, sslmode, sql),
            format!("42|{PG_USER}|127.0.0.1")
        );
        // The server's own view of the session: encrypted, with our client certificate.
        let sql = "select ssl, client_dn, version from pg_stat_ssl where pid = pg_backend_pid()";
        let row = query(&proxy, sslmode, sql);
        let cols: Vec<&str> = row.split('|').collect();
        assert_eq!(cols[..2], ["t", "/CN=pgapp"], "sslmode={sslmode}: {row}");
        assert!(cols[2].starts_with("TLSv1."), "sslmode={sslmode}: {row}");
        let lines = proxy.wait_conn_lines(3 * (i + 1));
        for line in &lines {
            assert_eq!(field(line, "outcome"), Some("ok"), "{line}");
            assert!(num_field(line, "bytes_to_upstream") > 0, "{line}");
            assert!(num_field(line, "bytes_from_upstream") > 0, "{line}");
        }
    }
    // An app that insists on TLS to the sidecar is told, by its own libpq, that there is none.
    let done = Psql::new(&conninfo(proxy.addr(), "require"))
        .args(["-c", "select 1"])
        .run(PSQL_LIMIT);
    assert!(
        !done.success() && done.stderr.contains("server does not support SSL"),
        "{}",
        done.output()
    );
    // The server saw TLS with a verified client certificate every time.
    let log = pg.log();
    let authorized = log.matches("connection authorized: user=pgapp").count();
    assert!(
        authorized >= 6,
        "{authorized} authorized connections:\n{log}"
    );
}

#[test]
fn the_server_itself_demands_tls_and_a_client_certificate() {
    let (pki, client, pg) = setup();
    // libpq refuses a key file others may read.
    let key = pki.path("pg-client-key-0600.pem");
    std::fs::copy(&client.key, &key).expect("copy key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let direct = format!(
        "host=127.0.0.1 port={} user={PG_USER} dbname=postgres connect_timeout=15",
        pg.port
    );
    let run = |extra: String| {
        Psql::new(&format!("{direct} {extra}"))
            .args([
                "-At",
                "-c",
                "select ssl, client_dn from pg_stat_ssl where pid = pg_backend_pid()",
            ])
            .run(PSQL_LIMIT)
    };
    // With the certificate, directly: the server's configuration is what the other tests rely on.
    let done = run(format!(
        "sslmode=verify-full sslrootcert={} sslcert={} sslkey={}",
        pki.ca.pem.display(),
        client.cert.display(),
        key.display()
    ));
    assert!(done.success(), "{}", done.output());
    assert_eq!(done.stdout.trim(), "t|/CN=pgapp", "{}", done.output());
    // Plaintext, or TLS without a certificate: refused by pg_hba.conf.
    for extra in [
        "sslmode=disable",
        "sslmode=require sslcert=/nonexistent sslkey=/nonexistent",
    ] {
        let done = run(extra.to_owned());
        assert!(!done.success(), "{extra}: {}", done.output());
        assert!(
            done.stderr.contains("pg_hba.conf") || done.stderr.contains("certificate"),
            "{extra}: {}",
            done.output()
        );
    }
}

/// ~4 MB of rows: `id \t payload`, payload pseudo-random hex, as COPY's text format.
fn copy_rows() -> Vec<u8> {
    let mut rows = Vec::new();
    for id in 0..40_000u64 {
        rows.extend_from_slice(format!("{id}\t{}\n", hex(&pattern(id, 48))).as_bytes());
    }
    rows
}

#[test]
fn copy_of_four_megabytes_in_and_out_intact() {
    let (pki, client, pg) = setup();
    let proxy = sidecar(&pki, &client, upstream_of(&pg));
    query(
        &proxy,
        "disable",
        "create table t (id bigint primary key, payload text not null)",
    );
    let rows = copy_rows();
    assert!(rows.len() > 4_000_000, "{} bytes", rows.len());
    let done = Psql::new(&conninfo(proxy.addr(), "disable"))
        .args(["-v", "ON_ERROR_STOP=1", "-c", "COPY t FROM STDIN"])
        .stdin(rows.clone())
        .run(PSQL_LIMIT);
    assert!(done.success(), "COPY FROM STDIN:\n{}", done.output());
    assert_eq!(done.stdout.trim(), "COPY 40000", "{}", done.output());

    // What the server stored, checked on the server (over its unix socket, not the sidecar).
    let sql = "select encode(sha256(convert_to(string_agg(id || E'\\t' || payload || E'\\n', '' \
               order by id), 'UTF8')), 'hex') from t";
    assert_eq!(
        pg.admin(sql).trim(),
        hex(&sha256(&rows)),
        "stored rows differ"
    );

    // And back through the sidecar, byte for byte.
    let done = Psql::new(&conninfo(proxy.addr(), "disable"))
        .args(["-c", "COPY (select * from t order by id) TO STDOUT"])
        .run(PSQL_LIMIT);
    assert!(done.success(), "COPY TO STDOUT:\n{}", done.output());
    assert_eq!(done.stdout_bytes.len(), rows.len(), "COPY TO STDOUT length");
    assert!(done.stdout_bytes == rows, "COPY TO STDOUT bytes differ");
    assert_no_failed_lines(&proxy);
}

/// Starts `select pg_sleep(60)` through the sidecar and waits until the server runs it; returns
/// the psql process and the backend's pid.
fn sleeping_session(pg: &Postgres, proxy: &Sidecar) -> (Running, String) {
    let session = Psql::new(&conninfo(proxy.addr(), "disable"))
        .args(["-c", SLEEP])
        .spawn();
    let sql = format!(
        "select pid from pg_stat_activity where usename = '{PG_USER}' and state = 'active' \
         and query = '{SLEEP}'"
    );
    let deadline = Instant::now() + WAIT;
    loop {
        let pid = pg.admin(&sql);
        let pid = pid.trim();
        if !pid.is_empty() {
            return (session, pid.to_owned());
        }
        if Instant::now() >= deadline {
            proxy.fail(&format!("the server never ran {SLEEP}:\n{}", pg.log()));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The cancelled session ends within a few seconds with the server's cancel message.
fn assert_cancelled(session: Running, proxy: &Sidecar) -> Done {
    let done = session.wait(Duration::from_secs(15));
    if done.status.is_none() || !done.stderr.contains(CANCELLED) {
        proxy.fail(&format!("the query was not cancelled:\n{}", done.output()));
    }
    assert!(done.elapsed < Duration::from_secs(15), "{:?}", done.elapsed);
    done
}

#[test]
fn cancel_with_pg_cancel_backend_from_another_session() {
    let (pki, client, pg) = setup();
    let proxy = sidecar(&pki, &client, upstream_of(&pg));
    let (session, pid) = sleeping_session(&pg, &proxy);
    let sql = format!("select pg_cancel_backend({pid})");
    assert_eq!(query(&proxy, "disable", &sql), "t");
    assert_cancelled(session, &proxy);
}

#[test]
fn cancel_with_ctrl_c_sends_a_cancel_request_through_the_sidecar() {
    let (pki, client, pg) = setup();
    let mut proxy = sidecar(&pki, &client, upstream_of(&pg));
    let (session, _pid) = sleeping_session(&pg, &proxy);
    // psql's Ctrl-C: libpq opens a second connection to the same host and port (the sidecar)
    // and sends a CancelRequest with the session's key.
    session.signal(libc::SIGINT);
    let done = assert_cancelled(session, &proxy);
    assert!(
        done.stderr.contains("Cancel request sent"),
        "{}",
        done.output()
    );
    // Two connections through the sidecar: the session and its CancelRequest, both fine.
    let lines = proxy.wait_conn_lines(2);
    assert_eq!(lines.len(), 2, "{lines:#?}");
    assert_no_failed_lines(&proxy);
}

/// psql's output for a connection that must fail; it must end (not hang) with an error.
fn failed_psql(proxy: &Sidecar, sslmode: &str) -> Done {
    let done = Psql::new(&conninfo(proxy.addr(), sslmode))
        .args(["-c", "select 1"])
        .run(PSQL_LIMIT);
    if done.status.is_none() || done.success() {
        proxy.fail(&format!("psql should have failed:\n{}", done.output()));
    }
    eprintln!("psql (sslmode={sslmode}) said: {}", done.stderr.trim_end());
    done
}

#[test]
fn server_with_ssl_off_gives_the_sidecars_08001_sentence() {
    let pki = Pki::new();
    let client = pki.leaf(&pki.ca, "pg-client", LeafSpec::client(PG_USER));
    let pg = Postgres::start_without_ssl(&pki);
    let mut proxy = sidecar(&pki, &client, upstream_of(&pg));
    for sslmode in ["disable", "prefer"] {
        let done = failed_psql(&proxy, sslmode);
        let text = done.all();
        assert!(
            text.contains("mtls-sidecar") && text.contains("not offer TLS"),
            "sslmode={sslmode}: no sentence from the sidecar:\n{}",
            done.output()
        );
        assert!(!text.contains(BARE_CLOSE), "{}", done.output());
    }
    let lines = proxy.wait_conn_lines(2);
    for line in &lines {
        assert_eq!(field(line, "reason"), Some("protocol"), "{line}");
        assert_ne!(field(line, "outcome"), Some("ok"), "{line}");
    }
}

/// A fake PostgreSQL server: answers every SSLRequest with `S` followed, in the same write, by
/// a complete ErrorResponse that psql would print if it ever reached it. Returns its port.
fn injecting_server() -> (u16, std::sync::mpsc::Receiver<usize>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let _ = stream.set_read_timeout(Some(WAIT));
            let mut request = [0u8; 8];
            if stream.read_exact(&mut request).is_err() {
                continue;
            }
            if request != [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f] {
                // Not an SSLRequest: reported as a value no real count has.
                let _ = tx.send(usize::MAX);
                continue;
            }
            let mut reply = b"S".to_vec();
            reply.extend_from_slice(&error_response("INJECTED-BY-FAKE-SERVER"));
            let _ = stream.write_all(&reply);
            // Whatever the sidecar sends next (it should close): how much, for the test.
            let mut rest = Vec::new();
            let _ = stream.take(1 << 20).read_to_end(&mut rest);
            if tx.send(rest.len()).is_err() {
                return;
            }
        }
    });
    (port, rx)
}

/// A PostgreSQL ErrorResponse: FATAL, SQLSTATE 28000, `message`.
fn error_response(message: &str) -> Vec<u8> {
    let mut body = Vec::new();
    for (code, value) in [(b'S', "FATAL"), (b'C', "28000"), (b'M', message)] {
        body.push(code);
        body.extend_from_slice(value.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut msg = vec![b'E'];
    msg.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    msg.extend_from_slice(&body);
    msg
}

#[test]
fn bytes_injected_after_s_are_refused_and_never_reach_psql() {
    let pki = Pki::new();
    let client = pki.leaf(&pki.ca, "pg-client", LeafSpec::client(PG_USER));
    let (port, sent_after) = injecting_server();
    let mut proxy = sidecar(&pki, &client, format!("127.0.0.1:{port}"));
    for sslmode in ["disable", "prefer"] {
        let done = failed_psql(&proxy, sslmode);
        assert!(
            !done.all().contains("INJECTED"),
            "injected bytes reached psql:\n{}",
            done.output()
        );
        assert!(done.all().contains("mtls-sidecar"), "{}", done.output());
        assert!(!done.all().contains(BARE_CLOSE), "{}", done.output());
        // The sidecar sent no ClientHello (nor anything else) after the injected bytes.
        let after = sent_after
            .recv_timeout(WAIT)
            .expect("the fake server's report");
        assert_eq!(after, 0, "the sidecar went on after the injection");
    }
    let lines = proxy.wait_conn_lines(2);
    for line in &lines {
        assert_eq!(field(line, "reason"), Some("protocol"), "{line}");
        assert_eq!(num_field(line, "bytes_from_upstream"), 0, "{line}");
    }
}

#[test]
fn client_certificate_the_server_refuses_gives_an_error_not_a_hang() {
    let pki = Pki::new();
    let pg = Postgres::start(&pki);
    let other = pki.other_ca();
    let stranger = pki.leaf(&other, "pg-stranger", LeafSpec::client(PG_USER));
    let mut proxy = sidecar(&pki, &stranger, upstream_of(&pg));
    let done = failed_psql(&proxy, "disable");
    assert!(done.elapsed < Duration::from_secs(20), "{}", done.output());
    // TLS 1.3: the server's alert comes after our handshake ends, while the startup message
    // is relayed; psql still gets the sidecar's sentence, not a bare close.
    assert!(
        done.stderr
            .contains("mtls-sidecar: the upstream rejected our client certificate"),
        "no sentence from the sidecar:\n{}",
        done.output()
    );
    assert!(!done.stderr.contains(BARE_CLOSE), "{}", done.output());
    let line = proxy.wait_conn_lines(1).remove(0);
    assert_eq!(field(&line, "outcome"), Some("tls_error"), "{line}");
    assert_eq!(
        field(&line, "reason"),
        Some("client_cert_rejected"),
        "{line}"
    );
}

#[test]
fn certificate_for_another_role_is_refused_by_the_server() {
    let (pki, _client, pg) = setup();
    // Trusted CA, but CN=postgres while psql asks for pgapp: the server's own FATAL reaches psql.
    let other_name = pki.leaf(&pki.ca, "pg-other-name", LeafSpec::client("postgres"));
    let proxy = sidecar(&pki, &other_name, upstream_of(&pg));
    let done = failed_psql(&proxy, "disable");
    assert!(
        done.stderr
            .contains("certificate authentication failed for user \"pgapp\""),
        "{}",
        done.output()
    );
}

#[test]
fn pgbench_with_eight_clients_completes_without_errors() {
    let (pki, client, pg) = setup();
    let mut proxy = sidecar(&pki, &client, upstream_of(&pg));
    let init = pgbench(proxy.addr(), &["-i", "-s", "1", "-q"]);
    let done = run_bounded(init, None, Duration::from_secs(60), "pgbench -i");
    if !done.success() {
        proxy.fail(&format!("pgbench -i:\n{}", done.output()));
    }
    // At most 100 transactions a second (-R): eight concurrent clients for 10 s without
    // taking both cores from the tests running beside this one (unthrottled: ~360 tps here).
    let run = pgbench(
        proxy.addr(),
        &["-c", "8", "-j", "2", "-T", "10", "-R", "100"],
    );
    let done = run_bounded(run, None, Duration::from_secs(60), "pgbench -c 8 -T 10");
    if !done.success()
        || !done.stdout.contains("number of failed transactions: 0")
        || done.stderr.to_lowercase().contains("error")
    {
        proxy.fail(&format!("pgbench -c 8 -T 10:\n{}", done.output()));
    }
    let processed = done
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .and_then(|n| n.split('/').next()?.trim().parse::<u64>().ok())
        .unwrap_or_else(|| proxy.fail(&format!("no transaction count:\n{}", done.output())));
    assert!(processed >= 100, "{}", done.output());
    eprintln!("pgbench through the sidecar:\n{}", done.stdout);
    // pgbench -i (1 connection), then 8 clients (and pgbench's own first connection).
    proxy.wait_conn_lines(9);
    assert_no_failed_lines(&proxy);
}
