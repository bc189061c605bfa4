//! What the kernel says a process uses, from `/proc`: CPU time (user and system, all threads),
//! resident memory (peak and current, with the peak reset on demand) and child processes.

use std::fs;
use std::io;
use std::process::Command;
use std::sync::OnceLock;

use nix::unistd::Pid;

/// CPU time spent by one or more processes, in seconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CpuTime {
    /// Time in user mode.
    pub user_seconds: f64,
    /// Time in the kernel on the processes' behalf.
    pub system_seconds: f64,
}

/// Resident memory of a process, in KiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Memory {
    /// The peak since start or since [`reset_peak_memory`] (`VmHWM`).
    pub peak_kib: u64,
    /// Now (`VmRSS`).
    pub current_kib: u64,
}

/// The CPU time of `pids` together (`utime` and `stime` of `/proc/PID/stat`).
pub fn cpu_time(pids: &[Pid]) -> io::Result<CpuTime> {
    let (mut user, mut system) = (0, 0);
    for pid in pids {
        let path = format!("/proc/{pid}/stat");
        let stat = read(&path)?;
        let (u, s) = cpu_ticks(&stat).ok_or_else(|| unreadable(&path))?;
        user += u;
        system += s;
    }
    let ticks = ticks_per_second();
    Ok(CpuTime {
        user_seconds: user as f64 / ticks,
        system_seconds: system as f64 / ticks,
    })
}

/// The resident memory of `pid` (`/proc/PID/status`).
pub fn memory(pid: Pid) -> io::Result<Memory> {
    let path = format!("/proc/{pid}/status");
    let status = read(&path)?;
    let kib = |field| status_kib(&status, field).ok_or_else(|| unreadable(&path));
    Ok(Memory {
        peak_kib: kib("VmHWM")?,
        current_kib: kib("VmRSS")?,
    })
}

/// Resets the peak of `pid`'s resident memory to its current size (`clear_refs` value 5,
/// Linux 4.0+), so that a later [`memory`] gives the peak since now.
pub fn reset_peak_memory(pid: Pid) -> io::Result<()> {
    let path = format!("/proc/{pid}/clear_refs");
    fs::write(&path, "5").map_err(|e| io::Error::new(e.kind(), format!("writing {path}: {e}")))
}

/// The processes whose parent is `parent`.
pub fn children(parent: Pid) -> Vec<Pid> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .map(Pid::from_raw)
        .filter(|pid| {
            fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| parent_pid(&stat))
                == Some(parent)
        })
        .collect()
}

/// The fields of a `/proc/PID/stat` line after the command name, which sits in parentheses
/// and may hold spaces: the state (field 3) comes first.
fn fields_after_name(stat: &str) -> Option<Vec<&str>> {
    Some(stat.rsplit_once(')')?.1.split_whitespace().collect())
}

/// `(utime, stime)` in clock ticks: fields 14 and 15.
fn cpu_ticks(stat: &str) -> Option<(u64, u64)> {
    let fields = fields_after_name(stat)?;
    Some((fields.get(11)?.parse().ok()?, fields.get(12)?.parse().ok()?))
}

/// The parent's pid: field 4.
fn parent_pid(stat: &str) -> Option<Pid> {
    Some(Pid::from_raw(
        fields_after_name(stat)?.get(1)?.parse().ok()?,
    ))
}

/// A `kB` field of `/proc/PID/status`.
fn status_kib(status: &str, field: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The clock ticks per second of `/proc/PID/stat` times, from `getconf CLK_TCK` (100 on
/// every common Linux, the fallback).
fn ticks_per_second() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|out| String::from_utf8_lossy(&out.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

fn read(path: &str) -> io::Result<String> {
    fs::read_to_string(path).map_err(|e| io::Error::new(e.kind(), format!("reading {path}: {e}")))
}

fn unreadable(path: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("unreadable {path}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check<T: PartialEq + std::fmt::Debug>(actual: T, expected: T) {
        assert_eq!(actual, expected);
    }

    #[test]
    fn reads_proc_text() {
        let stat = "1234 (tokio rt) S 1 1234 1234 0 -1 4194560 500 0 0 0 250 37 0 0 20 0 3 0";
        check(cpu_ticks(stat), Some((250, 37)));
        check(parent_pid(stat), Some(Pid::from_raw(1)));
        check(cpu_ticks("1234 (x) S 1"), None);
        let status = "Name:\tproxy\nVmPeak:\t  80000 kB\nVmHWM:\t   12345 kB\nVmRSS:\t 9000 kB\n";
        check(status_kib(status, "VmHWM"), Some(12345));
        check(status_kib(status, "VmRSS"), Some(9000));
        check(status_kib("Name:\tkthreadd\n", "VmHWM"), None);
    }

    #[test]
    fn reads_this_process() {
        let me = Pid::this();
        let memory = memory(me).expect("our own /proc/self/status");
        assert!(memory.peak_kib >= memory.current_kib && memory.current_kib > 0);
        let cpu = cpu_time(&[me]).expect("our own /proc/self/stat");
        assert!(cpu.user_seconds >= 0.0 && cpu.system_seconds >= 0.0);
        let mut child = Command::new("sleep")
            .arg("5")
            .spawn()
            .expect("sleep starts");
        let found = children(me).contains(&crate::command::pid_of(&child));
        let _ = child.kill();
        let _ = child.wait();
        assert!(found, "our child is among our children");
    }
}
