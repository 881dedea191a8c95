//! `--protocol`: an in-band TLS start spoken for the app before the upstream handshake.

use clap::ValueEnum;

/// `--protocol`: what the upstream speaks before TLS starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum Protocol {
    /// TLS from the first byte (the default).
    #[default]
    None,
    /// PostgreSQL up to 16: `SSLRequest`, the server answers `S`, then TLS. The app speaks plain
    /// PostgreSQL to the listener.
    Postgres,
}

impl Protocol {
    /// As written on the command line and in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::None => "none",
            Protocol::Postgres => "postgres",
        }
    }
}
