//! Binding the listening sockets: dual-stack where IPv6 exists, a deep accept queue, and an
//! error that says what to do when a port below 1024 needs privilege.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;

/// Connections the kernel queues for us while we are busy; the kernel caps it at somaxconn.
const BACKLOG: i32 = 4096;

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

/// Binds `addr`. An unspecified IPv6 address listens dual-stack, falling back to IPv4 only
/// on hosts without IPv6.
pub fn bind(addr: SocketAddr) -> Result<TcpListener, ListenError> {
    match bind_exact(addr) {
        Err(e)
            if addr.ip().is_unspecified()
                && addr.is_ipv6()
                && e.raw_os_error() == Some(libc::EAFNOSUPPORT) =>
        {
            tracing::warn!(%addr, "IPv6 is unavailable; listening on IPv4 only");
            bind(SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), addr.port()))
        }
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            Err(ListenError::Privilege { addr })
        }
        Err(source) => Err(ListenError::Bind { addr, source }),
        Ok(listener) => Ok(listener),
    }
}

fn bind_exact(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    TcpListener::from_std(socket.into())
}
