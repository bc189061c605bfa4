//! The operator's commands: `proxy check` catches bad configuration before a deploy, `proxy
//! ca` creates, exports and issues from the local CA, `--help` and the README agree on every
//! default, and the logs say whose connection a line is about.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use proxy_e2e::{
    TestEnv, path_str, proxy_bin, proxy_cmd, proxy_cmd_ok, read, run_with_timeout, scratch_dir,
};

/// Runs `proxy check ARGS` inside the test's namespace (so nothing it might bind collides).
fn check(env: &TestEnv, args: &[&str]) -> Output {
    let mut cmd = env.ns.command(proxy_bin());
    cmd.arg("check").args(args);
    run_with_timeout(cmd, Duration::from_secs(30))
}

fn text(out: &Output) -> String {
    format!(
        "exit {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn check_accepts_good_config_and_names_what_is_wrong() {
    let Some(env) = TestEnv::new("check") else {
        return;
    };
    let state = env.path("state");
    proxy_cmd_ok(&[
        "ca",
        "init",
        "--state-dir",
        path_str(&state),
        "--name",
        "localhost",
    ]);

    let write_config = |name: &str, extra: &str| {
        let path = env.path(name);
        let body = format!(
            "state_dir = \"{}\"\nnames = [\"localhost\"]\nhttp_listen = \"[::]:80\"\n{extra}\n",
            state.display()
        );
        std::fs::write(&path, body).expect("writing a config file");
        path
    };

    let good = write_config(
        "good.toml",
        "https_listen = \"[::]:443\"\nleaf_lifetime = \"7d\"",
    );
    let out = check(&env, &["--config", path_str(&good)]);
    assert!(
        out.status.success(),
        "a valid config was rejected: {}",
        text(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("configuration ok"),
        "`proxy check` should say \"configuration ok\": {}",
        text(&out)
    );

    let bad_listen = write_config("bad-listen.toml", "https_listen = \"nonsense\"");
    let out = check(&env, &["--config", path_str(&bad_listen)]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "https_listen = \"nonsense\" passed the check: {}",
        text(&out)
    );
    assert!(
        stderr.contains("https_listen")
            || stderr.contains("https-listen")
            || stderr.contains("nonsense"),
        "the error should name https_listen or the bad value: {}",
        text(&out)
    );

    let too_long = write_config("bad-lifetime.toml", "leaf_lifetime = \"365d\"");
    let out = check(&env, &["--config", path_str(&too_long)]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a 365d leaf lifetime (max 90d) passed: {}",
        text(&out)
    );
    assert!(
        stderr.contains("lifetime"),
        "the error should name the leaf lifetime: {}",
        text(&out)
    );

    // Bring-your-own material: a good pair passes, a corrupt or mismatched one does not.
    let issue = |name: &str| {
        let cert = env.path(&format!("{name}.pem"));
        let key = env.path(&format!("{name}.key"));
        proxy_e2e::issue_localhost_leaf(&state, &cert, &key);
        (cert, key)
    };
    let (cert_a, key_a) = issue("a");
    let (_cert_b, key_b) = issue("b");
    let byo = |cert: &Path, key: &Path| {
        check(
            &env,
            &[
                "--config",
                path_str(&good),
                "--tls-cert",
                path_str(cert),
                "--tls-key",
                path_str(key),
            ],
        )
    };
    let out = byo(&cert_a, &key_a);
    assert!(
        out.status.success(),
        "a valid --tls-cert/--tls-key pair was rejected: {}",
        text(&out)
    );

    let corrupt = env.path("corrupt.pem");
    std::fs::write(
        &corrupt,
        "-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n",
    )
    .expect("writing a corrupt certificate");
    let out = byo(&corrupt, &key_a);
    assert!(
        !out.status.success(),
        "a corrupt --tls-cert passed the check: {}",
        text(&out)
    );
    let stderr = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(
        stderr.contains("corrupt.pem") || stderr.contains("certificate"),
        "the error should point at the certificate: {}",
        text(&out)
    );

    let out = byo(&cert_a, &key_b);
    assert!(
        !out.status.success(),
        "a certificate with somebody else's key passed the check: {}",
        text(&out)
    );
}

#[test]
fn ca_export_prints_the_pem_and_its_sha256_fingerprint() {
    let dir = scratch_dir("export");
    let state = dir.path().join("state");
    proxy_cmd_ok(&[
        "ca",
        "init",
        "--state-dir",
        path_str(&state),
        "--name",
        "localhost",
    ]);
    let out = proxy_cmd_ok(&["ca", "export", "--state-dir", path_str(&state)]);
    let stdout = String::from_utf8_lossy(&out.stdout);

    let ca_pem = String::from_utf8(read(&state.join("ca.pem"))).expect("ca.pem is text");
    assert!(
        stdout.contains(ca_pem.trim()),
        "`proxy ca export` does not print ca.pem:\n{stdout}"
    );
    let printed = stdout
        .lines()
        .find_map(|l| l.strip_prefix("SHA-256 Fingerprint: "))
        .unwrap_or_else(|| panic!("no `SHA-256 Fingerprint: ` line in:\n{stdout}"))
        .trim()
        .to_uppercase();

    let mut cmd = std::process::Command::new("openssl");
    cmd.args(["x509", "-noout", "-fingerprint", "-sha256", "-in"])
        .arg(state.join("ca.pem"));
    let out = run_with_timeout(cmd, Duration::from_secs(20));
    let openssl = String::from_utf8_lossy(&out.stdout);
    let expected = openssl
        .trim()
        .split_once('=')
        .unwrap_or_else(|| panic!("unexpected openssl output {openssl:?}"))
        .1
        .to_uppercase();
    assert_eq!(
        printed, expected,
        "the printed fingerprint differs from openssl's"
    );
}

#[test]
fn ca_init_keeps_keys_private_and_refuses_to_overwrite() {
    let dir = scratch_dir("init");
    let state = dir.path().join("state");
    proxy_cmd_ok(&[
        "ca",
        "init",
        "--state-dir",
        path_str(&state),
        "--name",
        "localhost",
    ]);
    let mode = |p: &Path| {
        std::fs::metadata(p)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode(&state), 0o700, "state dir permissions");
    assert_eq!(mode(&state.join("ca.key")), 0o600, "ca.key permissions");
    let first = read(&state.join("ca.pem"));

    let out = proxy_cmd(&[
        "ca",
        "init",
        "--state-dir",
        path_str(&state),
        "--name",
        "localhost",
    ]);
    assert!(
        !out.status.success(),
        "a second `ca init` overwrote the CA without --force"
    );
    assert!(!out.stderr.is_empty(), "a refused `ca init` should say why");
    assert_eq!(
        read(&state.join("ca.pem")),
        first,
        "a refused `ca init` changed ca.pem"
    );

    proxy_cmd_ok(&[
        "ca",
        "init",
        "--state-dir",
        path_str(&state),
        "--name",
        "localhost",
        "--force",
    ]);
    assert_ne!(
        read(&state.join("ca.pem")),
        first,
        "`ca init --force` did not make a new CA"
    );
}

#[test]
fn json_log_format_is_one_object_per_line() {
    let Some(env) = TestEnv::new("jsonlog") else {
        return;
    };
    let proxy = env.serve(&["--log-format", "json"]);
    let stderr = proxy.process.stderr();
    let mut ready = false;
    for line in stderr.lines().filter(|l| !l.trim().is_empty()) {
        let value: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("--log-format json wrote a non-JSON line ({e}): {line}"));
        assert!(
            value.is_object(),
            "a JSON log line is not an object: {line}"
        );
        ready |= line.contains("proxy ready");
    }
    assert!(ready, "no \"proxy ready\" JSON line on stderr:\n{stderr}");
}

/// The README's table of settings shows the defaults `proxy serve --help` shows, which come
/// from the one place each setting is declared.
#[test]
fn readme_defaults_match_serve_help() {
    let help = String::from_utf8_lossy(&proxy_cmd_ok(&["serve", "--help"]).stdout).into_owned();
    let readme_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
    let readme = String::from_utf8_lossy(&read(&readme_path)).into_owned();
    let mut compared = 0;
    for row in readme.lines().filter(|line| line.starts_with("| `--")) {
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let (Some(flags), Some(defaults)) = (cells.get(1), cells.get(2)) else {
            continue;
        };
        let flags: Vec<&str> = flags.split(", ").map(|f| f.trim_matches('`')).collect();
        let defaults: Vec<&str> = defaults.split(", ").map(|d| d.trim_matches('`')).collect();
        if flags.len() != defaults.len() {
            continue;
        }
        for (flag, readme_default) in flags.iter().zip(&defaults) {
            let Some(help_default) = help_default(&help, flag) else {
                continue;
            };
            assert_eq!(
                *readme_default, help_default,
                "README.md says {flag} defaults to {readme_default:?}, `proxy serve --help` says {help_default:?}"
            );
            compared += 1;
        }
    }
    assert!(
        compared >= 9,
        "only {compared} defaults of the README's settings table were compared with --help:\n{help}"
    );
}

/// The `[default: ...]` that `--help` shows under `flag`, if any.
fn help_default<'a>(help: &'a str, flag: &str) -> Option<&'a str> {
    let mut lines = help.lines().skip_while(|line| {
        !line.trim_start().starts_with(&format!("{flag} ")) && line.trim() != flag
    });
    lines.next()?;
    lines
        .take_while(|line| !line.trim_start().starts_with("--"))
        .find_map(|line| line.trim().strip_prefix("[default: ")?.strip_suffix(']'))
}

/// With debug logging, what the proxy says about a connection names its listener and peer
/// (a `connection` span), over HTTP/1.1 and HTTP/2 alike (hyper serves each HTTP/2 stream in
/// a task of its own), while access-log lines keep their own format, outside any span.
#[test]
fn debug_lines_name_the_connection_and_access_lines_do_not_change() {
    let Some(env) = TestEnv::new("spans") else {
        return;
    };
    // Nothing listens on port 1: every request fails upstream, with a warning.
    let proxy = env.serve_with_env(
        &["--upstream", "http://127.0.0.1:1"],
        &[("PROXY_LOG", "debug")],
    );
    let tls = proxy.tls();
    // Not TLS: the handshake fails, which is logged at debug inside the connection's span.
    let _ = env.run(|| {
        proxy_e2e::client::raw_http(proxy_e2e::HTTPS, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    });
    for alpn in [proxy_e2e::Alpn::H1, proxy_e2e::Alpn::H2] {
        let options = tls.clone().alpn(alpn);
        let resp = env
            .run(|| proxy_e2e::client::https(&options, proxy_e2e::Req::get("/")))
            .unwrap_or_else(|e| panic!("GET / over {alpn:?}: {e}"));
        assert_eq!(
            resp.status,
            http::StatusCode::BAD_GATEWAY,
            "{alpn:?}: {resp:?}"
        );
    }
    let stderr = proxy.process.stderr();
    let lines_with = |needle: &str| -> Vec<&str> {
        stderr
            .lines()
            .filter(|line| line.contains(needle))
            .collect()
    };
    let failed = lines_with("TLS handshake failed");
    assert!(
        failed.len() == 1 && failed[0].contains("connection{listener=\"https\" peer=127.0.0.1:"),
        "the handshake failure does not name its connection: {failed:?}\n{stderr}"
    );
    let upstream = lines_with("upstream request failed");
    assert_eq!(
        upstream.len(),
        2,
        "one upstream warning per request:\n{stderr}"
    );
    for line in upstream {
        assert!(
            line.contains("connection{listener=\"https\" peer=127.0.0.1:"),
            "an upstream warning (HTTP/1.1 or HTTP/2) does not name its connection: {line}"
        );
    }
    let access = lines_with("proxy::access");
    assert_eq!(access.len(), 2, "one access line per request:\n{stderr}");
    for line in access {
        assert!(
            line.contains(" INFO proxy::access: request listener=\"https\" peer=127.0.0.1:"),
            "an access line changed its format: {line}"
        );
    }
}

/// `proxy check --print` shows every setting in effect and where it came from, as a config
/// file that `--config` reads back to the same configuration.
#[test]
fn check_print_shows_each_setting_and_its_source_and_reads_back() {
    let dir = scratch_dir("check-print");
    let file = dir.path().join("proxy.toml");
    std::fs::write(
        &file,
        "idle_timeout = \"5s\"\nupstream = [\"http://127.0.0.1:8080\", \"http://127.0.0.1:8081\"]\n",
    )
    .expect("config file");
    let state = dir.path().join("state");
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let mut cmd = std::process::Command::new(proxy_bin());
        cmd.arg("check").args(args).arg("--print");
        cmd.env_remove("PROXY_HSTS_MAX_AGE")
            .envs(env.iter().copied());
        let out = run_with_timeout(cmd, Duration::from_secs(30));
        assert!(out.status.success(), "check --print: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let printed = run(
        &[
            "--config",
            path_str(&file),
            "--https-listen",
            "127.0.0.1:8443",
            "--state-dir",
            path_str(&state),
        ],
        &[("PROXY_HSTS_MAX_AGE", "60")],
    );
    let file_source = format!("# file {}", file.display());
    for (line, source) in [
        ("https_listen = \"127.0.0.1:8443\"", "# flag"),
        ("hsts_max_age = \"60\"", "# environment PROXY_HSTS_MAX_AGE"),
        ("idle_timeout = \"5s\"", file_source.as_str()),
        (
            "upstream = [\"http://127.0.0.1:8080\", \"http://127.0.0.1:8081\"]",
            file_source.as_str(),
        ),
        ("http_listen = \"[::]:80\"", "# default"),
    ] {
        assert!(
            printed
                .lines()
                .any(|l| l.starts_with(line) && l.ends_with(source)),
            "no `{line}  {source}` in:\n{printed}"
        );
    }
    assert!(printed.contains("configuration ok"), "{printed}");

    // The printed settings, as a file of their own, give the same configuration.
    let settings: String = printed
        .lines()
        .take_while(|l| !l.starts_with("configuration ok"))
        .map(|l| format!("{l}\n"))
        .collect();
    let again = dir.path().join("effective.toml");
    std::fs::write(&again, &settings).expect("effective config");
    let reread = run(&["--config", path_str(&again)], &[]);
    let values = |text: &str| -> Vec<String> {
        text.lines()
            .filter(|l| !l.starts_with('#') && l.contains(" = "))
            .map(|l| l.split("  #").next().unwrap_or_default().to_owned())
            .collect()
    };
    assert_eq!(values(&reread), values(&printed), "read back:\n{reread}");
}

/// Completion scripts for the common shells, and one manual page per command that `man`
/// renders without a warning.
#[test]
fn completions_and_manual_pages_come_from_the_command_definitions() {
    let bash = proxy_cmd_ok(&["completions", "bash"]);
    let script = String::from_utf8_lossy(&bash.stdout).into_owned();
    assert!(
        script.contains("_proxy()") && script.contains("--upstream"),
        "{script}"
    );
    let dir = scratch_dir("completions");
    let path = dir.path().join("proxy.bash");
    std::fs::write(&path, &script).expect("script");
    let mut syntax = std::process::Command::new("bash");
    syntax.arg("-n").arg(&path);
    let out = run_with_timeout(syntax, Duration::from_secs(10));
    assert!(out.status.success(), "bash -n: {}", text(&out));
    for shell in ["zsh", "fish"] {
        let out = proxy_cmd_ok(&["completions", shell]);
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("upstream"),
            "{shell} completions"
        );
    }

    let pages = dir.path().join("man");
    proxy_cmd_ok(&["manpage", "--out-dir", path_str(&pages)]);
    for page in [
        "proxy.8",
        "proxy-serve.8",
        "proxy-check.8",
        "proxy-ca-export.8",
    ] {
        let path = pages.join(page);
        assert!(path.is_file(), "no {page}");
        // groff reports what it cannot render (-ww: every warning); `man -l` would page.
        let mut groff = std::process::Command::new("groff");
        groff.args(["-man", "-Tutf8", "-ww", "-z"]).arg(&path);
        let out = run_with_timeout(groff, Duration::from_secs(10));
        assert!(
            out.status.success() && out.stderr.is_empty(),
            "groff on {page}: {}",
            text(&out)
        );
    }
    let serve = std::fs::read_to_string(pages.join("proxy-serve.8")).expect("proxy-serve.8");
    for flag in ["upstream", "max\\-connections", "PROXY_HTTPS_LISTEN"] {
        assert!(
            serve.contains(flag),
            "proxy-serve.8 does not document {flag}"
        );
    }
}
