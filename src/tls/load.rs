//! Reading certificate material: every file a route's TLS configuration is built from is read
//! once into a [`Material`] snapshot, which is then parsed (PEM chains, PKCS#8 / PKCS#1 / SEC1
//! and encrypted PKCS#8 keys, PKCS#12, CA bundles, CRLs). Building from one snapshot keeps a
//! reload consistent, and the snapshot's digest tells whether anything changed, by content.
//! Every error names the flag and the file, and says what is wrong in words an operator can act
//! on. Passwords never appear in errors or logs.

use std::path::{Path, PathBuf};

use rustls::RootCertStore;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{
    CertificateDer, CertificateRevocationListDer, PrivateKeyDer, PrivatePkcs8KeyDer,
};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {flag} {}: {source}", path.display())]
    Read {
        flag: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{flag} {} is not a regular file ({kind}); point it at a file", path.display())]
    NotRegularFile {
        flag: &'static str,
        path: PathBuf,
        kind: &'static str,
    },
    #[error(
        "{flag} {} is larger than the 64 MiB limit ({size} bytes); is it the right file?",
        path.display()
    )]
    TooLarge {
        flag: &'static str,
        path: PathBuf,
        size: u64,
    },
    #[error(
        "{flag} {}: the key's password derivation asks for {what}, over the limit of {limit}; \
         re-encrypt the key with cheaper parameters",
        path.display()
    )]
    TooExpensive {
        flag: &'static str,
        path: PathBuf,
        what: String,
        limit: &'static str,
    },
    #[error(
        "{flag} {} holds no PEM certificate (expected a \"-----BEGIN CERTIFICATE-----\" block)",
        path.display()
    )]
    NoCertificate { flag: &'static str, path: PathBuf },
    #[error(
        "--key {} holds no private key (expected PEM \"BEGIN PRIVATE KEY\" (PKCS#8), \"BEGIN RSA \
         PRIVATE KEY\" (PKCS#1), \"BEGIN EC PRIVATE KEY\" (SEC1) or \"BEGIN ENCRYPTED PRIVATE \
         KEY\")",
        path.display()
    )]
    NoKey { path: PathBuf },
    #[error("--key {} is an encrypted PKCS#8 key: pass --key-password-file", path.display())]
    EncryptedKeyNeedsPassword { path: PathBuf },
    #[error(
        "wrong password for {flag} {} (from {password_flag} {}): it does not decrypt",
        path.display(), password_path.display()
    )]
    WrongPassword {
        flag: &'static str,
        path: PathBuf,
        password_flag: &'static str,
        password_path: PathBuf,
    },
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
    #[error("{flag} {} cannot be used: {detail}", path.display())]
    BadKey {
        flag: &'static str,
        path: PathBuf,
        detail: String,
    },
    #[error("--pkcs12 {}: {detail}", path.display())]
    BadPkcs12 { path: PathBuf, detail: String },
    #[error(
        "--key {} does not belong to the certificate in --cert {} (their public keys differ)",
        key.display(), cert.display()
    )]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("{flag} {}: certificate {index} is not usable as a trust anchor: {detail}", path.display())]
    BadCa {
        flag: &'static str,
        path: PathBuf,
        index: usize,
        detail: String,
    },
    #[error("--crl {} holds no PEM CRL (expected a \"-----BEGIN X509 CRL-----\" block)", path.display())]
    NoCrl { path: PathBuf },
    #[error("--crl {} cannot be used: {detail}", path.display())]
    BadCrl { path: PathBuf, detail: String },
    #[error(
        "no {flag} given and the system trust store has no certificates{hint}; pass {flag} FILE"
    )]
    NoSystemRoots { flag: &'static str, hint: String },
}

impl Error {
    /// A mismatch between certificate and key can be a writer between its two steps.
    pub fn is_key_mismatch(&self) -> bool {
        matches!(self, Error::KeyMismatch { .. })
    }
}

/// The largest file the program reads (any of them: certificates, keys, CRLs, config).
pub const MAX_FILE_BYTES: u64 = 64 << 20;
/// The most memory an scrypt-encrypted key may ask for (128 * r * (N + p) bytes).
const MAX_KDF_MEMORY: u64 = 256 << 20;
/// The most PBKDF2 iterations an encrypted key may ask for.
const MAX_KDF_ITERATIONS: u64 = 10_000_000;

/// Read a file the program depends on, refusing what could cost unbounded memory or time or
/// never end: anything not a regular file (a FIFO would block the reader forever, `/dev/zero`
/// never ends) and anything over [`MAX_FILE_BYTES`]. The path is stat-ed first, then opened
/// with `O_NONBLOCK` (so a FIFO swapped in between cannot block the open), checked again on the
/// open descriptor, and read at most one byte past the limit.
pub fn read_bounded(flag: &'static str, path: &Path) -> Result<Zeroizing<Vec<u8>>, Error> {
    read_bounded_mode(flag, path).map(|(bytes, _)| bytes)
}

/// [`read_bounded`], also returning the file's permission bits (of the file opened).
fn read_bounded_mode(flag: &'static str, path: &Path) -> Result<(Zeroizing<Vec<u8>>, u32), Error> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    use std::os::unix::fs::PermissionsExt;
    let read_err = |source| Error::Read {
        flag,
        path: path.to_path_buf(),
        source,
    };
    let check = |meta: &std::fs::Metadata| -> Result<(), Error> {
        if !meta.is_file() {
            return Err(Error::NotRegularFile {
                flag,
                path: path.to_path_buf(),
                kind: file_kind(meta),
            });
        }
        if meta.len() > MAX_FILE_BYTES {
            return Err(Error::TooLarge {
                flag,
                path: path.to_path_buf(),
                size: meta.len(),
            });
        }
        Ok(())
    };
    check(&std::fs::metadata(path).map_err(read_err)?)?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(read_err)?;
    let meta = file.metadata().map_err(read_err)?;
    check(&meta)?;
    // Zeroizing from the start: a growing Vec would leave copies of the content behind, so
    // reserve the size stat reported (plus one byte to see growth past the limit).
    let mut bytes = Zeroizing::new(Vec::with_capacity(meta.len() as usize + 1));
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(Error::TooLarge {
            flag,
            path: path.to_path_buf(),
            size: bytes.len() as u64,
        });
    }
    Ok((bytes, meta.permissions().mode()))
}

fn file_kind(meta: &std::fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}

/// Where a PEM parse went wrong, in words and a line number, never the content: the
/// pki-types error carries the offending bytes (a whole base64 key when its newlines were
/// lost), so it is never printed.
fn pem_problem(bytes: &[u8], e: &pem::Error) -> String {
    // The line of the first BEGIN marker whose block does not end, or of the first marker.
    let mut open: Option<usize> = None;
    let mut first: Option<usize> = None;
    let mut unterminated: Option<usize> = None;
    for (i, line) in bytes.split(|b| *b == b'\n').enumerate() {
        let has = |m: &[u8]| line.windows(m.len()).any(|w| w == m);
        if has(b"-----BEGIN ") {
            first.get_or_insert(i + 1);
            if open.is_some() {
                unterminated.get_or_insert(open.unwrap_or(i + 1));
            }
            open = Some(i + 1);
            // BEGIN and END on one line: the newlines became spaces.
            if has(b"-----END ") {
                unterminated.get_or_insert(i + 1);
                open = None;
            }
        } else if has(b"-----END ") {
            open = None;
        }
    }
    let line = unterminated.or(open).or(first).unwrap_or(1);
    match e {
        pem::Error::MissingSectionEnd { .. } => format!(
            "the PEM block starting on line {line} has no END line where expected (were its \
             newlines turned into spaces, as `echo $KEY > file` does?)"
        ),
        pem::Error::IllegalSectionStart { .. } => {
            format!("line {line}: malformed PEM BEGIN line")
        }
        pem::Error::Base64Decode(_) => {
            format!("the PEM block starting on line {line} is not valid base64")
        }
        pem::Error::Io(_) => "it cannot be read as PEM".into(),
        _ => format!("the PEM block starting on line {line} cannot be parsed"),
    }
}

/// One file's bytes with the flag and path it came from, for error messages. The bytes are
/// wiped from memory when the last copy is dropped (they may be a key or a password).
#[derive(Clone)]
pub struct FileBytes {
    pub flag: &'static str,
    pub path: PathBuf,
    pub bytes: Zeroizing<Vec<u8>>,
    /// Permission bits when read: a key readable by others is warned about.
    pub mode: u32,
}

impl std::fmt::Debug for FileBytes {
    // Never print the bytes: they may be a key or a password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "FileBytes({} {}, {} bytes)",
            self.flag,
            self.path.display(),
            self.bytes.len()
        )
    }
}

impl FileBytes {
    pub fn read(flag: &'static str, path: &Path) -> Result<Self, Error> {
        let (bytes, mode) = read_bounded_mode(flag, path)?;
        Ok(FileBytes {
            flag,
            path: path.to_path_buf(),
            bytes,
            mode,
        })
    }

    /// A password file holds the password alone; one trailing newline is ignored.
    pub fn password(&self) -> &[u8] {
        let b = self.bytes.strip_suffix(b"\n").unwrap_or(&self.bytes);
        b.strip_suffix(b"\r").unwrap_or(b)
    }

    fn pem_error(&self, e: pem::Error) -> Error {
        Error::BadPem {
            flag: self.flag,
            path: self.path.clone(),
            detail: pem_problem(&self.bytes, &e),
        }
    }
}

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
}

impl IdentitySource {
    /// The file an operator knows the identity by (for logs).
    pub fn main_file(&self) -> &std::path::Path {
        match self {
            IdentitySource::Pem { cert, .. } => cert,
            IdentitySource::Pkcs12 { file, .. } => file,
        }
    }
}

/// Every file of a route's TLS configuration, read at one moment.
#[derive(Debug, Clone)]
pub struct Material {
    pub identity: IdentityBytes,
    pub ca: Option<FileBytes>,
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
    use super::*;

    fn file(flag: &'static str, name: &str, body: &[u8]) -> FileBytes {
        FileBytes {
            flag,
            path: PathBuf::from(name),
            bytes: Zeroizing::new(body.to_vec()),
            mode: 0o600,
        }
    }

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

    #[test]
    fn password_file_drops_one_trailing_newline() {
        assert_eq!(file("p", "p", b"secret\n").password(), b"secret");
        assert_eq!(file("p", "p", b"secret\r\n").password(), b"secret");
        assert_eq!(file("p", "p", b"secret\n\n").password(), b"secret\n");
        assert_eq!(file("p", "p", b"secret").password(), b"secret");
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
