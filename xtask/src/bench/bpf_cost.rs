//! What the proxy's kernel programs cost: with `kernel.bpf_stats_enabled` on, the kernel
//! counts each program's runs and the nanoseconds they took, and shows both in the fdinfo of
//! every descriptor of the program (`/proc/PID/fdinfo/N`: `run_time_ns`, `run_cnt`), so the
//! proxy's own descriptors give them without bpftool. Read around a run, they give the
//! programs' time per connection or request and their calls per connection.
//!
//! The setting is system-wide and costs two clock reads per program run: the bench turns it on
//! only while the attached proxy is measured, and restores the old value after.

use std::{collections::BTreeMap, fs};

use anyhow::{Context as _, Result};
use nix::unistd::Pid;

const STATS_SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// `kernel.bpf_stats_enabled` set to 1 until dropped, then back to what it was.
#[derive(Debug)]
pub(super) struct StatsEnabled {
    old: String,
}

impl StatsEnabled {
    pub(super) fn new() -> Result<StatsEnabled> {
        let old = fs::read_to_string(STATS_SYSCTL)
            .with_context(|| format!("reading {STATS_SYSCTL}"))?
            .trim()
            .to_owned();
        fs::write(STATS_SYSCTL, "1").with_context(|| format!("writing 1 to {STATS_SYSCTL}"))?;
        Ok(StatsEnabled { old })
    }
}

impl Drop for StatsEnabled {
    fn drop(&mut self) {
        if let Err(e) = fs::write(STATS_SYSCTL, &self.old) {
            eprintln!(
                "warning: could not restore {STATS_SYSCTL} to {}: {e}",
                self.old
            );
        }
    }
}

/// Runs and run time of one program so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) struct ProgramStats {
    pub run_time_ns: u64,
    pub run_count: u64,
}

/// The programs `pid` holds, by program id with their type's name.
pub(super) type Programs = BTreeMap<(u32, &'static str), ProgramStats>;

/// Every BPF program `pid` holds a descriptor of, with its counters.
pub(super) fn programs(pid: Pid) -> Result<Programs> {
    let dir = format!("/proc/{pid}/fdinfo");
    let mut programs = Programs::new();
    for entry in fs::read_dir(&dir).with_context(|| format!("listing {dir}"))? {
        // A descriptor closed meanwhile is not a program of interest.
        let Ok(text) = fs::read_to_string(entry?.path()) else {
            continue;
        };
        if let Some((id, kind, stats)) = parse_fdinfo(&text) {
            programs.insert((id, kind), stats);
        }
    }
    Ok(programs)
}

/// What the programs did between `before` and `after`, summed, with the programs named.
pub(super) fn difference(before: &Programs, after: &Programs) -> (ProgramStats, Vec<String>) {
    let mut total = ProgramStats::default();
    let mut names = Vec::new();
    for (key, now) in after {
        let then = before.get(key).copied().unwrap_or_default();
        total.run_time_ns += now.run_time_ns.saturating_sub(then.run_time_ns);
        total.run_count += now.run_count.saturating_sub(then.run_count);
        names.push(format!("{} (id {})", key.1, key.0));
    }
    (total, names)
}

/// A program descriptor's id, type and counters; `None` for any other descriptor.
fn parse_fdinfo(text: &str) -> Option<(u32, &'static str, ProgramStats)> {
    let field = |name: &str| {
        text.lines().find_map(|line| {
            let (key, value) = line.split_once(':')?;
            (key.trim() == name).then(|| value.trim().parse::<u64>().ok())?
        })
    };
    let kind = field("prog_type")?;
    Some((
        u32::try_from(field("prog_id")?).ok()?,
        program_type(kind),
        ProgramStats {
            run_time_ns: field("run_time_ns")?,
            run_count: field("run_cnt")?,
        },
    ))
}

/// The name of a `bpf_prog_type` the proxy loads.
fn program_type(kind: u64) -> &'static str {
    match kind {
        5 => "tracepoint",
        13 => "sock_ops",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_program_descriptors() {
        let sock_ops = "pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t1057\n\
            prog_type:\t13\nprog_jited:\t1\nprog_tag:\t3b185187f1855c4c\nmemlock:\t4096\n\
            prog_id:\t42\nrun_time_ns:\t123456\nrun_cnt:\t789\nrecursion_misses:\t0\n\
            verified_insns:\t2000\n";
        assert_eq!(
            parse_fdinfo(sock_ops),
            Some((
                42,
                "sock_ops",
                ProgramStats {
                    run_time_ns: 123_456,
                    run_count: 789
                }
            ))
        );
        let map = "pos:\t0\nflags:\t02000002\nmap_type:\t1\nkey_size:\t4\nmap_id:\t7\n";
        assert_eq!(parse_fdinfo(map), None);
        assert_eq!(parse_fdinfo("pos:\t0\nflags:\t02\nmnt_id:\t15\n"), None);
    }

    #[test]
    fn sums_what_happened_between() {
        let stats = |run_time_ns, run_count| ProgramStats {
            run_time_ns,
            run_count,
        };
        let before = Programs::from([((1, "sock_ops"), stats(100, 10))]);
        let after = Programs::from([
            ((1, "sock_ops"), stats(400, 25)),
            ((2, "tracepoint"), stats(50, 1)),
        ]);
        let (total, names) = difference(&before, &after);
        assert_eq!(total, stats(350, 16));
        assert_eq!(names, ["sock_ops (id 1)", "tracepoint (id 2)"]);
    }
}
