//! Faults of the environment: a broken or half-deleted CA, and an expired one. The proxy
//! answers with a clear error or keeps serving what it has, never panics, and never
//! overwrites a CA key.

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use nix::sys::signal::Signal;
use proxy_e2e::client::{self, Req};
use proxy_e2e::{TestEnv, poll_until, proxy_bin, read, run_with_timeout};

#[test]
fn a_deleted_ca_certificate_keeps_the_running_proxy_serving_and_the_key_untouched() {
    let Some(env) = TestEnv::new("fault-ca-deleted") else {
        return;
    };
    let proxy = env.serve(&[]);
    let tls = proxy.tls();
    let key_before = read(&proxy.state_dir.join("ca.key"));
    std::fs::remove_file(proxy.state_dir.join("ca.pem")).expect("remove ca.pem");

    proxy.signal(Signal::SIGHUP);
    let failed = poll_until(Duration::from_secs(5), || {
        let m = env.metrics();
        (m.value(
            "proxy_reloads_total",
            &[("what", "tls"), ("result", "failure")],
        ) >= 1.0)
            .then_some(())
    });
    assert!(
        failed.is_some(),
        "a reload without ca.pem should be counted as failed"
    );
    let resp = env
        .run(|| client::https(&tls, Req::get("/")))
        .unwrap_or_else(|e| panic!("no longer serving: {e}"));
    assert_eq!(
        resp.text(),
        "Hello SRE!",
        "the old certificate keeps serving"
    );
    assert_eq!(
        read(&proxy.state_dir.join("ca.key")),
        key_before,
        "the CA key was rewritten"
    );
    assert!(
        !proxy.state_dir.join("ca.pem").exists(),
        "a new CA was created over the old key"
    );

    // A restart in that state refuses, saying what to do, and still leaves the key alone.
    drop(proxy);
    let out = serve_once(&env, &env.path("state"));
    expect_clear_failure(&out, "ca.pem is missing");
    assert_eq!(
        read(&env.path("state").join("ca.key")),
        key_before,
        "a restart rewrote the CA key"
    );
}

#[test]
fn a_corrupt_ca_key_is_a_clear_start_up_error() {
    let Some(env) = TestEnv::new("fault-ca-corrupt") else {
        return;
    };
    let state = env.path("state");
    proxy_e2e::proxy_cmd_ok(&[
        "ca",
        "init",
        "--state-dir",
        state.to_str().expect("utf-8"),
        "--name",
        "localhost",
    ]);
    std::fs::write(
        state.join("ca.key"),
        b"-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n",
    )
    .expect("write");
    let out = serve_once(&env, &state);
    expect_clear_failure(&out, "ca.key");
}

#[test]
fn an_expired_ca_is_a_clear_start_up_error() {
    let Some(env) = TestEnv::new("fault-ca-expired") else {
        return;
    };
    let state = env.path("state");
    std::fs::create_dir_all(&state).expect("state dir");
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    let cert = params.self_signed(&key).expect("self-signed CA");
    std::fs::write(state.join("ca.pem"), cert.pem()).expect("ca.pem");
    std::fs::write(state.join("ca.key"), key.serialize_pem()).expect("ca.key");
    let out = serve_once(&env, &state);
    expect_clear_failure(&out, "the CA expired");
}

/// Runs `proxy serve` in the namespace, expecting it to stop by itself.
fn serve_once(env: &TestEnv, state: &Path) -> Output {
    let mut cmd = env.ns.command(proxy_bin());
    cmd.arg("serve").arg("--state-dir").arg(state);
    run_with_timeout(cmd, Duration::from_secs(20))
}

fn expect_clear_failure(out: &Output, fragment: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the proxy should refuse to start; stderr:\n{stderr}"
    );
    assert!(
        !stderr.contains("panicked"),
        "a panic instead of an error:\n{stderr}"
    );
    assert!(
        stderr.contains(fragment),
        "the error should mention {fragment:?}:\n{stderr}"
    );
}
