//! `cargo xtask monitoring`: runs Prometheus and Alertmanager (Debian's packages) with the
//! files in `monitoring/` against a proxy on this machine, for users without the VM. Runs in
//! the foreground until Ctrl-C; data lives under `target/monitoring/`.

use std::process::{Child, Command};

use anyhow::{Context as _, Result, bail};

use crate::{deps, privilege, workspace};

/// The Debian packages this task runs.
pub(crate) const PACKAGES: &[&str] = &["prometheus", "prometheus-alertmanager"];
/// Where Prometheus listens (the proxy's admin listener has 9090).
pub(crate) const PROMETHEUS_ADDR: &str = "127.0.0.1:9091";
pub(crate) const ALERTMANAGER_ADDR: &str = "127.0.0.1:9093";

/// Starts both and waits for Ctrl-C (or for either to exit).
pub(crate) fn monitoring() -> Result<()> {
    let missing = deps::missing(PACKAGES)?;
    if !missing.is_empty() {
        if !privilege::is_root() {
            bail!(
                "missing packages: sudo apt-get install -y {}",
                missing.join(" ")
            );
        }
        deps::apt_install(&missing)?;
    }
    let root = workspace::root();
    let data = workspace::target_dir().join("monitoring");
    std::fs::create_dir_all(&data).with_context(|| format!("creating {}", data.display()))?;

    let mut prometheus = spawn(
        Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                root.join("monitoring/prometheus/prometheus.yml").display()
            ))
            .arg(format!("--web.listen-address={PROMETHEUS_ADDR}"))
            .arg(format!(
                "--storage.tsdb.path={}",
                data.join("prometheus").display()
            )),
    )?;
    let mut alertmanager = match spawn(
        Command::new("prometheus-alertmanager")
            .arg(format!(
                "--config.file={}",
                root.join("monitoring/alertmanager/alertmanager.yml")
                    .display()
            ))
            .arg(format!("--web.listen-address={ALERTMANAGER_ADDR}"))
            .arg(format!(
                "--storage.path={}",
                data.join("alertmanager").display()
            ))
            // A single instance: no gossip port.
            .arg("--cluster.listen-address="),
    ) {
        Ok(child) => child,
        Err(e) => {
            let _ = prometheus.kill();
            return Err(e);
        }
    };
    println!(
        "==> Prometheus:   http://{PROMETHEUS_ADDR}/  (alerts: http://{PROMETHEUS_ADDR}/alerts)"
    );
    println!("==> Alertmanager: http://{ALERTMANAGER_ADDR}/");
    println!(
        "    scraping the proxy's admin listener at 127.0.0.1:9090; start it with `cargo xtask run`"
    );
    println!("    Ctrl-C stops both");
    // Ctrl-C reaches the whole foreground process group: both children stop with us.
    let status = loop {
        if let Some(status) = prometheus.try_wait()? {
            break format!("prometheus exited: {status}");
        }
        if let Some(status) = alertmanager.try_wait()? {
            break format!("alertmanager exited: {status}");
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    };
    let _ = prometheus.kill();
    let _ = alertmanager.kill();
    bail!("{status}")
}

fn spawn(cmd: &mut Command) -> Result<Child> {
    println!("$ {}", crate::exec::display(cmd));
    cmd.spawn()
        .with_context(|| format!("failed to start `{}`", crate::exec::display(cmd)))
}
