//! TLS material: loading from disk and building the client configuration.

pub mod identity;
pub mod load;
