//! `cargo xtask mixin`: renders the monitoring (recording rules, alerts, dashboards) from
//! `mixin/templates/`. Without options it rewrites the files the repository ships (`monitoring/`
//! and the Kubernetes base); with `--out` it renders them for another fleet.

use std::path::PathBuf;

use anyhow::{Context as _, Result};
use proxy_mixin::{Config, Objectives};

use crate::workspace;

#[derive(Debug, clap::Args)]
pub(crate) struct Options {
    /// Write the rule files, dashboards and a PrometheusRule resource for the parameters below
    /// into this directory, instead of rewriting the shipped files.
    #[arg(long)]
    out: Option<PathBuf>,
    /// PromQL label matchers that select the proxy's targets.
    #[arg(long, default_value = r#"job="proxy""#)]
    selector: String,
    /// Labels that tell groups of proxies apart, outermost first; each SLO and alert is
    /// computed per group.
    #[arg(long, value_delimiter = ',', default_value = "cluster,namespace,job")]
    group_by: Vec<String>,
    /// The runbook's address (without #anchor), as on-call opens it.
    #[arg(long, default_value = "../../runbook.md")]
    runbook_url: String,
    /// Availability objective (share of HTTPS requests that succeed).
    #[arg(long, default_value_t = Objectives::default().availability)]
    availability: f64,
    /// TLS handshake objective (share of handshakes that succeed).
    #[arg(long, default_value_t = Objectives::default().tls_handshake)]
    tls_handshake: f64,
    /// Latency objective (share of HTTPS requests within --latency-threshold).
    #[arg(long, default_value_t = Objectives::default().latency)]
    latency: f64,
    /// Latency threshold in seconds: a bucket bound of the request histogram.
    #[arg(long, default_value_t = Objectives::default().latency_threshold_seconds)]
    latency_threshold: f64,
    /// Accept-wait objective (share of connections accepted within --accept-wait-threshold).
    #[arg(long, default_value_t = Objectives::default().accept_wait)]
    accept_wait: f64,
    /// Accept-wait threshold in seconds: a bucket bound of the accept-wait histogram.
    #[arg(long, default_value_t = Objectives::default().accept_wait_threshold_seconds)]
    accept_wait_threshold: f64,
}

pub(crate) fn mixin(options: Options) -> Result<()> {
    let root = workspace::root();
    let Some(out) = options.out.clone() else {
        for (path, text) in proxy_mixin::shipped()? {
            write(&root.join(path), &text)?;
        }
        println!("==> rewrote monitoring/ and deploy/kubernetes/ from mixin/templates/");
        return Ok(());
    };
    let config = Config {
        selector: options.selector,
        group_by: options.group_by,
        runbook_url: options.runbook_url,
        objectives: Objectives {
            availability: options.availability,
            tls_handshake: options.tls_handshake,
            latency: options.latency,
            latency_threshold_seconds: options.latency_threshold,
            accept_wait: options.accept_wait,
            accept_wait_threshold_seconds: options.accept_wait_threshold,
        },
    };
    for file in proxy_mixin::render(&config)? {
        write(&out.join(file.path), &file.text)?;
    }
    write(
        &out.join("prometheusrule.yaml"),
        &proxy_mixin::prometheus_rule(&config)?,
    )?;
    println!("==> wrote {}", out.display());
    Ok(())
}

fn write(path: &std::path::Path, text: &str) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}
