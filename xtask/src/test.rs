//! `cargo xtask test`: every test of the project, in the order a reviewer would run them: the
//! system packages the tests need, formatting, clippy (the workspace, then the kernel program
//! for its BPF target), unused dependencies, the supply chain, fuzzing, then the proxy binary
//! and the whole workspace's tests against it (end-to-end tests find it through `PROXY_BIN`),
//! and a smoke run of the benchmark harness against the proxy and its peers.

use std::process::ExitCode;

use proxy_testkit::phase::{self, Phase};

use crate::{bench, deps, ebpf, exec::exec, fuzz, privilege, pypi, supply_chain, workspace};

/// Options of `cargo xtask test`.
#[derive(Debug, clap::Args)]
pub(crate) struct Options {
    /// A fast loop while editing: skip the system packages and clippy, and let end-to-end
    /// tests skip (loudly) when they cannot run instead of failing.
    #[arg(long)]
    pub quick: bool,
}

/// The system packages, Python tools and BPF toolchain the tests need (installed when this is
/// Debian and we are root).
pub(crate) fn ensure_dependencies() -> anyhow::Result<()> {
    deps::ensure()?;
    pypi::ensure()?;
    ebpf::ensure_tracefs()?;
    ebpf::ensure_toolchain()
}

/// Runs the phases; fails at the first failing one, after printing the summary.
pub(crate) fn test(Options { quick }: Options) -> ExitCode {
    let proxy_bin = workspace::proxy_bin(false);
    let phases = vec![
        if quick {
            Phase::skip("deps", "--quick")
        } else {
            Phase::new("deps", ensure_dependencies)
        },
        Phase::new("build-ebpf", || ebpf::build().map(drop)),
        Phase::new("fmt", || {
            exec(workspace::cargo().args(["fmt", "--all", "--check"]))
        }),
        if quick {
            Phase::skip("clippy", "--quick")
        } else {
            Phase::new("clippy", || {
                exec(workspace::cargo().args([
                    "clippy",
                    "--workspace",
                    "--all-targets",
                    "--locked",
                    "--",
                    "-D",
                    "warnings",
                ]))
            })
        },
        if quick {
            Phase::skip("ebpf-clippy", "--quick")
        } else {
            Phase::new("ebpf-clippy", ebpf::clippy)
        },
        if quick {
            Phase::skip("unused-deps", "--quick")
        } else {
            Phase::new("unused-deps", supply_chain::unused_dependencies)
        },
        if quick {
            Phase::skip("supply-chain", "--quick")
        } else {
            Phase::new("supply-chain", supply_chain::check)
        },
        if quick {
            Phase::skip("fuzz", "--quick")
        } else {
            Phase::new("fuzz", || fuzz::run(10))
        },
        Phase::new("build", || {
            exec(workspace::cargo().args(["build", "--locked", "-p", "proxy"]))?;
            // Also the release build, for the checks of production timings (and the VM and
            // container tasks build the same one after).
            exec(workspace::cargo().args(["build", "--locked", "--release", "-p", "proxy"]))
        }),
        Phase::new("test", || {
            let mut cmd = workspace::cargo();
            // Every failure shows, not only the first test binary's.
            cmd.args(["test", "--workspace", "--locked", "--no-fail-fast"])
                .env("PROXY_BIN", &proxy_bin)
                .env("PROXY_RELEASE_BIN", workspace::proxy_bin(true));
            if !quick {
                cmd.env("PROXY_E2E_REQUIRE", "1");
            }
            exec(&mut cmd)
        }),
        if quick && !privilege::is_root() {
            Phase::skip(
                "bench-smoke",
                "--quick and not root (namespaces, ports 80/443)",
            )
        } else {
            Phase::new("bench-smoke", bench::smoke)
        },
    ];
    if phase::run_all(phases) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
