//! Who an inbound route's verified client is, for the access line: the leaf's subject and its
//! first URI (else DNS) SAN, escaped. Each worker remembers the last leaf it described, so a
//! returning client's certificate is not parsed again.

use crate::failure::escape;

/// Who the verified client is, for the access line.
#[derive(Clone)]
pub(super) struct Client {
    /// The leaf's subject.
    pub(super) subject: String,
    /// First URI SAN, else first DNS SAN, else `-`.
    pub(super) id: String,
}

thread_local! {
    /// The last leaf this worker described, and its description: most connections of a route
    /// come from the same few clients, and one comparison of bytes costs less than parsing
    /// the certificate and formatting its subject again (about 19k instructions a connection).
    static LAST_CLIENT: std::cell::RefCell<Option<(Vec<u8>, Client)>> =
        const { std::cell::RefCell::new(None) };
}

impl Client {
    /// The client of the verified leaf `leaf` (DER), the same as [`Client::parse`] gives.
    pub(super) fn of(leaf: Option<&[u8]>) -> Client {
        let Some(der) = leaf else {
            return Client::parse(None);
        };
        let remembered = LAST_CLIENT.with(|last| {
            let last = last.try_borrow().ok()?;
            let (seen, client) = last.as_ref()?;
            (seen.as_slice() == der).then(|| client.clone())
        });
        if let Some(client) = remembered {
            return client;
        }
        let client = Client::parse(Some(der));
        LAST_CLIENT.with(|last| {
            if let Ok(mut last) = last.try_borrow_mut() {
                *last = Some((der.to_vec(), client.clone()));
            }
        });
        client
    }

    /// Parse the leaf for its subject and first URI (else DNS) SAN, both escaped.
    fn parse(leaf: Option<&[u8]>) -> Client {
        let unknown = || Client {
            subject: "-".into(),
            id: "-".into(),
        };
        let Some(Ok((_, cert))) = leaf.map(x509_parser::parse_x509_certificate) else {
            return unknown();
        };
        use x509_parser::extensions::GeneralName;
        let names: Vec<GeneralName<'_>> = cert
            .subject_alternative_name()
            .ok()
            .flatten()
            .map(|e| e.value.general_names.clone())
            .unwrap_or_default();
        let uri = names.iter().find_map(|n| match n {
            GeneralName::URI(u) => Some(u.to_string()),
            _ => None,
        });
        let dns = || {
            names.iter().find_map(|n| match n {
                GeneralName::DNSName(d) => Some(d.to_string()),
                _ => None,
            })
        };
        Client {
            subject: escape(&cert.subject().to_string()).into_owned(),
            id: escape(&uri.or_else(dns).unwrap_or_else(|| "-".into())).into_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;

    use super::Client;

    #[test]
    fn a_remembered_client_is_the_one_parsed() {
        let pki = crate::pki::DevPki::generate().unwrap();
        let der = |pem: &str| CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        let (client, server) = (der(&pki.client), der(&pki.server));
        for leaf in [&client, &client, &server, &client] {
            let (of, parsed) = (Client::of(Some(leaf)), Client::parse(Some(leaf)));
            assert_eq!((&of.subject, &of.id), (&parsed.subject, &parsed.id));
        }
        assert_ne!(
            Client::of(Some(&client)).subject,
            Client::of(Some(&server)).subject
        );
        assert_eq!(Client::of(None).id, "-");
    }
}
