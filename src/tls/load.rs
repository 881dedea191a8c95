//! Reading certificate material from disk: PEM chains, private keys, CA bundles. Every error
//! names the flag and the file, and says what is wrong in words an operator can act on.

use std::path::{Path, PathBuf};

use rustls::RootCertStore;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {flag} {}: {source}", path.display())]
    Read {
        flag: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{flag} {} holds no PEM certificate (expected a \"-----BEGIN CERTIFICATE-----\" block)",
        path.display()
    )]
    NoCertificate { flag: &'static str, path: PathBuf },
    #[error(
        "--key {} holds no private key (expected PEM \"BEGIN PRIVATE KEY\" (PKCS#8), \"BEGIN RSA \
         PRIVATE KEY\" (PKCS#1) or \"BEGIN EC PRIVATE KEY\" (SEC1))",
        path.display()
    )]
    NoKey { path: PathBuf },
    #[error(
        "--key {} is an encrypted PKCS#8 key; encrypted keys are not supported yet, decrypt it \
         with `openssl pkcs8 -in KEY -out PLAIN.key`",
        path.display()
    )]
    EncryptedKey { path: PathBuf },
    #[error("{flag} {} is not valid PEM: {detail}", path.display())]
    BadPem {
        flag: &'static str,
        path: PathBuf,
        detail: String,
    },
    #[error("{flag} {}: certificate {index} cannot be parsed: {detail}", path.display())]
    BadCertificate {
        flag: &'static str,
        path: PathBuf,
        index: usize,
        detail: String,
    },
    #[error("--key {} cannot be used: {detail}", path.display())]
    BadKey { path: PathBuf, detail: String },
    #[error(
        "--key {} does not belong to the certificate in --cert {} (their public keys differ)",
        key.display(), cert.display()
    )]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("--ca {}: certificate {index} is not usable as a trust anchor: {detail}", path.display())]
    BadCa {
        path: PathBuf,
        index: usize,
        detail: String,
    },
    #[error("no --ca given and the system trust store has no certificates{hint}; pass --ca FILE")]
    NoSystemRoots { hint: String },
}

/// Read a file whole, mapping the error to one that names the flag and path.
fn read(flag: &'static str, path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|source| Error::Read {
        flag,
        path: path.to_path_buf(),
        source,
    })
}

fn pem_error(flag: &'static str, path: &Path, e: pem::Error) -> Error {
    Error::BadPem {
        flag,
        path: path.to_path_buf(),
        detail: e.to_string(),
    }
}

/// Load every certificate of a PEM file, in order. An empty result is an error.
pub fn certificates(
    flag: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, Error> {
    let bytes = read(flag, path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(flag, path, e))?;
    if certs.is_empty() {
        return Err(Error::NoCertificate {
            flag,
            path: path.to_path_buf(),
        });
    }
    for (i, c) in certs.iter().enumerate() {
        if let Err(e) = x509_parser::parse_x509_certificate(c) {
            return Err(Error::BadCertificate {
                flag,
                path: path.to_path_buf(),
                index: i + 1,
                detail: e.to_string(),
            });
        }
    }
    Ok(certs)
}

/// Load the first private key of a PEM file: PKCS#8, PKCS#1 or SEC1.
pub fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, Error> {
    let bytes = read("--key", path)?;
    match PrivateKeyDer::from_pem_slice(&bytes) {
        Ok(k) => Ok(k),
        Err(pem::Error::NoItemsFound) => {
            if bytes
                .windows(27)
                .any(|w| w == b"BEGIN ENCRYPTED PRIVATE KEY")
            {
                Err(Error::EncryptedKey {
                    path: path.to_path_buf(),
                })
            } else {
                Err(Error::NoKey {
                    path: path.to_path_buf(),
                })
            }
        }
        Err(e) => Err(pem_error("--key", path, e)),
    }
}

/// Load a CA bundle into a root store; every certificate in it must be usable.
pub fn ca_bundle(path: &Path) -> Result<RootCertStore, Error> {
    let certs = certificates("--ca", path)?;
    let mut roots = RootCertStore::empty();
    for (i, c) in certs.into_iter().enumerate() {
        roots.add(c).map_err(|e| Error::BadCa {
            path: path.to_path_buf(),
            index: i + 1,
            detail: e.to_string(),
        })?;
    }
    Ok(roots)
}

/// The system trust store; honours `SSL_CERT_FILE` and `SSL_CERT_DIR`.
pub fn system_roots() -> Result<RootCertStore, Error> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (_added, _ignored) = roots.add_parsable_certificates(found.certs);
    if roots.is_empty() {
        let hint = match found.errors.first() {
            Some(e) => format!(" ({e})"),
            None => String::new(),
        };
        return Err(Error::NoSystemRoots { hint });
    }
    Ok(roots)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, body: &[u8]) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, body).unwrap();
        p
    }

    #[test]
    fn errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.pem");
        let e = certificates("--cert", &missing).unwrap_err().to_string();
        assert!(e.contains("--cert") && e.contains("nope.pem"), "{e}");

        let garbage = write(dir.path(), "garbage.pem", b"\x00\x01 not pem at all");
        let e = certificates("--cert", &garbage).unwrap_err().to_string();
        assert!(
            e.contains("garbage.pem") && e.contains("no PEM certificate"),
            "{e}"
        );
        let e = private_key(&garbage).unwrap_err().to_string();
        assert!(
            e.contains("garbage.pem") && e.contains("no private key"),
            "{e}"
        );

        let bad = write(
            dir.path(),
            "bad.pem",
            b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        );
        let e = certificates("--ca", &bad).unwrap_err().to_string();
        assert!(
            e.contains("bad.pem") && e.contains("cannot be parsed"),
            "{e}"
        );

        let enc = write(
            dir.path(),
            "enc.key",
            b"-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n",
        );
        let e = private_key(&enc).unwrap_err().to_string();
        assert!(e.contains("encrypted"), "{e}");
    }

    #[test]
    fn loads_generated_material() {
        let dir = tempfile::tempdir().unwrap();
        let pki = crate::pki::DevPki::generate().unwrap();
        pki.write(dir.path()).unwrap();
        let chain = certificates("--cert", &dir.path().join("client.pem")).unwrap();
        assert_eq!(chain.len(), 1);
        private_key(&dir.path().join("client-key.pem")).unwrap();
        let roots = ca_bundle(&dir.path().join("ca.pem")).unwrap();
        assert_eq!(roots.len(), 1);
    }
}
