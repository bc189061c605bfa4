//! `cargo xtask build-ebpf`: builds the kernel program (`proxy-ebpf`) for
//! `bpfel-unknown-none` with whichever BPF toolchain the machine has, says which, and says
//! exactly what to install when there is none. Also installs that toolchain on Debian 12
//! (as `cargo xtask test` does on a fresh machine).
//!
//! Two toolchains work: Debian's `rustc-web` with the precompiled BPF `core`
//! (`libstd-rust-web-dev-bpf`), or a nightly with `rust-src` (`-Z build-std=core`). Both link
//! with `bpf-linker`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Result, bail};

use crate::{exec::exec, privilege, workspace};

const TARGET: &str = "bpfel-unknown-none";
/// Debian's rustc that can build for BPF, and where its precompiled `core` lands.
const DEBIAN_RUSTC: &str = "/usr/bin/rustc";
const DEBIAN_BPF_CORE: &str = "/usr/lib/rustlib/bpfel-unknown-none";
/// Debian 12 packages of the Debian toolchain (LLVM 22 for bpf-linker to link against).
const DEBIAN_PACKAGES: &[&str] = &[
    "rustc-web",
    "libstd-rust-web-dev-bpf",
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
];
const BPF_LINKER_VERSION: &str = "0.13.0";

/// A toolchain that can build the program.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Toolchain {
    /// Debian's rustc with the precompiled BPF core library.
    Debian,
    /// A rustup nightly with rust-src.
    Nightly,
}

/// The object `build` writes and every `cargo xtask` build of the proxy embeds.
pub fn object_path() -> PathBuf {
    workspace::target_dir()
        .join("bpf")
        .join(TARGET)
        .join("release")
        .join("proxy-ebpf")
}

/// Builds the program; returns the object's path.
pub fn build() -> Result<PathBuf> {
    let Some(toolchain) = detect() else {
        bail!("{}", missing_toolchain_help());
    };
    let program_dir = workspace::root().join("proxy-ebpf");
    let mut cmd = Command::new("cargo");
    cmd.current_dir(&program_dir)
        .env("CARGO_TARGET_DIR", workspace::target_dir().join("bpf"))
        .env("RUSTFLAGS", "-C linker=bpf-linker -C link-arg=--btf");
    match toolchain {
        Toolchain::Debian => {
            println!(
                "building the eBPF program with Debian's rustc ({DEBIAN_RUSTC}) and its precompiled BPF core"
            );
            // aya-ebpf needs an unstable feature on BPF targets; Debian's stable rustc allows
            // it when bootstrapping is on.
            cmd.env("RUSTC", DEBIAN_RUSTC).env("RUSTC_BOOTSTRAP", "1");
            cmd.args(["build", "--locked", "--release", "--target", TARGET]);
        }
        Toolchain::Nightly => {
            println!("building the eBPF program with rustup's nightly and -Z build-std=core");
            cmd.args([
                "+nightly",
                "build",
                "--locked",
                "--release",
                "--target",
                TARGET,
                "-Z",
                "build-std=core",
            ]);
        }
    }
    exec(&mut cmd)?;
    let object = object_path();
    if !object.is_file() {
        bail!("the build succeeded but {} is missing", object.display());
    }
    println!("eBPF object: {}", object.display());
    Ok(object)
}

/// Installs the Debian toolchain and bpf-linker when this is Debian, we are root and no
/// toolchain is present; otherwise says what is missing.
pub fn ensure_toolchain() -> Result<()> {
    if detect().is_some() {
        println!("BPF toolchain present");
        return Ok(());
    }
    if !Path::new("/etc/debian_version").exists() || !privilege::is_root() {
        println!("{}", missing_toolchain_help());
        return Ok(());
    }
    if !debian_toolchain_installed() {
        println!(
            "installing Debian's BPF toolchain: {}",
            DEBIAN_PACKAGES.join(" ")
        );
        crate::deps::apt_install(DEBIAN_PACKAGES)?;
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
    if detect().is_none() {
        bail!(
            "the BPF toolchain is still incomplete after installing it:\n{}",
            missing_toolchain_help()
        );
    }
    Ok(())
}

/// Mounts tracefs where the proxy looks for tracepoints, when this machine has not (the
/// resets-received tracepoint needs it). Root only; elsewhere says how.
pub fn ensure_tracefs() -> Result<()> {
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

fn detect() -> Option<Toolchain> {
    if !command_works("bpf-linker", &["--version"]) {
        return None;
    }
    if debian_toolchain_installed() {
        return Some(Toolchain::Debian);
    }
    let nightly_src = Command::new("rustup")
        .args(["component", "list", "--toolchain", "nightly", "--installed"])
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|out| {
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains("rust-src")
        });
    nightly_src.then_some(Toolchain::Nightly)
}

fn debian_toolchain_installed() -> bool {
    Path::new(DEBIAN_RUSTC).is_file() && Path::new(DEBIAN_BPF_CORE).is_dir()
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
         - elsewhere: rustup toolchain install nightly --component rust-src && cargo install bpf-linker\n\
         (`cargo xtask test` installs the Debian toolchain itself when run as root on Debian)",
        packages = DEBIAN_PACKAGES.join(" "),
    )
}
