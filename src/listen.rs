//! Listeners: TCP, unix socket files (mode, stale-file replacement, removal at exit, peer uid
//! checks) and sockets passed by systemd (`LISTEN_FDS`, `LISTEN_FDNAMES`).

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

use crate::config::ListenAddr;

/// The accept queue asked of the kernel for TCP and unix listeners we bind (Linux caps it at
/// `net.core.somaxconn`, 4096 by default). tokio and std ask for 128, which a burst of new
/// connections overflows while every accept waits for a `--max-connections` slot or for the
/// one accept loop: the kernel then drops their SYNs and the clients retry only after 1 s.
/// Sockets passed by systemd keep the backlog of their unit (`Backlog=`).
const BACKLOG: i32 = 4096;

/// Ask for [`BACKLOG`] on a socket that is listening already (on Linux a second `listen`
/// only changes the queue's length).
fn deepen_backlog(socket: socket2::SockRef<'_>) -> io::Result<()> {
    socket.listen(BACKLOG)
}

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
        "refusing to listen on {listen} (bound to {addr}): it is not a loopback address, and \
         anyone who can reach it borrows this client identity; pass --allow-non-loopback if that \
         is meant"
    )]
    NonLoopback { listen: String, addr: String },
    #[error(
        "--allow-uid applies only to unix: listeners, and {listen} is a TCP socket (bound to \
         {addr}) whose peers have no local uid to check; remove --allow-uid or listen on a unix \
         socket"
    )]
    UidOnTcp { listen: String, addr: String },
    #[error(
        "no socket named {name:?} was passed by systemd (LISTEN_FDNAMES has {available}); check \
         FileDescriptorName= in the .socket unit"
    )]
    NoSystemdSocket { name: String, available: String },
}

/// At most one log line per `every` for something that can repeat without bound (refused
/// peers, accept errors): a flood must not turn into a log flood. The line that is logged says
/// how many were left out since the previous one.
#[derive(Debug)]
pub struct LogLimit {
    every: std::time::Duration,
    last: Option<std::time::Instant>,
    suppressed: u64,
}

impl LogLimit {
    /// One line a second.
    pub fn per_second() -> Self {
        LogLimit {
            every: std::time::Duration::from_secs(1),
            last: None,
            suppressed: 0,
        }
    }

    /// `Some(n)`: log now, and `n` occurrences were not logged since the last line; `None`:
    /// count this one and log nothing.
    pub fn allow(&mut self) -> Option<u64> {
        let now = std::time::Instant::now();
        match self.last {
            Some(t) if now.saturating_duration_since(t) < self.every => {
                self.suppressed = self.suppressed.saturating_add(1);
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

/// Whether a unix peer may connect under `--allow-uid`: anyone when the list is empty;
/// otherwise only a listed uid, and never a peer whose uid could not be read (SO_PEERCRED
/// failed, or the connection is not a unix one at all): the check fails closed.
pub fn uid_allowed(allow: &[u32], uid: Option<u32>) -> bool {
    allow.is_empty() || uid.is_some_and(|u| allow.contains(&u))
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
                .and_then(|l| deepen_backlog((&l).into()).map(|()| l))
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

    /// The rules of `--listen` applied to what was actually bound, which matters for a socket
    /// passed by systemd (its address is only known now): a TCP socket on a non-loopback
    /// address needs `--allow-non-loopback`, and `--allow-uid` cannot apply to TCP at all.
    pub fn check_rules(
        &self,
        listen: &ListenAddr,
        allow_non_loopback: bool,
        allow_uid: bool,
    ) -> Result<(), Error> {
        let Listener::Tcp(l) = self else {
            return Ok(());
        };
        let addr = l.local_addr().map_err(|source| Error::Bind {
            addr: listen.to_string(),
            source,
        })?;
        if allow_uid {
            return Err(Error::UidOnTcp {
                listen: listen.to_string(),
                addr: addr.to_string(),
            });
        }
        if !allow_non_loopback && !addr.ip().to_canonical().is_loopback() {
            return Err(Error::NonLoopback {
                listen: listen.to_string(),
                addr: addr.to_string(),
            });
        }
        Ok(())
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
    deepen_backlog((&listener).into()).map_err(bind_err)?;
    let socket = UnixSocket {
        listener,
        path: Some(path.to_path_buf()),
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(bind_err)?;
    Ok(Listener::Unix(socket))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_uid_fails_closed() {
        assert!(uid_allowed(&[], None));
        assert!(uid_allowed(&[], Some(7)));
        assert!(uid_allowed(&[0, 7], Some(7)));
        assert!(!uid_allowed(&[0, 7], Some(8)));
        assert!(!uid_allowed(&[0, 7], None), "an unreadable uid is refused");
    }

    #[test]
    fn log_limit_one_a_second_with_a_count() {
        let mut l = LogLimit::per_second();
        assert_eq!(l.allow(), Some(0));
        assert_eq!(l.allow(), None);
        assert_eq!(l.allow(), None);
        l.last = l
            .last
            .and_then(|t| t.checked_sub(std::time::Duration::from_millis(1001)));
        assert_eq!(l.allow(), Some(2));
        assert_eq!(l.allow(), None);
    }
}
