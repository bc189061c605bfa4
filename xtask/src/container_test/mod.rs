//! `cargo xtask container-test`: the container image for real. Builds the release proxy (eBPF
//! object embedded) and an image of it on a base made here from Debian's packages (no
//! registry: see [`image`]), runs it with podman exactly as the Containerfile's header and the
//! README say (see [`run`]), in a private network namespace, and checks from outside the
//! container what a user would see:
//!
//! - the image has no shell and no package manager, and the Containerfile's user, entrypoint,
//!   ports and volume;
//! - `https://localhost/` answers `Hello SRE!` to a client that trusts only the CA taken from
//!   the container's volume (and curl without it refuses the certificate);
//! - `http://localhost/...` redirects (308) to the same path on https;
//! - `/metrics` reports `proxy_ebpf_attached{program="sock_ops"} 1` (the observer attached
//!   inside the container) and the kernel's connection counts rise by exactly the requests
//!   made;
//! - a second run on the same volume, in upstream mode, serves the same CA; SIGTERM
//!   (`podman stop`) while a slow request is in flight lets it complete, and the container
//!   exits 0.

mod image;
mod run;
mod slow_backend;

use std::cell::RefCell;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use proxy_testkit::phase::{self, Phase};
use proxy_testkit::{Metrics, NetNs};

use crate::client::{self, ca_fingerprint};
use crate::{deps, ebpf, exec::exec, privilege, workspace};
use run::{Container, Site};
use slow_backend::SlowBackend;

/// Options of `cargo xtask container-test`.
#[derive(Debug, clap::Args)]
pub(crate) struct Options {
    /// Where the Debian tree and the logs are kept between runs (default:
    /// `<target>/container`).
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
}

/// Host packages: the container engine and its runtime, what builds the base, the clients.
const HOST_PACKAGES: &[&str] = &[
    "podman",
    "runc",
    "netavark",
    "iptables",
    "mmdebstrap",
    "curl",
    "openssl",
    "iproute2",
    "util-linux",
];
/// The container's name (and its volume's, with `-state`).
const NAME: &str = "proxy-container-test";
/// Requests made through each published port to check the kernel counts.
const HTTPS_REQUESTS: u64 = 5;
const HTTP_REQUESTS: u64 = 3;
/// How long the slow backend holds the request in flight at SIGTERM.
const SLOW_DELAY: Duration = Duration::from_secs(4);
/// `podman stop`'s grace before SIGKILL: the proxy must drain well within it.
const STOP_GRACE: Duration = Duration::from_secs(20);

pub(crate) fn container_test(opts: Options) -> ExitCode {
    if !privilege::is_root() {
        eprintln!("error: the container test needs root (podman, network namespaces, eBPF)");
        return ExitCode::FAILURE;
    }
    let work = opts
        .work_dir
        .unwrap_or_else(|| workspace::target_dir().join("container"));
    let rootfs = RefCell::new(PathBuf::new());
    let base = RefCell::new(String::new());
    let fingerprint = RefCell::new(String::new());
    let seccomp = match run::seccomp_profile(&work) {
        Ok(profile) => profile,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let site = Site::here(NAME, seccomp);
    let phases = vec![
        Phase::new("host packages", || deps::apt_install_missing(HOST_PACKAGES)),
        Phase::new("proxy binary", || {
            ebpf::build()?;
            exec(workspace::cargo().args(["build", "--release", "--locked", "-p", "proxy"]))
        }),
        Phase::new("Debian tree", || {
            *rootfs.borrow_mut() = image::rootfs(&work)?;
            Ok(())
        }),
        Phase::new("runtime base", || {
            let proxy = workspace::proxy_bin(true);
            *base.borrow_mut() = image::runtime_base(&work, &rootfs.borrow(), &proxy)?;
            Ok(())
        }),
        Phase::new("image", || {
            image::build(&work, &base.borrow(), &workspace::proxy_bin(true))?;
            let size = image::inspect()?;
            println!(
                "image {}: {:.1} MB",
                image::IMAGE,
                size as f64 / 1_000_000.0
            );
            Ok(())
        }),
        // A namespace per run: podman's bridge and port forwards start afresh, whatever
        // the previous container's network teardown left.
        Phase::new("first run", || {
            run::remove_volume(&site.volume);
            let ns = NetNs::create("proxy-ctest")?;
            *fingerprint.borrow_mut() = first_run(&ns, &site, &work)?;
            Ok(())
        }),
        Phase::new("second run: same CA, drain", || {
            let ns = NetNs::create("proxy-ctest")?;
            second_run(&ns, &site, &work, &fingerprint.borrow())
        }),
    ];
    let passed = phase::run_all(phases);
    run::remove_volume(&site.volume);
    if passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Static mode on a fresh volume: the CA, the answer, the redirect, the kernel observer, a
/// clean stop. Returns the CA's fingerprint.
fn first_run(ns: &NetNs, site: &Site, work: &Path) -> Result<String> {
    let mut container = Container::start(ns, site, &work.join("first-run.log"), &[])?;
    let ca = work.join("proxy-ca.pem");
    fs::copy(run::volume_dir(&site.volume)?.join("ca.pem"), &ca)
        .context("no ca.pem in the container's volume")?;
    let fingerprint = ca_fingerprint(&ca)?;
    println!("ok: the volume holds the CA, SHA-256 {fingerprint}");
    let cacert = ca.to_string_lossy().into_owned();

    let https = client::curl(
        ns.command("curl"),
        &["--cacert", &cacert, "https://localhost/"],
    )?;
    ensure!(
        https.status == 200 && https.body == "Hello SRE!",
        "https://localhost/ answered {https:?}"
    );
    println!(
        "ok: https://localhost/ -> 200 {} {:?}, trusting only the volume's CA",
        https.content_type, https.body
    );
    let untrusted = client::curl(ns.command("curl"), &["https://localhost/"]);
    ensure!(
        untrusted.is_err(),
        "curl trusted the container's certificate without its CA"
    );
    println!("ok: without the CA, curl refuses the certificate");

    client::expect_redirect(
        ns.command("curl"),
        "http://localhost/status?probe=1",
        "https://localhost/status?probe=1",
    )?;

    let before = metrics(ns)?;
    let attached: Vec<String> = before
        .named("proxy_ebpf_attached")
        .map(ToString::to_string)
        .collect();
    ensure!(
        before.get("proxy_ebpf_attached", &[("program", "sock_ops")]) == Some(1.0),
        "the kernel observer did not attach in the container: {attached:?}\n{}",
        container.log()
    );
    println!("ok: {}", attached.join(", "));
    for _ in 0..HTTPS_REQUESTS {
        let resp = client::curl(
            ns.command("curl"),
            &["--cacert", &cacert, "https://localhost/"],
        )?;
        ensure!(resp.status == 200, "https request answered {resp:?}");
    }
    for _ in 0..HTTP_REQUESTS {
        let resp = client::curl(ns.command("curl"), &["http://localhost/"])?;
        ensure!(resp.status == 308, "http request answered {resp:?}");
    }
    let after = metrics(ns)?;
    for (listener, made) in [("https", HTTPS_REQUESTS), ("http", HTTP_REQUESTS)] {
        let key = "proxy_tcp_connections_total";
        let labels = [("listener", listener)];
        let rose = after.value(key, &labels) - before.value(key, &labels);
        ensure!(
            rose == made as f64,
            "{key}{{listener=\"{listener}\"}} rose by {rose}, {made} requests were made"
        );
        println!("ok: the kernel counted {rose} connections on {listener}, as many as were made");
    }

    let status = container.stop(STOP_GRACE)?;
    ensure!(status.success(), "the container exited with {status}");
    println!("ok: podman stop: the container exited 0");
    Ok(fingerprint)
}

/// Upstream mode on the same volume: the same CA, and a request in flight at SIGTERM that
/// completes before the container exits 0.
fn second_run(ns: &NetNs, site: &Site, work: &Path, fingerprint: &str) -> Result<()> {
    let backend = SlowBackend::start(ns, SLOW_DELAY)?;
    let upstream = format!("http://{}:{}", run::gateway(ns)?, backend.port());
    let mut container = Container::start(
        ns,
        site,
        &work.join("second-run.log"),
        &["--upstream", &upstream],
    )?;
    let ca = work.join("proxy-ca-second.pem");
    fs::copy(run::volume_dir(&site.volume)?.join("ca.pem"), &ca)?;
    let second = ca_fingerprint(&ca)?;
    ensure!(
        second == fingerprint,
        "the second run serves CA {second}, the first served {fingerprint}"
    );
    println!("ok: the second run on the same volume kept the CA ({second})");
    let cacert = ca.to_string_lossy().into_owned();
    let through = client::curl(
        ns.command("curl"),
        &["--cacert", &cacert, "https://localhost/"],
    )?;
    ensure!(
        through.status == 200 && through.body == "Hello SRE!",
        "https://localhost/ through {upstream} answered {through:?}"
    );
    println!("ok: https://localhost/ -> 200 through the upstream {upstream}");

    let slow_ns = ns.command("curl");
    let cacert_slow = cacert.clone();
    let slow = std::thread::spawn(move || {
        let started = Instant::now();
        let answer = client::curl(
            slow_ns,
            &["--cacert", &cacert_slow, "https://localhost/slow"],
        );
        (answer, started.elapsed())
    });
    let arrived = proxy_testkit::poll_until(Duration::from_secs(10), || {
        (backend.slow_requests() > 0).then_some(())
    });
    ensure!(
        arrived.is_some(),
        "the slow request never reached the backend"
    );
    let stopping = Instant::now();
    let status = container.stop(STOP_GRACE)?;
    let stopped_after = stopping.elapsed();
    let (answer, took) = slow
        .join()
        .map_err(|_| anyhow::anyhow!("the slow client panicked"))?;
    let answer = answer.context("the request in flight at SIGTERM failed")?;
    ensure!(
        answer.status == 200 && answer.body == slow_backend::SLOW_BODY,
        "the request in flight at SIGTERM answered {answer:?}"
    );
    println!(
        "ok: the request in flight at SIGTERM completed (200, {} bytes, {})",
        answer.body.len(),
        phase::seconds(took)
    );
    ensure!(
        status.success(),
        "the container exited with {status} after SIGTERM\n{}",
        container.log()
    );
    println!(
        "ok: podman stop returned after {}: drained, the container exited 0",
        phase::seconds(stopped_after)
    );
    Ok(())
}

/// The proxy's metrics through the published admin port (`127.0.0.1:9090`).
fn metrics(ns: &NetNs) -> Result<Metrics> {
    let answer = client::curl(ns.command("curl"), &["http://127.0.0.1:9090/metrics"])?;
    ensure!(answer.status == 200, "/metrics answered {}", answer.status);
    Ok(Metrics::parse(&answer.body))
}
