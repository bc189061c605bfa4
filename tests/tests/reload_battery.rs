//! The reliability battery's zero-drop change: 100 SIGHUP reloads (1000 in the soak), each
//! rotating the certificate and rewriting the configuration file, under continuous HTTP/1.1
//! and HTTP/2 load with a new TLS connection per request, and not one request fails.

use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use proxy_e2e::load::{Load, LoadPlan};
use proxy_e2e::{
    TestEnv, TlsOptions, ca_with_leaves, path_str, poll_until, read, soak, soak_figure,
    write_atomic,
};

const RELOADS: usize = 100;
const RELOADS_SOAK: usize = 1000;

#[test]
fn sighup_reloads_under_load_fail_no_request() {
    let Some(env) = TestEnv::new("reload-battery") else {
        return;
    };
    let (ca_dir, leaves) = ca_with_leaves(&env, 2);
    let (cert, key, config) = (
        env.path("tls.pem"),
        env.path("tls.key"),
        env.path("proxy.toml"),
    );
    write_atomic(&cert, &read(&leaves[0].0));
    write_atomic(&key, &read(&leaves[0].1));
    write_config(&config, &cert, &key, 0);
    let reloads_wanted = if soak() { RELOADS_SOAK } else { RELOADS };
    let proxy = env.serve(&["--config", path_str(&config)]);
    let tls = TlsOptions::trusting_pem(&read(&ca_dir.join("ca.pem")));

    let load = Load::start(
        &env.ns,
        tls,
        LoadPlan {
            h1_tasks: 2,
            h2_tasks: 2,
            max_duration: Duration::from_secs(60 + reloads_wanted as u64),
            ..LoadPlan::default()
        },
    );
    let started = Instant::now();
    let mut reloads = reload_count(&env);
    for round in 1..=reloads_wanted {
        let (new_cert, new_key) = &leaves[round % 2];
        // Key and certificate change together, then the config file, then the signal.
        write_atomic(&key, &read(new_key));
        write_atomic(&cert, &read(new_cert));
        write_config(&config, &cert, &key, round);
        proxy.signal(Signal::SIGHUP);
        // SIGHUPs that arrive together count once: wait for this one before the next.
        reloads = poll_until(Duration::from_secs(5), || {
            let now = reload_count(&env);
            (now > reloads).then_some(now)
        })
        .unwrap_or_else(|| panic!("SIGHUP #{round} was not followed by a successful TLS reload"));
    }
    let elapsed = started.elapsed();
    let report = load.finish();
    let metrics = env.metrics();
    let config_reloads = metrics.value(
        "proxy_reloads_total",
        &[("what", "config"), ("result", "success")],
    );
    eprintln!(
        "reload battery: {reloads_wanted} reloads in {elapsed:?}; {} requests, {} failed, {} certificate changes seen",
        report.ok, report.failed, report.changes
    );
    soak_figure(
        &format!("{reloads_wanted} SIGHUP reloads under h1+h2 load"),
        &format!(
            "{} failed of {} requests over {:.0} s; served certificate changed {} times",
            report.failed,
            report.ok + report.failed,
            elapsed.as_secs_f64(),
            report.changes
        ),
    );
    assert_eq!(
        report.failed, 0,
        "requests failed during the reloads: {:#?}",
        report.errors
    );
    assert!(
        report.ok >= 200,
        "too little load to prove anything: {} requests",
        report.ok
    );
    assert!(
        report.changes >= 10,
        "the served certificate was seen to change only {} times",
        report.changes
    );
    assert!(
        config_reloads >= reloads_wanted as f64,
        "only {config_reloads} config reloads counted"
    );
    assert_eq!(
        metrics.value(
            "proxy_reloads_total",
            &[("what", "tls"), ("result", "failure")]
        ),
        0.0
    );
}

fn reload_count(env: &TestEnv) -> f64 {
    env.metrics().value(
        "proxy_reloads_total",
        &[("what", "tls"), ("result", "success")],
    )
}

/// A config naming the certificate files; `round` changes a setting a reload applies.
fn write_config(config: &Path, cert: &Path, key: &Path, round: usize) {
    let lifetime_days = 20 + round % 2 * 10;
    let text = format!(
        "tls_cert = {:?}\ntls_key = {:?}\nleaf_lifetime = \"{lifetime_days}d\"\n",
        path_str(cert),
        path_str(key)
    );
    write_atomic(config, text.as_bytes());
}
