//! Getting the CA to clients: `proxy ca trust` and `untrust` against this machine's real
//! Debian trust store and NSS databases, `ca export` in the Kubernetes layout (`--ca-dir`),
//! and the admin listener's `/ca.pem`.
//!
//! The trust store is changed only inside a private mount namespace, on tmpfs copies of
//! `/etc/ssl/certs`, `/usr/local/share/ca-certificates` and `/etc/ca-certificates.conf`; the
//! host's are compared byte for byte before and after. The hooks of `update-ca-certificates`
//! are an empty directory there, since they act on state outside the copies (dpkg triggers
//! for Java's keystore). NSS databases live under a temporary `HOME`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use nix::sys::signal::Signal;
use proxy_e2e::mounts::seen_by;
use proxy_e2e::{
    ADMIN, Process, RawResp, TestEnv, client, path_str, poll_until, proxy_bin, proxy_cmd,
    proxy_cmd_ok, read, require_tool, run_with_timeout,
};

/// The trust store's files on a Debian system: what `update-ca-certificates` reads and writes.
const TRUST_STORE: &[&str] = &[
    "/etc/ssl/certs",
    "/usr/local/share/ca-certificates",
    "/etc/ca-certificates.conf",
];

#[test]
fn trust_and_untrust_change_what_curl_and_nss_accept_and_nothing_else() {
    let Some(env) = TestEnv::new("ca-trust") else {
        return;
    };
    if !require_tool(
        "ca-trust",
        "update-ca-certificates",
        "apt-get install ca-certificates",
    ) || !require_tool("ca-trust", "certutil", "apt-get install libnss3-tools")
        || !require_tool("ca-trust", "curl", "apt-get install curl")
    {
        return;
    }
    let host_before = snapshot(Path::new("/"));
    let proxy = env.serve(&[]);
    let state = path_str(&proxy.state_dir).to_owned();
    let home = env.path("home");
    let chromium = home.join(".pki/nssdb");
    let firefox = home.join(".mozilla/firefox/e2e.default-release");
    for db in [&chromium, &firefox] {
        std::fs::create_dir_all(db).expect("NSS database directory");
        certutil(&["-N", "--empty-password", "-d", &sql(db)]);
    }
    // Another CA in one database: untrust must leave it there.
    let other = env.path("other-ca");
    proxy_cmd_ok(&["ca", "init", "--state-dir", path_str(&other)]);
    certutil(&[
        "-A",
        "-d",
        &sql(&chromium),
        "-n",
        "someone else",
        "-t",
        "C,,",
        "-i",
        path_str(&other.join("ca.pem")),
    ]);

    // Rebuilt once first, so that "as before" is what the tool makes of the same anchors
    // (the host's bundle need not be).
    let store = TrustStoreCopy::start(&env, "update-ca-certificates >/dev/null");
    let inside_before = snapshot(&seen_by(store.holder.pid(), Path::new("/")));
    let trust = ["ca", "trust", "--state-dir", &state];
    let untrust = ["ca", "untrust", "--state-dir", &state];

    let refused = store.curl();
    assert!(
        !refused.status.success(),
        "curl trusted the proxy before `proxy ca trust`: {}",
        text(&refused.stdout)
    );

    let out = store.proxy(&home, &trust);
    let said = expect_success(&out, "proxy ca trust");
    let fingerprint = fingerprint_of(&proxy.state_dir);
    let name = anchor_name(&fingerprint);
    for part in [
        format!("SHA-256 Fingerprint: {fingerprint}"),
        format!("added /usr/local/share/ca-certificates/{name}.crt"),
        format!(
            "NSS database {}: added {name} (trust C,,)",
            chromium.display()
        ),
        format!(
            "NSS database {}: added {name} (trust C,,)",
            firefox.display()
        ),
        format!(
            "undo: {} ca untrust --state-dir {state}",
            proxy_bin().display()
        ),
    ] {
        assert!(
            said.contains(&part),
            "`proxy ca trust` did not say {part:?}:\n{said}"
        );
    }
    let answer = store.curl();
    assert_eq!(
        text(&answer.stdout),
        "Hello SRE!",
        "curl without --cacert after `proxy ca trust`: {}",
        text(&answer.stderr)
    );
    for db in [&chromium, &firefox] {
        let listed = certutil(&["-L", "-d", &sql(db)]);
        assert!(
            listed
                .lines()
                .any(|l| l.starts_with(&name) && l.trim_end().ends_with("C,,")),
            "{} does not list {name} with trust C,,:\n{listed}",
            db.display()
        );
    }

    // Again: the same entries, rewritten, and no second copy.
    let said = expect_success(&store.proxy(&home, &trust), "a second proxy ca trust");
    assert!(said.contains("already present"), "{said}");
    let anchors = seen_by(
        store.holder.pid(),
        Path::new("/usr/local/share/ca-certificates"),
    );
    let ours = proxy_e2e::mounts::listing(&anchors)
        .into_iter()
        .filter(|f| f.starts_with("proxy-local-ca-"))
        .count();
    assert_eq!(ours, 1, "a second trust added a second anchor file");

    let said = expect_success(&store.proxy(&home, &untrust), "proxy ca untrust");
    for part in [
        format!("removed /usr/local/share/ca-certificates/{name}.crt"),
        format!("NSS database {}: removed {name}", chromium.display()),
        format!("NSS database {}: removed {name}", firefox.display()),
    ] {
        assert!(
            said.contains(&part),
            "`proxy ca untrust` did not say {part:?}:\n{said}"
        );
    }
    let refused = store.curl();
    assert!(
        !refused.status.success(),
        "curl still trusted the proxy after `proxy ca untrust`"
    );
    for db in [&chromium, &firefox] {
        let listed = certutil(&["-L", "-d", &sql(db)]);
        assert!(
            !listed.contains(&name),
            "{} still lists {name}:\n{listed}",
            db.display()
        );
    }
    let listed = certutil(&["-L", "-d", &sql(&chromium)]);
    assert!(
        listed.contains("someone else"),
        "untrust removed another CA:\n{listed}"
    );
    assert_same(
        &inside_before,
        &snapshot(&seen_by(store.holder.pid(), Path::new("/"))),
        "after trust and untrust, the trust store in the namespace",
    );

    let said = expect_success(&store.proxy(&home, &untrust), "a second proxy ca untrust");
    assert!(
        said.contains("nothing to remove: this CA was not trusted here"),
        "{said}"
    );

    drop(store);
    assert_same(
        &host_before,
        &snapshot(Path::new("/")),
        "the host's own trust store",
    );
}

#[test]
fn an_unknown_platform_is_refused_and_nothing_changes() {
    let Some(env) = TestEnv::new("ca-trust-plan9") else {
        return;
    };
    let state = env.path("state");
    proxy_cmd_ok(&["ca", "init", "--state-dir", path_str(&state)]);
    let home = env.path("home");
    std::fs::create_dir_all(&home).expect("home");
    // No ca-certificates, no p11-kit: an os-release nobody knows and a PATH with no tools.
    let store = TrustStoreCopy::start(
        &env,
        "printf 'ID=plan9\\nNAME=\"Plan 9\"\\n' > \"$M/os-release\" && \
         mount --bind \"$M/os-release\" /etc/os-release",
    );
    let before = snapshot(&seen_by(store.holder.pid(), Path::new("/")));
    let mut cmd = store.command(&home, proxy_bin());
    cmd.args(["ca", "trust", "--state-dir", path_str(&state)])
        .env("PATH", env.path("empty-path"));
    let out = run_with_timeout(cmd, Duration::from_secs(30));
    let said = text(&out.stderr);
    assert!(
        !out.status.success(),
        "trust on plan9 succeeded: {}",
        text(&out.stdout)
    );
    for part in [
        "no system trust store this command knows",
        "ID=\"plan9\"",
        "update-ca-certificates, update-ca-trust, trust is on PATH",
    ] {
        assert!(
            said.contains(part),
            "the error does not say {part:?}:\n{said}"
        );
    }
    assert_same(
        &before,
        &snapshot(&seen_by(store.holder.pid(), Path::new("/"))),
        "after a refused trust, the trust store in the namespace",
    );
}

#[test]
fn ca_export_finds_the_ca_in_the_kubernetes_layout() {
    let Some(env) = TestEnv::new("ca-export-ca-dir") else {
        return;
    };
    // The pod's layout: an empty state directory, the CA mounted from a Secret elsewhere.
    let ca = env.path("ca");
    proxy_cmd_ok(&["ca", "init", "--state-dir", path_str(&ca)]);
    let state = env.path("state");
    std::fs::create_dir_all(&state).expect("state dir");
    let expected = format!(
        "{}SHA-256 Fingerprint: {}\n",
        text(&read(&ca.join("ca.pem"))),
        fingerprint_of(&ca)
    );
    let out = proxy_cmd_ok(&[
        "ca",
        "export",
        "--state-dir",
        path_str(&state),
        "--ca-dir",
        path_str(&ca),
    ]);
    assert_eq!(text(&out.stdout), expected, "ca export --ca-dir");
    let mut cmd = Command::new(proxy_bin());
    cmd.args(["ca", "export"])
        .env("PROXY_STATE_DIR", &state)
        .env("PROXY_CA_DIR", &ca);
    let out = run_with_timeout(cmd, Duration::from_secs(30));
    assert_eq!(text(&out.stdout), expected, "ca export with PROXY_CA_DIR");

    // Export needs the certificate only: a directory without the key will do.
    let public = env.path("public");
    std::fs::create_dir_all(&public).expect("public dir");
    std::fs::copy(ca.join("ca.pem"), public.join("ca.pem")).expect("copy ca.pem");
    let out = proxy_cmd_ok(&["ca", "export", "--ca-dir", path_str(&public)]);
    assert_eq!(
        text(&out.stdout),
        expected,
        "ca export of a directory without ca.key"
    );

    let out = proxy_cmd(&["ca", "export", "--state-dir", path_str(&state)]);
    let said = text(&out.stderr);
    assert!(
        !out.status.success(),
        "export of an empty state directory succeeded"
    );
    assert!(
        said.contains("--ca-dir") && !said.contains("--force"),
        "the error should point at --ca-dir, not at replacing a CA:\n{said}"
    );
}

#[test]
fn the_admin_listener_serves_the_ca_certificate_and_follows_its_rotation() {
    let Some(env) = TestEnv::new("ca-pem") else {
        return;
    };
    if !require_tool("ca-pem", "curl", "apt-get install curl") {
        return;
    }
    let proxy = env.serve(&[]);
    let served = get_ca_pem(&env);
    assert_eq!(served.status, 200, "GET /ca.pem: {}", served.head);
    assert_eq!(
        served.header("content-type"),
        Some("application/x-pem-file")
    );
    assert_eq!(
        served.body,
        proxy.ca_pem(),
        "/ca.pem is not the state dir's ca.pem"
    );
    assert!(
        !text(&served.body).contains("PRIVATE KEY"),
        "/ca.pem holds a key"
    );
    let downloaded = env.path("downloaded.pem");
    std::fs::write(&downloaded, &served.body).expect("write download");
    let answer = curl_with_ca(&env, &downloaded);
    assert_eq!(
        text(&answer.stdout),
        "Hello SRE!",
        "{}",
        text(&answer.stderr)
    );

    // A new CA in the state directory and a SIGHUP: the new leaf and /ca.pem go together.
    let old = served.body;
    proxy_cmd_ok(&[
        "ca",
        "init",
        "--force",
        "--state-dir",
        path_str(&proxy.state_dir),
    ]);
    proxy.signal(Signal::SIGHUP);
    let rotated = poll_until(Duration::from_secs(10), || {
        let served = get_ca_pem(&env);
        (served.body != old).then_some(served.body)
    })
    .expect("/ca.pem still serves the old CA 10 s after the reload");
    assert_eq!(rotated, proxy.ca_pem(), "/ca.pem is not the new ca.pem");
    std::fs::write(&downloaded, &rotated).expect("write download");
    let answer = curl_with_ca(&env, &downloaded);
    assert_eq!(
        text(&answer.stdout),
        "Hello SRE!",
        "{}",
        text(&answer.stderr)
    );
}

#[test]
fn the_admin_listener_has_no_ca_for_a_certificate_of_the_operators() {
    let Some(env) = TestEnv::new("ca-pem-own-cert") else {
        return;
    };
    let (_, leaves) = proxy_e2e::ca_with_leaves(&env, 1);
    let (cert, key) = &leaves[0];
    let _proxy = env.serve(&["--tls-cert", path_str(cert), "--tls-key", path_str(key)]);
    let served = get_ca_pem(&env);
    assert_eq!(
        served.status, 404,
        "GET /ca.pem with --tls-cert: {}",
        served.head
    );
    assert!(
        !text(&served.body).contains("BEGIN"),
        "served a certificate anyway"
    );
}

/// A private mount namespace, entered by a process that holds it, where the trust store is a
/// tmpfs copy of the host's. Commands run in it (and in the test's network namespace) through
/// `nsenter`.
struct TrustStoreCopy {
    holder: Process,
}

impl TrustStoreCopy {
    /// Sets the copies up, then runs the shell commands `more` (`$M` is the tmpfs).
    fn start(env: &TestEnv, more: &str) -> Self {
        let tmpfs = env.path("trust-store-copy");
        std::fs::create_dir_all(&tmpfs).expect("mount point");
        let mut setup = format!(
            "M='{}' && mount -t tmpfs trust-store \"$M\"",
            tmpfs.display()
        );
        for (i, path) in TRUST_STORE.iter().enumerate() {
            // `cp -a SRC/.` copies a directory's contents; a file is copied as itself.
            setup += &format!(
                " && if [ -d {path} ]; then mkdir \"$M/{i}\" && cp -a {path}/. \"$M/{i}\"; \
                 else cp -a {path} \"$M/{i}\"; fi && mount --bind \"$M/{i}\" {path}"
            );
        }
        // The hooks act on state outside these copies (Debian's Java hook runs dpkg triggers).
        setup +=
            " && mkdir \"$M/hooks\" && mount --bind \"$M/hooks\" /etc/ca-certificates/update.d";
        if !more.is_empty() {
            setup += &format!(" && {more}");
        }
        let mut cmd = env.ns.command("unshare");
        cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(format!("{setup} && exec sleep 600"));
        let mut holder = Process::spawn("trust store holder", cmd, env.path("holder.stderr"));
        let pid = holder.pid();
        holder.wait_ready(|| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "sleep")
        });
        TrustStoreCopy { holder }
    }

    /// `program` inside the namespaces, with `HOME` set to `home`.
    fn command(&self, home: &Path, program: impl AsRef<std::ffi::OsStr>) -> Command {
        // By its path: a test may give the command a PATH without it.
        let nsenter = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
            .map(|dir| dir.join("nsenter"))
            .find(|candidate| candidate.is_file())
            .expect("nsenter on PATH");
        let mut cmd = Command::new(nsenter);
        cmd.arg(format!("--target={}", self.holder.pid()))
            .args(["--mount", "--net", "--"])
            .arg(program)
            .env("HOME", home);
        cmd
    }

    fn proxy(&self, home: &Path, args: &[&str]) -> Output {
        let mut cmd = self.command(home, proxy_bin());
        cmd.args(args);
        run_with_timeout(cmd, Duration::from_secs(60))
    }

    /// `curl https://localhost/` with the system's trust store only.
    fn curl(&self) -> Output {
        let mut cmd = self.command(Path::new("/nonexistent"), "curl");
        cmd.args(["-sS", "--max-time", "10", "https://localhost/"]);
        run_with_timeout(cmd, Duration::from_secs(20))
    }
}

fn get_ca_pem(env: &TestEnv) -> RawResp {
    env.run(|| client::raw_http(ADMIN, b"GET /ca.pem HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"))
        .unwrap_or_else(|e| panic!("GET /ca.pem on the admin listener: {e}"))
}

fn curl_with_ca(env: &TestEnv, ca: &Path) -> Output {
    let mut cmd = env.ns.command("curl");
    cmd.args([
        "-sS",
        "--max-time",
        "10",
        "--cacert",
        path_str(ca),
        "https://localhost/",
    ]);
    run_with_timeout(cmd, Duration::from_secs(20))
}

/// Every file under the trust store's paths as seen from `root`: contents, or a symlink's
/// target, so that "unchanged" means byte for byte.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut files = BTreeMap::new();
    let mut pending: Vec<PathBuf> = TRUST_STORE
        .iter()
        .map(|p| root.join(p.trim_start_matches('/')))
        .collect();
    while let Some(path) = pending.pop() {
        let meta = std::fs::symlink_metadata(&path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        let relative = path.strip_prefix(root).unwrap_or(&path).to_owned();
        if meta.is_symlink() {
            let target = std::fs::read_link(&path).expect("symlink target");
            files.insert(relative, format!("-> {}", target.display()).into_bytes());
        } else if meta.is_dir() {
            for entry in std::fs::read_dir(&path).expect("listing") {
                pending.push(entry.expect("entry").path());
            }
        } else {
            files.insert(relative, read(&path));
        }
    }
    files
}

/// Panics naming every file added, removed or changed between two snapshots.
fn assert_same(
    before: &BTreeMap<PathBuf, Vec<u8>>,
    after: &BTreeMap<PathBuf, Vec<u8>>,
    what: &str,
) {
    let changed: Vec<String> = before
        .keys()
        .chain(after.keys())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .filter(|path| before.get(*path) != after.get(*path))
        .map(|path| match (before.get(path), after.get(path)) {
            (None, _) => format!("added {}", path.display()),
            (_, None) => format!("removed {}", path.display()),
            _ => format!("changed {}", path.display()),
        })
        .collect();
    assert!(
        changed.is_empty(),
        "{what} differs from before:\n{}",
        changed.join("\n")
    );
}

fn certutil(args: &[&str]) -> String {
    let mut cmd = Command::new("certutil");
    cmd.args(args);
    let out = run_with_timeout(cmd, Duration::from_secs(20));
    expect_success(&out, &format!("certutil {}", args.join(" ")))
}

fn sql(dir: &Path) -> String {
    format!("sql:{}", dir.display())
}

/// The fingerprint `ca export` prints for the CA in `dir`.
fn fingerprint_of(dir: &Path) -> String {
    let out = proxy_cmd_ok(&["ca", "export", "--state-dir", path_str(dir)]);
    let said = text(&out.stdout);
    said.lines()
        .find_map(|l| l.strip_prefix("SHA-256 Fingerprint: "))
        .unwrap_or_else(|| panic!("no fingerprint in:\n{said}"))
        .to_owned()
}

/// The file name and nickname `proxy ca trust` uses: the fingerprint's first six bytes.
fn anchor_name(fingerprint: &str) -> String {
    let short: String = fingerprint.split(':').take(6).collect();
    format!("proxy-local-ca-{}", short.to_lowercase())
}

fn expect_success(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn without_root_the_system_store_is_refused_before_anything_changes() {
    let Some(env) = TestEnv::new("ca-trust-not-root") else {
        return;
    };
    let state = env.path("state");
    proxy_cmd_ok(&["ca", "init", "--state-dir", path_str(&state)]);
    // A certificate a user could have downloaded from /ca.pem, readable by nobody.
    let cert = env.path("ca.pem");
    std::fs::copy(state.join("ca.pem"), &cert).expect("copy ca.pem");
    let mode = |path: &Path, mode| {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    };
    mode(env.dir.path(), 0o711);
    mode(&cert, 0o644);
    let store = TrustStoreCopy::start(&env, "");
    let before = snapshot(&seen_by(store.holder.pid(), Path::new("/")));
    let mut cmd = store.command(Path::new("/nonexistent"), "setpriv");
    cmd.args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
        .arg(proxy_bin())
        .args(["ca", "trust", "--cert", path_str(&cert)]);
    let out = run_with_timeout(cmd, Duration::from_secs(30));
    let said = text(&out.stderr);
    assert!(
        !out.status.success(),
        "trust as nobody succeeded: {}",
        text(&out.stdout)
    );
    assert!(
        said.contains("changing the system trust store needs root: run `sudo ")
            && said.contains("--no-system"),
        "{said}"
    );
    assert_same(
        &before,
        &snapshot(&seen_by(store.holder.pid(), Path::new("/"))),
        "after a trust without root, the trust store in the namespace",
    );
}
