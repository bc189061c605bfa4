//! Checks of a built package, without installing it: its control fields and conffiles, that
//! its binary embeds the eBPF object, that every shipped unit, script, setting and monitoring
//! file is the repository's byte for byte (and nothing of `monitoring/` is left out), that the
//! units name only programs and documentation the package installs, that the man pages are
//! the binary's own and render without a warning, that the completions are the binary's own
//! and parse; then lintian.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, Result, bail, ensure};
use proxy_testkit::TempDir;

use crate::{exec, workspace};

/// Files shipped as they are in the repository: (path in the package, path in the source).
const VERBATIM: &[(&str, &str)] = &[
    (
        "usr/lib/systemd/system/proxy.service",
        "deploy/systemd/proxy.service",
    ),
    (
        "usr/lib/systemd/system/proxy.socket",
        "deploy/systemd/proxy.socket",
    ),
    (
        "usr/lib/systemd/system/proxy-backend.service",
        "deploy/systemd/proxy-backend.service",
    ),
    (
        "usr/libexec/proxy/proxy-tracefs",
        "deploy/systemd/proxy-tracefs",
    ),
    (
        "usr/lib/sysctl.d/60-proxy.conf",
        "deploy/sysctl.d/60-proxy.conf",
    ),
    ("etc/proxy/proxy.env", "deploy/debian/proxy.env"),
    ("usr/share/doc/proxy/copyright", "deploy/debian/copyright"),
    ("usr/share/doc/proxy/README.md", "README.md"),
    ("DEBIAN/postinst", "deploy/debian/postinst"),
    ("DEBIAN/prerm", "deploy/debian/prerm"),
    ("DEBIAN/postrm", "deploy/debian/postrm"),
    (
        "usr/share/lintian/overrides/proxy",
        "deploy/debian/lintian-overrides",
    ),
];
/// The completions: (shell, path in the package).
const COMPLETIONS: &[(&str, &str)] = &[
    ("bash", "usr/share/bash-completion/completions/proxy"),
    ("zsh", "usr/share/zsh/vendor-completions/_proxy"),
    ("fish", "usr/share/fish/vendor_completions.d/proxy.fish"),
];
const MONITORING: &str = "usr/share/proxy/monitoring";

/// Everything but lintian; `version` is the package version expected.
pub(super) fn contents(deb: &Path, version: &str) -> Result<()> {
    let fields = dpkg_deb(deb, &["--field"])?;
    let field = |name: &str| {
        fields
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .unwrap_or("")
            .to_owned()
    };
    ensure!(field("Package") == "proxy", "Package: {}", field("Package"));
    ensure!(
        field("Version") == version,
        "Version: {} (expected {version})",
        field("Version")
    );
    let depends = field("Depends");
    ensure!(depends.contains("libc6"), "Depends: {depends}");
    println!(
        "ok: {} {} {}, Installed-Size {} KiB, Depends: {depends}",
        field("Package"),
        field("Version"),
        field("Architecture"),
        field("Installed-Size")
    );

    let listing = dpkg_deb(deb, &["--contents"])?;
    for (path, mode) in [
        ("./usr/bin/proxy", "-rwxr-xr-x"),
        ("./usr/libexec/proxy/proxy-tracefs", "-rwxr-xr-x"),
        ("./usr/lib/systemd/system/proxy.service", "-rw-r--r--"),
        ("./etc/proxy/proxy.env", "-rw-r--r--"),
    ] {
        let line = listing
            .lines()
            .find(|l| l.ends_with(&format!(" {path}")))
            .with_context(|| format!("the package has no {path}"))?;
        let mut fields = line.split_whitespace();
        let (got_mode, owner) = (fields.next(), fields.next());
        ensure!(
            got_mode == Some(mode) && matches!(owner, Some("root/root" | "0/0")),
            "{path}: {line}"
        );
    }
    println!(
        "ok: {} entries; binary and scripts 0755, units and settings 0644, root-owned",
        listing.lines().count()
    );

    let tmp = TempDir::new("proxy-package")?;
    let root = tmp.path().join("root");
    exec::exec(
        Command::new("dpkg-deb")
            .arg("--raw-extract")
            .arg(deb)
            .arg(&root),
    )?;

    let bin = root.join("usr/bin/proxy");
    let line = super::version_line(&bin)?;
    let upstream = version.rsplit_once('-').map_or(version, |(v, _)| v);
    ensure!(
        line.starts_with(&format!("proxy {upstream} ")) && line.contains("eBPF embedded"),
        "the packaged binary says {line:?}"
    );
    println!("ok: /usr/bin/proxy --version: {line}");

    let conffiles = fs::read_to_string(root.join("DEBIAN/conffiles")).context("no conffiles")?;
    ensure!(
        conffiles.lines().collect::<Vec<_>>() == ["/etc/proxy/proxy.env"],
        "conffiles: {conffiles:?}"
    );
    println!("ok: conffiles: /etc/proxy/proxy.env");

    let source = workspace::root();
    for (packaged, repo) in VERBATIM {
        same(&root.join(packaged), &source.join(repo))?;
    }
    println!(
        "ok: units, proxy-tracefs, sysctl, proxy.env, copyright, README and maintainer scripts are the repository's"
    );
    let shipped = monitoring(&root, &source)?;
    println!(
        "ok: {shipped} monitoring files under /{MONITORING}, identical to monitoring/ and the drop-ins of deploy/systemd"
    );

    let pages = man_pages(&root, &bin, tmp.path())?;
    println!("ok: {pages} man pages, the binary's own, render with man -l without a warning");
    units_name_what_is_installed(&root)?;
    println!(
        "ok: every ExecStart/ExecStartPre/ExecReload program and Documentation= page of the units is in the package"
    );
    completions(&root, &bin)?;
    println!(
        "ok: bash, zsh and fish completions are the binary's own (bash -n parses the bash one)"
    );
    Ok(())
}

/// lintian on the package; fails on any error or warning (info tags are printed).
pub(super) fn lintian(deb: &Path) -> Result<()> {
    let teed = exec::tee(
        Command::new("lintian")
            .args(["--info", "--fail-on", "error,warning"])
            .arg(deb),
    )?;
    if !teed.status.success() {
        bail!("lintian found errors or warnings (above)");
    }
    let tags = teed.stdout.iter().filter(|l| l.contains(": ")).count();
    println!("ok: lintian: no error or warning ({tags} other lines)");
    Ok(())
}

fn dpkg_deb(deb: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new("dpkg-deb")
        .args(args)
        .arg(deb)
        .output()
        .context("failed to run dpkg-deb")?;
    ensure!(
        out.status.success(),
        "dpkg-deb {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn same(packaged: &Path, repo: &Path) -> Result<()> {
    let a =
        fs::read(packaged).with_context(|| format!("the package has no {}", packaged.display()))?;
    let b = fs::read(repo).with_context(|| format!("reading {}", repo.display()))?;
    ensure!(
        a == b,
        "{} differs from {}",
        packaged.display(),
        repo.display()
    );
    Ok(())
}

/// Every file under the package's monitoring directory is the repository's, and every file
/// of `monitoring/` but the promtool tests and the yamllint settings is shipped.
fn monitoring(root: &Path, source: &Path) -> Result<usize> {
    let dir = root.join(MONITORING);
    let mut shipped = BTreeSet::new();
    for file in files(&dir)? {
        let rel = file.strip_prefix(&dir)?.to_string_lossy().into_owned();
        let repo = match rel.strip_prefix("systemd/") {
            Some(drop_in) => source.join("deploy/systemd").join(drop_in),
            None => source.join("monitoring").join(&rel),
        };
        same(&file, &repo)?;
        shipped.insert(rel);
    }
    let monitoring = source.join("monitoring");
    for file in files(&monitoring)? {
        let rel = file
            .strip_prefix(&monitoring)?
            .to_string_lossy()
            .into_owned();
        if rel.starts_with("prometheus/tests/") || rel.starts_with('.') {
            continue;
        }
        ensure!(
            shipped.contains(&rel),
            "monitoring/{rel} is not in the package"
        );
    }
    for unit in ["prometheus", "prometheus-alertmanager", "grafana-server"] {
        let rel = format!("systemd/{unit}.service.d/proxy.conf");
        ensure!(shipped.contains(&rel), "{rel} is not in the package");
    }
    Ok(shipped.len())
}

/// The packaged pages are exactly those the packaged binary generates, and each renders.
fn man_pages(root: &Path, bin: &Path, tmp: &Path) -> Result<usize> {
    let dir = root.join("usr/share/man/man8");
    let generated = tmp.join("man8");
    exec::exec(
        Command::new(bin)
            .arg("manpage")
            .arg("--out-dir")
            .arg(&generated),
    )?;
    let names = |dir: &Path, suffix: &str| -> Result<BTreeSet<String>> {
        Ok(files(dir)?
            .iter()
            .filter_map(|p| {
                p.file_name()?
                    .to_str()?
                    .strip_suffix(suffix)
                    .map(str::to_owned)
            })
            .collect())
    };
    let packaged = names(&dir, ".8.gz")?;
    let expected = names(&generated, ".8")?;
    ensure!(
        packaged == expected && packaged.contains("proxy"),
        "man pages: packaged {packaged:?}, the binary generates {expected:?}"
    );
    for name in &packaged {
        let page = dir.join(format!("{name}.8.gz"));
        let out = Command::new("man")
            .args(["--warnings", "-l"])
            .arg(&page)
            .env("MANWIDTH", "80")
            .output()
            .context("failed to run man")?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(
            out.status.success() && stderr.trim().is_empty(),
            "man -l {}: {}",
            page.display(),
            stderr.trim()
        );
        let text = String::from_utf8_lossy(&out.stdout);
        ensure!(
            text.contains("NAME"),
            "man -l {} rendered no NAME section",
            page.display()
        );
    }
    Ok(packaged.len())
}

/// The programs the units run and the documentation they name are installed by the package
/// (/bin/kill is util-linux's, and Essential).
fn units_name_what_is_installed(root: &Path) -> Result<()> {
    for unit in ["proxy.service", "proxy.socket", "proxy-backend.service"] {
        let text = fs::read_to_string(root.join("usr/lib/systemd/system").join(unit))?;
        for line in text.lines() {
            let Some((key, value)) = line.split_once('=') else {
                continue;
            };
            match key {
                "ExecStart" | "ExecStartPre" | "ExecReload" => {
                    let program = value
                        .trim_start_matches(['+', '-', '@', '!', ':'])
                        .split_whitespace()
                        .next()
                        .unwrap_or("");
                    if program != "/bin/kill" {
                        ensure!(
                            root.join(program.trim_start_matches('/')).is_file(),
                            "{unit}: {key} runs {program}, which the package does not install"
                        );
                    }
                }
                "Documentation" => {
                    for doc in value.split_whitespace() {
                        let path = if let Some(page) = doc.strip_prefix("man:") {
                            let (name, section) = page
                                .strip_suffix(')')
                                .and_then(|p| p.split_once('('))
                                .with_context(|| format!("{unit}: {doc}"))?;
                            format!("usr/share/man/man{section}/{name}.{section}.gz")
                        } else if let Some(file) = doc.strip_prefix("file:/") {
                            file.to_owned()
                        } else {
                            bail!("{unit}: Documentation={doc} is neither man: nor file:");
                        };
                        ensure!(
                            root.join(&path).is_file(),
                            "{unit}: Documentation={doc}, but the package has no /{path}"
                        );
                    }
                }
                _ => {}
            }
        }
    }
    Ok(())
}

fn completions(root: &Path, bin: &Path) -> Result<()> {
    for (shell, path) in COMPLETIONS {
        let out = Command::new(bin).args(["completions", shell]).output()?;
        ensure!(out.status.success(), "proxy completions {shell} failed");
        let packaged = fs::read(root.join(path)).with_context(|| format!("no /{path}"))?;
        ensure!(
            packaged == out.stdout,
            "/{path} is not what `proxy completions {shell}` prints"
        );
    }
    exec::exec(
        Command::new("bash")
            .arg("-n")
            .arg(root.join(COMPLETIONS[0].1)),
    )
}

/// Regular files under `dir`, recursively, sorted.
fn files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let entry = entry?;
            if entry.file_type()?.is_dir() {
                stack.push(entry.path());
            } else {
                out.push(entry.path());
            }
        }
    }
    out.sort();
    Ok(out)
}
