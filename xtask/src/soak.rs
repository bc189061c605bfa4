//! `cargo xtask soak`: the reliability and security battery at full length, in under 20
//! minutes on two cores. It makes sure of the system packages and tools, runs `cargo deny`,
//! fuzzes every target for a minute, builds the proxy, and runs the battery's end-to-end tests
//! with `PROXY_SOAK=1` (longer counts) and `--include-ignored` (the checks too long for
//! `cargo xtask test`, such as testssl.sh). At the end it prints a markdown table of every
//! check with its figure and result, also written to `target/soak/soak-<unix time>.md`.
//!
//! Tests report what they measured as one line `SOAK-FIGURE <test>\t<check>\t<figure>` on
//! stderr; a test's result is its check's. Unlike `test`, a failing check does not stop the
//! others; the exit status is non-zero when any failed.

use std::process::{Command, ExitCode};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Result, bail};
use proxy_testkit::phase;

use crate::{ebpf, exec, fuzz, supply_chain, test, workspace};

/// The battery's end-to-end test files (`tests/tests/<name>.rs`), run whole.
const BATTERY: &[&str] = &[
    "reload_battery",
    "handover",
    "hostile",
    "faults",
    "upstream",
    "upstream_faults",
    "upstream_pool",
    "upstream_balance",
    "defences",
    "rotation",
    "tls_posture",
];
/// Tests of other files that belong to the battery: (file, test).
const BATTERY_SINGLES: &[(&str, &str)] = &[(
    "kernel",
    "without_privilege_the_proxy_serves_and_reports_ebpf_detached",
)];
const FIGURE_PREFIX: &str = "SOAK-FIGURE ";

/// Options of `cargo xtask soak`.
#[derive(Debug, clap::Args)]
pub(crate) struct Options {
    /// Seconds of fuzzing per target.
    #[arg(long, default_value_t = 60)]
    pub fuzz_seconds: u32,
}

/// One row of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Check {
    name: String,
    figure: String,
    passed: bool,
}

/// Runs every check, prints the table, and fails if any check failed.
pub(crate) fn soak(Options { fuzz_seconds }: Options) -> ExitCode {
    let started = Instant::now();
    let mut checks = Vec::new();
    step(
        &mut checks,
        "tools: Debian packages, sslyze, BPF toolchain",
        || test::ensure_dependencies().map(|()| "present".to_owned()),
    );
    step(&mut checks, "eBPF program", || {
        ebpf::build().map(|_| "built".to_owned())
    });
    step(
        &mut checks,
        "cargo deny --offline: advisories, bans, licences, sources",
        || supply_chain::check().map(|()| "no finding".to_owned()),
    );
    for target in fuzz::TARGETS {
        step(&mut checks, &format!("fuzz target {target}"), || {
            fuzz_target(target, fuzz_seconds)
        });
    }
    let built = step(
        &mut checks,
        "proxy build (debug, as the tests use it)",
        || {
            exec::exec(workspace::cargo().args(["build", "--locked", "-p", "proxy"]))?;
            Ok(if ebpf::object_path().is_file() {
                "eBPF object embedded".to_owned()
            } else {
                "without the eBPF object".to_owned()
            })
        },
    );
    if built {
        checks.extend(battery());
    } else {
        checks.push(Check {
            name: "end-to-end battery".into(),
            figure: "not run: the proxy did not build".into(),
            passed: false,
        });
    }
    let report = table(&checks, started.elapsed());
    println!("\n{report}");
    let dir = workspace::target_dir().join("soak");
    let unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let file = dir.join(format!("soak-{unix}.md"));
    match std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&file, &report)) {
        Ok(()) => println!("report written to {}", file.display()),
        Err(e) => eprintln!("warning: cannot write {}: {e}", file.display()),
    }
    if checks.iter().all(|c| c.passed) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Runs one check that is not a test, timed, and records it; returns whether it passed.
fn step(checks: &mut Vec<Check>, name: &str, work: impl FnOnce() -> Result<String>) -> bool {
    let (result, elapsed) = phase::timed(name, work);
    let (figure, passed) = match result {
        Ok(figure) => (figure, true),
        Err(e) => (format!("{e:#}"), false),
    };
    let result = if passed { "ok" } else { "FAILED" };
    println!("==> [soak] {name}: {result} ({})", phase::seconds(elapsed));
    checks.push(Check {
        name: name.to_owned(),
        figure,
        passed,
    });
    passed
}

/// Fuzzes `target` for `seconds`; the figure is libFuzzer's count of runs.
fn fuzz_target(target: &str, seconds: u32) -> Result<String> {
    fuzz::ensure_cargo_fuzz()?;
    let teed = exec::tee(&mut fuzz::command(target, seconds))?;
    if !teed.status.success() {
        bail!(
            "crashed or failed ({}); see fuzz/artifacts/{target}/",
            teed.status
        );
    }
    let runs = teed
        .stderr
        .iter()
        .rev()
        .find_map(|line| line.strip_prefix("Done ")?.split_whitespace().next());
    Ok(match runs {
        Some(runs) => format!("{runs} runs in {seconds} s, no crash"),
        None => format!("{seconds} s, no crash"),
    })
}

/// Runs the battery's tests and turns their results and figures into checks.
fn battery() -> Vec<Check> {
    let proxy_bin = workspace::proxy_bin(false);
    let mut runs = Vec::new();
    let mut whole = test_command(&proxy_bin);
    for file in BATTERY {
        whole.args(["--test", file]);
    }
    whole.args(["--", "--include-ignored", "--nocapture"]);
    runs.push(whole);
    for (file, test) in BATTERY_SINGLES {
        let mut single = test_command(&proxy_bin);
        single.args(["--test", file, "--", "--exact", test, "--nocapture"]);
        runs.push(single);
    }
    let mut checks = Vec::new();
    for mut cmd in runs {
        let line = exec::display(&cmd);
        match phase::timed("end-to-end battery", || exec::tee(&mut cmd)) {
            (Ok(teed), elapsed) => {
                let found = test_checks(&teed.stdout, &teed.stderr);
                println!(
                    "==> [soak] end-to-end battery: {} tests, {} failed ({})",
                    found.len(),
                    found.iter().filter(|c| !c.passed).count(),
                    phase::seconds(elapsed)
                );
                if !teed.status.success() && found.iter().all(|c| c.passed) {
                    // A build error or a crashed test binary: no test reported the failure.
                    checks.push(Check {
                        name: format!("`{line}`"),
                        figure: format!("failed ({})", teed.status),
                        passed: false,
                    });
                }
                checks.extend(found);
            }
            (Err(e), _) => checks.push(Check {
                name: format!("`{line}`"),
                figure: format!("{e:#}"),
                passed: false,
            }),
        }
    }
    checks
}

fn test_command(proxy_bin: &std::path::Path) -> Command {
    let mut cmd = workspace::cargo();
    cmd.args(["test", "--locked", "--no-fail-fast", "-p", "proxy-e2e"])
        .env("PROXY_BIN", proxy_bin)
        .env("PROXY_E2E_REQUIRE", "1")
        .env("PROXY_SOAK", "1");
    cmd
}

/// Checks from libtest's result lines (`test NAME ... ok|FAILED` on stdout) and the tests'
/// `SOAK-FIGURE` lines (stderr), in the order the results came.
fn test_checks(stdout: &[String], stderr: &[String]) -> Vec<Check> {
    let figures: Vec<(&str, &str, &str)> = stderr
        .iter()
        .filter_map(|line| {
            let mut fields = line.strip_prefix(FIGURE_PREFIX)?.splitn(3, '\t');
            Some((fields.next()?, fields.next()?, fields.next()?))
        })
        .collect();
    let results = stdout.iter().filter_map(|line| {
        let (name, result) = line.strip_prefix("test ")?.split_once(" ... ")?;
        match result.trim() {
            "ok" => Some((name, true)),
            "FAILED" => Some((name, false)),
            _ => None,
        }
    });
    let mut checks: Vec<Check> = results
        .map(
            |(test, passed)| match figures.iter().find(|f| f.0 == test) {
                Some((_, check, figure)) => Check {
                    name: (*check).to_owned(),
                    figure: (*figure).to_owned(),
                    passed,
                },
                None => Check {
                    name: test.replace('_', " "),
                    figure: "–".into(),
                    passed,
                },
            },
        )
        .collect();
    // A figure without a result: its test never finished.
    for (test, check, figure) in &figures {
        if !stdout
            .iter()
            .any(|l| l.starts_with(&format!("test {test} ... ")))
        {
            checks.push(Check {
                name: (*check).to_owned(),
                figure: format!("{figure} (test {test} did not finish)"),
                passed: false,
            });
        }
    }
    checks
}

/// The report: a heading with the totals, then one row per check.
fn table(checks: &[Check], elapsed: Duration) -> String {
    let failed = checks.iter().filter(|c| !c.passed).count();
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let mut out = format!(
        "Soak: {} checks, {} passed, {failed} failed, in {} on {cores} cores\n\n\
         | check | figure | result |\n| --- | --- | --- |\n",
        checks.len(),
        checks.len() - failed,
        minutes(elapsed)
    );
    for check in checks {
        let cell = |text: &str| text.replace('|', "\\|").replace('\n', " ");
        out += &format!(
            "| {} | {} | {} |\n",
            cell(&check.name),
            cell(&check.figure),
            if check.passed { "pass" } else { "**FAIL**" }
        );
    }
    out
}

fn minutes(d: Duration) -> String {
    let s = d.as_secs();
    format!("{} min {:02} s", s / 60, s % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(text: &str) -> Vec<String> {
        text.lines().map(str::to_owned).collect()
    }

    fn check(stdout: &str, stderr: &str, expected: &[(&str, &str, bool)]) {
        let expected: Vec<Check> = expected
            .iter()
            .map(|&(name, figure, passed)| Check {
                name: name.into(),
                figure: figure.into(),
                passed,
            })
            .collect();
        assert_eq!(test_checks(&lines(stdout), &lines(stderr)), expected);
    }

    #[test]
    fn results_take_their_tests_figures() {
        check(
            "running 3 tests\n\
             test upstream_down_is_502 ... ok\n\
             test slowloris ... FAILED\n\
             test reloads ... ok\n\
             test result: FAILED. 2 passed; 1 failed",
            "SOAK-FIGURE reloads\t100 reloads\t0 failed of 900 requests\n\
             noise\n\
             SOAK-FIGURE slowloris\t1000 slowloris\tp99 9 ms | 4 ms\n\
             SOAK-FIGURE crashed\tstate dir full\t2 leaves",
            &[
                ("upstream down is 502", "–", true),
                ("1000 slowloris", "p99 9 ms | 4 ms", false),
                ("100 reloads", "0 failed of 900 requests", true),
                (
                    "state dir full",
                    "2 leaves (test crashed did not finish)",
                    false,
                ),
            ],
        );
        check("test a ... ignored\n", "", &[]);
    }

    #[test]
    fn table_escapes_cells_and_counts() {
        let checks = [
            Check {
                name: "fuzz target config".into(),
                figure: "1200 runs in 60 s, no crash".into(),
                passed: true,
            },
            Check {
                name: "slowloris".into(),
                figure: "a | b".into(),
                passed: false,
            },
        ];
        let cores = std::thread::available_parallelism().map_or(0, usize::from);
        assert_eq!(
            table(&checks, Duration::from_secs(725)),
            format!(
                "Soak: 2 checks, 1 passed, 1 failed, in 12 min 05 s on {cores} cores\n\n\
                 | check | figure | result |\n| --- | --- | --- |\n\
                 | fuzz target config | 1200 runs in 60 s, no crash | pass |\n\
                 | slowloris | a \\| b | **FAIL** |\n"
            )
        );
    }
}
