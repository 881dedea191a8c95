//! The scripted Workload API server of `support::workload_api`, checked with the `spiffe`
//! crate's own client: what it sends, updates pushed to open streams, withdrawal, the security
//! header, stop and start again on the same path.

use std::time::Duration;

use spiffe::{TrustDomain, WorkloadApiClient};
use tokio_stream::StreamExt;

use crate::support::WAIT;
use crate::support::workload_api::{SpiffeCa, WorkloadApi};

async fn client(api: &WorkloadApi) -> WorkloadApiClient {
    tokio::time::timeout(WAIT, WorkloadApiClient::connect_to(api.endpoint()))
        .await
        .expect("connect within the wait")
        .expect("connect to the test Workload API")
}

#[tokio::test]
async fn serves_svids_and_bundles_own_and_federated() {
    let api = WorkloadApi::start().await;
    let own = SpiffeCa::new("example.org");
    let fed = SpiffeCa::new("partner.test");
    let web = own.svid("/web");
    let db = own.svid("/db");
    api.issue(&[&web, &db], &[&own, &fed]);
    let c = client(&api).await;
    let ctx = tokio::time::timeout(WAIT, c.fetch_x509_context())
        .await
        .expect("answer within the wait")
        .expect("an X.509 context");
    let ids: Vec<String> = ctx
        .svids()
        .iter()
        .map(|s| s.spiffe_id().to_string())
        .collect();
    assert_eq!(ids, ["spiffe://example.org/web", "spiffe://example.org/db"]);
    let set = ctx.bundle_set();
    for td in ["example.org", "partner.test"] {
        let td = TrustDomain::new(td).unwrap();
        assert!(set.get(&td).is_some(), "bundle for {td} in {set:?}");
    }
    let bundles = tokio::time::timeout(WAIT, c.fetch_x509_bundles())
        .await
        .expect("bundles within the wait")
        .expect("a bundle set");
    assert_eq!(bundles.len(), 2);
    assert_eq!(api.svid_requests(), 1);
    assert_eq!(api.bundle_requests(), 1);
    assert_eq!(api.refused_requests(), 0);
}

#[tokio::test]
async fn pushes_every_update_to_an_open_stream_and_withdraws() {
    let api = WorkloadApi::start().await;
    let ca = SpiffeCa::new("example.org");
    let first = ca.svid("/app");
    api.issue(&[&first], &[&ca]);
    let c = client(&api).await;
    let mut stream = c.stream_x509_svids().await.expect("stream");
    let got = tokio::time::timeout(WAIT, stream.next())
        .await
        .expect("first in time")
        .expect("item");
    assert_eq!(got.expect("svid").leaf().as_bytes(), first.der.as_ref());
    let second = ca.svid("/app");
    api.set_svids(&[&second]);
    let got = tokio::time::timeout(WAIT, stream.next())
        .await
        .expect("update in time")
        .expect("item");
    assert_eq!(got.expect("svid").leaf().as_bytes(), second.der.as_ref());
    api.deny();
    let got = tokio::time::timeout(WAIT, stream.next())
        .await
        .expect("denial in time")
        .expect("item");
    let err = got.expect_err("withdrawn");
    // The spiffe crate reads PermissionDenied as "no identity issued".
    assert!(format!("{err:?}").contains("NoIdentityIssued"), "{err:?}");
    assert!(
        c.fetch_x509_svid().await.is_err(),
        "new requests are refused too"
    );
    api.set_svids(&[&second]);
    assert!(c.fetch_x509_svid().await.is_ok(), "issued again");
}

#[tokio::test]
async fn refuses_a_request_without_the_security_header() {
    let api = WorkloadApi::start().await;
    let ca = SpiffeCa::new("example.org");
    api.issue(&[&ca.svid("/app")], &[&ca]);
    let channel = tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn({
            let path = api.path().to_owned();
            move |_| {
                let path = path.clone();
                async move {
                    let s = tokio::net::UnixStream::connect(path).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
                }
            }
        }))
        .await
        .expect("channel");
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("ready");
    let path =
        tonic::codegen::http::uri::PathAndQuery::from_static("/SpiffeWorkloadAPI/FetchX509SVID");
    let codec = tonic_prost::ProstCodec::<
        crate::support::workload_api::EmptyRequest,
        crate::support::workload_api::X509SvidResponse,
    >::default();
    let request = tonic::Request::new(crate::support::workload_api::EmptyRequest {});
    let status = grpc
        .server_streaming(request, path, codec)
        .await
        .expect_err("refused");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert_eq!(api.refused_requests(), 1);
    assert_eq!(api.svid_requests(), 0);
}

#[tokio::test]
async fn delays_the_first_answer() {
    let api = WorkloadApi::start().await;
    let ca = SpiffeCa::new("example.org");
    api.issue(&[&ca.svid("/app")], &[&ca]);
    api.delay_first_answer(Duration::from_millis(700));
    let c = client(&api).await;
    let started = std::time::Instant::now();
    c.fetch_x509_svid().await.expect("an SVID");
    assert!(
        started.elapsed() >= Duration::from_millis(700),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn stops_and_starts_again_on_the_same_path() {
    let mut api = WorkloadApi::start().await;
    let ca = SpiffeCa::new("example.org");
    api.issue(&[&ca.svid("/app")], &[&ca]);
    let c = client(&api).await;
    let mut stream = c.stream_x509_svids().await.expect("stream");
    assert!(stream.next().await.expect("item").is_ok());
    assert!(api.wait_until(WAIT, |a| a.open_streams() == 1).await);
    api.stop().await;
    let end = tokio::time::timeout(WAIT, stream.next())
        .await
        .expect("stream ends in time");
    assert!(!matches!(end, Some(Ok(_))), "no SVID after stop: {end:?}");
    assert!(!api.path().exists(), "socket removed");
    assert!(
        WorkloadApiClient::connect_to(api.endpoint()).await.is_err()
            || c.fetch_x509_svid().await.is_err()
    );
    api.start_again();
    let c = client(&api).await;
    c.fetch_x509_svid().await.expect("served again");
    assert_eq!(api.svid_requests(), 2);
}

/// The test SVIDs are good TLS identities both ways (serverAuth and clientAuth, chains to their
/// trust domain's CA), and a client of another trust domain is refused by the upstream helper.
#[tokio::test(flavor = "multi_thread")]
async fn svids_authenticate_both_ways_in_process() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ca = SpiffeCa::new("example.org");
    let up = crate::support::Upstream::start(
        ca.svid("/api").server_config(&[&ca]),
        vec![crate::support::Behavior::Echo],
    )
    .await;
    let client = ca.svid("/web");
    let config = std::sync::Arc::new(client.client_config(&[&ca]));
    let tcp = crate::support::connect(up.addr).await;
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .expect("handshake");
    tls.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    tokio::time::timeout(WAIT, tls.read_exact(&mut buf))
        .await
        .expect("echo in time")
        .unwrap();
    assert_eq!(&buf, b"ping");
    let seen = up.stats.conns().last().cloned().expect("a connection");
    assert_eq!(seen.client_der.as_deref(), Some(client.der.as_ref()));
    // Another trust domain's SVID does not chain to this CA.
    let stranger = SpiffeCa::new("stranger.test").svid("/web");
    let config = std::sync::Arc::new(stranger.client_config(&[&ca]));
    let tcp = crate::support::connect(up.addr).await;
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let refused = async {
        let mut tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await?;
        tls.write_all(b"ping").await?;
        tls.read_exact(&mut buf).await
    };
    assert!(
        tokio::time::timeout(WAIT, refused)
            .await
            .expect("in time")
            .is_err()
    );
}
