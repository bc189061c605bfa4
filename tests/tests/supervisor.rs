//! The systemd notify protocol as a service manager sees it: READY=1 once serving,
//! RELOADING=1 then READY=1 around a SIGHUP, STOPPING=1 on SIGTERM.

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use proxy_e2e::TestEnv;

#[test]
fn notifies_ready_reloading_and_stopping() {
    let Some(env) = TestEnv::new("supervisor") else {
        return;
    };
    let socket_path = env.path("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).expect("bind the notify socket");
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("read timeout");
    let notify = socket_path.display().to_string();
    let mut proxy = env.serve_with_env(&[], &[("NOTIFY_SOCKET", notify.as_str())]);

    let ready = receive_until(&socket, "READY=1");
    assert!(
        ready.contains("STATUS="),
        "READY=1 carries a status: {ready:?}"
    );

    proxy.signal(Signal::SIGHUP);
    receive_until(&socket, "RELOADING=1");
    receive_until(&socket, "READY=1");

    proxy.signal(Signal::SIGTERM);
    receive_until(&socket, "STOPPING=1");
    let status = proxy.process.wait_exit(Duration::from_secs(10));
    assert!(
        status.is_some_and(|s| s.success()),
        "the proxy exits 0 after draining: {status:?}"
    );
}

/// Reads datagrams until one contains `wanted` (bounded to 10 s); returns it.
fn receive_until(socket: &UnixDatagram, wanted: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        if let Ok(n) = socket.recv(&mut buf) {
            let message = String::from_utf8_lossy(&buf[..n]).into_owned();
            if message.lines().any(|line| line == wanted) {
                return message;
            }
            seen.push(message);
        }
    }
    panic!("no {wanted} notification within 10 s; received: {seen:?}");
}
