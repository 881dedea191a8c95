//! Certificate material as `tls::load` parses it: PEM chains, private keys (PKCS#8, PKCS#1,
//! SEC1, encrypted PKCS#8 with a password), PKCS#12 with a password, CA bundles and CRLs.
#![no_main]

use std::path::PathBuf;

use libfuzzer_sys::fuzz_target;
use mtls_sidecar::tls::load::{self, FileBytes, IdentityBytes, Material};

/// The bytes of each file a route names. Input format (simple, so seeds are easy to write by
/// hand): seven fields in this order, each a little-endian `u32` length then that many bytes
/// (cut short at the end of the input). A password of length 0 means no password file.
struct Files {
    cert: Vec<u8>,
    key: Vec<u8>,
    key_password: Option<Vec<u8>>,
    pkcs12: Vec<u8>,
    pkcs12_password: Option<Vec<u8>>,
    ca: Vec<u8>,
    crl: Vec<u8>,
}

impl Files {
    fn split(mut data: &[u8]) -> Self {
        let mut next = || {
            let (len, rest) = data.split_at_checked(4).unwrap_or((&[], data));
            let len = len
                .try_into()
                .map_or(0, |b: [u8; 4]| u32::from_le_bytes(b) as usize)
                .min(rest.len());
            let (field, rest) = rest.split_at(len);
            data = rest;
            field.to_vec()
        };
        let some = |v: Vec<u8>| (!v.is_empty()).then_some(v);
        Files {
            cert: next(),
            key: next(),
            key_password: some(next()),
            pkcs12: next(),
            pkcs12_password: some(next()),
            ca: next(),
            crl: next(),
        }
    }
}

fn file(flag: &'static str, bytes: Vec<u8>) -> FileBytes {
    FileBytes {
        flag,
        path: PathBuf::from(format!("/fuzz/{}", flag.trim_start_matches('-'))),
        bytes: bytes.into(),
        mode: 0o600,
    }
}

fuzz_target!(|data: &[u8]| {
    let files = Files::split(data);
    let cert = file("--cert", files.cert);
    let key = file("--key", files.key);
    let key_password = files.key_password.map(|b| file("--key-password-file", b));
    let p12 = file("--pkcs12", files.pkcs12);
    let p12_password = files
        .pkcs12_password
        .map(|b| file("--pkcs12-password-file", b));
    let ca = file("--ca", files.ca);
    let crl = file("--crl", files.crl);

    // Errors are formatted too: that is what an operator sees.
    let show = |e: load::Error| e.to_string();
    let pem = Material {
        identity: IdentityBytes::Pem {
            cert,
            key,
            password: key_password,
        },
        ca: Some(ca.clone()),
        crls: vec![crl.clone()],
    };
    let _ = pem.identity().map_err(show);
    let _ = pem.digest();
    let pkcs12 = Material {
        identity: IdentityBytes::Pkcs12 {
            file: p12,
            password: p12_password,
        },
        ca: None,
        crls: Vec::new(),
    };
    let _ = pkcs12.identity().map_err(show);
    let _ = load::ca_bundle(&ca).map_err(show);
    if let Ok(list) = load::crls(&crl).map_err(show) {
        let _ = load::newest_crl_per_issuer(list);
    }
});
