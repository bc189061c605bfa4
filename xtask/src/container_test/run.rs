//! Running the image as users are told to: the run command is read from
//! `deploy/container/Containerfile`'s header (which the README points to), so the test runs
//! exactly the documented flags. Only what must differ on a test machine is changed, and
//! printed: the container's name and volume, the file limit when the machine's hard limit is
//! lower, and the cgroup v2 mount where the host has the hybrid layout.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use anyhow::{Context as _, Result, bail, ensure};
use nix::sys::resource::{Resource, getrlimit};
use proxy_testkit::{NetNs, Process};

use super::image::{self, IMAGE};
use crate::{exec::exec, workspace};

/// Flags of `docker run` that take a value as the next word.
const VALUED: &[&str] = &[
    "--name",
    "--hostname",
    "-v",
    "--volume",
    "-p",
    "--publish",
    "--ulimit",
    "--security-opt",
    "--cap-add",
    "--cap-drop",
    "-e",
    "--env",
    "--network",
];
/// Process limit for the container: podman's default is above this machine's hard limit.
const NPROC: u64 = 4096;

/// The documented run command, split into its flags, image and arguments.
#[derive(Debug, PartialEq)]
pub(super) struct Documented {
    pub(super) flags: Vec<String>,
    pub(super) image: String,
    pub(super) args: Vec<String>,
}

/// Reads the `docker run` command of the Containerfile's header.
pub(super) fn documented() -> Result<Documented> {
    let path = workspace::root().join("deploy/container/Containerfile");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    parse_documented(&text).with_context(|| format!("the run command of {}", path.display()))
}

fn parse_documented(text: &str) -> Result<Documented> {
    let mut words = Vec::new();
    let mut inside = false;
    for line in text.lines() {
        let Some(comment) = line.strip_prefix('#') else {
            continue;
        };
        let comment = comment.trim();
        if comment.starts_with("docker run ") {
            inside = true;
        }
        if inside {
            words.extend(
                comment
                    .trim_end_matches('\\')
                    .split_whitespace()
                    .map(str::to_owned),
            );
            if !comment.ends_with('\\') {
                break;
            }
        }
    }
    ensure!(words.len() > 2, "no `docker run` command in the header");
    let mut flags = Vec::new();
    let mut rest = words.into_iter().skip(2);
    let image = loop {
        let word = rest.next().context("no image name after the flags")?;
        if !word.starts_with('-') {
            break word;
        }
        let takes_value = VALUED.contains(&word.as_str());
        flags.push(word);
        if takes_value {
            flags.push(rest.next().context("a flag without its value")?);
        }
    };
    Ok(Documented {
        flags,
        image,
        args: rest.collect(),
    })
}

/// What a run changes of the documented command, and why.
pub(super) struct Site {
    pub(super) name: String,
    pub(super) volume: String,
    /// The host's cgroup v2 mount when it is not `/sys/fs/cgroup` (the hybrid layout): the
    /// container's own `/sys/fs/cgroup` then has no v2 hierarchy to attach the program to.
    pub(super) cgroup2: Option<PathBuf>,
    /// A seccomp profile to use instead of the runtime's default, when that refuses `bpf`
    /// and `perf_event_open` short of `CAP_SYS_ADMIN` (see [`seccomp_profile`]).
    pub(super) seccomp: Option<PathBuf>,
}

impl Site {
    pub(super) fn here(name: &str, seccomp: Option<PathBuf>) -> Site {
        let cgroup2 = fs::read_to_string("/proc/self/mountinfo")
            .ok()
            .and_then(|m| {
                m.lines().find_map(|l| {
                    let (fields, rest) = l.split_once(" - ")?;
                    let mount = fields.split_whitespace().nth(4)?;
                    rest.starts_with("cgroup2 ").then(|| PathBuf::from(mount))
                })
            })
            .filter(|m| m != Path::new("/sys/fs/cgroup"));
        Site {
            name: name.to_owned(),
            volume: format!("{name}-state"),
            cgroup2,
            seccomp,
        }
    }

    /// The documented flags as run here.
    pub(super) fn flags(&self, documented: &Documented) -> Vec<String> {
        let hard_nofile = getrlimit(Resource::RLIMIT_NOFILE).map_or(u64::MAX, |(_, hard)| hard);
        let hard_nproc = getrlimit(Resource::RLIMIT_NPROC).map_or(u64::MAX, |(_, hard)| hard);
        let mut flags = Vec::new();
        let mut words = documented.flags.iter();
        while let Some(flag) = words.next() {
            let value = VALUED
                .contains(&flag.as_str())
                .then(|| words.next().cloned().unwrap_or_default());
            let value = match (flag.as_str(), value) {
                ("--name", Some(_)) => Some(self.name.clone()),
                ("-v" | "--volume", Some(v)) if v.ends_with(":/var/lib/proxy") => {
                    Some(format!("{}:/var/lib/proxy", self.volume))
                }
                ("--ulimit", Some(v)) if v.starts_with("nofile=") => {
                    let wanted: u64 = v
                        .trim_start_matches("nofile=")
                        .split(':')
                        .next()
                        .and_then(|n| n.parse().ok())
                        .unwrap_or(hard_nofile);
                    let n = wanted.min(hard_nofile);
                    Some(format!("nofile={n}:{n}"))
                }
                (_, value) => value,
            };
            flags.push(flag.clone());
            flags.extend(value);
        }
        let nproc = NPROC.min(hard_nproc);
        flags.extend(["--ulimit".to_owned(), format!("nproc={nproc}:{nproc}")]);
        if let Some(cgroup2) = &self.cgroup2 {
            flags.extend(["-v".to_owned(), format!("{0}:{0}:ro", cgroup2.display())]);
        }
        if let Some(profile) = &self.seccomp {
            flags.push(format!("--security-opt=seccomp={}", profile.display()));
        }
        flags
    }
}

/// Where podman (containers-common) keeps its default seccomp profile.
const DEFAULT_SECCOMP: &str = "/usr/share/containers/seccomp.json";

/// The runtime's default seccomp profile with `bpf` allowed to `CAP_BPF` and
/// `perf_event_open` to `CAP_PERFMON`, written to `dir`, when the default allows them only to
/// `CAP_SYS_ADMIN` (profiles older than those capabilities, as Debian 12's podman has);
/// `None` when the default lets them through already. Nothing else of the profile changes.
pub(super) fn seccomp_profile(dir: &Path) -> Result<Option<PathBuf>> {
    let Ok(text) = fs::read_to_string(DEFAULT_SECCOMP) else {
        return Ok(None);
    };
    let mut profile: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {DEFAULT_SECCOMP}"))?;
    let Some(rules) = profile["syscalls"].as_array_mut() else {
        bail!("{DEFAULT_SECCOMP} has no syscalls");
    };
    if !widen_to_capabilities(rules) {
        return Ok(None);
    }
    let path = dir.join("seccomp.json");
    fs::create_dir_all(dir)?;
    fs::write(&path, serde_json::to_string_pretty(&profile)?)?;
    println!(
        "seccomp: {DEFAULT_SECCOMP} allows bpf and perf_event_open only to CAP_SYS_ADMIN; \
         running with {} (also to CAP_BPF and CAP_PERFMON)",
        path.display()
    );
    Ok(Some(path))
}

/// Rewrites the rules that refuse `bpf` and `perf_event_open` unless `CAP_SYS_ADMIN` so that
/// `CAP_BPF` and `CAP_PERFMON` allow them too; returns whether there were such rules.
fn widen_to_capabilities(rules: &mut Vec<serde_json::Value>) -> bool {
    use serde_json::json;
    const CALLS: [(&str, &str); 2] = [("bpf", "CAP_BPF"), ("perf_event_open", "CAP_PERFMON")];
    let sys_admin_only =
        |rule: &serde_json::Value, field: &str| rule[field]["caps"] == json!(["CAP_SYS_ADMIN"]);
    let mut widened = false;
    for rule in rules.iter_mut() {
        // The refusal for everyone without CAP_SYS_ADMIN: the two calls leave it.
        if rule["action"] == "SCMP_ACT_ERRNO"
            && sys_admin_only(rule, "excludes")
            && let Some(names) = rule["names"].as_array_mut()
        {
            let before = names.len();
            names.retain(|n| !CALLS.iter().any(|(call, _)| n == call));
            widened |= names.len() != before;
        }
    }
    if !widened {
        return false;
    }
    for (call, cap) in CALLS {
        // Refused unless CAP_SYS_ADMIN or the call's own capability; allowed with the latter
        // (the CAP_SYS_ADMIN rule that allows it stays as it was).
        rules.push(json!({
            "names": [call], "action": "SCMP_ACT_ERRNO", "errnoRet": 1,
            "excludes": {"caps": ["CAP_SYS_ADMIN", cap]}
        }));
        rules.push(json!({
            "names": [call], "action": "SCMP_ACT_ALLOW", "includes": {"caps": [cap]}
        }));
    }
    true
}

/// A container started in the foreground (its exit status is `podman run`'s) in the test's
/// namespace; removed when dropped.
pub(super) struct Container {
    name: String,
    process: Option<Process>,
}

impl Container {
    /// `podman run` with the documented flags as run here and `args` after the documented
    /// ones; returns once `/readyz` answers 200 through the published admin port.
    pub(super) fn start(ns: &NetNs, site: &Site, log: &Path, args: &[&str]) -> Result<Container> {
        let documented = documented()?;
        let mut cmd = ns.command("podman");
        cmd.args(["--runtime", "runc", "run"])
            .args(site.flags(&documented))
            .arg(IMAGE)
            .args(&documented.args)
            .args(args);
        println!("$ {}", crate::exec::display(&cmd));
        let process = Process::spawn("container", &mut cmd, log)?;
        let mut container = Container {
            name: site.name.clone(),
            process: Some(process),
        };
        let ready = || {
            ns.command("curl")
                .args(["-fsS", "-o", "/dev/null", "--max-time", "2"])
                .arg("http://127.0.0.1:9090/readyz")
                .output()
                .is_ok_and(|o| o.status.success())
        };
        let process = container.process.as_mut().context("no process")?;
        if let Err(e) = process.wait_ready(Duration::from_secs(60), ready) {
            bail!("{e}\n{}", process.log());
        }
        Ok(container)
    }

    /// `podman stop` (SIGTERM, then SIGKILL after `grace`); returns the container's exit
    /// status.
    pub(super) fn stop(&mut self, grace: Duration) -> Result<ExitStatus> {
        exec(
            image::podman()
                .args(["stop", "--time", &grace.as_secs().to_string()])
                .arg(&self.name),
        )?;
        let process = self.process.as_mut().context("no process")?;
        process
            .wait_exit(Duration::from_secs(30))?
            .context("podman run did not return after podman stop")
    }

    /// What the proxy has logged so far.
    pub(super) fn log(&self) -> String {
        self.process.as_ref().map(Process::log).unwrap_or_default()
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        // The container outlives its `podman run` (conmon holds it): remove it first.
        let _ = image::podman()
            .args(["rm", "--force", "--time", "0", &self.name])
            .output();
        drop(self.process.take());
    }
}

/// The directory of a named volume on the host.
pub(super) fn volume_dir(volume: &str) -> Result<PathBuf> {
    let out = proxy_testkit::command::output(image::podman().args([
        "volume",
        "inspect",
        "--format",
        "{{.Mountpoint}}",
        volume,
    ]))?;
    Ok(PathBuf::from(out.trim()))
}

/// Removes a named volume, if there is one.
pub(super) fn remove_volume(volume: &str) {
    let _ = image::podman()
        .args(["volume", "rm", "--force", volume])
        .output();
}

/// The gateway of podman's default network: the test's namespace as the containers see it.
pub(super) fn gateway(ns: &NetNs) -> Result<String> {
    let out = proxy_testkit::command::output(ns.command("podman").args([
        "--runtime",
        "runc",
        "network",
        "inspect",
        "podman",
        "--format",
        "{{range .Subnets}}{{.Gateway}}{{end}}",
    ]))?;
    let gateway = out.trim().to_owned();
    ensure!(
        !gateway.is_empty(),
        "podman's default network has no gateway"
    );
    Ok(gateway)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_documented_command() {
        let header = "# Run:\n\
            #   docker run --rm --name proxy \\\n\
            #     --cap-drop=ALL --cap-add=BPF --read-only --ulimit nofile=65536:65536 \\\n\
            #     -v proxy-state:/var/lib/proxy -p 80:80 \\\n\
            #     proxy serve --admin-listen 0.0.0.0:9090\n\
            # Without those capabilities\n";
        let documented = parse_documented(header).expect("a command");
        assert_eq!(
            documented,
            Documented {
                flags: [
                    "--rm",
                    "--name",
                    "proxy",
                    "--cap-drop=ALL",
                    "--cap-add=BPF",
                    "--read-only",
                    "--ulimit",
                    "nofile=65536:65536",
                    "-v",
                    "proxy-state:/var/lib/proxy",
                    "-p",
                    "80:80"
                ]
                .map(str::to_owned)
                .to_vec(),
                image: "proxy".to_owned(),
                args: ["serve", "--admin-listen", "0.0.0.0:9090"]
                    .map(str::to_owned)
                    .to_vec(),
            }
        );
        let site = Site {
            name: "t".to_owned(),
            volume: "t-state".to_owned(),
            cgroup2: Some(PathBuf::from("/sys/fs/cgroup/unified")),
            seccomp: None,
        };
        let flags = site.flags(&documented).join(" ");
        assert!(flags.contains("--name t "), "{flags}");
        assert!(flags.contains("-v t-state:/var/lib/proxy "), "{flags}");
        assert!(
            flags.ends_with("-v /sys/fs/cgroup/unified:/sys/fs/cgroup/unified:ro"),
            "{flags}"
        );
    }

    #[test]
    fn lets_bpf_and_perfmon_call_what_they_stand_for() {
        use serde_json::json;
        let mut rules = vec![
            json!({"names": ["bpf", "quotactl", "perf_event_open"], "action": "SCMP_ACT_ALLOW",
                   "includes": {"caps": ["CAP_SYS_ADMIN"]}}),
            json!({"names": ["bpf", "quotactl", "perf_event_open"], "action": "SCMP_ACT_ERRNO",
                   "errnoRet": 1, "excludes": {"caps": ["CAP_SYS_ADMIN"]}}),
        ];
        assert!(widen_to_capabilities(&mut rules));
        assert_eq!(
            rules[0]["names"],
            json!(["bpf", "quotactl", "perf_event_open"])
        );
        assert_eq!(rules[1]["names"], json!(["quotactl"]));
        assert_eq!(rules.len(), 6);
        assert_eq!(rules[3]["includes"]["caps"], json!(["CAP_BPF"]));
        assert_eq!(
            rules[4]["excludes"]["caps"],
            json!(["CAP_SYS_ADMIN", "CAP_PERFMON"])
        );
        // A profile that already lets them through is left alone.
        assert!(!widen_to_capabilities(&mut vec![
            json!({"names": ["read"], "action": "SCMP_ACT_ALLOW"})
        ]));
    }

    #[test]
    fn the_shipped_containerfile_has_a_run_command() {
        let documented = documented().expect("the shipped run command");
        assert_eq!(documented.image, "proxy");
        for flag in [
            "--cap-drop=ALL",
            "--read-only",
            "--security-opt=no-new-privileges",
        ] {
            assert!(documented.flags.iter().any(|f| f == flag), "{flag}");
        }
    }
}
