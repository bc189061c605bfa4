//! Faults of the environment: a broken or half-deleted CA, an expired one, and a state
//! directory that is read-only or full at start-up or by the time the leaf is renewed. The
//! proxy answers with a clear error or keeps serving what it has, never panics, never
//! overwrites or truncates a CA key, and never leaves a half-written file.

use std::os::unix::fs::DirBuilderExt as _;
use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use proxy_e2e::client::{self, Req};
use proxy_e2e::load::{Load, LoadPlan};
use proxy_e2e::mounts::{self, FILLER};
use proxy_e2e::{
    Metrics, MetricsExt as _, Proxy, TestEnv, TlsOptions, path_str, pem_serial, poll_until,
    proxy_bin, proxy_cmd_ok, read, run_with_timeout, soak_figure,
};

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

/// How the state directory is made unwritable.
#[derive(Debug, Clone, Copy)]
enum Unwritable {
    /// A read-only bind mount.
    ReadOnly,
    /// A tiny tmpfs filled until this many 4 KiB pages are free: with one, the first file of
    /// a pair fits and the second does not.
    Full { free_pages: u32 },
}

impl Unwritable {
    /// Shell commands, run in the proxy's mount namespace, that make `dir` unwritable. `Full`
    /// expects `dir` to be the tiny tmpfs already.
    fn apply(self, dir: &Path) -> String {
        match self {
            Unwritable::ReadOnly => mounts::read_only(dir),
            Unwritable::Full { free_pages } => mounts::fill(dir, free_pages),
        }
    }

    /// What the kernel answers a write with.
    fn error(self) -> &'static str {
        match self {
            Unwritable::ReadOnly => "Read-only file system",
            Unwritable::Full { .. } => "No space left on device",
        }
    }

    fn describe(self) -> String {
        match self {
            Unwritable::ReadOnly => "read-only".into(),
            Unwritable::Full { free_pages: 0 } => "full".into(),
            Unwritable::Full { free_pages } => format!("full ({free_pages} page free)"),
        }
    }
}

#[test]
fn a_read_only_state_dir_with_a_ca_serves_a_leaf_from_memory() {
    start_with_a_ca_in_an_unwritable_state_dir(Unwritable::ReadOnly);
}

#[test]
fn a_full_state_dir_with_a_ca_serves_a_leaf_from_memory() {
    start_with_a_ca_in_an_unwritable_state_dir(Unwritable::Full { free_pages: 0 });
}

/// The state directory holds a CA and no leaf, and cannot be written from the start.
fn start_with_a_ca_in_an_unwritable_state_dir(fault: Unwritable) {
    let what = fault.describe();
    let Some(env) = TestEnv::new(&format!("fault-state-{what}")) else {
        return;
    };
    let (state, seed) = (env.path("state"), env.path("seed"));
    proxy_cmd_ok(&[
        "ca",
        "init",
        "--state-dir",
        path_str(&seed),
        "--name",
        "localhost",
    ]);
    let (ca_key, ca_pem) = (read(&seed.join("ca.key")), read(&seed.join("ca.pem")));
    let setup = match fault {
        Unwritable::ReadOnly => {
            std::fs::rename(&seed, &state).expect("moving the CA into the state dir");
            fault.apply(&state)
        }
        Unwritable::Full { .. } => {
            std::fs::create_dir(&state).expect("state dir");
            format!(
                "{} && cp -a {}/. {}/ && {}",
                mounts::tiny_tmpfs(&state),
                path_str(&seed),
                path_str(&state),
                fault.apply(&state)
            )
        }
    };
    let wrapper = mounts::private_mounts(&setup);
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let proxy = Proxy::start_via(
        &env.ns,
        env.dir.path(),
        &wrapper,
        &["--state-dir", path_str(&state), "--name", "localhost"],
        &[],
        || {},
    );
    let seen = mounts::seen_by(proxy.process.pid(), &state);
    let probe = std::fs::write(seen.join("probe"), [0u8; 4096]);
    let _ = std::fs::remove_file(seen.join("probe"));
    assert!(
        probe.is_err_and(|e| e.to_string().contains(fault.error())),
        "the state directory is not {what} for the proxy: the fault was not set up"
    );

    // The leaf that could not be stored chains to the CA on disk, so clients trusting it are
    // served.
    let tls = TlsOptions::trusting_pem(&ca_pem);
    let resp = env
        .run(|| client::https(&tls, Req::get("/")))
        .unwrap_or_else(|e| panic!("not serving with a {what} state directory: {e}"));
    assert_eq!(resp.text(), "Hello SRE!");
    let failures = env
        .metrics()
        .expect("proxy_state_write_failures_total", &[]);
    assert_eq!(
        failures, 1.0,
        "the leaf that could not be stored should be counted once"
    );
    let log = proxy.process.stderr();
    assert!(
        log.contains("serving it from memory") && log.contains(fault.error()),
        "the log should say the leaf is served from memory and why:\n{log}"
    );
    assert_eq!(read(&seen.join("ca.key")), ca_key, "ca.key changed");
    assert_eq!(read(&seen.join("ca.pem")), ca_pem, "ca.pem changed");
    let mut expected = vec!["ca.key", "ca.pem"];
    if let Unwritable::Full { .. } = fault {
        expected.push(FILLER);
    }
    assert_eq!(
        mounts::listing(&seen),
        expected,
        "nothing should have been written"
    );
    soak_figure(
        &format!("state dir {what} at start, CA present"),
        &format!(
            "serves a leaf kept in memory; proxy_state_write_failures_total {failures}; \
             ca.key unchanged"
        ),
    );
}

#[test]
fn an_unwritable_state_dir_without_a_ca_is_a_clear_start_up_error() {
    let Some(env) = TestEnv::new("fault-state-no-ca") else {
        return;
    };
    let faults = [
        Unwritable::ReadOnly,
        Unwritable::Full { free_pages: 0 },
        Unwritable::Full { free_pages: 1 },
    ];
    for (i, fault) in faults.into_iter().enumerate() {
        let state = env.path(&format!("state-{i}"));
        // Private already, so that creating the CA fails at writing its files.
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&state)
            .expect("state dir");
        let setup = match fault {
            Unwritable::ReadOnly => fault.apply(&state),
            Unwritable::Full { .. } => {
                format!("{} && {}", mounts::tiny_tmpfs(&state), fault.apply(&state))
            }
        };
        let out = mounts::run_proxy_then_list(
            &env.ns,
            &setup,
            &[
                "serve",
                "--state-dir",
                path_str(&state),
                "--name",
                "localhost",
            ],
            &state,
        );
        let what = fault.describe();
        expect_clear_failure(&out, "cannot create the local CA");
        expect_clear_failure(&out, fault.error());
        // Neither a key without its certificate (which a restart would refuse to replace)
        // nor a truncated file nor a temporary file is left behind.
        let listing = String::from_utf8_lossy(&out.stdout);
        let left: Vec<&str> = listing
            .lines()
            .filter(|line| !line.starts_with(FILLER))
            .collect();
        assert!(
            left.is_empty(),
            "a {what} state directory was left with {left:?} after the failed start"
        );
    }
    soak_figure(
        "state dir read-only or full at start, no CA",
        "clear start-up error in all 3 cases (read-only, full, 1 page free); no file left",
    );
}

#[test]
fn renewal_into_a_read_only_state_dir_keeps_serving() {
    renewal_into_an_unwritable_state_dir(Unwritable::ReadOnly);
}

#[test]
fn renewal_into_a_full_state_dir_keeps_serving() {
    renewal_into_an_unwritable_state_dir(Unwritable::Full { free_pages: 0 });
}

/// A 15 s leaf is renewed about every 10 s; the state directory becomes unwritable after
/// start-up, and renewals go on in memory under load, the files on disk untouched.
fn renewal_into_an_unwritable_state_dir(fault: Unwritable) {
    let what = fault.describe();
    let Some(env) = TestEnv::new(&format!("fault-renewal-{}", what.replace(' ', "-"))) else {
        return;
    };
    let state = env.path("state");
    std::fs::create_dir(&state).expect("state dir");
    // The proxy lives in its own mount namespace from the start; for a full disk its state
    // directory is a tiny tmpfs that it fills with its own CA and leaf first.
    let setup = match fault {
        Unwritable::ReadOnly => "true".to_owned(),
        Unwritable::Full { .. } => mounts::tiny_tmpfs(&state),
    };
    let wrapper = mounts::private_mounts(&setup);
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let proxy = Proxy::start_via(
        &env.ns,
        env.dir.path(),
        &wrapper,
        &[
            "--state-dir",
            path_str(&state),
            "--name",
            "localhost",
            "--leaf-lifetime",
            "15s",
        ],
        &[],
        || {},
    );
    let pid = proxy.process.pid();
    let seen = mounts::seen_by(pid, &state);
    let files = ["ca.key", "ca.pem", "leaf.key", "leaf.pem"];
    let before: Vec<Vec<u8>> = files.iter().map(|f| read(&seen.join(f))).collect();
    let first_serial = pem_serial(&seen.join("leaf.pem"));
    // The host's view of a tmpfs state directory is empty: trust the CA the proxy sees.
    let tls = TlsOptions::trusting_pem(&before[1]);

    mounts::in_mount_namespace_of(pid, &fault.apply(&state));
    let probe = std::fs::write(seen.join("probe"), [0u8; 4096]);
    let _ = std::fs::remove_file(seen.join("probe"));
    assert!(
        probe.is_err_and(|e| e.to_string().contains(fault.error())),
        "the state directory did not become {what}: the fault was not set up"
    );

    let load = Load::start(
        &env.ns,
        tls,
        LoadPlan {
            h1_tasks: 1,
            h2_tasks: 1,
            max_duration: Duration::from_secs(60),
            pause: Duration::from_millis(20),
            ..LoadPlan::default()
        },
    );
    // Two renewals: the first leaf (15 s) has expired by the second, so only the leaves kept
    // in memory can have served the load.
    let started = Instant::now();
    let renewed = poll_until(Duration::from_secs(45), || {
        let m = env.metrics();
        (renewals(&m, "success") >= 2.0).then_some(m)
    });
    let report = load.finish();
    let Some(metrics) = renewed else {
        panic!(
            "two renewals into a {what} state directory did not succeed within 45 s; /metrics:\n{}",
            env.metrics().text
        );
    };
    assert_eq!(
        report.failed, 0,
        "{} requests failed while the state directory was {what}: {:#?}",
        report.failed, report.errors
    );
    assert!(
        report.serials.len() >= 2 && report.serials.iter().any(|s| *s != first_serial),
        "no renewed leaf was served: {:?}",
        report.serials
    );
    let unstored = metrics.expect("proxy_state_write_failures_total", &[]);
    assert!(
        unstored >= 2.0,
        "each renewed leaf that could not be stored should be counted: {unstored}"
    );
    assert_eq!(renewals(&metrics, "failure"), 0.0, "a renewal failed");
    let log = proxy.process.stderr();
    assert!(
        log.contains("cannot store the new leaf") && log.contains(fault.error()),
        "the log should say the renewed leaf could not be stored, and why:\n{log}"
    );
    // Nothing on disk changed: not the CA key, nor the old leaf (neither replaced by half of
    // a new pair nor truncated), and no temporary file is left.
    for (file, bytes) in files.iter().zip(&before) {
        assert_eq!(
            &read(&seen.join(file)),
            bytes,
            "{file} changed in the {what} state directory"
        );
    }
    let mut expected: Vec<&str> = files.to_vec();
    if let Unwritable::Full { .. } = fault {
        expected.push(FILLER);
    }
    expected.sort_unstable();
    assert_eq!(mounts::listing(&seen), expected);
    soak_figure(
        &format!("state dir {what} at renewal"),
        &format!(
            "{} leaves served (renewed in memory), {unstored} unstored; 0 failed of {} requests \
             over {:.0} s; ca.key unchanged",
            report.serials.len(),
            report.ok,
            started.elapsed().as_secs_f64()
        ),
    );
}

fn renewals(m: &Metrics, result: &str) -> f64 {
    m.value(
        "proxy_reloads_total",
        &[("what", "renewal"), ("result", result)],
    )
}
