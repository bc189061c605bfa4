//! Instructions a server retires per request, from `perf stat -e instructions -p PIDS` around
//! a run, where the machine has the counter: many virtual machines expose no hardware
//! performance counters, and `perf` then reports the event `<not supported>`. The bench asks
//! once at the start ([`probe`]) and, without it, says why and leaves the figure out.

use std::process::{Command, Stdio};

use anyhow::{Context as _, Result, bail};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

/// Whether `perf stat` can count instructions here; the reason when it cannot.
pub(super) fn probe() -> Result<(), String> {
    let out = Command::new("perf")
        .args(["stat", "-x,", "-e", "instructions", "--", "true"])
        .output()
        .map_err(|e| format!("perf cannot be run ({e}); Debian: apt-get install linux-perf"))?;
    let text = String::from_utf8_lossy(&out.stderr);
    match instructions(&text) {
        Ok(_) => Ok(()),
        Err(e) => Err(format!("{e:#}")),
    }
}

/// Runs `f` with `perf stat` counting the instructions of `pids`; returns both.
pub(super) fn count_during<T>(pids: &[Pid], f: impl FnOnce() -> Result<T>) -> Result<(T, u64)> {
    let list: Vec<String> = pids.iter().map(ToString::to_string).collect();
    let perf = Command::new("perf")
        .args(["stat", "-x,", "-e", "instructions", "-p", &list.join(",")])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting perf stat")?;
    let value = f();
    // perf prints its counts when interrupted.
    let perf_pid = Pid::from_raw(i32::try_from(perf.id())?);
    kill(perf_pid, Signal::SIGINT).context("interrupting perf stat")?;
    let out = perf.wait_with_output()?;
    let count = instructions(&String::from_utf8_lossy(&out.stderr))?;
    Ok((value?, count))
}

/// The instruction count in `perf stat -x,` output ("123456,,instructions,...").
fn instructions(text: &str) -> Result<u64> {
    let line = text
        .lines()
        .find(|l| {
            l.split(',')
                .nth(2)
                .is_some_and(|e| e.starts_with("instructions"))
        })
        .with_context(|| format!("perf stat printed no instructions line: {:?}", text.trim()))?;
    let value = line.split(',').next().unwrap_or_default();
    match value.parse() {
        Ok(count) => Ok(count),
        Err(_) => bail!(
            "perf stat reports the instructions counter as {value}: this machine exposes no \
             hardware performance counters (usual in a virtual machine)"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_instruction_count() {
        assert_eq!(
            instructions("1234567,,instructions,1002345,100.00,,\n").ok(),
            Some(1_234_567)
        );
        assert_eq!(
            instructions("987,,instructions:u,10,100.00,,\n").ok(),
            Some(987)
        );
        let vm = "<not supported>,,instructions,0,100.00,,\n";
        let e = instructions(vm).map_err(|e| e.to_string());
        assert!(
            e.as_ref().is_err_and(|e| e.contains("<not supported>")),
            "{e:?}"
        );
        assert!(instructions("").is_err());
    }
}
