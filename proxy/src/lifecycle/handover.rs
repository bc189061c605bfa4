//! Restarting without refusing a connection, outside systemd: on SIGUSR2 the proxy starts
//! its successor (the binary on disk now, same arguments and environment) with its listening
//! sockets as `LISTEN_FDS`, waits for the successor's READY=1 on a private notify socket,
//! then stops accepting and drains. The kernel keeps queueing on the shared sockets the whole
//! time, so no client is refused. Under systemd, `proxy.socket` gives the same guarantee.

use std::os::fd::AsFd;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use command_fds::{CommandFdExt, FdMapping};
use tokio::net::TcpListener;

/// How long the successor may take to serve before the handover is abandoned.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// The first descriptor of `LISTEN_FDS` (systemd's convention).
const FIRST_FD: i32 = 3;

/// Why a handover did not happen (the current process keeps serving).
#[derive(Debug, thiserror::Error)]
pub(crate) enum HandoverError {
    /// The successor could not be prepared or started.
    #[error("starting the successor: {0}")]
    Spawn(std::io::Error),
    /// Two listeners mapped to one descriptor (a bug).
    #[error("descriptor mapping: {0}")]
    Mapping(#[from] command_fds::FdMappingCollision),
    /// The successor exited before it was ready.
    #[error("the successor exited before serving: {0}")]
    Exited(std::process::ExitStatus),
    /// The successor did not say READY=1 in time.
    #[error("the successor was not ready within {READY_TIMEOUT:?}")]
    Timeout,
}

/// Starts the successor with `listeners` and returns once it serves. Blocking: run it with
/// `spawn_blocking`.
pub(crate) fn start_successor(listeners: &[&TcpListener]) -> Result<u32, HandoverError> {
    let notify_path = notify_path();
    let _ = std::fs::remove_file(&notify_path);
    let notify = UnixDatagram::bind(&notify_path).map_err(HandoverError::Spawn)?;
    notify
        .set_read_timeout(Some(Duration::from_millis(200)))
        .map_err(HandoverError::Spawn)?;

    let mut mappings = Vec::with_capacity(listeners.len());
    for (offset, listener) in (FIRST_FD..).zip(listeners) {
        let parent_fd = listener
            .as_fd()
            .try_clone_to_owned()
            .map_err(HandoverError::Spawn)?;
        mappings.push(FdMapping {
            parent_fd,
            child_fd: offset,
        });
    }
    let exe = std::env::current_exe().map_err(HandoverError::Spawn)?;
    let mut command = Command::new(exe);
    command
        .args(std::env::args_os().skip(1))
        .env("LISTEN_FDS", listeners.len().to_string())
        // Unset: the successor's pid is not known before it starts; listenfd accepts that.
        .env_remove("LISTEN_PID")
        .env_remove("LISTEN_FDNAMES")
        .env("NOTIFY_SOCKET", &notify_path)
        .fd_mappings(mappings)?;
    let mut child = command.spawn().map_err(HandoverError::Spawn)?;
    let pid = child.id();
    tracing::info!(pid, "successor started; waiting for it to serve");
    let outcome = wait_ready(&notify, &mut child);
    let _ = std::fs::remove_file(&notify_path);
    match outcome {
        Ok(()) => Ok(pid),
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(e)
        }
    }
}

fn wait_ready(notify: &UnixDatagram, child: &mut Child) -> Result<(), HandoverError> {
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut buf = [0u8; 1024];
    while Instant::now() < deadline {
        if let Ok(n) = notify.recv(&mut buf)
            && String::from_utf8_lossy(&buf[..n])
                .lines()
                .any(|line| line == "READY=1")
        {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(HandoverError::Exited(status));
        }
    }
    Err(HandoverError::Timeout)
}

fn notify_path() -> PathBuf {
    std::env::temp_dir().join(format!("proxy-handover-{}.sock", std::process::id()))
}
