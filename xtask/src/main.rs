//! The project's task runner (`cargo xtask <task>`): one module per task, every external
//! command run through [`exec::exec`]. See `cargo xtask --help`.

mod bench;
mod client;
mod container_test;
mod deps;
mod ebpf;
mod exec;
mod fuzz;
mod mixin;
mod monitoring;
mod package;
mod privilege;
mod pypi;
mod run;
mod soak;
mod supply_chain;
mod test;
mod vm_test;
mod workspace;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Tasks of the proxy workspace.
#[derive(Debug, Parser)]
#[command(bin_name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Run every test of the project: system packages, fmt, clippy, build, tests.
    Test(test::Options),
    /// Build the eBPF kernel program with the BPF toolchain this machine has.
    BuildEbpf,
    /// Run Prometheus and Alertmanager with monitoring/ against a proxy on this machine.
    Monitoring,
    /// Render the recording rules, alerts and dashboards from mixin/templates/: the shipped
    /// files, or (with --out) a set for another fleet's selector, grouping and objectives.
    Mixin(mixin::Options),
    /// Build the proxy and serve on :80/:443 with the embedded defaults.
    Run(run::Options),
    /// Benchmark the release proxy (eBPF attached and detached) against nginx on two cores.
    Bench(bench::Options),
    /// Run the reliability and security battery at full length (under 20 minutes) and print
    /// every check with its figure as a markdown table.
    Soak(soak::Options),
    /// Build the Debian package (cargo-deb): the release proxy with its eBPF object, units,
    /// settings, man pages, completions and monitoring files; then inspect it and run lintian.
    Package(package::Options),
    /// Boot vagrant/Vagrantfile in a VM (libvirt, in a private network namespace) and check
    /// the appliance through its forwarded ports.
    VmTest(vm_test::Options),
    /// Build the container image (on a base made here from Debian's packages), run it with the
    /// documented flags in a private network namespace and check it from outside.
    ContainerTest(container_test::Options),
}

fn main() -> ExitCode {
    match Cli::parse().task {
        Task::Test(opts) => test::test(opts),
        Task::Bench(opts) => bench::bench(opts),
        Task::Soak(opts) => soak::soak(opts),
        Task::VmTest(opts) => vm_test::vm_test(opts),
        Task::Package(opts) => package::package(opts),
        Task::ContainerTest(opts) => container_test::container_test(opts),
        Task::Monitoring => match monitoring::monitoring() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
        Task::Mixin(opts) => match mixin::mixin(opts) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
        Task::BuildEbpf => match ebpf::build() {
            Ok(_) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
        Task::Run(opts) => {
            // `run` only returns on failure: on success the proxy replaced this process.
            let Err(e) = run::run(opts);
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
