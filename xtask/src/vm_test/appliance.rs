//! The VM test's checks from the host side, through the forwarded ports, of what a user of the
//! appliance would see: the CA and its fingerprint, the HTTPS answer and the redirect, the
//! kernel observer attached and counting exactly the requests made, Prometheus scraping the
//! proxy, Alertmanager ready. Requests go out with curl in the lab's namespace; the guest's
//! own view comes through `vagrant ssh`.

use std::fs;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use proxy_testkit::Metrics;

use super::lab::{HostPorts, Lab};
use crate::client::{self, Answer, ca_fingerprint, normalise_fingerprint};

/// Requests made through each forward to check the kernel counts.
const HTTPS_REQUESTS: u64 = 5;
const HTTP_REQUESTS: u64 = 3;
const SSH_LIMIT: Duration = Duration::from_secs(180);

/// The host port the Vagrantfile prefers for HTTPS; the test keeps it busy.
pub(super) const PREFERRED_HTTPS_PORT: u16 = 8443;

/// With [`PREFERRED_HTTPS_PORT`] busy on the host, `vagrant up` forwarded another port, said
/// which, and left the squatter's port alone. Returns the ports forwarded.
pub(super) fn check_ports(lab: &Lab, up_log: &str) -> Result<HostPorts> {
    let ports = lab.host_ports()?;
    ensure!(
        ports.https != PREFERRED_HTTPS_PORT,
        "the Vagrantfile forwarded the busy port {PREFERRED_HTTPS_PORT}: {ports:?}"
    );
    let notice = format!(
        "host port {PREFERRED_HTTPS_PORT} (https) is in use: forwarding 127.0.0.1:{} instead",
        ports.https
    );
    ensure!(
        up_log.contains(&notice),
        "`vagrant up` did not say {notice:?}"
    );
    let url = format!("https://localhost:{}/", ports.https);
    ensure!(
        up_log.contains(&format!("proxy appliance: {url}"))
            && up_log.contains(&format!("  {url} ")),
        "neither Vagrant's message nor provisioning's names {url}"
    );
    ensure!(
        lab.occupant_answers(PREFERRED_HTTPS_PORT),
        "the program on 127.0.0.1:{PREFERRED_HTTPS_PORT} no longer answers"
    );
    println!(
        "ok: 127.0.0.1:{PREFERRED_HTTPS_PORT} was taken: vagrant up forwarded {url} instead, \
         said so, and the other program still answers on {PREFERRED_HTTPS_PORT}"
    );
    Ok(ports)
}

/// What a user of the VM would check, through the forwarded ports.
pub(super) fn check(lab: &Lab, ports: HostPorts, up_log: &str, work: &Path) -> Result<()> {
    let https_url = format!("https://localhost:{}/", ports.https);
    // The CA as the README tells libvirt users to fetch it (rsync folders are one-way).
    let ca_pem = ssh(lab, "sudo cat /var/lib/proxy/ca.pem")?;
    let ca = work.join("proxy-ca.pem");
    fs::write(&ca, &ca_pem)?;
    let fingerprint = ca_fingerprint(&ca)?;
    let printed = up_log
        .lines()
        .filter_map(|l| l.split("SHA-256 Fingerprint:").nth(1))
        .map(normalise_fingerprint)
        .next_back()
        .context("provisioning printed no CA fingerprint")?;
    ensure!(
        printed == fingerprint,
        "the CA served has fingerprint {fingerprint}, provisioning printed {printed}"
    );
    println!("ok: CA fingerprint {fingerprint} matches the one provisioning printed");

    let https = curl(lab, &["--cacert", &ca.to_string_lossy(), &https_url])?;
    ensure!(
        https.status == 200
            && https.body == "Hello SRE!"
            && https.content_type.starts_with("text/plain"),
        "{https_url} answered {https:?}"
    );
    println!(
        "ok: {https_url} -> 200 {} {:?}",
        https.content_type, https.body
    );
    let untrusted = lab
        .command("curl")
        .args(["-sS", "-o", "/dev/null", &https_url])
        .stderr(Stdio::null())
        .status()?;
    ensure!(
        !untrusted.success(),
        "curl trusted the VM's certificate without its CA"
    );
    println!("ok: without the CA, curl refuses the certificate ({untrusted})");

    // The redirect names the port really forwarded: provisioning passed it to the proxy.
    client::expect_redirect(
        lab.command("curl"),
        &format!("http://localhost:{}/status?probe=1", ports.http),
        &format!("{https_url}status?probe=1"),
    )?;

    let before = guest_metrics(lab)?;
    let attached: Vec<String> = before
        .named("proxy_ebpf_attached")
        .map(ToString::to_string)
        .collect();
    ensure!(
        !attached.is_empty() && before.named("proxy_ebpf_attached").all(|s| s.value == 1.0),
        "the kernel observer is not attached in the VM: {attached:?}"
    );
    println!("ok: {}", attached.join(", "));
    for _ in 0..HTTPS_REQUESTS {
        let resp = curl(lab, &["--cacert", &ca.to_string_lossy(), &https_url])?;
        ensure!(resp.status == 200, "https request answered {resp:?}");
    }
    for _ in 0..HTTP_REQUESTS {
        let resp = curl(lab, &[&format!("http://localhost:{}/", ports.http)])?;
        ensure!(resp.status == 308, "http request answered {resp:?}");
    }
    let expected = [("https", HTTPS_REQUESTS), ("http", HTTP_REQUESTS)];
    let started = Instant::now();
    let deltas = loop {
        let after = guest_metrics(lab)?;
        let deltas: Vec<(&str, f64)> = expected
            .iter()
            .map(|(listener, _)| {
                let key = "proxy_tcp_connections_total";
                let labels = [("listener", *listener)];
                (
                    *listener,
                    after.value(key, &labels) - before.value(key, &labels),
                )
            })
            .collect();
        let reached = deltas
            .iter()
            .zip(expected)
            .all(|((_, got), (_, want))| *got >= want as f64);
        if reached || started.elapsed() > Duration::from_secs(30) {
            break deltas;
        }
        std::thread::sleep(Duration::from_secs(2));
    };
    for ((listener, got), (_, want)) in deltas.iter().zip(expected) {
        ensure!(
            *got == want as f64,
            "proxy_tcp_connections_total{{listener=\"{listener}\"}} rose by {got}, {want} requests were made"
        );
    }
    println!(
        "ok: kernel connection counts rose by exactly the requests made: https +{}, http +{}",
        deltas[0].1, deltas[1].1
    );

    let started = Instant::now();
    loop {
        let up = prometheus_query(lab, ports, "up{job=\"proxy\"}")?;
        let kernel = prometheus_query(
            lab,
            ports,
            "proxy_tcp_connections_total{listener=\"https\"}",
        )?;
        if up == Some(1.0) && kernel.is_some_and(|v| v > 0.0) {
            println!(
                "ok: Prometheus (localhost:{}) has the proxy target up and its kernel metrics ({} HTTPS connections)",
                ports.prometheus,
                kernel.unwrap_or_default()
            );
            break;
        }
        ensure!(
            started.elapsed() < Duration::from_secs(120),
            "Prometheus: up{{job=\"proxy\"}} = {up:?}, proxy_tcp_connections_total{{listener=\"https\"}} = {kernel:?} after 120 s"
        );
        std::thread::sleep(Duration::from_secs(5));
    }
    let alertmanager = format!("localhost:{}", ports.alertmanager);
    let ready = curl(lab, &[&format!("http://{alertmanager}/-/ready")])?;
    ensure!(
        ready.status == 200,
        "Alertmanager ({alertmanager}) is not ready: {ready:?}"
    );
    println!("ok: Alertmanager ({alertmanager}) ready");
    Ok(())
}

/// The value of a one-series Prometheus query, through the forwarded port.
fn prometheus_query(lab: &Lab, ports: HostPorts, query: &str) -> Result<Option<f64>> {
    let out = lab
        .command("curl")
        .args(["-sS", "--max-time", "10", "--data-urlencode"])
        .arg(format!("query={query}"))
        .arg(format!(
            "http://localhost:{}/api/v1/query",
            ports.prometheus
        ))
        .output()
        .context("failed to run curl")?;
    if !out.status.success() {
        return Ok(None);
    }
    let json: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("Prometheus answered no JSON")?;
    Ok(json["data"]["result"][0]["value"][1]
        .as_str()
        .and_then(|v| v.parse().ok()))
}

/// The proxy's own metrics inside the VM (the admin port is not forwarded).
fn guest_metrics(lab: &Lab) -> Result<Metrics> {
    Ok(Metrics::parse(&ssh(
        lab,
        "curl -fsS http://127.0.0.1:9090/metrics",
    )?))
}

/// Runs `command` in the VM with `vagrant ssh`; returns its standard output.
pub(super) fn ssh(lab: &Lab, command: &str) -> Result<String> {
    ssh_limited(lab, command, SSH_LIMIT)
}

/// [`ssh`] for a command that may take longer than its usual limit.
pub(super) fn ssh_limited(lab: &Lab, command: &str, limit: Duration) -> Result<String> {
    let out = lab
        .vagrant(limit)
        .args(["ssh", "-c", command, "--", "-T"])
        .output()
        .context("failed to run vagrant ssh")?;
    ensure!(
        out.status.success(),
        "vagrant ssh -c {command:?}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).replace('\r', ""))
}

/// One request with curl in the test's namespace (the host side of the forwards).
fn curl(lab: &Lab, args: &[&str]) -> Result<Answer> {
    client::curl(lab.command("curl"), args)
}
