//! Reading certificate material: every file a route's TLS configuration is built from is read
//! once into a [`Material`] snapshot, which is then parsed: PEM chains, CA bundles and CRLs
//! here, keys in [`super::keys`], each file read as [`super::file`] bounds it. Building from one
//! snapshot keeps a reload consistent, and the snapshot's digest tells whether anything changed,
//! by content. Every error names the flag and the file, and says what is wrong in words an
//! operator can act on. Passwords never appear in errors or logs.

use std::path::PathBuf;

use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use sha2::{Digest, Sha256};

pub use super::file::{Error, FileBytes, MAX_FILE_BYTES, read_bounded};
pub use super::keys::{pkcs12, private_key};

/// Where the client identity comes from, as read.
#[derive(Debug, Clone)]
pub enum IdentityBytes {
    Pem {
        cert: FileBytes,
        key: FileBytes,
        password: Option<FileBytes>,
    },
    Pkcs12 {
        file: FileBytes,
        password: Option<FileBytes>,
    },
}

/// Files that make a route's TLS client configuration.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TlsFiles {
    /// The client certificate and key.
    pub identity: IdentitySource,
    /// `None` = the system trust store (honours `SSL_CERT_FILE`).
    pub ca: Option<PathBuf>,
    /// CRLs applied to the upstream chain.
    pub crls: Vec<PathBuf>,
}

/// Where the client certificate and key come from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum IdentitySource {
    Pem {
        cert: PathBuf,
        key: PathBuf,
        key_password: Option<PathBuf>,
    },
    Pkcs12 {
        file: PathBuf,
        password: Option<PathBuf>,
    },
    /// `--spiffe`: an X.509-SVID and its trust bundles, streamed from the Workload API.
    Spiffe(SpiffeSource),
}

/// Where a `--spiffe` route's identity comes from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SpiffeSource {
    /// The Workload API's unix socket (`--spiffe-socket`, else `SPIFFE_ENDPOINT_SOCKET`).
    pub socket: PathBuf,
    /// `--spiffe-id`: the SVID to use; `None` = the first one the API sends.
    pub id: Option<String>,
}

impl IdentitySource {
    /// The file an operator knows the identity by (for logs).
    pub fn main_file(&self) -> &std::path::Path {
        match self {
            IdentitySource::Pem { cert, .. } => cert,
            IdentitySource::Pkcs12 { file, .. } => file,
            IdentitySource::Spiffe(s) => &s.socket,
        }
    }
}

/// Every file of a route's TLS configuration, read at one moment.
#[derive(Debug, Clone)]
pub struct Material {
    /// The client certificate and key, or the PKCS#12 file, with any password file.
    pub identity: IdentityBytes,
    /// `--ca`; `None` trusts the system store.
    pub ca: Option<FileBytes>,
    /// Every `--crl`, in the order given.
    pub crls: Vec<FileBytes>,
}

impl Material {
    /// Read every file; the first unreadable one is the error.
    pub fn read(files: &TlsFiles) -> Result<Self, Error> {
        let opt =
            |flag, p: &Option<PathBuf>| p.as_deref().map(|p| FileBytes::read(flag, p)).transpose();
        let identity = match &files.identity {
            IdentitySource::Pem {
                cert,
                key,
                key_password,
            } => IdentityBytes::Pem {
                cert: FileBytes::read("--cert", cert)?,
                key: FileBytes::read("--key", key)?,
                password: opt("--key-password-file", key_password)?,
            },
            IdentitySource::Pkcs12 { file, password } => IdentityBytes::Pkcs12 {
                file: FileBytes::read("--pkcs12", file)?,
                password: opt("--pkcs12-password-file", password)?,
            },
            IdentitySource::Spiffe(s) => {
                return Err(Error::NotFiles {
                    path: s.socket.clone(),
                });
            }
        };
        Ok(Material {
            identity,
            ca: opt("--ca", &files.ca)?,
            crls: files
                .crls
                .iter()
                .map(|p| FileBytes::read("--crl", p))
                .collect::<Result<_, _>>()?,
        })
    }

    /// SHA-256 over every file's path and content: equal digests mean nothing changed.
    pub fn digest(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        let mut add = |f: &FileBytes| {
            h.update(f.path.as_os_str().as_encoded_bytes());
            h.update((f.bytes.len() as u64).to_le_bytes());
            h.update(&f.bytes);
        };
        match &self.identity {
            IdentityBytes::Pem {
                cert,
                key,
                password,
            } => {
                add(cert);
                add(key);
                password.iter().for_each(&mut add);
            }
            IdentityBytes::Pkcs12 { file, password } => {
                add(file);
                password.iter().for_each(&mut add);
            }
        }
        self.ca.iter().for_each(&mut add);
        self.crls.iter().for_each(&mut add);
        h.finalize().into()
    }

    /// Secret files (key, PKCS#12, passwords) readable by group or others, with their modes.
    pub fn loose_permissions(&self) -> Vec<(&'static str, PathBuf, u32)> {
        let secrets: Vec<&FileBytes> = match &self.identity {
            IdentityBytes::Pem { key, password, .. } => {
                std::iter::once(key).chain(password.iter()).collect()
            }
            IdentityBytes::Pkcs12 { file, password } => {
                std::iter::once(file).chain(password.iter()).collect()
            }
        };
        secrets
            .into_iter()
            .filter(|f| f.mode & 0o044 != 0)
            .map(|f| (f.flag, f.path.clone(), f.mode & 0o777))
            .collect()
    }

    /// Every CRL's file and nextUpdate (Unix seconds), for the stale-CRL warning. CRLs
    /// without a nextUpdate, or that do not parse here, are left out.
    pub fn crl_next_updates(&self) -> Vec<(PathBuf, i64)> {
        let mut out = Vec::new();
        for f in &self.crls {
            for der in CertificateRevocationListDer::pem_slice_iter(&f.bytes).flatten() {
                if let Ok((_, crl)) = x509_parser::parse_x509_crl(&der)
                    && let Some(next) = crl.next_update()
                {
                    out.push((f.path.clone(), next.timestamp()));
                }
            }
        }
        out
    }

    /// The client certificate chain (leaf first) and its private key.
    pub fn identity(
        &self,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), Error> {
        match &self.identity {
            IdentityBytes::Pem {
                cert,
                key,
                password,
            } => Ok((certificates(cert)?, private_key(key, password.as_ref())?)),
            IdentityBytes::Pkcs12 { file, password } => pkcs12(file, password.as_ref()),
        }
    }
}

/// Every certificate of a PEM file, in order. An empty result is an error.
pub fn certificates(f: &FileBytes) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certs = CertificateDer::pem_slice_iter(&f.bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| f.pem_error(e))?;
    if certs.is_empty() {
        return Err(Error::NoCertificate {
            flag: f.flag,
            path: f.path.clone(),
        });
    }
    for (i, c) in certs.iter().enumerate() {
        if let Err(e) = x509_parser::parse_x509_certificate(c) {
            return Err(Error::BadCertificate {
                flag: f.flag,
                path: f.path.clone(),
                index: i + 1,
                detail: e.to_string(),
            });
        }
    }
    Ok(certs)
}

/// A CA bundle as a root store; every certificate in it must be usable.
pub fn ca_bundle(f: &FileBytes) -> Result<RootCertStore, Error> {
    let mut roots = RootCertStore::empty();
    for (i, c) in certificates(f)?.into_iter().enumerate() {
        roots.add(c).map_err(|e| Error::BadCa {
            flag: f.flag,
            path: f.path.clone(),
            index: i + 1,
            detail: e.to_string(),
        })?;
    }
    Ok(roots)
}

/// Every CRL of a PEM file; at least one.
pub fn crls(f: &FileBytes) -> Result<Vec<CertificateRevocationListDer<'static>>, Error> {
    let crls = CertificateRevocationListDer::pem_slice_iter(&f.bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| f.pem_error(e))?;
    if crls.is_empty() {
        return Err(Error::NoCrl {
            path: f.path.clone(),
        });
    }
    Ok(crls)
}

/// Keep one CRL per issuer, the newest (highest CRL number, else latest thisUpdate). webpki
/// consults only the first CRL it finds for an issuer, so an older CRL listed first would hide
/// a newer one's revocations; a CRL of the same issuer supersedes the earlier ones anyway.
pub fn newest_crl_per_issuer(
    crls: Vec<CertificateRevocationListDer<'static>>,
) -> Vec<CertificateRevocationListDer<'static>> {
    type Rank = (Option<Vec<u8>>, i64);
    let mut best: Vec<(Vec<u8>, Rank, CertificateRevocationListDer<'static>)> = Vec::new();
    for der in crls {
        let Ok((_, crl)) = x509_parser::parse_x509_crl(&der) else {
            // Unparsable here: let webpki judge it.
            best.push((Vec::new(), (None, i64::MIN), der));
            continue;
        };
        let issuer = crl.issuer().as_raw().to_vec();
        // Left-pad the number so byte order is numeric order.
        let number = crl.crl_number().map(|n| {
            let b = n.to_bytes_be();
            let mut v = vec![0u8; 32usize.saturating_sub(b.len())];
            v.extend(b);
            v
        });
        let rank: Rank = (number, crl.last_update().timestamp());
        match best
            .iter_mut()
            .find(|(i, _, _)| !i.is_empty() && *i == issuer)
        {
            Some(entry) if rank > entry.1 => {
                entry.1 = rank;
                entry.2 = der;
            }
            Some(_) => {}
            None => best.push((issuer, rank, der)),
        }
    }
    best.into_iter().map(|(_, _, der)| der).collect()
}

/// The system trust store; honours `SSL_CERT_FILE` and `SSL_CERT_DIR`.
pub fn system_roots(flag: &'static str) -> Result<RootCertStore, Error> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (_added, _ignored) = roots.add_parsable_certificates(found.certs);
    if roots.is_empty() {
        let hint = match found.errors.first() {
            Some(e) => format!(" ({e})"),
            None => String::new(),
        };
        return Err(Error::NoSystemRoots { flag, hint });
    }
    Ok(roots)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::tls::file::test_file as file;

    #[test]
    fn errors_name_the_file() {
        let e = FileBytes::read("--cert", Path::new("/nonexistent/nope.pem"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("--cert") && e.contains("nope.pem"), "{e}");

        let garbage = file("--cert", "garbage.pem", b"\x00\x01 not pem at all");
        let e = certificates(&garbage).unwrap_err().to_string();
        assert!(
            e.contains("garbage.pem") && e.contains("no PEM certificate"),
            "{e}"
        );
        let garbage = file("--key", "garbage.pem", b"\x00\x01 not pem at all");
        let e = private_key(&garbage, None).unwrap_err().to_string();
        assert!(
            e.contains("garbage.pem") && e.contains("no private key"),
            "{e}"
        );

        let bad = file(
            "--ca",
            "bad.pem",
            b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        );
        let e = certificates(&bad).unwrap_err().to_string();
        assert!(
            e.contains("bad.pem") && e.contains("cannot be parsed"),
            "{e}"
        );

        let enc = file(
            "--key",
            "enc.key",
            b"-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n",
        );
        let e = private_key(&enc, None).unwrap_err().to_string();
        assert!(e.contains("--key-password-file"), "{e}");
    }

    #[test]
    fn digest_follows_content() {
        let m = |body: &[u8]| Material {
            identity: IdentityBytes::Pkcs12 {
                file: file("--pkcs12", "id.p12", body),
                password: None,
            },
            ca: None,
            crls: vec![],
        };
        assert_eq!(m(b"one").digest(), m(b"one").digest());
        assert_ne!(m(b"one").digest(), m(b"two").digest());
        assert!(!format!("{:?}", m(b"secret-bytes")).contains("secret"));
    }

    #[test]
    fn loads_generated_material() {
        let pki = crate::pki::DevPki::generate().unwrap();
        let chain = certificates(&file("--cert", "client.pem", pki.client.as_bytes())).unwrap();
        assert_eq!(chain.len(), 1);
        private_key(
            &file("--key", "client-key.pem", pki.client_key.as_bytes()),
            None,
        )
        .unwrap();
        let roots = ca_bundle(&file("--ca", "ca.pem", pki.ca.as_bytes())).unwrap();
        assert_eq!(roots.len(), 1);
    }
}
