//! The image the container test runs, made on this machine with no registry:
//!
//! 1. a Debian 12 tree (`mmdebstrap --variant=minbase`, from the host's bookworm sources),
//!    kept under the work directory and rebuilt when its recipe changes;
//! 2. a distroless-like base taken from that tree: exactly the libraries `ldd` lists for the
//!    proxy, `/etc/passwd` and `/etc/group` as distroless has them, `os-release` and `/tmp`;
//!    no shell, no package manager. Imported as `localhost/proxy-runtime-base:<digest>`, so
//!    the tag says what it holds and an unchanged base is not imported again;
//! 3. `deploy/container/Containerfile.prebuilt` on that base with the release proxy: the
//!    shipped Containerfile's last stage (a deploy test keeps the two the same).
//!
//! The base carries less than distroless's `cc-debian12` (no CA bundle, tzdata, libstdc++ or
//! libgomp): upstreams are plain HTTP and logs are in UTC, so the proxy reads none of them.

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, Result, bail, ensure};
use proxy_testkit::command;

use crate::{deps, exec::exec, workspace};

/// The tag the test builds and runs.
pub(super) const IMAGE: &str = "localhost/proxy:container-test";
const BASE_REPOSITORY: &str = "localhost/proxy-runtime-base";
/// Bumped when the recipe of the tree changes in a way its sources do not show.
const RECIPE_VERSION: u32 = 1;
/// distroless's users and groups (root, nobody, nonroot), so that `--user 65532` works as it
/// does on distroless.
const PASSWD: &str = "root:x:0:0:root:/root:/sbin/nologin\n\
    nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\n\
    nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n";
const GROUP: &str = "root:x:0:\nnobody:x:65534:\nnonroot:x:65532:\n";

/// The Debian tree under `work`, built unless the cached one has the same recipe.
pub(super) fn rootfs(work: &Path) -> Result<PathBuf> {
    let rootfs = work.join("rootfs");
    let stamp = work.join("rootfs.recipe");
    let sources = deps::bookworm_sources();
    let recipe = format!("v{RECIPE_VERSION} minbase {}", sources.join(" | "));
    if rootfs.join("usr/bin/ldd").is_file()
        && fs::read_to_string(&stamp).ok().as_deref() == Some(&recipe)
    {
        println!("Debian tree: {} (cached)", rootfs.display());
        return Ok(rootfs);
    }
    if rootfs.exists() {
        fs::remove_dir_all(&rootfs)
            .with_context(|| format!("failed to remove {}", rootfs.display()))?;
    }
    let _ = fs::remove_file(&stamp);
    fs::create_dir_all(work)?;
    exec(
        Command::new("mmdebstrap")
            .args(["--variant=minbase", "--quiet", "bookworm"])
            .arg(&rootfs)
            .args(&sources),
    )?;
    fs::write(&stamp, recipe)?;
    Ok(rootfs)
}

/// Assembles the runtime base for `proxy` from `rootfs` and imports it unless an image of the
/// same content exists; returns its tag.
pub(super) fn runtime_base(work: &Path, rootfs: &Path, proxy: &Path) -> Result<String> {
    let tree = work.join("runtime-base");
    if tree.exists() {
        fs::remove_dir_all(&tree)?;
    }
    let libraries = libraries(rootfs, proxy)?;
    for library in &libraries {
        // The file itself at the path the loader asks for: no merged-/usr symlinks to carry.
        let real = command::output(
            Command::new("chroot")
                .arg(rootfs)
                .args(["readlink", "-f"])
                .arg(library),
        )?;
        let from = rootfs.join(real.trim().trim_start_matches('/'));
        let to = tree.join(library.trim_start_matches('/'));
        fs::create_dir_all(to.parent().context("library path")?)?;
        fs::copy(&from, &to).with_context(|| format!("failed to copy {}", from.display()))?;
        println!("base: {library} (from {})", real.trim());
    }
    let write = |path: &str, text: &str| -> Result<()> {
        let path = tree.join(path);
        fs::create_dir_all(path.parent().context("file path")?)?;
        fs::write(&path, text).with_context(|| format!("failed to write {}", path.display()))
    };
    write("etc/passwd", PASSWD)?;
    write("etc/group", GROUP)?;
    write(
        "etc/os-release",
        &fs::read_to_string(rootfs.join("usr/lib/os-release"))?,
    )?;
    let tmp = tree.join("tmp");
    fs::create_dir_all(&tmp)?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o1777))?;

    // Same content, same bytes, same tag: owners, times and order are fixed.
    let tar = work.join("runtime-base.tar");
    exec(
        Command::new("tar")
            .args(["--sort=name", "--owner=0", "--group=0", "--numeric-owner"])
            .args(["--mtime=@0", "-C"])
            .arg(&tree)
            .arg("-cf")
            .arg(&tar)
            .arg("."),
    )?;
    let digest = command::output(Command::new("sha256sum").arg(&tar))?;
    let tag = format!(
        "{BASE_REPOSITORY}:{}",
        digest.get(..16).context("sha256sum printed no digest")?
    );
    if podman().args(["image", "exists", &tag]).status()?.success() {
        println!("runtime base: {tag} (present)");
    } else {
        exec(podman().arg("import").arg(&tar).arg(&tag))?;
    }
    fs::remove_file(&tar)?;
    Ok(tag)
}

/// Builds [`IMAGE`] from `Containerfile.prebuilt` on `base` with `proxy`, removing the image
/// the tag named before.
pub(super) fn build(work: &Path, base: &str, proxy: &Path) -> Result<()> {
    let context = work.join("context");
    if context.exists() {
        fs::remove_dir_all(&context)?;
    }
    fs::create_dir_all(&context)?;
    fs::copy(proxy, context.join("proxy"))?;
    let previous = image_id(IMAGE);
    exec(
        podman()
            .args(["build", "--pull=never", "-f"])
            .arg(workspace::root().join("deploy/container/Containerfile.prebuilt"))
            .arg("--build-arg")
            .arg(format!("BASE={base}"))
            .args(["-t", IMAGE])
            .arg(&context),
    )?;
    if let Some(previous) = previous
        && image_id(IMAGE).as_ref() != Some(&previous)
    {
        let _ = podman().args(["rmi", &previous]).output();
    }
    fs::remove_dir_all(&context)?;
    Ok(())
}

/// What the built image is: its configuration as the Containerfile sets it, and its files,
/// with no shell and no package manager among them. Returns its size in bytes.
pub(super) fn inspect() -> Result<u64> {
    let json = command::output(podman().args(["image", "inspect", IMAGE]))?;
    let json: serde_json::Value = serde_json::from_str(&json).context("podman image inspect")?;
    let image = &json[0];
    let config = &image["Config"];
    let keys = |value: &serde_json::Value| -> Vec<String> {
        let mut keys: Vec<String> = value
            .as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default();
        keys.sort();
        keys
    };
    let seen = format!(
        "user {} entrypoint {} cmd {} ports {:?} volumes {:?}",
        config["User"],
        config["Entrypoint"],
        config["Cmd"],
        keys(&config["ExposedPorts"]),
        keys(&config["Volumes"])
    );
    ensure!(
        seen == r#"user "0:0" entrypoint ["/usr/local/bin/proxy"] cmd ["serve"] ports ["443/tcp", "80/tcp", "9090/tcp"] volumes ["/var/lib/proxy"]"#,
        "the image's configuration is not the Containerfile's: {seen}"
    );
    println!("image configuration: {seen}");

    let container = command::output(podman().args(["create", IMAGE]))?;
    let container = container.trim();
    let listing = command::output(
        Command::new("sh")
            .arg("-c")
            .arg(format!("podman --runtime runc export {container} | tar -t")),
    );
    // `-v`: the VOLUME the image declares got an anonymous volume at create.
    let _ = podman().args(["rm", "-v", container]).output();
    let files: Vec<String> = listing?
        .lines()
        .map(|l| format!("/{}", l.trim_start_matches("./")))
        .filter(|l| !l.ends_with('/'))
        .collect();
    for forbidden in [
        "/bin/sh",
        "/usr/bin/sh",
        "/bin/bash",
        "/usr/bin/apt",
        "/usr/bin/dpkg",
    ] {
        ensure!(
            !files.iter().any(|f| f == forbidden),
            "the image has {forbidden}"
        );
    }
    ensure!(
        files.iter().any(|f| f == "/usr/local/bin/proxy"),
        "the image has no /usr/local/bin/proxy"
    );
    println!("image files ({}): {}", files.len(), files.join(" "));
    image["Size"]
        .as_u64()
        .context("podman image inspect gave no size")
}

/// `podman` with the runtime this machine's cgroup layout needs (crun refuses a hybrid one).
pub(super) fn podman() -> Command {
    let mut cmd = Command::new("podman");
    cmd.args(["--runtime", "runc"]);
    cmd
}

/// The libraries `ldd` in `rootfs` lists for `proxy`: the ones the image must carry.
fn libraries(rootfs: &Path, proxy: &Path) -> Result<Vec<String>> {
    let inside = rootfs.join("tmp/proxy-ldd");
    fs::copy(proxy, &inside)?;
    let out = command::output(
        Command::new("chroot")
            .arg(rootfs)
            .args(["ldd", "/tmp/proxy-ldd"]),
    );
    fs::remove_file(&inside)?;
    parse_ldd(&out?)
}

/// The paths of `ldd`'s lines (`name => /path (0x...)` or `/path (0x...)`); the vDSO has none.
fn parse_ldd(text: &str) -> Result<Vec<String>> {
    let mut paths = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if line.contains("not found") {
            bail!("ldd: {line}");
        }
        let target = line.split_once("=>").map_or(line, |(_, path)| path).trim();
        if let Some(path) = target
            .split_whitespace()
            .next()
            .filter(|p| p.starts_with('/'))
        {
            paths.push(path.to_owned());
        }
    }
    ensure!(!paths.is_empty(), "ldd listed no library: {text}");
    Ok(paths)
}

fn image_id(image: &str) -> Option<String> {
    let out = podman()
        .args(["image", "inspect", "--format", "{{.Id}}", image])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_ldd_paths() {
        let ldd = "\tlinux-vdso.so.1 (0x00007ffd)\n\
            \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f1)\n\
            \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f2)\n\
            \t/lib64/ld-linux-x86-64.so.2 (0x00007f3)\n";
        assert_eq!(
            parse_ldd(ldd).expect("paths"),
            [
                "/lib/x86_64-linux-gnu/libgcc_s.so.1",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2",
            ]
        );
        assert!(parse_ldd("\tlibfoo.so => not found\n").is_err());
    }
}
