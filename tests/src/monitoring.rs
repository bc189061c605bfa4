//! Real Prometheus and Alertmanager (Debian's packages) inside a test's namespace, fed with a
//! copy of `monitoring/` that only the test's timings differ from, plus the webhook sink the
//! shipped Alertmanager receivers post to.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;

use crate::client::raw_http;
use crate::netns::NetNs;
use crate::process::Process;

/// Where Prometheus listens in the namespace (the proxy's admin listener has 9090).
pub const PROMETHEUS: &str = "127.0.0.1:9091";
/// Where Alertmanager listens.
pub const ALERTMANAGER: &str = "127.0.0.1:9093";
/// Where the shipped receivers post alerts.
pub const WEBHOOK: &str = "127.0.0.1:9095";

/// The repository's `monitoring/` directory.
pub fn monitoring_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../monitoring")
}

/// Copies `monitoring/` into `dest`, rewriting each file through `edit(relative path, text)`.
pub fn copy_tree(dest: &Path, edit: &dyn Fn(&str, String) -> String) {
    proxy_testkit::tree::copy_tree(&monitoring_dir(), dest, &|path, bytes| {
        let text = String::from_utf8_lossy(&bytes).into_owned();
        edit(&path.to_string_lossy(), text).into_bytes()
    })
    .unwrap_or_else(|e| panic!("copying monitoring/ to {}: {e}", dest.display()));
}

/// Runs Debian's `promtool`/`amtool`/... and returns (success, stdout + stderr).
pub fn tool(program: &str, args: &[&str], dir: &Path) -> (bool, String) {
    let output = Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} (is its Debian package installed?): {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

/// Prometheus running in `ns` with `config`, storing under `data`.
pub fn start_prometheus(ns: &NetNs, config: &Path, data: &Path, stderr: PathBuf) -> Process {
    let mut cmd = ns.command("prometheus");
    cmd.arg(format!("--config.file={}", config.display()))
        .arg(format!("--web.listen-address={PROMETHEUS}"))
        .arg(format!("--storage.tsdb.path={}", data.display()));
    let mut process = Process::spawn("prometheus", cmd, stderr);
    process.wait_ready(|| is_ready(ns, PROMETHEUS));
    process
}

/// Alertmanager running in `ns` with `config`.
pub fn start_alertmanager(ns: &NetNs, config: &Path, data: &Path, stderr: PathBuf) -> Process {
    let mut cmd = ns.command("prometheus-alertmanager");
    cmd.arg(format!("--config.file={}", config.display()))
        .arg(format!("--web.listen-address={ALERTMANAGER}"))
        .arg(format!("--storage.path={}", data.display()))
        .arg("--cluster.listen-address=");
    let mut process = Process::spawn("alertmanager", cmd, stderr);
    process.wait_ready(|| is_ready(ns, ALERTMANAGER));
    process
}

/// Whether `GET /-/ready` on `addr` in `ns` answers 200 (Prometheus and Alertmanager both
/// serve it).
fn is_ready(ns: &NetNs, addr: &str) -> bool {
    ns.run(|| async {
        raw_http(
            addr,
            b"GET /-/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await
    })
    .is_ok_and(|r| r.status == 200)
}

/// Evaluates `expr` now; returns each series' labels (as `k="v"` text) and value.
pub fn query(ns: &NetNs, expr: &str) -> Result<Vec<(String, f64)>, String> {
    let body: String = form_urlencoded::Serializer::new(String::new())
        .append_pair("query", expr)
        .finish();
    let request = format!(
        "POST /api/v1/query HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let resp = ns.run(|| async move { raw_http(PROMETHEUS, request.as_bytes()).await })?;
    let json: serde_json::Value = serde_json::from_slice(&resp.body)
        .map_err(|e| format!("query {expr:?}: not JSON ({e}): {}", resp.text()))?;
    if json["status"] != "success" {
        return Err(format!("query {expr:?} failed: {}", resp.text()));
    }
    let data = &json["data"];
    let samples = match data["resultType"].as_str() {
        Some("vector") => data["result"].as_array().cloned().unwrap_or_default(),
        Some("scalar") => vec![serde_json::json!({"metric": {}, "value": data["result"]})],
        other => return Err(format!("query {expr:?}: unexpected result type {other:?}")),
    };
    Ok(samples
        .iter()
        .map(|sample| {
            let labels = sample["metric"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .unwrap_or_default();
            let value = sample["value"][1]
                .as_str()
                .and_then(|v| v.parse().ok())
                .unwrap_or(f64::NAN);
            (labels, value)
        })
        .collect())
}

/// The alerts Prometheus holds now: (alertname, state).
pub fn alerts(ns: &NetNs) -> Vec<(String, String)> {
    let resp = ns
        .run(|| async {
            raw_http(
                PROMETHEUS,
                b"GET /api/v1/alerts HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            )
            .await
        })
        .unwrap_or_else(|e| panic!("GET /api/v1/alerts: {e}"));
    let json: serde_json::Value = serde_json::from_slice(&resp.body).unwrap_or_default();
    json["data"]["alerts"]
        .as_array()
        .map(|alerts| {
            alerts
                .iter()
                .map(|a| {
                    (
                        a["labels"]["alertname"]
                            .as_str()
                            .unwrap_or_default()
                            .to_owned(),
                        a["state"].as_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// An HTTP sink for Alertmanager's webhooks, recording every body it receives.
pub struct WebhookSink {
    pub received: Arc<Mutex<Vec<String>>>,
}

impl WebhookSink {
    /// Listens on [`WEBHOOK`] in `ns` for at most `lifetime`.
    pub fn start(ns: &NetNs, lifetime: Duration) -> WebhookSink {
        let received = Arc::new(Mutex::new(Vec::new()));
        let sink = received.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        ns.spawn(move || async move {
            let listener = TcpListener::bind(WEBHOOK)
                .await
                .expect("bind the webhook sink");
            let _ = ready_tx.send(());
            let deadline = Instant::now() + lifetime;
            while let Ok(Ok((mut stream, _))) =
                tokio::time::timeout_at(deadline.into(), listener.accept()).await
            {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 8192];
                // Read until the declared body has arrived (or the peer stops).
                while let Ok(Ok(n)) =
                    tokio::time::timeout(Duration::from_secs(2), stream.read(&mut chunk)).await
                {
                    if n == 0 {
                        break;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    if body_complete(&buf) {
                        break;
                    }
                }
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    .await;
                if let Ok(mut sink) = sink.lock() {
                    sink.push(String::from_utf8_lossy(&buf).into_owned());
                }
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("the webhook sink listens");
        WebhookSink { received }
    }

    /// Every request body received so far, joined.
    pub fn text(&self) -> String {
        self.received
            .lock()
            .map(|r| r.join("\n"))
            .unwrap_or_default()
    }
}

fn body_complete(buf: &[u8]) -> bool {
    let text = String::from_utf8_lossy(buf);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return false;
    };
    let length = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse::<usize>().unwrap_or(0))
        })
        .unwrap_or(0);
    body.len() >= length
}
