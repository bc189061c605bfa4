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
    // A new commit or checkout changes HEAD or the ref it names. In a linked worktree HEAD
    // is the worktree's own and the refs are in the common directory. Only existing files are
    // watched: cargo counts a missing one as changed, and would rebuild the proxy every time.
    let git_path = |arg: &str| {
        Command::new("git")
            .args(["rev-parse", arg])
            .output()
            .ok()
            .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    };
    if let (Some(dir), Some(common)) = (git_path("--git-dir"), git_path("--git-common-dir")) {
        let head = Path::new(&dir).join("HEAD");
        let mut watched = vec![head.clone(), Path::new(&common).join("packed-refs")];
        if let Ok(text) = std::fs::read_to_string(&head)
            && let Some(reference) = text.trim().strip_prefix("ref: ")
        {
            watched.push(Path::new(&common).join(reference));
        }
        for file in watched.iter().filter(|f| f.exists()) {
            println!("cargo::rerun-if-changed={}", file.display());
        }
    }
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}
