//! Config files with proxied, bypassing, https and from-env routes; a SOCKS proxy refused.

use super::*;

/// A TOML basic string.
fn q(s: &str) -> String {
    format!("{s:?}")
}

/// Starts `run --config PATH` and waits for the listening line of each route in `names`.
fn start_routes(
    cmd: Cmd,
    names: &[&str],
) -> (
    Sidecar,
    std::collections::HashMap<String, std::net::SocketAddr>,
) {
    let mut sidecar = cmd.spawn();
    let mut addrs = std::collections::HashMap::new();
    for name in names {
        let line = sidecar.wait_for_line(&format!("route {name} listening"), WAIT, |l| {
            l.contains("listening")
                && !l.contains("admin listening")
                && field(l, "route") == Some(name)
                && field(l, "addr").is_some()
        });
        let addr = field(&line, "addr").unwrap();
        let addr = addr
            .parse()
            .unwrap_or_else(|e| sidecar.fail(&format!("addr={addr}: {e}")));
        addrs.insert(name.to_string(), addr);
    }
    (sidecar, addrs)
}

/// A TOML basic string holding a path.
fn qp(p: &std::path::Path) -> String {
    q(p.to_str().expect("UTF-8 temp path"))
}

/// Four routes: `[defaults]` sets an authenticating http proxy and its credentials file;
/// route `via` uses them towards a name only the proxy knows, `direct` bypasses them with
/// `no_proxy`, `tls` sets its own https proxy and `proxy_ca`, `env` takes its proxy from
/// `HTTPS_PROXY` with `proxy_from_env = true`.
#[tokio::test(flavor = "multi_thread")]
async fn config_file_routes_through_and_around_the_proxy() {
    let pki = Pki::new();
    let up = named_upstream(&pki).await;
    let local = Upstream::echo(&pki.server, &pki.ca.der).await;
    let (proxy_ca, proxy_id) = proxy_pki(&pki);
    let proxy = ConnectProxy::builder()
        .credentials("ivan", "config-pw")
        .start()
        .await;
    let tls_proxy = ConnectProxy::builder()
        .tls_identity(&proxy_id)
        .credentials("ivan", "config-pw")
        .start()
        .await;
    let env_proxy = ConnectProxy::builder()
        .credentials("ivan", "config-pw")
        .start()
        .await;
    let file = auth_file(&pki, "proxy-auth", "ivan", "config-pw");
    let named = q(&target(up.port()));
    let text = format!(
        "[defaults]\ncert = {}\nkey = {}\nca = {}\nproxy = {}\nproxy_auth_file = {}\n\
         \n[[route]]\nname = \"via\"\nlisten = \"127.0.0.1:0\"\nupstream = {named}\n\
         \n[[route]]\nname = \"direct\"\nlisten = \"127.0.0.1:0\"\nupstream = {}\n\
         no_proxy = \"127.0.0.0/8\"\n\
         \n[[route]]\nname = \"tls\"\nlisten = \"127.0.0.1:0\"\nupstream = {named}\n\
         proxy = {}\nproxy_ca = {}\n",
        qp(&pki.client.cert),
        qp(&pki.client.key),
        qp(&pki.ca.pem),
        q(&proxy.url()),
        qp(&file),
        q(&local.addr.to_string()),
        q(&tls_proxy.url()),
        qp(&proxy_ca.pem),
    );
    // An inherited `proxy` would win over the environment: route env has a file of its own.
    let env_text = format!(
        "[defaults]\ncert = {}\nkey = {}\nca = {}\nproxy_auth_file = {}\n\
         \n[[route]]\nname = \"env\"\nlisten = \"127.0.0.1:0\"\nupstream = {named}\n\
         proxy_from_env = true\n",
        qp(&pki.client.cert),
        qp(&pki.client.key),
        qp(&pki.ca.pem),
        qp(&file),
    );
    let config = pki.write("proxy.toml", &text);
    let env_config = pki.write("proxy-env.toml", &env_text);
    let names = ["via", "direct", "tls"];
    let (mut sidecar, addrs) =
        start_routes(Cmd::new().args(["run", "--config"]).arg(&config), &names);
    let (mut env_sidecar, env_addrs) = start_routes(
        Cmd::new()
            .args(["run", "--config"])
            .arg(&env_config)
            .env("HTTPS_PROXY", env_proxy.url()),
        &["env"],
    );

    let data = pattern(21, 5000);
    for name in names {
        let got = exchange(addrs[name], data.clone()).await;
        assert!(got == data, "route {name}: echo altered or cut");
    }
    assert!(
        exchange(env_addrs["env"], data.clone()).await == data,
        "route env"
    );
    let lines = sidecar.wait_conn_lines(3);
    for name in names {
        let line = lines
            .iter()
            .find(|l| field(l, "route") == Some(name))
            .unwrap_or_else(|| sidecar.fail(&format!("no connection line of route {name}")));
        assert_eq!(field(line, "outcome"), Some("ok"), "{line}");
    }
    let line = env_sidecar.wait_conn_lines(1)[0].clone();
    assert_eq!(field(&line, "outcome"), Some("ok"), "{line}");

    for (name, p) in [("via", &proxy), ("tls", &tls_proxy), ("env", &env_proxy)] {
        let requests = p.requests();
        assert_eq!(requests.len(), 1, "route {name}'s proxy: {requests:#?}");
        assert_connect(&requests[0], &target(up.port()));
        assert_eq!(
            requests[0].proxy_authorization(),
            Some(&*basic("ivan", "config-pw")),
            "route {name}"
        );
    }
    assert_eq!(up.stats.tls_accepted(), 3);
    for conn in up.stats.conns() {
        assert_named_conn(&conn);
    }
    assert_eq!(local.stats.tls_accepted(), 1);
    assert_not_logged(&sidecar, "ivan", "config-pw");
    assert_not_logged(&env_sidecar, "ivan", "config-pw");
}

/// A bad `proxy` in a config file exits 2 naming the file, the line and the key.
#[test]
fn config_file_with_a_socks_proxy_exits_2() {
    let pki = Pki::new();
    let text = format!(
        "[defaults]\ncert = {}\nkey = {}\nca = {}\n\
         \n[[route]]\nname = \"r\"\nlisten = \"127.0.0.1:0\"\nupstream = {}\n\
         proxy = \"socks5://127.0.0.1:1080\"\n",
        qp(&pki.client.cert),
        qp(&pki.client.key),
        qp(&pki.ca.pem),
        q(&target(8443)),
    );
    let config = pki.write("socks.toml", &text);
    let err = Cmd::new()
        .args(["run", "--config"])
        .arg(&config)
        .startup_error();
    let line = text
        .lines()
        .position(|l| l.starts_with("proxy = "))
        .expect("test bug: no proxy line")
        + 1;
    let at = format!("{}:{line}", config.display());
    assert!(
        err.contains(&at) && err.contains("`proxy`"),
        "the error does not name {at} and the key `proxy`:\n{err}"
    );
}
