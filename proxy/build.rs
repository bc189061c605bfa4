//! Embeds the eBPF object when `PROXY_EBPF_OBJECT` names one (every `cargo xtask` build
//! does); without it the proxy builds with no BPF toolchain and serves without kernel metrics.
//! Also records the source revision (`PROXY_REVISION`, else `git rev-parse`, else
//! `unknown`) for `--version` and `proxy_build_info`.

use std::path::Path;
use std::process::Command;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(proxy_ebpf_embedded)");
    println!("cargo::rerun-if-env-changed=PROXY_EBPF_OBJECT");
    if let Ok(path) = std::env::var("PROXY_EBPF_OBJECT") {
        if !Path::new(&path).is_file() {
            panic!("PROXY_EBPF_OBJECT={path} is not a file; run `cargo xtask build-ebpf`");
        }
        println!("cargo::rerun-if-changed={path}");
        println!("cargo::rustc-cfg=proxy_ebpf_embedded");
    }
    println!("cargo::rustc-env=PROXY_REVISION={}", revision());
}

/// The revision the binary is built from: `PROXY_REVISION` when the build says it (a
/// source tarball, a container build without `.git`), else the checkout's commit.
fn revision() -> String {
    println!("cargo::rerun-if-env-changed=PROXY_REVISION");
    if let Ok(revision) = std::env::var("PROXY_REVISION")
        && !revision.trim().is_empty()
    {
        return revision.trim().to_owned();
    }
    let Ok(output) = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
    else {
        return "unknown".to_owned();
    };
    if !output.status.success() {
        return "unknown".to_owned();
    }
    // A new commit or checkout changes HEAD or the ref it names. In a linked worktree HEAD is
    // its own, while refs live in the common directory. Only existing paths are named: cargo
    // reruns this script, and rebuilds the proxy, on every build for a path that does not exist.
    if let Ok(dirs) = Command::new("git")
        .args(["rev-parse", "--git-dir", "--git-common-dir"])
        .output()
    {
        let dirs = String::from_utf8_lossy(&dirs.stdout).into_owned();
        let mut lines = dirs.lines().map(str::trim);
        let dir = lines.next().unwrap_or_default().to_owned();
        let common = lines.next().unwrap_or(&dir).to_owned();
        println!("cargo::rerun-if-changed={dir}/HEAD");
        if Path::new(&common).join("packed-refs").exists() {
            println!("cargo::rerun-if-changed={common}/packed-refs");
        }
        if let Ok(head) = std::fs::read_to_string(Path::new(&dir).join("HEAD"))
            && let Some(reference) = head.trim().strip_prefix("ref: ")
            && Path::new(&common).join(reference).exists()
        {
            println!("cargo::rerun-if-changed={common}/{reference}");
        }
    }
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}
