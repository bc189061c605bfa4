//! `cargo xtask build-ebpf`: builds the kernel program (`proxy-ebpf`) for
//! `bpfel-unknown-none` with whichever BPF toolchain the machine has, says which, and says
//! exactly what to install when there is none. Also runs clippy on the program for that target
//! ([`clippy`]), and installs the toolchain on Debian 12 (as `cargo xtask test` does on a fresh
//! machine).
//!
//! Two toolchains work: Debian's `rustc-web` with the precompiled BPF `core`
//! (`libstd-rust-web-dev-bpf`) and its clippy (`rust-web-clippy`), or a nightly with `rust-src`
//! (`-Z build-std=core`) and `clippy`. Both link with `bpf-linker`. rustup's stable clippy cannot
//! lint for BPF: its sysroot has no BPF `core`, and it cannot read Debian's, which another rustc
//! built.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Result, bail};

use crate::{exec::exec, privilege, workspace};

const TARGET: &str = "bpfel-unknown-none";
/// Debian's rustc that can build for BPF, and where its precompiled `core` lands.
const DEBIAN_RUSTC: &str = "/usr/bin/rustc";
const DEBIAN_BPF_CORE: &str = "/usr/lib/rustlib/bpfel-unknown-none";
/// Debian's clippy for that rustc (`rust-web-clippy`). Called by path: rustup's `cargo-clippy`
/// comes first on `PATH`.
const DEBIAN_CARGO_CLIPPY: &str = "/usr/bin/cargo-clippy";
const DEBIAN_CLIPPY_DRIVER: &str = "/usr/bin/clippy-driver";
/// Debian 12 packages of the Debian toolchain (LLVM 22 for bpf-linker to link against).
const DEBIAN_PACKAGES: &[&str] = &[
    "rustc-web",
    "libstd-rust-web-dev-bpf",
    "rust-web-clippy",
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
];
const BPF_LINKER_VERSION: &str = "0.13.0";

/// A toolchain that can build (or lint) the program.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Toolchain {
    /// Debian's rustc with the precompiled BPF core library (and Debian's clippy, to lint).
    Debian,
    /// A rustup nightly with rust-src (and clippy, to lint).
    Nightly,
}

/// The object `build` writes and every `cargo xtask` build of the proxy embeds.
pub(crate) fn object_path() -> PathBuf {
    workspace::target_dir()
        .join("bpf")
        .join(TARGET)
        .join("release")
        .join("proxy-ebpf")
}

/// Builds the program; returns the object's path.
pub(crate) fn build() -> Result<PathBuf> {
    let Some(toolchain) = detect() else {
        bail!("{}", missing_toolchain_help());
    };
    match toolchain {
        Toolchain::Debian => println!(
            "building the eBPF program with Debian's rustc ({DEBIAN_RUSTC}) and its precompiled BPF core"
        ),
        Toolchain::Nightly => {
            println!("building the eBPF program with rustup's nightly and -Z build-std=core")
        }
    }
    let mut cmd = program_command("cargo");
    for_target(&mut cmd, toolchain, "build");
    exec(&mut cmd)?;
    let object = object_path();
    if !object.is_file() {
        bail!("the build succeeded but {} is missing", object.display());
    }
    println!("eBPF object: {}", object.display());
    Ok(object)
}

/// Runs clippy on the program for `bpfel-unknown-none` with `-D warnings` (its lints are the
/// `[lints]` of `proxy-ebpf/Cargo.toml`), with the same choice of toolchain as [`build`].
pub(crate) fn clippy() -> Result<()> {
    let Some(toolchain) = detect_clippy() else {
        bail!("{}", missing_clippy_help());
    };
    let mut cmd = match toolchain {
        Toolchain::Debian => {
            println!(
                "linting the eBPF program with Debian's clippy ({DEBIAN_CARGO_CLIPPY}), rustc ({DEBIAN_RUSTC}) and precompiled BPF core"
            );
            // Debian's cargo-clippy runs `cargo check` (rustup's cargo) with Debian's
            // clippy-driver as the workspace's rustc wrapper; RUSTC (set by `for_target`)
            // makes the dependencies Debian's rustc's too, so that the driver can read them.
            program_command(DEBIAN_CARGO_CLIPPY)
        }
        Toolchain::Nightly => {
            println!("linting the eBPF program with rustup's nightly clippy and -Z build-std=core");
            program_command("cargo")
        }
    };
    for_target(&mut cmd, toolchain, "clippy");
    cmd.args(["--", "-D", "warnings"]);
    exec(&mut cmd)
}

/// `cargo SUBCOMMAND --locked --release --target bpfel-unknown-none` with `toolchain`:
/// Debian's rustc with bootstrapping on (aya-ebpf needs an unstable feature on BPF targets),
/// or the nightly building its own `core`.
fn for_target(cmd: &mut Command, toolchain: Toolchain, subcommand: &str) {
    match toolchain {
        Toolchain::Debian => {
            cmd.env("RUSTC", DEBIAN_RUSTC).env("RUSTC_BOOTSTRAP", "1");
            cmd.args([subcommand, "--locked", "--release", "--target", TARGET]);
        }
        Toolchain::Nightly => {
            cmd.arg("+nightly");
            cmd.args([subcommand, "--locked", "--release", "--target", TARGET]);
            cmd.args(["-Z", "build-std=core"]);
        }
    }
}

/// Installs the Debian toolchain and bpf-linker when this is Debian, we are root and no
/// toolchain is present; otherwise says what is missing.
pub(crate) fn ensure_toolchain() -> Result<()> {
    if detect().is_some() && detect_clippy().is_some() {
        println!("BPF toolchain present");
        return Ok(());
    }
    if !Path::new("/etc/debian_version").exists() || !privilege::is_root() {
        println!("{}", missing_toolchain_help());
        return Ok(());
    }
    // Also on a machine that already builds the program but lacks the clippy package.
    let missing = crate::deps::missing(DEBIAN_PACKAGES)?;
    if !missing.is_empty() {
        println!("installing Debian's BPF toolchain: {}", missing.join(" "));
        crate::deps::apt_install(&missing)?;
    }
    if !command_works("bpf-linker", &["--version"]) {
        println!("building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (a few minutes)");
        exec(
            Command::new("cargo")
                .env("LLVM_PREFIX", "/usr/lib/llvm-22")
                .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
                .args(["--no-default-features", "--features", "llvm-22"]),
        )?;
    }
    if detect().is_none() || detect_clippy().is_none() {
        bail!(
            "the BPF toolchain is still incomplete after installing it:\n{}",
            missing_toolchain_help()
        );
    }
    Ok(())
}

/// Mounts tracefs where the proxy looks for tracepoints, when this machine has not (the
/// resets-received tracepoint needs it). Root only; elsewhere says how.
pub(crate) fn ensure_tracefs() -> Result<()> {
    const TRACEFS: &str = "/sys/kernel/tracing";
    if Path::new(TRACEFS).join("events").is_dir() {
        return Ok(());
    }
    if !privilege::is_root() {
        println!("tracefs is not mounted: as root, mount -t tracefs tracefs {TRACEFS}");
        return Ok(());
    }
    exec(Command::new("mount").args(["-t", "tracefs", "tracefs", TRACEFS]))
}

/// `cargo` with the program's directory, target directory and BPF link flags; for clippy too,
/// so that its dependency checks share what the build already compiled.
fn program_command(program: &str) -> Command {
    let mut cmd = Command::new(program);
    cmd.current_dir(workspace::root().join("proxy-ebpf"))
        .env("CARGO_TARGET_DIR", workspace::target_dir().join("bpf"))
        .env("RUSTFLAGS", "-C linker=bpf-linker -C link-arg=--btf");
    cmd
}

/// The toolchain that builds the program: Debian's first, else a nightly with rust-src.
fn detect() -> Option<Toolchain> {
    if !command_works("bpf-linker", &["--version"]) {
        return None;
    }
    if debian_toolchain_installed() {
        return Some(Toolchain::Debian);
    }
    nightly_has(&["rust-src"]).then_some(Toolchain::Nightly)
}

/// The toolchain that lints the program, chosen as [`detect`] does, each with its clippy
/// (clippy checks without linking, so bpf-linker is not needed).
fn detect_clippy() -> Option<Toolchain> {
    if debian_toolchain_installed()
        && Path::new(DEBIAN_CARGO_CLIPPY).is_file()
        && Path::new(DEBIAN_CLIPPY_DRIVER).is_file()
    {
        return Some(Toolchain::Debian);
    }
    nightly_has(&["rust-src", "clippy"]).then_some(Toolchain::Nightly)
}

fn debian_toolchain_installed() -> bool {
    Path::new(DEBIAN_RUSTC).is_file() && Path::new(DEBIAN_BPF_CORE).is_dir()
}

/// Whether rustup has a nightly with all of `components`.
fn nightly_has(components: &[&str]) -> bool {
    Command::new("rustup")
        .args(["component", "list", "--toolchain", "nightly", "--installed"])
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|out| {
            let installed = String::from_utf8_lossy(&out.stdout);
            // Lines are `rust-src` or `clippy-x86_64-unknown-linux-gnu`.
            out.status.success()
                && components.iter().all(|component| {
                    installed.lines().any(|line| {
                        line == *component || line.starts_with(&format!("{component}-"))
                    })
                })
        })
}

fn command_works(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

fn missing_toolchain_help() -> String {
    format!(
        "no BPF toolchain found. Install one of:\n\
         - Debian 12: apt-get install {packages}\n   \
           then: LLVM_PREFIX=/usr/lib/llvm-22 cargo install bpf-linker --version {BPF_LINKER_VERSION} --no-default-features --features llvm-22\n\
         - elsewhere: rustup toolchain install nightly --component rust-src,clippy && cargo install bpf-linker\n\
         (`cargo xtask test` installs the Debian toolchain itself when run as root on Debian)",
        packages = DEBIAN_PACKAGES.join(" "),
    )
}

fn missing_clippy_help() -> String {
    format!(
        "no clippy that can lint for {TARGET} found. Install one of:\n\
         - Debian 12: apt-get install rustc-web libstd-rust-web-dev-bpf rust-web-clippy\n\
         - elsewhere: rustup toolchain install nightly --component rust-src,clippy\n\
         (rustup's stable clippy has no BPF core library and cannot read Debian's)"
    )
}
