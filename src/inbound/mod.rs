//! What an inbound route tells the app about the client, as pure functions of values the route
//! already holds: `proxy_protocol` (the PROXY protocol v1 line or v2 header, with the SSL TLV)
//! for tcp mode, `xfcc` (`X-Forwarded-Client-Cert` in Envoy's format and the other forwarded
//! headers) for http mode. No I/O here.

pub mod proxy_protocol;
pub mod xfcc;
