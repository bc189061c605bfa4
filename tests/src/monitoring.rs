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

/// Whether the monitoring tools are installed; skips loudly, or fails under PROXY_E2E_REQUIRE.
pub fn tools_present(test: &str) -> bool {
    let tools = [
        "promtool",
        "amtool",
        "yamllint",
        "prometheus",
        "prometheus-alertmanager",
    ];
    tools.iter().all(|tool| crate::on_path(tool))
        || crate::skip(
            test,
            "needs Prometheus, Alertmanager and yamllint (apt-get install prometheus \
             prometheus-alertmanager yamllint; `cargo xtask test` installs them)",
        )
}

/// The YAML files of `dir`, sorted.
pub fn files(dir: &Path) -> Vec<String> {
    let mut files: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|e| e.path().display().to_string())
        .filter(|p| p.ends_with(".yml") || p.ends_with(".yaml"))
        .collect();
    files.sort();
    files
}

/// A shipped dashboard of `monitoring/grafana/dashboards`, parsed.
pub fn dashboard(file: &str) -> serde_json::Value {
    let path = monitoring_dir().join("grafana/dashboards").join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// Every panel of `dashboard`, those inside rows included.
pub fn all_panels(dashboard: &serde_json::Value) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    let mut stack: Vec<serde_json::Value> =
        dashboard["panels"].as_array().cloned().unwrap_or_default();
    while let Some(panel) = stack.pop() {
        stack.extend(panel["panels"].as_array().cloned().unwrap_or_default());
        out.push(panel);
    }
    out
}

/// (panel title, expr) of every query target.
pub fn targets(dashboard: &serde_json::Value) -> Vec<(String, String)> {
    all_panels(dashboard)
        .iter()
        .flat_map(|panel| {
            let title = panel["title"].as_str().unwrap_or_default().to_owned();
            panel["targets"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .filter_map(move |t| t["expr"].as_str().map(|e| (title.clone(), e.to_owned())))
        })
        .collect()
}

/// The `label="value"` matchers of the PromQL in `text` (equality only: `=~`, `!=` and
/// `!~` are left out).
pub fn equality_matchers(text: &str) -> Vec<(String, String)> {
    let mut found = Vec::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("=\"") {
        let eq = i + at;
        i = eq + 2;
        // The label name right before `=`, itself right after `{` or `,` (and spaces).
        let name_start = text[..eq]
            .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map_or(0, |p| p + 1);
        let name = &text[name_start..eq];
        let before = text[..name_start].trim_end();
        if name.is_empty() || !(before.ends_with('{') || before.ends_with(',')) {
            continue;
        }
        if eq > 0 && matches!(bytes[eq - 1], b'!' | b'~') {
            continue;
        }
        let Some(len) = text[i..].find('"') else {
            break;
        };
        found.push((name.to_owned(), text[i..i + len].to_owned()));
        i += len + 1;
    }
    found
}

/// The dashboard's template variables.
pub fn variable_names(dashboard: &serde_json::Value) -> Vec<String> {
    dashboard["templating"]["list"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter_map(|v| v["name"].as_str().map(str::to_owned))
        .collect()
}

/// The query as Grafana would send it for "All" of every variable over the last minutes.
pub fn grafana_to_promql(expr: &str, variables: &[String]) -> String {
    let mut expr = expr
        .replace("$__rate_interval", "1m")
        .replace("${__rate_interval}", "1m")
        .replace("$__interval", "15s")
        .replace("$__range", "5m");
    // Longest names first, so that `$instance` never eats part of `$instance_group`.
    let mut variables = variables.to_vec();
    variables.sort_by_key(|name| std::cmp::Reverse(name.len()));
    for name in variables {
        for form in [
            format!("${{{name}:regex}}"),
            format!("${{{name}:pipe}}"),
            format!("${{{name}}}"),
            format!("${name}"),
        ] {
            expr = expr.replace(&form, ".*");
        }
    }
    expr
}

/// The values of `label` in the result of `expr` (one label kept, e.g. by `count by`).
pub fn query_labels(ns: &NetNs, expr: &str, label: &str) -> Vec<String> {
    let mut values: Vec<String> = query(ns, expr)
        .unwrap_or_else(|e| panic!("{e}"))
        .into_iter()
        .filter_map(|(labels, _)| {
            labels
                .strip_prefix(&format!("{label}="))
                .map(|v| v.trim_matches('"').to_owned())
        })
        .collect();
    values.sort();
    values
}
