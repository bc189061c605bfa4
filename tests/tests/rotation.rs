//! Certificates change under a running proxy without a single failed request: BYO files
//! swapped and SIGHUPed, a broken file ignored, and short-lived local-CA leaves renewed.

use std::path::PathBuf;
use std::time::Duration;

use nix::sys::signal::Signal;
use proxy_e2e::load::{Load, LoadPlan};
use proxy_e2e::{
    Metrics, MetricsExt as _, TestEnv, TlsOptions, ca_with_leaves, path_str, pem_serial,
    poll_until, proxy_cmd_ok, read, write_atomic,
};

fn tls_reloads(m: &Metrics, result: &str) -> f64 {
    m.value(
        "proxy_reloads_total",
        &[("what", "tls"), ("result", result)],
    )
}

#[test]
fn byo_certificate_swapped_under_load_drops_nothing() {
    let Some(env) = TestEnv::new("rotation") else {
        return;
    };
    let (ca_dir, issued) = ca_with_leaves(&env, 2);
    let leaves: Vec<(PathBuf, PathBuf, String)> = issued
        .into_iter()
        .map(|(cert, key)| {
            let serial = pem_serial(&cert);
            (cert, key, serial)
        })
        .collect();
    assert_ne!(leaves[0].2, leaves[1].2, "`proxy ca issue` reused a serial");

    let cert = env.path("tls.pem");
    let key = env.path("tls.key");
    write_atomic(&cert, &read(&leaves[0].0));
    write_atomic(&key, &read(&leaves[0].1));
    let proxy = env.serve(&["--tls-cert", path_str(&cert), "--tls-key", path_str(&key)]);
    let tls = TlsOptions::trusting_pem(&read(&ca_dir.join("ca.pem")));

    let plan = LoadPlan {
        h1_tasks: 3,
        h2_tasks: 3,
        max_duration: Duration::from_secs(30),
        ..LoadPlan::default()
    };
    let load = Load::start(&env.ns, tls.clone(), plan.clone());
    std::thread::sleep(Duration::from_millis(800));
    let mut successes = tls_reloads(&env.metrics(), "success");
    for round in 1..=6 {
        let (new_cert, new_key, _) = &leaves[round % 2];
        write_atomic(&key, &read(new_key));
        write_atomic(&cert, &read(new_cert));
        proxy.signal(Signal::SIGHUP);
        successes = poll_until(Duration::from_secs(5), || {
            let now = tls_reloads(&env.metrics(), "success");
            (now > successes).then_some(now)
        })
        .unwrap_or_else(|| {
            panic!(
                "SIGHUP #{round} after swapping the certificate files did not count a successful \
                 TLS reload (proxy_reloads_total{{what=\"tls\",result=\"success\"}} stayed at {successes})"
            )
        });
        std::thread::sleep(Duration::from_millis(1200));
    }
    let report = load.finish();
    assert_eq!(
        report.failed,
        0,
        "{} of {} requests failed while certificates were rotated; first errors: {:#?}",
        report.failed,
        report.ok + report.failed,
        report.errors
    );
    assert!(report.ok > 100, "the load made only {} requests", report.ok);
    assert!(
        report.changes >= 6,
        "the served leaf changed only {} times over 6 swaps (serials seen: {:?})",
        report.changes,
        report.serials
    );
    for (_, _, serial) in &leaves {
        assert!(
            report.serials.contains(serial),
            "leaf {serial} was never served; serials seen: {:?}",
            report.serials
        );
    }

    // The last swap (round 6) installed leaves[0]. Now break the file: the old leaf must stay.
    let serving = &leaves[0].2;
    write_atomic(
        &cert,
        b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n",
    );
    proxy.signal(Signal::SIGHUP);
    poll_until(Duration::from_secs(5), || {
        (tls_reloads(&env.metrics(), "failure") >= 1.0).then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "SIGHUP with a corrupt certificate file did not count \
             proxy_reloads_total{{what=\"tls\",result=\"failure\"}}; /metrics:\n{}",
            env.metrics().text
        )
    });
    let load = Load::start(
        &env.ns,
        tls,
        LoadPlan {
            max_duration: Duration::from_secs(2),
            ..plan
        },
    );
    std::thread::sleep(Duration::from_secs(2));
    let report = load.finish();
    assert_eq!(
        report.failed, 0,
        "after a broken certificate reload {} requests failed: {:#?}",
        report.failed, report.errors
    );
    assert!(report.ok > 0, "no request was made after the broken reload");
    assert_eq!(
        report.serials,
        vec![serving.clone()],
        "after a broken reload the proxy should keep serving the previous leaf"
    );

    // A valid certificate with somebody else's key is just as broken.
    write_atomic(&cert, &read(&leaves[1].0));
    write_atomic(&key, &read(&leaves[0].1));
    let failures = tls_reloads(&env.metrics(), "failure");
    proxy.signal(Signal::SIGHUP);
    poll_until(Duration::from_secs(5), || {
        (tls_reloads(&env.metrics(), "failure") > failures).then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "SIGHUP with a certificate and a key that do not match was not counted as a failed \
             TLS reload; /metrics:\n{}",
            env.metrics().text
        )
    });
    let load = Load::start(
        &env.ns,
        TlsOptions::trusting_pem(&read(&ca_dir.join("ca.pem"))),
        LoadPlan {
            max_duration: Duration::from_secs(2),
            ..LoadPlan::default()
        },
    );
    std::thread::sleep(Duration::from_secs(2));
    let report = load.finish();
    assert_eq!(
        report.failed, 0,
        "after a reload with a mismatched key {} requests failed: {:#?}",
        report.failed, report.errors
    );
    assert_eq!(
        report.serials,
        vec![serving.clone()],
        "after a mismatched-key reload the proxy should keep serving the previous leaf"
    );
}

#[test]
fn short_lived_leaf_is_renewed_without_restart_or_failures() {
    let Some(env) = TestEnv::new("renewal") else {
        return;
    };
    let proxy = env.serve(&["--leaf-lifetime", "15s"]);
    let expiry = |m: &Metrics| {
        m.expect(
            "proxy_certificate_expiry_timestamp_seconds",
            &[("cert", "leaf")],
        )
    };
    let before = expiry(&env.metrics());

    let load = Load::start(
        &env.ns,
        proxy.tls(),
        LoadPlan {
            max_duration: Duration::from_secs(40),
            pause: Duration::from_millis(20),
            ..LoadPlan::default()
        },
    );
    std::thread::sleep(Duration::from_secs(27));
    let report = load.finish();
    assert_eq!(
        report.failed,
        0,
        "{} of {} requests failed across leaf renewals; first errors: {:#?}",
        report.failed,
        report.ok + report.failed,
        report.errors
    );
    assert!(
        report.serials.len() >= 3,
        "a 15 s leaf should be renewed about every 10 s, but in 27 s only these serials were \
         served: {:?}",
        report.serials
    );
    let after = expiry(&env.metrics());
    assert!(
        after > before,
        "proxy_certificate_expiry_timestamp_seconds{{cert=\"leaf\"}} did not move forward \
         ({before} -> {after})"
    );
}

#[test]
fn sighup_rereads_the_config_file_names() {
    let Some(env) = TestEnv::new("names") else {
        return;
    };
    let config = env.path("proxy.toml");
    std::fs::write(&config, "names = [\"localhost\", \"app.test\"]\n").expect("writing config");
    let proxy = env.serve(&["--config", path_str(&config)]);
    let app = proxy.tls().server_name("app.test");
    let redirect_app = || {
        env.run(|| {
            proxy_e2e::client::raw_http(
                proxy_e2e::HTTP,
                b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n",
            )
        })
        .unwrap_or_else(|e| panic!("port 80 request for app.test: {e}"))
        .status
    };
    assert_eq!(
        redirect_app(),
        308,
        "app.test is configured but not redirected"
    );
    env.run(|| proxy_e2e::client::tls_connect(proxy_e2e::HTTPS, &app))
        .unwrap_or_else(|e| panic!("app.test is configured but not on the leaf: {e}"));

    std::fs::write(&config, "names = [\"localhost\"]\n").expect("rewriting config");
    proxy.signal(Signal::SIGHUP);
    poll_until(Duration::from_secs(5), || {
        (redirect_app() == 421).then_some(())
    })
    .unwrap_or_else(|| {
        panic!("after dropping app.test from the config and SIGHUP, port 80 still redirects it")
    });
    let err = env
        .run(|| proxy_e2e::client::tls_connect(proxy_e2e::HTTPS, &app))
        .err()
        .expect("after dropping app.test and SIGHUP, the leaf still carries app.test");
    assert!(err.contains("certificate"), "unexpected failure: {err}");
    let tls = proxy.tls();
    let resp = env
        .run(|| proxy_e2e::client::https(&tls, proxy_e2e::Req::get("/")))
        .unwrap_or_else(|e| panic!("localhost after the names reload: {e}"));
    assert_eq!(resp.status, 200);
}

#[test]
fn sighup_in_local_ca_mode_picks_up_a_leaf_replaced_in_the_state_dir() {
    let Some(env) = TestEnv::new("statedir") else {
        return;
    };
    let proxy = env.serve(&["--name", "localhost"]);
    let state = proxy.state_dir.clone();
    let first = pem_serial(&state.join("leaf.pem"));
    let (cert, key) = (env.path("new.pem"), env.path("new.key"));
    proxy_e2e::issue_localhost_leaf(&state, &cert, &key);
    let second = pem_serial(&cert);
    assert_ne!(first, second);
    write_atomic(&state.join("leaf.key"), &read(&key));
    write_atomic(&state.join("leaf.pem"), &read(&cert));
    proxy.signal(Signal::SIGHUP);
    let tls = proxy.tls();
    let served = poll_until(Duration::from_secs(5), || {
        let serial = env
            .run(|| proxy_e2e::client::https(&tls, proxy_e2e::Req::get("/")))
            .unwrap_or_else(|e| panic!("GET / after replacing the leaf and SIGHUP: {e}"))
            .tls
            .serial;
        (serial == second).then_some(serial)
    });
    assert!(
        served.is_some(),
        "after replacing leaf.pem/leaf.key in the state dir and SIGHUP, the proxy still serves \
         the old leaf {first} instead of {second}"
    );
}

#[test]
fn sighup_after_ca_init_force_serves_a_leaf_from_the_new_ca() {
    let Some(env) = TestEnv::new("newca") else {
        return;
    };
    let proxy = env.serve(&["--name", "localhost"]);
    let state = proxy.state_dir.clone();
    let old_tls = proxy.tls();
    proxy_cmd_ok(&[
        "ca",
        "init",
        "--state-dir",
        path_str(&state),
        "--name",
        "localhost",
        "--force",
    ]);
    let new_tls = TlsOptions::trusting_pem(&read(&state.join("ca.pem")));
    assert!(
        env.run(|| proxy_e2e::client::tls_connect(proxy_e2e::HTTPS, &new_tls))
            .is_err(),
        "before SIGHUP the running proxy already chains to the new CA"
    );
    proxy.signal(Signal::SIGHUP);
    let served = poll_until(Duration::from_secs(5), || {
        env.run(|| proxy_e2e::client::tls_connect(proxy_e2e::HTTPS, &new_tls))
            .ok()
            .map(|c| c.info.serial)
    });
    assert!(
        served.is_some(),
        "after `proxy ca init --force` and SIGHUP, clients trusting the new CA still fail: the \
         proxy keeps serving a leaf signed by the old CA"
    );
    assert!(
        env.run(|| proxy_e2e::client::tls_connect(proxy_e2e::HTTPS, &old_tls))
            .is_err(),
        "after the CA was replaced, clients trusting only the old CA still connect"
    );
}
