//! `cargo xtask run`: builds the proxy and replaces this process with `proxy serve` on :80 and
//! :443 with the embedded defaults, after saying where the CA certificate is and how to trust
//! it. Refuses, with the fixes spelled out, when the proxy could not bind its privileged ports.

use std::{
    convert::Infallible, env, fs, os::unix::process::CommandExt as _, path::PathBuf,
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::{exec, privilege, workspace};

/// Options of `cargo xtask run`.
#[derive(Debug, clap::Args)]
pub(crate) struct Options {
    /// Build and run the optimised binary.
    #[arg(long)]
    pub release: bool,
    /// Extra arguments for `proxy serve`, after `--` (e.g. `-- --http-listen [::]:8080
    /// --https-listen [::]:8443`).
    #[arg(last = true)]
    pub serve_args: Vec<String>,
}

/// The proxy's listeners that default to privileged ports: flag, its environment fallback
/// (`proxy serve --help`) and the default port.
const LISTENERS: [(&str, &str, u16); 2] = [
    ("--http-listen", "PROXY_HTTP_LISTEN", 80),
    ("--https-listen", "PROXY_HTTPS_LISTEN", 443),
];

/// Builds and execs the proxy; returns only on failure.
pub(crate) fn run(opts: Options) -> Result<Infallible> {
    let Options {
        release,
        serve_args,
    } = opts;
    // Kernel metrics need the eBPF program: on Debian as root the toolchain is installed as
    // `cargo xtask test` installs it; without one the proxy still serves, and says so.
    let toolchain = crate::ebpf::ensure_tracefs().and_then(|()| crate::ebpf::ensure_toolchain());
    if let Err(e) = toolchain.and_then(|()| crate::ebpf::build().map(drop)) {
        println!("warning: serving without kernel metrics: {e:#}");
    }
    let mut build = workspace::cargo();
    build.args(["build", "-p", "proxy"]);
    if release {
        build.arg("--release");
    }
    exec::exec(&mut build)?;
    let bin = workspace::proxy_bin(release);

    let start = privilege::unprivileged_port_start();
    let low = privileged_ports(&serve_args, |name| env::var(name).ok(), start);
    if !low.is_empty() && !privilege::exec_may_bind_low_ports(&bin) {
        bail!("{}", privilege_help(&low, start, &bin));
    }

    let mut serve = Command::new(&bin);
    serve.arg("serve");
    let state_dir = match flag_values(&serve_args, "--state-dir").last() {
        Some(dir) => PathBuf::from(dir),
        None if let Some(dir) = env::var_os("PROXY_STATE_DIR") => PathBuf::from(dir),
        None => {
            let dir = default_state_dir();
            serve.arg("--state-dir").arg(&dir);
            dir
        }
    };
    serve.args(&serve_args);
    if let Some(parent) = state_dir.parent() {
        // The proxy creates the state directory itself (with the permissions a CA key needs);
        // only make sure it has somewhere to go.
        fs::create_dir_all(parent)
            .with_context(|| format!("failed to create {}", parent.display()))?;
    }

    let ca = state_dir.join("ca.pem");
    let (ca, state, bin_s) = (ca.display(), state_dir.display(), bin.display());
    println!("==> CA certificate: {ca} (created on first start)");
    println!("    fingerprint and PEM: {bin_s} ca export --state-dir {state}");
    println!("    trust it for curl:   curl --cacert {ca} https://localhost/");
    println!(
        "    trust it here:       sudo {bin_s} ca trust --state-dir {state}   (undo: ca untrust)"
    );
    println!("$ {}", exec::display(&serve));
    // exec: the proxy takes over this process, so Ctrl-C and SIGTERM reach it directly.
    let e = serve.exec();
    Err(e).with_context(|| format!("failed to start {bin_s}"))
}

/// `/var/lib/proxy` for root (the appliance's place), else under the workspace's `target`.
fn default_state_dir() -> PathBuf {
    if privilege::is_root() {
        PathBuf::from("/var/lib/proxy")
    } else {
        workspace::root().join("target").join("proxy-state")
    }
}

/// The ports below `unprivileged_start` that `proxy serve` with these extra arguments would
/// bind: each listener's port from its flag, else from its environment variable (read through
/// `env`), else the default. Port 0 (any free port) needs no privilege; an address that does
/// not parse is left to the proxy to reject. (A `--config` file may move listeners too; it is
/// not read here.)
fn privileged_ports(
    serve_args: &[String],
    env: impl Fn(&str) -> Option<String>,
    unprivileged_start: u16,
) -> Vec<u16> {
    let mut ports = Vec::new();
    for (flag, var, default) in LISTENERS {
        let values = flag_values(serve_args, flag);
        if !values.is_empty() {
            ports.extend(values.iter().filter_map(|addr| port(addr)));
        } else if let Some(addr) = env(var) {
            ports.extend(port(&addr));
        } else {
            ports.push(default);
        }
    }
    ports.retain(|&port| port != 0 && port < unprivileged_start);
    ports.dedup();
    ports
}

/// Every value given to `flag`, as `--flag value` or `--flag=value`.
fn flag_values<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
    let mut values = Vec::new();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        if arg == flag {
            values.extend(args.next().map(String::as_str));
        } else if let Some(value) = arg
            .strip_prefix(flag)
            .and_then(|rest| rest.strip_prefix('='))
        {
            values.push(value);
        }
    }
    values
}

/// The port of a listen address (`[::]:8080`, `0.0.0.0:80`, `:8443`).
fn port(addr: &str) -> Option<u16> {
    addr.rsplit_once(':')?.1.parse().ok()
}

fn privilege_help(ports: &[u16], start: u16, bin: &std::path::Path) -> String {
    let ports = ports
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(" and ");
    let noun = if ports.contains(' ') { "ports" } else { "port" };
    format!(
        "cannot serve on {noun} {ports}: ports below {start} need root or CAP_NET_BIND_SERVICE, \
         and this process has neither\n\
         fix it one of these ways:\n  \
         - run as root\n  \
         - give the binary the capability (again after each rebuild): \
         sudo setcap cap_net_bind_service=+ep {bin}\n  \
         - listen on unprivileged ports: \
         cargo xtask run -- --http-listen [::]:8080 --https-listen [::]:8443",
        bin = bin.display(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `input` is the environment (`NAME=value` words) and the extra arguments, split by `|`.
    fn check(input: &str, expected: &[u16]) {
        let (env, args) = input.split_once('|').unwrap_or(("", input));
        let env: Vec<(&str, &str)> = env
            .split_whitespace()
            .filter_map(|w| w.split_once('='))
            .collect();
        let args: Vec<String> = args.split_whitespace().map(String::from).collect();
        let lookup = |name: &str| {
            env.iter()
                .find(|(key, _)| *key == name)
                .map(|(_, value)| value.to_string())
        };
        assert_eq!(privileged_ports(&args, lookup, 1024), expected, "{input}");
    }

    #[test]
    fn finds_the_privileged_ports_to_bind() {
        check("", &[80, 443]);
        check("--http-listen [::]:8080 --https-listen [::]:8443", &[]);
        check(
            "--http-listen=127.0.0.1:8080 --https-listen=0.0.0.0:8443",
            &[],
        );
        check("--http-listen [::]:8080", &[443]);
        check("--https-listen [::]:8443", &[80]);
        check("--http-listen [::]:1024 --https-listen [::]:1023", &[1023]);
        check("--http-listen 127.0.0.1:0 --https-listen 127.0.0.1:0", &[]);
        check("--http-listen :8080 --https-listen :443", &[443]);
        // Two listeners for one protocol: both count.
        check(
            "--http-listen [::]:8080 --http-listen 0.0.0.0:81 --https-listen [::]:8443",
            &[81],
        );
        // Unparsable: the proxy says what is wrong with it.
        check("--http-listen nonsense --https-listen [::]:8443", &[]);
        // A flag without its value moves nothing.
        check("--https-listen [::]:8443 --http-listen", &[80]);
        // Other flags are left alone.
        check("--state-dir /tmp/s --http-listen-backlog 5", &[80, 443]);
        // The proxy's environment fallbacks count, and a flag beats them.
        check(
            "PROXY_HTTP_LISTEN=[::]:8080 PROXY_HTTPS_LISTEN=[::]:8443 |",
            &[],
        );
        check("PROXY_HTTPS_LISTEN=[::]:8443 |", &[80]);
        check(
            "PROXY_HTTP_LISTEN=[::]:8080 | --http-listen [::]:80",
            &[80, 443],
        );
        check(
            "PROXY_HTTP_LISTEN=[::]:80 | --http-listen [::]:8080 --https-listen [::]:8443",
            &[],
        );
    }

    #[test]
    fn honours_the_unprivileged_port_sysctl() {
        let args = ["--http-listen", "[::]:80", "--https-listen", "[::]:443"].map(String::from);
        assert_eq!(privileged_ports(&args, |_| None, 0), Vec::<u16>::new());
        assert_eq!(privileged_ports(&args, |_| None, 443), vec![80]);
    }

    #[test]
    fn reads_flag_values() {
        let args = ["--state-dir", "/a", "x", "--state-dir=/b"].map(String::from);
        assert_eq!(flag_values(&args, "--state-dir"), ["/a", "/b"]);
    }
}
