//! The TLS posture as an auditor measures it: sslyze against Mozilla's "intermediate"
//! profile, trusting only our CA. This is the gate; the longer testssl.sh scan is in the soak.

use std::time::Duration;

use proxy_e2e::{TestEnv, run_with_timeout};

#[test]
fn sslyze_finds_the_https_listener_compliant_with_mozilla_intermediate() {
    let Some(env) = TestEnv::new("tls-posture") else {
        return;
    };
    let sslyze_present = std::process::Command::new("python3")
        .args(["-c", "import sslyze"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !sslyze_present {
        if std::env::var("PROXY_E2E_REQUIRE").as_deref() == Ok("1") {
            panic!("sslyze is needed (cargo xtask test installs it from PyPI)");
        }
        eprintln!("\n*** SKIPPED tls-posture: pip install sslyze ***\n");
        return;
    }
    let proxy = env.serve(&[]);
    let ca = proxy.state_dir.join("ca.pem");
    let mut cmd = env.ns.command("python3");
    cmd.args([
        "-m",
        "sslyze",
        "--mozilla_config=intermediate",
        "--certinfo_ca_file",
    ])
    .arg(&ca)
    .arg("localhost:443");
    let output = run_with_timeout(cmd, Duration::from_secs(120));
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && report.contains("OK - Compliant"),
        "sslyze does not find :443 compliant with Mozilla intermediate:\n{report}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for verdict in [
        "OK - Not vulnerable to Heartbleed",
        "OK - Not vulnerable to OpenSSL CCS injection",
        "OK - Compression disabled",
        "OK - Not vulnerable, RSA cipher suites not supported",
    ] {
        assert!(
            report.contains(verdict),
            "sslyze does not say {verdict:?}:\n{report}"
        );
    }
}
