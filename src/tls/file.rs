//! One file of certificate material, read once and within bounds (a regular file, at most
//! [`MAX_FILE_BYTES`]) into a [`FileBytes`] that wipes itself, and the [`Error`] every step of
//! loading returns. Every error names the flag and the file and says what is wrong in words an
//! operator can act on; a PEM problem is described by its line, never by the content (it may be
//! a key). Passwords never appear in errors or logs.

use std::path::{Path, PathBuf};

use rustls::pki_types::pem;
use zeroize::Zeroizing;

/// Why certificate material (or any file read with [`read_bounded`]) cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A `--spiffe` route's identity is streamed from the Workload API (`crate::spiffe`).
    #[error("--spiffe-socket {}: the identity comes from the Workload API, not files", path.display())]
    NotFiles { path: PathBuf },
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
    /// The flag that named the file (`--key`), so an error says which setting to fix.
    pub flag: &'static str,
    /// The file as given, for error messages and the content digest.
    pub path: PathBuf,
    /// The whole content, as read at one moment.
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

    /// The error for a PEM parse of this file that failed, described without its content.
    pub(super) fn pem_error(&self, e: pem::Error) -> Error {
        Error::BadPem {
            flag: self.flag,
            path: self.path.clone(),
            detail: pem_problem(&self.bytes, &e),
        }
    }
}

/// A file held in memory, as the unit tests of tls build them.
#[cfg(test)]
pub(crate) fn test_file(flag: &'static str, name: &str, body: &[u8]) -> FileBytes {
    FileBytes {
        flag,
        path: PathBuf::from(name),
        bytes: Zeroizing::new(body.to_vec()),
        mode: 0o600,
    }
}

#[cfg(test)]
mod tests {
    use super::test_file as file;

    #[test]
    fn password_file_drops_one_trailing_newline() {
        assert_eq!(file("p", "p", b"secret\n").password(), b"secret");
        assert_eq!(file("p", "p", b"secret\r\n").password(), b"secret");
        assert_eq!(file("p", "p", b"secret\n\n").password(), b"secret\n");
        assert_eq!(file("p", "p", b"secret").password(), b"secret");
    }
}
