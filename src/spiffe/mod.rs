//! SPIFFE: identities and trust bundles from the Workload API instead of files.
//!
//! - `id`: SPIFFE ID syntax and the trust domain of an ID

pub mod id;
