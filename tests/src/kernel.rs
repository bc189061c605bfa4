//! Helpers of the kernel tests: traffic in exact amounts, waiting for kernel counters that
//! move when connections close, nftables in a namespace, and child cgroups.

use std::io::Write as _;
use std::time::Duration;

use crate::client::{self, Req};
use crate::{HTTP, Metrics, NetNs, Proxy, TestEnv, poll_until, run_with_timeout};

/// `n` HTTPS requests, each on a new connection.
pub fn https_requests(env: &TestEnv, proxy: &Proxy, n: u32) {
    let tls = proxy.tls();
    for _ in 0..n {
        let resp = env
            .run(|| client::https(&tls, Req::get("/")))
            .unwrap_or_else(|e| panic!("HTTPS request failed: {e}"));
        assert_eq!(resp.text(), "Hello SRE!");
    }
}

/// `n` plain-HTTP requests, each on a new connection.
pub fn http_requests(env: &TestEnv, n: u32) {
    for _ in 0..n {
        let resp = env
            .run(|| {
                client::raw_http(
                    HTTP,
                    b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
                )
            })
            .unwrap_or_else(|e| panic!("HTTP request failed: {e}"));
        assert_eq!(resp.status, 308);
    }
}

/// Scrapes until `n` more connections to `listener` (`http` or `https`) have closed (closing
/// is asynchronous).
pub fn wait_for_closed(env: &TestEnv, before: &Metrics, listener: &str, n: f64) -> Metrics {
    let labels = [("listener", listener)];
    let base = before
        .get("proxy_tcp_connections_closed_total", &labels)
        .unwrap_or(0.0);
    poll_metrics(env, |m| {
        (m.value("proxy_tcp_connections_closed_total", &labels) - base >= n).then_some(())
    })
}

pub fn poll_metrics(env: &TestEnv, mut done: impl FnMut(&Metrics) -> Option<()>) -> Metrics {
    let mut last = None;
    let found = poll_until(Duration::from_secs(10), || {
        let metrics = env.metrics();
        let ok = done(&metrics).is_some();
        last = Some(metrics);
        ok.then_some(())
    });
    let last = last.expect("scraped at least once");
    assert!(
        found.is_some(),
        "kernel metrics never reached the expected values; last scrape:\n{}",
        last.text
    );
    last
}

pub fn nft(ns: &NetNs, args: &[&str]) {
    let mut cmd = ns.command("nft");
    cmd.args(args);
    let output = run_with_timeout(cmd, Duration::from_secs(10));
    assert!(
        output.status.success(),
        "nft {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A child cgroup of the cgroup v2 root, removed on drop.
pub struct Cgroup {
    pub path: std::path::PathBuf,
    /// The path as `/proc/PID/cgroup` shows it.
    pub relative: String,
}

impl Cgroup {
    pub fn new(tag: &str) -> Cgroup {
        let root = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
            .into_iter()
            .find(|p| {
                std::path::Path::new(p).join("cgroup.procs").exists()
                    && std::path::Path::new(p).join("cgroup.controllers").exists()
            })
            .expect("a cgroup v2 hierarchy");
        let name = format!("proxy-e2e-{tag}-{}", std::process::id());
        let path = std::path::Path::new(root).join(&name);
        std::fs::create_dir_all(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        Cgroup {
            path,
            relative: format!("/{name}"),
        }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // The proxy is gone by now (declared after it); move any straggler out first.
        let _ = std::fs::read_to_string(self.path.join("cgroup.procs")).map(|procs| {
            for pid in procs.lines() {
                let _ = std::fs::OpenOptions::new()
                    .write(true)
                    .open(
                        self.path
                            .parent()
                            .map(|p| p.join("cgroup.procs"))
                            .unwrap_or_default(),
                    )
                    .and_then(|mut f| f.write_all(pid.as_bytes()));
            }
        });
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// The cgroup v2 path of the proxy process.
pub fn cgroup_of(proxy: &Proxy) -> String {
    let status = std::fs::read_to_string(format!("/proc/{}/cgroup", proxy.process.pid()))
        .unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .unwrap_or_default()
        .to_owned()
}

/// Drops, on the way in, the SYN-ACKs sent from `port` in `ns` (a drop on the way out would
/// be a local send error, not a loss): a connect to that port then completes only after the
/// kernel's 1 s retransmission. Adds the nftables table `inet e2e`; `nft(ns, &["delete",
/// "table", "inet", "e2e"])` ends the loss.
pub fn drop_syn_acks_from(ns: &NetNs, port: u16) {
    let port = port.to_string();
    nft(ns, &["add", "table", "inet", "e2e"]);
    nft(
        ns,
        &[
            "add",
            "chain",
            "inet",
            "e2e",
            "lossy",
            "{ type filter hook input priority 0; }",
        ],
    );
    nft(
        ns,
        &[
            "add",
            "rule",
            "inet",
            "e2e",
            "lossy",
            "tcp",
            "sport",
            &port,
            "tcp",
            "flags",
            "&",
            "(syn|ack)",
            "==",
            "syn|ack",
            "drop",
        ],
    );
}

/// The number in `field=NUMBER` of a plain log line, if the line has that field.
pub fn log_number(line: &str, field: &str) -> Option<f64> {
    line.split_whitespace()
        .find_map(|part| part.strip_prefix(field)?.strip_prefix('='))
        .and_then(|value| value.parse().ok())
}
