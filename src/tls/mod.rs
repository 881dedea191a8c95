//! TLS material: loading from disk, building the client configuration, upstream checks and
//! reloading.

pub mod identity;
pub mod load;
pub mod reload;
pub mod verify;
