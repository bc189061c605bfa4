//! Zero-drop restart outside systemd: on SIGUSR2 the proxy starts its successor on the same
//! listening sockets, and under continuous load (a new TLS connection per request, HTTP/1.1
//! and HTTP/2) not one request fails or is refused while the process is replaced; the
//! successor's kernel counters show no accept-queue overflow and no reset sent.

use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use proxy_e2e::load::{Load, LoadPlan};
use proxy_e2e::{TestEnv, poll_until, soak_figure};

#[test]
fn sigusr2_hands_the_sockets_to_a_successor_without_a_failed_request() {
    let Some(env) = TestEnv::new("handover") else {
        return;
    };
    let mut proxy = env.serve(&["--ebpf", "required"]);
    let old_pid = proxy.process.pid();
    let load = Load::start(
        &env.ns,
        proxy.tls(),
        LoadPlan {
            max_duration: Duration::from_secs(8),
            ..LoadPlan::default()
        },
    );
    std::thread::sleep(Duration::from_secs(2));
    proxy.signal(Signal::SIGUSR2);

    let status = proxy.process.wait_exit(Duration::from_secs(20));
    assert!(
        status.is_some_and(|s| s.success()),
        "the old process should drain and exit 0: {status:?}"
    );
    let log = proxy.process.stderr();
    let successor = log
        .lines()
        .find_map(|line| line.split("successor=").nth(1))
        .and_then(|rest| rest.split_whitespace().next()?.parse::<i32>().ok())
        .unwrap_or_else(|| panic!("no successor in the log:\n{log}"));
    // The successor outlives the test's process handle: kill it whatever happens below.
    let _successor = KillOnDrop(Pid::from_raw(successor));
    assert_ne!(Pid::from_raw(successor), old_pid);

    // Keep the load on the successor alone for a while.
    std::thread::sleep(Duration::from_secs(2));
    let report = load.finish();
    soak_figure(
        "SIGUSR2 handover under h1+h2 load",
        &format!(
            "{} failed of {} requests",
            report.failed,
            report.ok + report.failed
        ),
    );
    assert!(
        report.ok > 50,
        "too little load to prove anything: {report:?}"
    );
    assert_eq!(
        report.failed, 0,
        "requests failed during the handover: {:?}",
        report.errors
    );

    let metrics = poll_until(Duration::from_secs(5), || {
        let m = env.metrics();
        m.has("proxy_tcp_connections_total").then_some(m)
    })
    .unwrap_or_else(|| panic!("the successor serves no kernel metrics"));
    assert_eq!(
        metrics.value("proxy_ebpf_attached", &[("program", "sock_ops")]),
        1.0
    );
    assert!(
        metrics.value("proxy_tcp_connections_total", &[("listener", "https")]) > 0.0,
        "the successor took connections"
    );
    assert!(
        metrics.value(
            "proxy_http_requests_total",
            &[("listener", "https"), ("code", "200")]
        ) > 10.0,
        "the successor served the load"
    );
    assert_eq!(
        metrics.value("proxy_tcp_listen_overflows_total", &[]),
        0.0,
        "connections overflowed the accept queue"
    );
    assert_eq!(
        metrics.value(
            "proxy_tcp_resets_total",
            &[("listener", "https"), ("direction", "sent")]
        ),
        0.0,
        "the successor reset connections"
    );
    eprintln!(
        "handover under load: {} requests, {} failed",
        report.ok, report.failed
    );
}

struct KillOnDrop(Pid);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = kill(self.0, Signal::SIGKILL);
    }
}
