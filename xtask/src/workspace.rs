//! Where things are: the workspace root (the parent of this crate's manifest directory), the
//! cargo commands started there, and the target directory their builds land in
//! (`CARGO_TARGET_DIR` when set, else `<workspace>/target`).

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

/// The workspace root: xtask lives one level below it. `cargo run` says where xtask's manifest
/// is; the path compiled in is the fallback (a binary built in another copy of the workspace may
/// be reused when the sources did not change).
pub(crate) fn root() -> PathBuf {
    let manifest_dir = env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    manifest_dir
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or(manifest_dir)
}

/// The directory cargo builds into, absolute.
pub(crate) fn target_dir() -> PathBuf {
    match env::var_os("CARGO_TARGET_DIR") {
        // Cargo reads a relative CARGO_TARGET_DIR against the directory it was started in.
        Some(dir) => env::current_dir()
            .map(|cwd| cwd.join(&dir))
            .unwrap_or_else(|_| PathBuf::from(dir)),
        None => root().join("target"),
    }
}

/// The binary `cargo build -p proxy` writes, for the debug or release profile.
pub(crate) fn proxy_bin(release: bool) -> PathBuf {
    target_dir()
        .join(if release { "release" } else { "debug" })
        .join("proxy")
}

/// A `cargo` command started in the workspace root, building into [`target_dir`]. Plain
/// `cargo` from `PATH`: under rustup it runs the toolchain that runs xtask.
pub(crate) fn cargo() -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root());
    // `cargo run` gives xtask its package's variables; build scripts (ring's) ask to be rerun
    // when they change, so left in place they would make every build xtask starts rebuild
    // what the plain `cargo xtask` build of the same crates made, and the other way round.
    for (name, _) in env::vars_os() {
        let name = name.to_string_lossy();
        if name.starts_with("CARGO_PKG_")
            || [
                "CARGO_MANIFEST_DIR",
                "CARGO_MANIFEST_PATH",
                "CARGO_CRATE_NAME",
                "CARGO_BIN_NAME",
                "CARGO_PRIMARY_PACKAGE",
            ]
            .contains(&name.as_ref())
        {
            cmd.env_remove(name.as_ref());
        }
    }
    // Started elsewhere, cargo would read a relative CARGO_TARGET_DIR against another directory.
    if env::var_os("CARGO_TARGET_DIR").is_some_and(|dir| Path::new(&dir).is_relative()) {
        cmd.env("CARGO_TARGET_DIR", target_dir());
    }
    // Every build of the proxy through xtask embeds the kernel program once it is built, so
    // that clippy, build and test all compile the same proxy (and do not rebuild each other's).
    let object = crate::ebpf::object_path();
    if object.is_file() {
        cmd.env("PROXY_EBPF_OBJECT", object);
    }
    cmd
}
