//! The listening sockets: taken over from a supervisor (systemd socket activation, or a
//! predecessor handing them on through `LISTEN_FDS`) so that restarts refuse no client, or
//! bound here: dual-stack where IPv6 exists, a deep accept queue, and an error that says
//! what to do when a port below 1024 needs privilege.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;

/// Why a listener could not be bound.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// Binding a privileged port without the privilege.
    #[error(
        "cannot listen on {addr}: permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE: \
         run as root, `setcap cap_net_bind_service=+ep` the binary, or choose ports above 1023)"
    )]
    Privilege { addr: SocketAddr },
    /// Any other bind or listen failure.
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
}

/// Listening sockets inherited through `LISTEN_FDS`, not yet claimed by a listener.
#[derive(Debug, Default)]
pub(crate) struct Inherited(Vec<std::net::TcpListener>);

impl Inherited {
    /// Takes the TCP listeners passed to this process (`LISTEN_PID` must be ours).
    pub(crate) fn from_env() -> Self {
        let mut fds = listenfd::ListenFd::from_env();
        Inherited(
            (0..fds.len())
                .filter_map(|i| fds.take_tcp_listener(i).ok().flatten())
                .collect(),
        )
    }

    /// Claims the inherited socket listening on `addr`: same port, and the same IP or both
    /// unspecified (`[::]` and `0.0.0.0` both mean "every address").
    fn take(&mut self, addr: SocketAddr) -> Option<std::net::TcpListener> {
        let position = self.0.iter().position(|listener| {
            listener.local_addr().is_ok_and(|local| {
                local.port() == addr.port()
                    && (local.ip() == addr.ip()
                        || (local.ip().is_unspecified() && addr.ip().is_unspecified()))
            })
        })?;
        Some(self.0.swap_remove(position))
    }

    /// Addresses of inherited sockets that no listener claimed.
    pub(crate) fn unclaimed(&self) -> Vec<String> {
        self.0
            .iter()
            .map(|l| {
                l.local_addr()
                    .map_or_else(|e| e.to_string(), |a| a.to_string())
            })
            .collect()
    }
}

/// The listener for `addr`: the inherited socket if there is one, else a new one.
/// `backlog` is the accept-queue length of a new socket (an inherited one keeps its own).
pub(crate) fn listen(
    addr: SocketAddr,
    backlog: u32,
    inherited: &mut Inherited,
) -> Result<TcpListener, ListenError> {
    let Some(listener) = inherited.take(addr) else {
        return bind(addr, backlog);
    };
    tracing::info!(%addr, "using inherited listening socket");
    listener
        .set_nonblocking(true)
        .and_then(|()| TcpListener::from_std(listener))
        .map_err(|source| ListenError::Bind { addr, source })
}

/// Binds `addr`. An unspecified IPv6 address listens dual-stack, falling back to IPv4 only
/// on hosts without IPv6.
pub(crate) fn bind(addr: SocketAddr, backlog: u32) -> Result<TcpListener, ListenError> {
    match bind_exact(addr, backlog) {
        Err(e)
            if addr.ip().is_unspecified()
                && addr.is_ipv6()
                && e.raw_os_error() == Some(libc::EAFNOSUPPORT) =>
        {
            tracing::warn!(%addr, "IPv6 is unavailable; listening on IPv4 only");
            bind(
                SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), addr.port()),
                backlog,
            )
        }
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            Err(ListenError::Privilege { addr })
        }
        Err(source) => Err(ListenError::Bind { addr, source }),
        Ok(listener) => Ok(listener),
    }
}

fn bind_exact(addr: SocketAddr, backlog: u32) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(i32::try_from(backlog).unwrap_or(i32::MAX))?;
    TcpListener::from_std(socket.into())
}
