//! A proxy's answer to CONNECT, as `egress::Proxy::connect_tunnel` reads it. Input: one byte
//! choosing how the answer is cut into reads, then the bytes the proxy sends.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mtls_sidecar::egress::{MAX_ANSWER, Proxy, ProxyUrl};
use mtls_sidecar_fuzz::Scripted;

fuzz_target!(|data: &[u8]| {
    let Some((&cut, answer)) = data.split_first() else {
        return;
    };
    let url = ProxyUrl::parse("http://proxy.test:3128").expect("a fixed, valid proxy URL");
    let proxy = Proxy::new(url, None, None).expect("no credentials, no TLS");
    // 1..=255 bytes per read, or everything at once.
    let mut io = Scripted::new(answer, cut);
    // Each poll reads at least one byte or ends: the answer's length bounds the polls.
    let result = mtls_sidecar_fuzz::block_on(
        proxy.connect_tunnel(&mut io, "upstream.test:443"),
        answer.len() + 16,
    );
    assert!(!io.written.is_empty(), "CONNECT was never sent");
    match result {
        Ok((status, rest)) => {
            assert!(
                status.starts_with('2'),
                "accepted a non-2xx answer: {status:?}"
            );
            // The bytes read past the head are handed on: exactly the tail of what was read
            // (the rest is still in the stream).
            let read = &answer[..answer.len() - io.data.len()];
            assert!(read.ends_with(&rest), "{} bytes handed on", rest.len());
        }
        Err(f) => {
            // The message quotes at most a short, escaped prefix of the answer.
            assert!(
                f.message.len() < 2048 + MAX_ANSWER / 1024,
                "{}",
                f.message.len()
            );
        }
    }
});
