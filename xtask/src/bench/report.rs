//! The figures of a benchmark and what is made of them: each run's measurements, medians with
//! min–max per contender, the ratios proxy/nginx, proxy/best peer and eBPF attached/detached,
//! the targets they are held against, the markdown table printed at the end and the JSON
//! written beside it.

use std::fmt::Write as _;

use serde_json::{Value, json};

pub(super) use super::metric::{Metric, Shapes};
use super::targets::{Over, TARGETS, Target};

/// What is measured, each against a fresh server in a fresh namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Contender {
    /// `proxy serve --ebpf required`, access log off.
    Attached,
    /// `proxy serve --ebpf off`, access log off.
    Detached,
    /// nginx with the same answer, certificate and protocols.
    Nginx,
    /// HAProxy with the same answer, certificate and protocols.
    Haproxy,
    /// h2o with the same answer, certificate and protocols.
    H2o,
    /// `proxy serve --ebpf required` with the default access log (HTTP/1.1 only).
    AccessLog,
}

impl Contender {
    pub(super) const ALL: [Contender; 6] = [
        Contender::Attached,
        Contender::Detached,
        Contender::Nginx,
        Contender::Haproxy,
        Contender::H2o,
        Contender::AccessLog,
    ];

    /// The other servers the proxy is compared with.
    pub(super) const PEERS: [Contender; 3] = [Contender::Nginx, Contender::Haproxy, Contender::H2o];

    pub(super) fn is_peer(self) -> bool {
        Self::PEERS.contains(&self)
    }

    pub(super) fn key(self) -> &'static str {
        match self {
            Contender::Attached => "proxy_ebpf_attached",
            Contender::Detached => "proxy_ebpf_detached",
            Contender::Nginx => "nginx",
            Contender::Haproxy => "haproxy",
            Contender::H2o => "h2o",
            Contender::AccessLog => "proxy_access_log_on",
        }
    }

    pub(super) fn label(self) -> &'static str {
        match self {
            Contender::Attached => "proxy, eBPF attached",
            Contender::Detached => "proxy, eBPF detached",
            Contender::Nginx => "nginx",
            Contender::Haproxy => "HAProxy",
            Contender::H2o => "h2o",
            Contender::AccessLog => "proxy, access log on",
        }
    }
}

/// The figures of one contender in one repetition.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Run {
    pub contender: Contender,
    pub rep: usize,
    pub figures: Vec<(Metric, f64)>,
    /// Load-generator errors per scenario (socket errors, non-2xx/3xx, failed requests).
    pub errors: Vec<(&'static str, u64)>,
    /// Anything else worth keeping (e.g. the nginx master's RSS), for the JSON only.
    pub extra: Vec<(&'static str, f64)>,
    /// Lines that could not be measured as asked, and why: their figures are left out.
    pub failed: Vec<(&'static str, String)>,
}

/// Median, minimum and maximum of a metric over the repetitions.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

/// The summary of `values`; `None` when there are none.
pub(super) fn summarize(values: &[f64]) -> Option<Summary> {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    if sorted.is_empty() {
        return None;
    }
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    let median = if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    };
    Some(Summary {
        median,
        min: sorted[0],
        max: sorted[n - 1],
        n,
    })
}

/// `a / b` of the medians, when both exist and are above zero (a figure that is zero or
/// below, such as kernel memory that did not grow, has no meaningful ratio).
pub(super) fn ratio(a: Option<Summary>, b: Option<Summary>) -> Option<f64> {
    let (a, b) = (a?, b?);
    (a.median > 0.0 && b.median > 0.0).then(|| a.median / b.median)
}

/// Every run of a benchmark, and the shapes of its loads.
#[derive(Debug, Default)]
pub(super) struct Results {
    pub runs: Vec<Run>,
    pub shapes: Shapes,
}

impl Results {
    pub(super) fn summary(&self, contender: Contender, metric: Metric) -> Option<Summary> {
        let values: Vec<f64> = self
            .runs
            .iter()
            .filter(|run| run.contender == contender)
            .flat_map(|run| run.figures.iter())
            .filter(|(m, _)| *m == metric)
            .map(|(_, v)| *v)
            .collect();
        summarize(&values)
    }

    /// The peer with the best median of `metric`, and that median.
    pub(super) fn best_peer(&self, metric: Metric) -> Option<(Contender, Summary)> {
        Contender::PEERS
            .into_iter()
            .filter_map(|c| Some((c, self.summary(c, metric)?)))
            .reduce(|best, next| {
                let better = if metric.higher_is_better() {
                    next.1.median > best.1.median
                } else {
                    next.1.median < best.1.median
                };
                if better { next } else { best }
            })
    }

    /// The attached proxy's median of `metric` over the best peer's, and that peer.
    pub(super) fn against_best_peer(&self, metric: Metric) -> Option<(f64, Contender)> {
        let (peer, best) = self.best_peer(metric)?;
        let r = ratio(self.summary(Contender::Attached, metric), Some(best))?;
        Some((r, peer))
    }

    /// The attached proxy's median over what `target` compares it with, and which contender
    /// that was.
    fn target_ratio(&self, target: Target) -> Option<(f64, Contender)> {
        match target.over {
            Over::BestPeer => self.against_best_peer(target.metric),
            Over::One(over) => Some((
                ratio(
                    self.summary(Contender::Attached, target.metric),
                    self.summary(over, target.metric),
                )?,
                over,
            )),
        }
    }

    fn contenders(&self) -> Vec<Contender> {
        Contender::ALL
            .into_iter()
            .filter(|c| self.runs.iter().any(|run| run.contender == *c))
            .collect()
    }

    /// The markdown table of medians (min–max), the ratios, and the targets.
    pub(super) fn markdown(&self) -> String {
        let contenders = self.contenders();
        let mut out = String::from("| |");
        for c in &contenders {
            let _ = write!(out, " {} |", c.label());
        }
        out += " proxy/nginx | proxy/best peer | attached/detached |\n|---|";
        out += &"---:|".repeat(contenders.len() + 3);
        out += "\n";
        // A figure nobody measured here (e.g. instructions without a counter) has no row.
        let measured = Metric::ALL
            .into_iter()
            .filter(|&m| contenders.iter().any(|&c| self.summary(c, m).is_some()));
        for metric in measured {
            let _ = write!(out, "| {} |", metric.label(&self.shapes));
            for &c in &contenders {
                let cell = self
                    .summary(c, metric)
                    .map_or_else(|| "–".to_owned(), |s| cell(s, metric.decimals()));
                let _ = write!(out, " {cell} |");
            }
            let of = |over| {
                ratio(
                    self.summary(Contender::Attached, metric),
                    self.summary(over, metric),
                )
            };
            let best = self.against_best_peer(metric).map_or_else(
                || "–".to_owned(),
                |(r, peer)| format!("{} ({})", times(r), peer.label()),
            );
            let _ = write!(
                out,
                " {} | {best} | {} |",
                of(Contender::Nginx).map_or_else(|| "–".to_owned(), times),
                of(Contender::Detached).map_or_else(|| "–".to_owned(), times),
            );
            out += "\n";
        }
        out += "\n| target | measured | met |\n|---|---:|---|\n";
        for target in TARGETS {
            let (measured, met) = match self.target_ratio(target) {
                Some((r, over)) => (
                    format!("{} ({})", times(r), over.label()),
                    if target.bound.met(r) { "yes" } else { "**no**" },
                ),
                None => ("–".to_owned(), "not measured"),
            };
            let _ = writeln!(out, "| {} | {measured} | {met} |", target.goal);
        }
        out
    }

    /// Summaries, ratios and targets as JSON (the raw runs are added by the caller).
    pub(super) fn json(&self) -> Value {
        let mut summary = serde_json::Map::new();
        for c in self.contenders() {
            let mut metrics = serde_json::Map::new();
            for metric in Metric::ALL {
                if let Some(s) = self.summary(c, metric) {
                    metrics.insert(
                        metric.key().into(),
                        json!({"median": s.median, "min": s.min, "max": s.max, "n": s.n}),
                    );
                }
            }
            summary.insert(c.key().into(), Value::Object(metrics));
        }
        let targets: Vec<Value> = TARGETS
            .iter()
            .map(|&t| {
                let compared = self.target_ratio(t);
                json!({
                    "goal": t.goal,
                    "metric": t.metric.key(),
                    "of": Contender::Attached.key(),
                    "over": compared.map(|(_, over)| over.key()),
                    "ratio": compared.map(|(r, _)| r),
                    "met": compared.map(|(r, _)| t.bound.met(r)),
                })
            })
            .collect();
        let runs: Vec<Value> = self
            .runs
            .iter()
            .map(|run| {
                let figures: serde_json::Map<String, Value> = run
                    .figures
                    .iter()
                    .map(|(m, v)| (m.key().to_owned(), json!(v)))
                    .collect();
                let errors: serde_json::Map<String, Value> = run
                    .errors
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), json!(v)))
                    .collect();
                let extra: serde_json::Map<String, Value> = run
                    .extra
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), json!(v)))
                    .collect();
                let failed: serde_json::Map<String, Value> = run
                    .failed
                    .iter()
                    .map(|(k, why)| ((*k).to_owned(), json!(why)))
                    .collect();
                json!({
                    "contender": run.contender.key(),
                    "rep": run.rep,
                    "figures": figures,
                    "errors": errors,
                    "extra": extra,
                    "failed": failed,
                })
            })
            .collect();
        let best_peer: serde_json::Map<String, Value> = Metric::ALL
            .into_iter()
            .filter_map(|metric| {
                let (r, peer) = self.against_best_peer(metric)?;
                Some((
                    metric.key().to_owned(),
                    json!({"peer": peer.key(), "proxy_over_peer": r}),
                ))
            })
            .collect();
        json!({
            "summary": summary,
            "proxy_against_best_peer": best_peer,
            "targets": targets,
            "runs": runs,
        })
    }
}

/// "median (min–max)", or the value alone for a single run.
fn cell(s: Summary, decimals: usize) -> String {
    if s.n == 1 || s.min == s.max {
        format!("{:.decimals$}", s.median)
    } else {
        format!(
            "{:.decimals$} ({:.decimals$}–{:.decimals$})",
            s.median, s.min, s.max
        )
    }
}

fn times(r: f64) -> String {
    format!("{r:.2}×")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check<T: PartialEq + std::fmt::Debug>(actual: T, expected: T) {
        assert_eq!(actual, expected);
    }

    fn s(median: f64, min: f64, max: f64, n: usize) -> Option<Summary> {
        Some(Summary {
            median,
            min,
            max,
            n,
        })
    }

    #[test]
    fn summarizes() {
        check(summarize(&[]), None);
        check(summarize(&[3.0]), s(3.0, 3.0, 3.0, 1));
        check(summarize(&[5.0, 1.0, 3.0]), s(3.0, 1.0, 5.0, 3));
        check(summarize(&[4.0, 1.0, 2.0, 10.0]), s(3.0, 1.0, 10.0, 4));
        check(summarize(&[f64::NAN, 2.0]), s(2.0, 2.0, 2.0, 1));
    }

    #[test]
    fn ratios_of_medians() {
        check(
            ratio(s(50.0, 0.0, 0.0, 1), s(40.0, 0.0, 0.0, 1)),
            Some(1.25),
        );
        check(ratio(s(1.0, 0.0, 0.0, 1), s(0.0, 0.0, 0.0, 1)), None);
        check(ratio(s(-0.05, 0.0, 0.0, 1), s(0.05, 0.0, 0.0, 1)), None);
        check(ratio(None, s(1.0, 0.0, 0.0, 1)), None);
    }

    #[test]
    fn formats_cells() {
        check(
            cell(
                Summary {
                    median: 41_691.89,
                    min: 40_000.2,
                    max: 42_000.7,
                    n: 3,
                },
                0,
            ),
            "41692 (40000–42001)".to_owned(),
        );
        check(
            cell(
                Summary {
                    median: 0.668,
                    min: 0.668,
                    max: 0.668,
                    n: 1,
                },
                2,
            ),
            "0.67".to_owned(),
        );
        check(times(0.6251), "0.63×".to_owned());
    }

    #[test]
    fn picks_the_best_peer() {
        let run = |contender, metric, value| Run {
            contender,
            rep: 1,
            figures: vec![(metric, value)],
            errors: vec![],
            failed: vec![],
            extra: vec![],
        };
        let results = Results {
            runs: vec![
                run(Contender::Attached, Metric::H1Rps, 100.0),
                run(Contender::Nginx, Metric::H1Rps, 80.0),
                run(Contender::H2o, Metric::H1Rps, 125.0),
                run(Contender::Attached, Metric::H1CpuUs, 10.0),
                run(Contender::Nginx, Metric::H1CpuUs, 8.0),
                run(Contender::Haproxy, Metric::H1CpuUs, 12.0),
                run(Contender::Attached, Metric::RssMib, 10.0),
            ],
            shapes: Shapes::default(),
        };
        check(
            results.against_best_peer(Metric::H1Rps),
            Some((0.8, Contender::H2o)),
        );
        check(
            results.against_best_peer(Metric::H1CpuUs),
            Some((1.25, Contender::Nginx)),
        );
        check(results.against_best_peer(Metric::RssMib), None);
    }

    #[test]
    fn renders_the_table() {
        let run = |contender, rep, rps: f64| Run {
            contender,
            rep,
            figures: vec![(Metric::H1Rps, rps)],
            errors: vec![],
            failed: vec![],
            extra: vec![],
        };
        let results = Results {
            runs: vec![
                run(Contender::Attached, 1, 100.0),
                run(Contender::Nginx, 1, 80.0),
                run(Contender::Attached, 2, 120.0),
                run(Contender::Nginx, 2, 80.0),
                run(Contender::Haproxy, 1, 100.0),
                run(Contender::H2o, 1, 90.0),
            ],
            shapes: Shapes::default(),
        };
        let table = results.markdown();
        assert!(
            table.contains(
                "| HTTP/1.1 keep-alive ×50, req/s | 110 (100–120) | 80 | 100 | 90 | 1.38× | 1.10× (HAProxy) | – |"
            ),
            "{table}"
        );
        // Against the best peer (HAProxy at 100), not nginx: 1.10× misses 1.25×.
        assert!(
            table.contains(
                "| HTTP/1.1 keep-alive req/s ≥ 1.25× the best peer (where the server is the limit) | 1.10× (HAProxy) | **no** |"
            ),
            "{table}"
        );
        assert!(
            table.contains("| HTTP/2 req/s ≥ 1.1× the best peer | – | not measured |"),
            "{table}"
        );
    }
}
