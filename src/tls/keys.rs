//! Private keys: PEM PKCS#8, PKCS#1 and SEC1, encrypted PKCS#8 with a password, and PKCS#12.
//! A password derivation is judged from its parameters before anything is derived (scrypt's
//! memory, PBKDF2's iterations), so a hostile key file cannot exhaust memory or time. Errors
//! hold no decoded bytes of a key and never the password.

use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use zeroize::Zeroizing;

use super::file::{Error, FileBytes};

/// The most memory an scrypt-encrypted key may ask for (128 * r * (N + p) bytes).
const MAX_KDF_MEMORY: u64 = 256 << 20;
/// The most PBKDF2 iterations an encrypted key may ask for.
const MAX_KDF_ITERATIONS: u64 = 10_000_000;

/// The first private key of a PEM file: PKCS#8, PKCS#1, SEC1, or encrypted PKCS#8 with a
/// password.
pub fn private_key(
    f: &FileBytes,
    password: Option<&FileBytes>,
) -> Result<PrivateKeyDer<'static>, Error> {
    match PrivateKeyDer::from_pem_slice(&f.bytes) {
        Ok(k) => Ok(k),
        Err(pem::Error::NoItemsFound) => {
            if !f
                .bytes
                .windows(27)
                .any(|w| w == b"BEGIN ENCRYPTED PRIVATE KEY")
            {
                return Err(Error::NoKey {
                    path: f.path.clone(),
                });
            }
            let Some(pw) = password else {
                return Err(Error::EncryptedKeyNeedsPassword {
                    path: f.path.clone(),
                });
            };
            let encrypted = encrypted_pkcs8(f)?;
            let info =
                pkcs8::EncryptedPrivateKeyInfo::try_from(encrypted.as_slice()).map_err(|_| {
                    // The DER error would name tags and offsets of the key: say it in words.
                    Error::BadKey {
                        flag: f.flag,
                        path: f.path.clone(),
                        detail: "its ENCRYPTED PRIVATE KEY block is not an encrypted PKCS#8 \
                                 structure"
                            .into(),
                    }
                })?;
            kdf_within_limits(f, &info.encryption_algorithm)?;
            let plain = info
                .decrypt(pw.password())
                .map_err(|_| Error::WrongPassword {
                    flag: f.flag,
                    path: f.path.clone(),
                    password_flag: pw.flag,
                    password_path: pw.path.clone(),
                })?;
            // `plain` (a SecretDocument) wipes itself on drop; this copy goes to rustls.
            Ok(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
                plain.as_bytes().to_vec(),
            )))
        }
        Err(e) => Err(f.pem_error(e)),
    }
}

/// Refuse a key whose password derivation would cost unbounded memory or time (scrypt with
/// N = 2^40 aborts the process on allocation), judged from its parameters before deriving.
fn kdf_within_limits(
    f: &FileBytes,
    scheme: &pkcs8::pkcs5::EncryptionScheme<'_>,
) -> Result<(), Error> {
    let refuse = |what: String, limit| {
        Err(Error::TooExpensive {
            flag: f.flag,
            path: f.path.clone(),
            what,
            limit,
        })
    };
    match scheme {
        pkcs8::pkcs5::EncryptionScheme::Pbes2(p) => match &p.kdf {
            pkcs8::pkcs5::pbes2::Kdf::Pbkdf2(k)
                if u64::from(k.iteration_count) > MAX_KDF_ITERATIONS =>
            {
                refuse(
                    format!("{} PBKDF2 iterations", k.iteration_count),
                    "10000000 iterations",
                )
            }
            pkcs8::pkcs5::pbes2::Kdf::Scrypt(k) => scrypt_within_limits(f, k),
            _ => Ok(()),
        },
        // PBES1 counts iterations in 16 bits: always cheap.
        pkcs8::pkcs5::EncryptionScheme::Pbes1(_) => Ok(()),
        _ => Ok(()),
    }
}

/// scrypt's working memory, 128 * r * N for V plus 128 * r * p for B, within the limit.
fn scrypt_within_limits(
    f: &FileBytes,
    k: &pkcs8::pkcs5::pbes2::ScryptParams<'_>,
) -> Result<(), Error> {
    let r = u64::from(k.block_size);
    let memory = k
        .cost_parameter
        .checked_add(u64::from(k.parallelization))
        .and_then(|n| n.checked_mul(r))
        .and_then(|n| n.checked_mul(128));
    match memory {
        Some(m) if m <= MAX_KDF_MEMORY => Ok(()),
        _ => Err(Error::TooExpensive {
            flag: f.flag,
            path: f.path.clone(),
            what: format!(
                "scrypt N={} r={} p={} (more memory than allowed)",
                k.cost_parameter, k.block_size, k.parallelization
            ),
            limit: "256 MiB",
        }),
    }
}

/// The DER of the file's `ENCRYPTED PRIVATE KEY` PEM block.
fn encrypted_pkcs8(f: &FileBytes) -> Result<Zeroizing<Vec<u8>>, Error> {
    const BEGIN: &str = "-----BEGIN ENCRYPTED PRIVATE KEY-----";
    const END: &str = "-----END ENCRYPTED PRIVATE KEY-----";
    // Lossy conversion copies only when the file is not UTF-8; wipe that copy as well.
    let text = Zeroizing::new(String::from_utf8_lossy(&f.bytes).into_owned());
    let Some(start) = text.find(BEGIN) else {
        return Err(Error::NoKey {
            path: f.path.clone(),
        });
    };
    let Some(len) = text[start..].find(END) else {
        return Err(f.pem_error(pem::Error::MissingSectionEnd {
            end_marker: END.as_bytes().to_vec(),
        }));
    };
    let block = &text[start..start + len + END.len()];
    let (_, doc) = pkcs8::SecretDocument::from_pem(block).map_err(|_| Error::BadPem {
        flag: f.flag,
        path: f.path.clone(),
        detail: format!(
            "the ENCRYPTED PRIVATE KEY block starting on line {} is not valid PEM base64",
            text[..start].matches('\n').count() + 1
        ),
    })?;
    Ok(Zeroizing::new(doc.as_bytes().to_vec()))
}

/// The key and chain of a PKCS#12 file.
pub fn pkcs12(
    f: &FileBytes,
    password: Option<&FileBytes>,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), Error> {
    pkcs12_kdfs_within_limits(f)?;
    let pw = password.map(|p| Zeroizing::new(String::from_utf8_lossy(p.password()).into_owned()));
    let store = p12_keystore::KeyStore::from_pkcs12(
        &f.bytes,
        pw.as_ref().map_or("", |p| p.as_str()),
        p12_keystore::Pkcs12ImportPolicy::default(),
    )
    .map_err(|e| match (e, password) {
        (p12_keystore::error::Error::MacError(_), Some(p)) => Error::WrongPassword {
            flag: "--pkcs12",
            path: f.path.clone(),
            password_flag: p.flag,
            password_path: p.path.clone(),
        },
        (p12_keystore::error::Error::MacError(_), None) => Error::BadPkcs12 {
            path: f.path.clone(),
            detail: "it is password-protected: pass --pkcs12-password-file".into(),
        },
        // p12-keystore refuses PBKDF2 / MAC iteration counts over 1,000,000 and scrypt over
        // 1 GiB before deriving; that is this error.
        (p12_keystore::error::Error::InvalidParameters, _) => Error::BadPkcs12 {
            path: f.path.clone(),
            detail: "its encryption parameters are invalid or too expensive (over 1000000 \
                     iterations or 1 GiB of scrypt memory)"
                .into(),
        },
        // The other errors' texts may quote decoded bytes (DER and X.509 parse errors): each
        // becomes a fixed description.
        (other, _) => Error::BadPkcs12 {
            path: f.path.clone(),
            detail: format!("not a usable PKCS#12 file: {}", pkcs12_problem(&other)),
        },
    })?;
    let Some((_, chain)) = store.private_key_chain() else {
        return Err(Error::BadPkcs12 {
            path: f.path.clone(),
            detail: "holds no private key with its certificate".into(),
        });
    };
    let certs: Vec<CertificateDer<'static>> = chain
        .certs()
        .iter()
        .map(|c| CertificateDer::from(c.as_der().to_vec()))
        .collect();
    if certs.is_empty() {
        return Err(Error::BadPkcs12 {
            path: f.path.clone(),
            detail: "its private key has no certificate".into(),
        });
    }
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(chain.key().as_der().to_vec()));
    Ok((certs, key))
}

/// The DER encoding of the scrypt OID 1.3.6.1.4.1.11591.4.11, tag and length included.
const SCRYPT_OID_TLV: [u8; 11] = [
    0x06, 0x09, 0x2b, 0x06, 0x01, 0x04, 0x01, 0xda, 0x47, 0x04, 0x0b,
];

/// p12-keystore bounds PBKDF2, PBE and MAC iterations (1,000,000) but lets scrypt use up to
/// 1 GiB; hold PKCS#12 to the same 256 MiB as a PKCS#8 key. Every scrypt AlgorithmIdentifier
/// in the file is found by its OID (the PBES2 parameters of the bags sit outside the encrypted
/// parts) and its parameters judged before p12-keystore derives anything.
fn pkcs12_kdfs_within_limits(f: &FileBytes) -> Result<(), Error> {
    use pkcs8::der::Decode;
    let bytes: &[u8] = &f.bytes;
    let mut at = 0;
    while let Some(found) = bytes[at..]
        .windows(SCRYPT_OID_TLV.len())
        .position(|w| w == SCRYPT_OID_TLV)
    {
        let oid = at + found;
        at = oid + 1;
        // The AlgorithmIdentifier SEQUENCE header stands 2 to 4 bytes before the OID.
        for header in 2..=4 {
            let Some(start) = oid.checked_sub(header) else {
                continue;
            };
            if bytes[start] != 0x30 {
                continue;
            }
            let Ok(mut reader) = pkcs8::der::SliceReader::new(&bytes[start..]) else {
                continue;
            };
            let Ok(kdf) = pkcs8::pkcs5::pbes2::Kdf::decode(&mut reader) else {
                continue;
            };
            if let pkcs8::pkcs5::pbes2::Kdf::Scrypt(k) = kdf {
                scrypt_within_limits(f, &k)?;
            }
            break;
        }
    }
    Ok(())
}

/// A content-free description of a p12-keystore error.
fn pkcs12_problem(e: &p12_keystore::error::Error) -> &'static str {
    use p12_keystore::error::Error as E;
    match e {
        E::IoError(_) => "it cannot be read",
        E::DerError(_) => "its DER structure cannot be parsed",
        E::InvalidVersion => "its PFX version is not 3",
        E::UnsupportedContentType => "it holds an unsupported content type",
        E::UnsupportedCertificateType => "it holds an unsupported certificate type",
        E::X509Error(_) => "a certificate in it cannot be parsed",
        E::InvalidLength | E::UnpadError | E::InvalidData => {
            "its encrypted content does not decrypt (wrong password or corrupt file)"
        }
        E::InvalidParameters => "its encryption parameters are invalid",
        E::UnsupportedEncryptionScheme => "it uses an unsupported encryption scheme",
        E::UnsupportedMacAlgorithm => "it uses an unsupported MAC algorithm",
        E::Pkcs5Error(_) => "its encrypted content cannot be decrypted",
        E::MacError(_) => "its MAC does not verify",
        E::InvalidPrivateKey => "its private key cannot be parsed",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::file::test_file as file;

    #[test]
    fn pkcs12_scrypt_parameters_are_bounded() {
        use pkcs8::der::Encode;
        use pkcs8::pkcs5::pbes2::{Kdf, ScryptParams};
        let salt = [1u8; 16];
        let der = |log_n: u32| {
            let kdf = Kdf::Scrypt(ScryptParams {
                salt: &salt,
                cost_parameter: 1 << log_n,
                block_size: 8,
                parallelization: 1,
                key_length: Some(32),
            });
            // As inside a PFX: other structures before and after.
            let mut v = vec![0x30, 0x03, 0x02, 0x01, 0x03];
            v.extend(kdf.to_der().unwrap());
            v.extend([0x04, 0x02, 0xaa, 0xbb]);
            v
        };
        let p12 = |body: Vec<u8>| file("--pkcs12", "id.p12", &body);
        pkcs12_kdfs_within_limits(&p12(der(14))).unwrap();
        // N = 2^20, r = 8: 1 GiB (p12-keystore's own limit); over 256 MiB.
        let e = pkcs12_kdfs_within_limits(&p12(der(20)))
            .unwrap_err()
            .to_string();
        assert!(e.contains("id.p12") && e.contains("256 MiB"), "{e}");
        let e = pkcs12_kdfs_within_limits(&p12(der(40)))
            .unwrap_err()
            .to_string();
        assert!(e.contains("256 MiB"), "{e}");
    }

    #[test]
    fn pem_errors_hold_no_content() {
        let key = crate::pki::DevPki::generate().unwrap().client_key;
        let body: String = key.lines().filter(|l| !l.starts_with("-----")).collect();
        for broken in [
            key.replace('\n', " "),
            key.replace("-----END PRIVATE KEY-----", ""),
            key.replacen("\n", "\n*", 2),
        ] {
            let e = private_key(&file("--key", "k.pem", broken.as_bytes()), None)
                .unwrap_err()
                .to_string();
            assert!(e.contains("k.pem") && e.contains("line"), "{e}");
            assert!(!e.contains(&body[..16]) && !e.contains("[4"), "{e}");
        }
    }
}
