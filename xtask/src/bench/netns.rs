//! The isolation every contender runs in: a fresh network namespace (its own loopback, its own
//! ports 80 and 443) entered with `nsenter`, which keeps the host's cgroup mount visible for the
//! proxy's eBPF program, and server processes pinned to a core with `taskset`. Both are guards:
//! dropping them stops what they started and deletes the namespace, also on error. Also reads
//! what the kernel says about a server process (CPU time, peak RSS, children) from `/proc`.

use std::{
    fs,
    path::Path,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::exec::display;

/// Names of the namespaces this task creates: the prefix, then the creating process's id.
const PREFIX: &str = "xtask-bench-";

/// A network namespace with loopback up; deleted (after stopping whatever still runs in it)
/// when dropped.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates namespace number `n` of this process.
    pub fn create(n: usize) -> Result<Self> {
        let name = format!("{PREFIX}{}-{n}", std::process::id());
        quiet(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = Netns { name };
        quiet(Command::new("ip").args(["-n", &ns.name, "link", "set", "lo", "up"]))?;
        Ok(ns)
    }

    /// `program` run inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.name))
            .arg(program);
        cmd
    }

    /// `program` run inside the namespace and pinned to `cpu` (nsenter and taskset both exec,
    /// so the child's pid is the program's).
    pub fn pinned(&self, cpu: usize, program: &str) -> Command {
        let mut cmd = self.command("taskset");
        cmd.args(["-c", &cpu.to_string(), program]);
        cmd
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        delete(&self.name);
    }
}

/// Deletes the namespaces an interrupted run of this task left behind (their creator is gone).
pub fn remove_stale() -> Result<()> {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .context("failed to run `ip netns list`")?;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        if let Some(creator) = stale_creator(name)
            && !Path::new(&format!("/proc/{creator}")).exists()
        {
            println!("removing network namespace {name} left by an interrupted run");
            delete(name);
        }
    }
    Ok(())
}

/// The pid that created a namespace of this task, from its name.
fn stale_creator(name: &str) -> Option<u32> {
    name.strip_prefix(PREFIX)?.split('-').next()?.parse().ok()
}

/// Kills what still runs in namespace `name` (clients, servers), then deletes it.
fn delete(name: &str) {
    if let Ok(out) = Command::new("ip").args(["netns", "pids", name]).output() {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            let _ = Command::new("kill").args(["-KILL", pid]).status();
        }
    }
    if let Err(e) = quiet(Command::new("ip").args(["netns", "del", name])) {
        eprintln!("warning: {e:#}");
    }
}

/// A server process; stopped (SIGTERM, then SIGKILL after 5 s) when dropped.
#[derive(Debug)]
pub struct Server {
    child: Child,
    name: String,
    log: std::path::PathBuf,
}

impl Server {
    /// Starts `cmd` with its output appended to `log`.
    pub fn start(name: &str, cmd: &mut Command, log: &Path) -> Result<Self> {
        let file = fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let line = display(cmd);
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("failed to start `{line}`"))?;
        Ok(Server {
            child,
            name: name.to_owned(),
            log: log.to_owned(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails when the server has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            // The end of its log says why.
            let log = fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(5).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!("{} exited: {status}\n{}", self.name, tail.join("\n"));
        }
        Ok(())
    }

    /// The server's process and its children's (nginx workers).
    pub fn pids(&self) -> Vec<u32> {
        let mut pids = vec![self.pid()];
        pids.extend(children(self.pid()));
        pids
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let pid = self.pid().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(50));
        }
        eprintln!("warning: {} did not stop on SIGTERM; killing it", self.name);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `probe` every 100 ms until it succeeds, the server exits or `timeout` passes.
pub fn wait_until(
    server: &mut Server,
    timeout: Duration,
    mut probe: impl FnMut() -> bool,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        server.check_alive()?;
        if probe() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("{} not ready after {timeout:?}", server.name);
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// User and system CPU time of processes `pids` (all their threads), in seconds.
pub fn cpu_seconds(pids: &[u32], ticks_per_second: f64) -> Result<(f64, f64)> {
    let (mut user, mut system) = (0, 0);
    for pid in pids {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
            .with_context(|| format!("reading /proc/{pid}/stat"))?;
        let (u, s) = cpu_ticks(&stat).with_context(|| format!("unreadable /proc/{pid}/stat"))?;
        user += u;
        system += s;
    }
    Ok((
        user as f64 / ticks_per_second,
        system as f64 / ticks_per_second,
    ))
}

/// `(utime, stime)` from a `/proc/PID/stat` line (fields 14 and 15; the command name in
/// parentheses may hold spaces, so count from the last `)`).
fn cpu_ticks(stat: &str) -> Option<(u64, u64)> {
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime, stime))
}

/// Peak and current resident set size (`VmHWM`, `VmRSS`) of `pid`, in KiB.
pub fn rss_kib(pid: u32) -> Result<(u64, u64)> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let read = |field| {
        status_kib(&status, field).with_context(|| format!("no {field} in /proc/{pid}/status"))
    };
    Ok((read("VmHWM")?, read("VmRSS")?))
}

/// Resets the peak RSS (`VmHWM`) of `pid` to its current RSS (`clear_refs` value 5, Linux 4.0+),
/// so that a later reading is the peak since now.
pub fn reset_peak_rss(pid: u32) -> Result<()> {
    let path = format!("/proc/{pid}/clear_refs");
    fs::write(&path, "5").with_context(|| format!("writing 5 to {path}"))
}

fn status_kib(status: &str, field: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The clock ticks per second of `/proc/PID/stat` times.
pub fn ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8_lossy(&out.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// The processes whose parent is `parent`.
fn children(parent: u32) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| parent_pid(&stat))
                == Some(parent)
        })
        .collect()
}

fn parent_pid(stat: &str) -> Option<u32> {
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Runs `cmd` and returns its standard output; fails with the command line, its status and
/// its standard error when it fails.
pub fn output(cmd: &mut Command) -> Result<String> {
    let line = display(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("failed to start `{line}`"))?;
    if !out.status.success() {
        bail!(
            "`{line}` failed: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn quiet(cmd: &mut Command) -> Result<()> {
    output(cmd).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check<T: PartialEq + std::fmt::Debug>(actual: T, expected: T) {
        assert_eq!(actual, expected);
    }

    #[test]
    fn reads_proc() {
        let stat = "1234 (tokio rt) S 1 1234 1234 0 -1 4194560 500 0 0 0 250 37 0 0 20 0 3 0";
        check(cpu_ticks(stat), Some((250, 37)));
        check(parent_pid(stat), Some(1));
        check(cpu_ticks("1234 (x) S 1"), None);
        let status = "Name:\tproxy\nVmPeak:\t  80000 kB\nVmHWM:\t   12345 kB\nVmRSS:\t 9000 kB\n";
        check(status_kib(status, "VmHWM"), Some(12345));
        check(status_kib(status, "VmRSS"), Some(9000));
        check(status_kib("Name:\tkthreadd\n", "VmHWM"), None);
    }

    #[test]
    fn recognises_its_own_namespaces() {
        check(stale_creator("xtask-bench-4242-3"), Some(4242));
        check(stale_creator("xtask-bench-x-3"), None);
        check(stale_creator("proxy-test-4242"), None);
    }
}
