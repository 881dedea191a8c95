//! SPIFFE: identities and trust bundles from the Workload API instead of files.
//!
//! - `id`: SPIFFE ID syntax and the trust domain of an ID
//! - `verify`: peer verification by the peer's own trust domain's bundle
//! - `build`: one Workload API update to one identity generation (`tls::identity::Loaded`)
//! - `client`: the stream from the socket, publishing, backoff, withdrawal

pub mod build;
pub mod client;
pub mod id;
pub mod verify;
