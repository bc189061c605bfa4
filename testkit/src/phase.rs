//! Phases of a long task: each runs timed under a `==> [phase]` heading, the sequence stops at
//! the first failure, and a closing table lists every phase with its result and time, ending in
//! the line `N passed, N failed` that a CI reader looks for. [`timed`] is the timed step
//! alone, for tasks that report their own way (the soak's table of checks).

use std::fmt::Display;
use std::time::{Duration, Instant};

/// One step of a task; its error `E` is printed with `{:#}` (an `anyhow` chain in full).
pub struct Phase<'a, E> {
    name: &'static str,
    step: Step<'a, E>,
}

enum Step<'a, E> {
    Run(Box<dyn FnOnce() -> Result<(), E> + 'a>),
    Skip(&'static str),
}

impl<'a, E> Phase<'a, E> {
    /// A phase that runs `step`.
    pub fn new(name: &'static str, step: impl FnOnce() -> Result<(), E> + 'a) -> Self {
        Self {
            name,
            step: Step::Run(Box::new(step)),
        }
    }

    /// A phase left out of this run, for `reason`.
    pub fn skip(name: &'static str, reason: &'static str) -> Self {
        Self {
            name,
            step: Step::Skip(reason),
        }
    }
}

/// What became of a phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Passed(Duration),
    Failed(Duration),
    Skipped(&'static str),
    NotRun,
}

/// Runs `phases` in order until one fails, prints the summary and returns whether all passed.
pub fn run_all<E: Display>(phases: Vec<Phase<'_, E>>) -> bool {
    let start = Instant::now();
    let mut failed = false;
    let mut rows = Vec::new();
    for Phase { name, step } in phases {
        let outcome = match step {
            _ if failed => Outcome::NotRun,
            Step::Skip(reason) => Outcome::Skipped(reason),
            Step::Run(step) => match timed(name, step) {
                (Ok(()), elapsed) => {
                    println!("==> [phase] {name} ({})", seconds(elapsed));
                    Outcome::Passed(elapsed)
                }
                (Err(e), elapsed) => {
                    println!("==> [phase] {name} FAILED ({}): {e:#}", seconds(elapsed));
                    failed = true;
                    Outcome::Failed(elapsed)
                }
            },
        };
        rows.push((name, outcome));
    }
    print!("{}", summary(&rows, start.elapsed()));
    !failed
}

/// Prints the heading `==> {name}`, runs `work` and returns its result with the time it took.
pub fn timed<T>(name: &str, work: impl FnOnce() -> T) -> (T, Duration) {
    println!("==> {name}");
    let started = Instant::now();
    let result = work();
    (result, started.elapsed())
}

/// A duration as the headings show it: `12.3 s`.
pub fn seconds(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

/// The closing table; its last line is `N passed, N failed`.
fn summary(rows: &[(&str, Outcome)], total: Duration) -> String {
    let width = rows
        .iter()
        .map(|(name, _)| name.len())
        .max()
        .unwrap_or(0)
        .max(5);
    let mut out = format!(
        "\n==> summary\n{:width$}  {:<7}  {:>8}\n",
        "phase", "result", "time"
    );
    let (mut passed, mut failed) = (0, 0);
    for (name, outcome) in rows {
        let (result, time) = match outcome {
            Outcome::Passed(t) => {
                passed += 1;
                ("ok".to_owned(), seconds(*t))
            }
            Outcome::Failed(t) => {
                failed += 1;
                ("FAILED".to_owned(), seconds(*t))
            }
            Outcome::Skipped(reason) => (format!("skipped ({reason})"), String::new()),
            Outcome::NotRun => ("not run".to_owned(), String::new()),
        };
        out += format!("{name:width$}  {result:<7}  {time:>8}").trim_end();
        out += "\n";
    }
    out += &format!("{:width$}  {:<7}  {:>8}\n", "total", "", seconds(total));
    out += &format!("{passed} passed, {failed} failed\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(rows: &[(&str, Outcome)], expected: &str) {
        assert_eq!(summary(rows, Duration::from_millis(43_210)), expected);
    }

    #[test]
    fn summary_counts_phases() {
        let s = Duration::from_secs_f64;
        check(
            &[
                ("deps", Outcome::Passed(s(0.04))),
                ("fmt", Outcome::Passed(s(1.24))),
                ("clippy", Outcome::Failed(s(41.9))),
                ("build", Outcome::NotRun),
            ],
            "\n==> summary\n\
             phase   result       time\n\
             deps    ok          0.0 s\n\
             fmt     ok          1.2 s\n\
             clippy  FAILED     41.9 s\n\
             build   not run\n\
             total              43.2 s\n\
             2 passed, 1 failed\n",
        );
        check(
            &[
                ("clippy", Outcome::Skipped("--quick")),
                ("test", Outcome::Passed(s(2.0))),
            ],
            "\n==> summary\n\
             phase   result       time\n\
             clippy  skipped (--quick)\n\
             test    ok          2.0 s\n\
             total              43.2 s\n\
             1 passed, 0 failed\n",
        );
    }

    #[test]
    fn stops_at_the_first_failure() {
        let ran = std::cell::Cell::new(0);
        let phases = vec![
            Phase::new("one", || {
                ran.set(ran.get() + 1);
                Ok(())
            }),
            Phase::new("two", || Err("broken")),
            Phase::new("three", || {
                ran.set(ran.get() + 1);
                Ok(())
            }),
        ];
        assert!(!run_all(phases));
        assert_eq!(ran.get(), 1);
    }
}
