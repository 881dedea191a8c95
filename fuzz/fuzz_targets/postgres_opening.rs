//! `--protocol postgres`'s parsers: the app's first messages (`postgres::startup::scan`, and
//! `postgres::io::read_startup` over an in-memory stream, which must agree), the upstream's
//! answer to `SSLRequest` (`Answer::of` and its refusal message) and the `ErrorResponse`
//! encoder. Input: one byte choosing the read size, then the bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mtls_sidecar::postgres::io::{AppError, read_startup, refusal};
use mtls_sidecar::postgres::startup::{Kind, MAX_STARTUP_PACKET_LENGTH, scan};
use mtls_sidecar::postgres::{Answer, error_response};
use mtls_sidecar_fuzz::Scripted;

/// The `ErrorResponse` for `text` parses back: `E`, its length, four fields, the terminator.
fn check_error_response(text: &str) {
    let e = error_response(text);
    assert_eq!(e[0], b'E');
    let len = u32::from_be_bytes([e[1], e[2], e[3], e[4]]) as usize;
    assert_eq!(len + 1, e.len());
    assert!(e.len() < 1200, "{}", e.len());
    let fields: Vec<&[u8]> = e[5..e.len() - 1].split_inclusive(|b| *b == 0).collect();
    assert_eq!(fields.len(), 4, "a NUL inside a field: {e:?}");
    assert!(
        std::str::from_utf8(&e[5..]).is_ok(),
        "cut inside a character"
    );
}

fuzz_target!(|data: &[u8]| {
    let Some((&cut, bytes)) = data.split_first() else {
        return;
    };

    // The app side: scan and the real reader agree.
    let scanned = scan(bytes);
    let mut app = Scripted::new(bytes, cut);
    let read = mtls_sidecar_fuzz::block_on(read_startup(&mut app), bytes.len() + 16);
    match (&scanned, &read) {
        (Ok(s), Ok((kind, message))) => {
            let (k, range) = s.message.clone().expect("read a message scan did not find");
            assert_eq!(*kind, k);
            assert_eq!(message.as_slice(), &bytes[range]);
            assert!(message.len() >= 8);
            assert!(message.len() <= MAX_STARTUP_PACKET_LENGTH as usize + 4);
            assert_eq!(app.written, vec![b'N'; s.declined.len()]);
            assert!(s.declined.len() <= 2);
            assert!(!matches!(k, Kind::SslRequest | Kind::GssEncRequest));
        }
        (Ok(s), Err(AppError::Closed)) => assert!(s.message.is_none()),
        (Err(e), Err(AppError::Refused(r))) => {
            assert_eq!(e, r);
            check_error_response(&e.to_string());
        }
        (s, r) => panic!("scan {s:?} and read_startup {r:?} disagree"),
    }

    // The upstream side: what one read brought, and how many bytes were there after it.
    let more = usize::from(cut);
    let answer = Answer::of(&bytes[..bytes.len().min(64)], more);
    match refusal(&answer, "db.test:5432 (127.0.0.1:5432)") {
        None => assert!(bytes == b"S" && more == 0, "{answer:?} accepted"),
        Some(f) => {
            assert!(f.message.len() < 512, "{}", f.message.len());
            check_error_response(&f.message);
        }
    }
    check_error_response(&String::from_utf8_lossy(bytes));
});
