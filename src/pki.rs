//! `dev-pki`: a throwaway CA, an upstream server certificate (localhost, 127.0.0.1, ::1) and a
//! client certificate, for trying the program and for tests. Never for production: the CA key
//! is discarded, so nothing else can ever be issued under it.

use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

/// The five PEM files `dev-pki` writes, in memory.
#[derive(Debug, Clone)]
pub struct DevPki {
    pub ca: String,
    pub server: String,
    pub server_key: String,
    pub client: String,
    pub client_key: String,
}

/// The file names, in the order they are listed to the user.
pub const FILES: [&str; 5] = [
    "ca.pem",
    "server.pem",
    "server-key.pem",
    "client.pem",
    "client-key.pem",
];

fn params(cn: &str, sans: Vec<SanType>) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    p.distinguished_name = dn;
    p.subject_alt_names = sans;
    let now = OffsetDateTime::now_utc();
    p.not_before = now - Duration::hours(1);
    p.not_after = now + Duration::days(365);
    p
}

impl DevPki {
    pub fn generate() -> Result<Self, rcgen::Error> {
        let ca_key = KeyPair::generate()?;
        // A CA name of its own per PKI: two dev CAs with one name would look alike in every
        // message while trusting neither's certificates.
        let tag: String = ca_key
            .public_key_raw()
            .iter()
            .skip(1)
            .take(4)
            .map(|b| format!("{b:02x}"))
            .collect();
        let mut ca_params = params(&format!("mtls-sidecar dev CA {tag}"), vec![]);
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca_params, ca_key);

        let server_key = KeyPair::generate()?;
        let mut sp = params(
            "localhost",
            vec![
                SanType::DnsName("localhost".try_into()?),
                SanType::IpAddress([127, 0, 0, 1].into()),
                SanType::IpAddress(std::net::Ipv6Addr::LOCALHOST.into()),
            ],
        );
        sp.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        sp.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server = sp.signed_by(&server_key, &issuer)?;

        let client_key = KeyPair::generate()?;
        let mut cp = params(
            "mtls-sidecar-dev-client",
            vec![SanType::DnsName("mtls-sidecar-dev-client".try_into()?)],
        );
        cp.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        cp.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let client = cp.signed_by(&client_key, &issuer)?;

        Ok(DevPki {
            ca: ca_cert.pem(),
            server: server.pem(),
            server_key: server_key.serialize_pem(),
            client: client.pem(),
            client_key: client_key.serialize_pem(),
        })
    }

    fn bodies(&self) -> [&str; 5] {
        [
            &self.ca,
            &self.server,
            &self.server_key,
            &self.client,
            &self.client_key,
        ]
    }

    /// Write the files into `dir` (created if missing); keys get mode 0600. Files already
    /// there are refused (all named) unless `force`: a dev PKI must never silently replace a
    /// key someone is using.
    pub fn write(&self, dir: &Path, force: bool) -> Result<(), WriteError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| WriteError::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        if !force {
            let existing: Vec<String> = FILES
                .iter()
                .map(|name| dir.join(name))
                .filter(|p| p.symlink_metadata().is_ok())
                .map(|p| p.display().to_string())
                .collect();
            if !existing.is_empty() {
                return Err(WriteError::Exists(existing.join(", ")));
            }
        }
        for (name, body) in FILES.iter().zip(self.bodies()) {
            let mode = if name.ends_with("-key.pem") {
                0o600
            } else {
                0o644
            };
            let path = dir.join(name);
            if force {
                // A fresh file, so the mode applies and a symlink is replaced, not followed.
                let _ = std::fs::remove_file(&path);
            }
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(&path)
                .map_err(io(&path))?;
            f.write_all(body.as_bytes()).map_err(io(&path))?;
        }
        Ok(())
    }
}

/// Why `dev-pki` wrote nothing (or not everything).
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error(
        "dev-pki --out: refusing to overwrite existing files: {0}; pass --force to replace them"
    )]
    Exists(String),
    #[error("dev-pki --out: cannot write {}: {source}", path.display())]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_five_files_with_private_keys_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        DevPki::generate()
            .unwrap()
            .write(dir.path(), false)
            .unwrap();
        for f in FILES {
            let meta = std::fs::metadata(dir.path().join(f)).unwrap();
            let mode = meta.permissions().mode() & 0o777;
            if f.ends_with("-key.pem") {
                assert_eq!(mode, 0o600, "{f}");
            }
            assert!(meta.len() > 100, "{f}");
        }
    }
}
