//! Listeners: TCP, unix socket files (mode, stale-file replacement, removal at exit, peer uid
//! checks) and sockets passed by systemd (`LISTEN_FDS`, `LISTEN_FDNAMES`).

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

use crate::config::ListenAddr;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: String, source: io::Error },
    #[error(
        "cannot listen on unix:{}: another process is listening there (remove it or pick another path)",
        path.display()
    )]
    UnixInUse { path: PathBuf },
    #[error("cannot listen on unix:{}: the file exists and is not a socket", path.display())]
    NotASocket { path: PathBuf },
    #[error(
        "no socket named {name:?} was passed by systemd (LISTEN_FDNAMES has {available}); check \
         FileDescriptorName= in the .socket unit"
    )]
    NoSystemdSocket { name: String, available: String },
}

/// Sockets passed by systemd, taken by name.
pub struct SystemdFds {
    fds: listenfd::ListenFd,
    names: Vec<String>,
}

impl SystemdFds {
    /// Read `LISTEN_FDS` / `LISTEN_PID` / `LISTEN_FDNAMES` once for the whole process.
    pub fn from_env() -> Self {
        let fds = listenfd::ListenFd::from_env();
        let names = std::env::var("LISTEN_FDNAMES")
            .map(|v| v.split(':').map(str::to_string).collect())
            .unwrap_or_default();
        SystemdFds { fds, names }
    }

    fn take(&mut self, name: &str) -> Result<Listener, Error> {
        let missing = || Error::NoSystemdSocket {
            name: name.to_string(),
            available: if self.names.is_empty() {
                "no names (is the unit socket-activated?)".into()
            } else {
                self.names.join(":")
            },
        };
        let idx = match self.names.iter().position(|n| n == name) {
            Some(i) => i,
            None => return Err(missing()),
        };
        let bind_err = |source| Error::Bind {
            addr: format!("systemd:{name}"),
            source,
        };
        if let Ok(Some(l)) = self.fds.take_tcp_listener(idx) {
            l.set_nonblocking(true).map_err(bind_err)?;
            return Ok(Listener::Tcp(TcpListener::from_std(l).map_err(bind_err)?));
        }
        match self.fds.take_unix_listener(idx) {
            Ok(Some(l)) => {
                l.set_nonblocking(true).map_err(bind_err)?;
                let l = UnixListener::from_std(l).map_err(bind_err)?;
                Ok(Listener::Unix(UnixSocket {
                    listener: l,
                    path: None,
                }))
            }
            _ => Err(missing()),
        }
    }
}

/// A bound unix socket; the file is removed on drop when we created it.
pub struct UnixSocket {
    listener: UnixListener,
    /// Our own socket file; `None` when systemd owns it.
    path: Option<PathBuf>,
}

impl Drop for UnixSocket {
    fn drop(&mut self) {
        if let Some(p) = &self.path {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// A bound listener of any kind.
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixSocket),
}

/// An accepted plaintext connection.
pub enum Conn {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Listener {
    /// Bind (or take from systemd) a listener. Must run inside the runtime.
    pub async fn bind(
        addr: &ListenAddr,
        mode: u32,
        systemd: &mut SystemdFds,
    ) -> Result<Self, Error> {
        match addr {
            ListenAddr::Tcp(a) => TcpListener::bind(a)
                .await
                .map(Listener::Tcp)
                .map_err(|source| Error::Bind {
                    addr: a.to_string(),
                    source,
                }),
            ListenAddr::Unix(path) => bind_unix(path, mode),
            ListenAddr::Systemd(name) => systemd.take(name),
        }
    }

    /// `HOST:PORT` or `unix:PATH`, as bound.
    pub fn describe(&self) -> String {
        match self {
            Listener::Tcp(l) => l
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "?".into()),
            Listener::Unix(u) => match u
                .listener
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(Path::to_path_buf))
            {
                Some(p) => format!("unix:{}", p.display()),
                None => "unix:(unnamed)".into(),
            },
        }
    }

    /// The bound TCP address, if TCP.
    pub fn tcp_addr(&self) -> Option<std::net::SocketAddr> {
        match self {
            Listener::Tcp(l) => l.local_addr().ok(),
            Listener::Unix(_) => None,
        }
    }

    /// Accept one connection; the peer as text for the access log, and for unix sockets the
    /// peer's uid.
    pub async fn accept(&self) -> io::Result<(Conn, String, Option<u32>)> {
        match self {
            Listener::Tcp(l) => {
                let (s, peer) = l.accept().await?;
                Ok((Conn::Tcp(s), peer.to_string(), None))
            }
            Listener::Unix(u) => {
                let (s, _) = u.listener.accept().await?;
                let cred = s.peer_cred().ok();
                let uid = cred.as_ref().map(|c| c.uid());
                let peer = match cred {
                    Some(c) => format!("unix,uid={},pid={}", c.uid(), c.pid().map_or(-1, |p| p)),
                    None => "unix".into(),
                };
                Ok((Conn::Unix(s), peer, uid))
            }
        }
    }

    /// Take the listener out of a `Tcp` variant (the admin listener is TCP-only).
    pub fn into_tcp(self) -> Option<TcpListener> {
        match self {
            Listener::Tcp(l) => Some(l),
            Listener::Unix(_) => None,
        }
    }
}

/// Create a unix socket file with `mode`. A stale file left by a dead process (nothing accepts
/// on it) is replaced; a live one is an error.
fn bind_unix(path: &Path, mode: u32) -> Result<Listener, Error> {
    let bind_err = |source| Error::Bind {
        addr: format!("unix:{}", path.display()),
        source,
    };
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(Error::NotASocket {
                path: path.to_path_buf(),
            });
        }
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => {
                return Err(Error::UnixInUse {
                    path: path.to_path_buf(),
                });
            }
            Err(_) => std::fs::remove_file(path).map_err(bind_err)?,
        }
    }
    let listener = UnixListener::bind(path).map_err(bind_err)?;
    let socket = UnixSocket {
        listener,
        path: Some(path.to_path_buf()),
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(bind_err)?;
    Ok(Listener::Unix(socket))
}
