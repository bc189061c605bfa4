//! The proxy's monitoring as code, rendered from one parameterised source.
//!
//! The templates in `templates/` hold the recording rules, the alerts and the Grafana
//! dashboards once; [`Config`] holds what differs between fleets, in the manner of a
//! monitoring mixin's `_config`: the selector of the proxy's targets, the labels that tell
//! one group of proxies from another (each SLO and alert is computed per group), the runbook's
//! address and the SLO objectives. [`render`] produces the files of `monitoring/`, and
//! [`prometheus_rule`] the same rules as a Prometheus Operator resource.
//!
//! The templates use `<< expr >>`, `<% statement %>` and `<# comment #>` rather than Jinja's
//! braces, which PromQL, Prometheus's alert templates and Grafana's legends all use.

use std::fmt::Write as _;

use anyhow::{Context as _, Result, bail, ensure};
use minijinja::syntax::SyntaxConfig;
use minijinja::{AutoEscape, Environment, Value, context};
use serde::Serialize;

/// What a fleet's monitoring is generated for.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// PromQL label matchers that select the proxy's targets, e.g. `job="proxy"`.
    pub selector: String,
    /// Labels that tell one group of proxies from another, outermost first (e.g. `cluster`,
    /// `namespace`, `job`). Every SLO, recording rule and alert is computed per group, and the
    /// dashboards get one variable per label. A label the targets do not have is harmless.
    pub group_by: Vec<String>,
    /// The runbook's address, without `#`: each alert's `runbook_url` and each SLO panel's
    /// link is this plus the anchor of its section.
    pub runbook_url: String,
    /// The SLOs.
    pub objectives: Objectives,
}

/// The SLO objectives (shares of good events over 30 days) and latency thresholds.
#[derive(Clone, Debug, PartialEq)]
pub struct Objectives {
    /// HTTPS requests that succeed.
    pub availability: f64,
    /// TLS handshakes that succeed.
    pub tls_handshake: f64,
    /// HTTPS requests answered within `latency_threshold_seconds`.
    pub latency: f64,
    /// Must be a bucket bound of `proxy_http_request_duration_seconds`.
    pub latency_threshold_seconds: f64,
    /// HTTPS connections accepted within `accept_wait_threshold_seconds` of ESTABLISHED.
    pub accept_wait: f64,
    /// Must be a bucket bound of `proxy_tcp_accept_wait_seconds`.
    pub accept_wait_threshold_seconds: f64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            selector: r#"job="proxy""#.to_owned(),
            group_by: ["cluster", "namespace", "job"].map(str::to_owned).to_vec(),
            // Relative to the generated files (two levels below monitoring/), so the links
            // resolve in a checkout and in a rendered repository; a fleet sets its own address.
            runbook_url: "../../runbook.md".to_owned(),
            objectives: Objectives::default(),
        }
    }
}

impl Default for Objectives {
    fn default() -> Self {
        Objectives {
            availability: 0.999,
            tls_handshake: 0.999,
            latency: 0.99,
            // 2^18 µs.
            latency_threshold_seconds: 0.262_144,
            accept_wait: 0.99,
            // 2^12 µs.
            accept_wait_threshold_seconds: 0.004_096,
        }
    }
}

/// One generated file: its path below `monitoring/` and its text.
#[derive(Debug)]
pub struct File {
    pub path: &'static str,
    pub text: String,
}

/// The rule files, in the order the Prometheus Operator resource lists them.
const RULE_FILES: [&str; 2] = [
    "prometheus/rules/alerts.yml",
    "prometheus/rules/recording.yml",
];

/// The files of `monitoring/` that `config` generates.
pub fn render(config: &Config) -> Result<Vec<File>> {
    config.validate()?;
    let env = environment()?;
    let mut files = Vec::new();
    let yaml = yaml_context(config);
    for (path, template) in [
        (RULE_FILES[0], "alerts.yml"),
        (RULE_FILES[1], "recording.yml"),
        ("alertmanager/alertmanager.yml", "alertmanager.yml"),
    ] {
        let text = env
            .get_template(template)?
            .render(&yaml)
            .with_context(|| format!("rendering {template}"))?;
        files.push(File { path, text });
    }
    let json = json_context(config);
    for (path, template) in [
        ("grafana/dashboards/overview.json", "overview.json"),
        (
            "grafana/dashboards/kernel-latency.json",
            "kernel-latency.json",
        ),
    ] {
        let text = env
            .get_template(template)?
            .render(&json)
            .with_context(|| format!("rendering {template}"))?;
        serde_json::from_str::<serde_json::Value>(&text)
            .with_context(|| format!("{template} did not render to JSON"))?;
        files.push(File { path, text });
    }
    Ok(files)
}

/// The rules of `config` as one Prometheus Operator `PrometheusRule` resource, each rule file's
/// groups indented under `spec:` with their comments.
pub fn prometheus_rule(config: &Config) -> Result<String> {
    let mut out = String::from(
        "---\n\
         # GENERATED by `cargo xtask mixin` from mixin/templates/: do not edit.\n\
         apiVersion: monitoring.coreos.com/v1\n\
         kind: PrometheusRule\n\
         metadata:\n  name: proxy\n  labels:\n    app.kubernetes.io/name: proxy\n\
         spec:\n  groups:\n",
    );
    for file in render(config)?
        .into_iter()
        .filter(|f| RULE_FILES.contains(&f.path))
    {
        let (_, body) = file
            .text
            .split_once("\ngroups:\n")
            .with_context(|| format!("{} has no top-level groups:", file.path))?;
        let _ = writeln!(out, "    # {}", file.path);
        for line in body.lines() {
            if !line.is_empty() {
                out.push_str("  ");
                out.push_str(line);
            }
            out.push('\n');
        }
    }
    Ok(out)
}

/// Every generated file the repository ships, by path from its root: `monitoring/` for the
/// VM, systemd and container set-ups, and the Kubernetes base's copies (the same rules and
/// dashboards; only the runbook's relative address differs).
pub fn shipped() -> Result<Vec<(String, String)>> {
    let mut files = Vec::new();
    for file in render(&Config::default())? {
        files.push((format!("monitoring/{}", file.path), file.text));
    }
    let kubernetes = Config {
        runbook_url: "../../monitoring/runbook.md".to_owned(),
        ..Config::default()
    };
    files.push((
        "deploy/kubernetes/prometheusrule.yaml".to_owned(),
        prometheus_rule(&kubernetes)?,
    ));
    let kubernetes_dashboards = Config {
        runbook_url: "../../../monitoring/runbook.md".to_owned(),
        ..Config::default()
    };
    for file in render(&kubernetes_dashboards)? {
        if let Some(name) = file.path.strip_prefix("grafana/dashboards/") {
            files.push((format!("deploy/kubernetes/dashboards/{name}"), file.text));
        }
    }
    Ok(files)
}

impl Config {
    /// Refuses what would generate rules that silently match nothing or say something else.
    pub fn validate(&self) -> Result<()> {
        ensure!(
            !self.selector.trim().is_empty()
                && !self.selector.contains(['{', '}'])
                && self.selector.contains('='),
            "the selector must be PromQL label matchers without braces, e.g. job=\"proxy\"; got {:?}",
            self.selector
        );
        ensure!(
            !self.group_by.is_empty(),
            "at least one label must group the proxies (e.g. job)"
        );
        for label in &self.group_by {
            let mut chars = label.chars();
            ensure!(
                chars
                    .next()
                    .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                    && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
                    && !label.starts_with("__"),
                "{label:?} is not a Prometheus label name"
            );
            ensure!(
                !["instance", "le", "listener", "backend", "cert"].contains(&label.as_str()),
                "{label:?} cannot group proxies: the rules keep or aggregate it themselves"
            );
        }
        ensure!(
            !self.runbook_url.is_empty() && !self.runbook_url.contains(['#', '"', ' ']),
            "the runbook URL must be an address without #anchor, quotes or spaces; got {:?}",
            self.runbook_url
        );
        let o = &self.objectives;
        for (name, value) in [
            ("availability", o.availability),
            ("tls-handshake", o.tls_handshake),
            ("latency", o.latency),
            ("accept-wait", o.accept_wait),
        ] {
            ensure!(
                value > 0.0 && value < 1.0,
                "the {name} objective must lie between 0 and 1 (0.999 for 99.9%); got {value}"
            );
        }
        for (name, seconds) in [
            ("latency", o.latency_threshold_seconds),
            ("accept-wait", o.accept_wait_threshold_seconds),
        ] {
            if !is_bucket_bound(seconds) {
                bail!(
                    "the {name} threshold {seconds} s is not a bucket bound of the proxy's histograms, \
                     so no rule can count the requests under it exactly; nearest bounds: {}",
                    nearest_bounds(seconds)
                );
            }
        }
        Ok(())
    }

    /// `level` of the recording rules' names: the labels they keep, joined by `_`.
    fn level(&self) -> String {
        self.group_by.join("_")
    }
}

/// Whether `seconds` prints as the `le` of a bucket the proxy exports.
fn is_bucket_bound(seconds: f64) -> bool {
    let wanted = seconds.to_string();
    bucket_bounds().any(|bound| bound.to_string() == wanted)
}

fn nearest_bounds(seconds: f64) -> String {
    let below = bucket_bounds().filter(|b| *b < seconds).last();
    let above = bucket_bounds().find(|b| *b > seconds);
    [below, above]
        .into_iter()
        .flatten()
        .map(|b| format!("{b} s"))
        .collect::<Vec<_>>()
        .join(" and ")
}

/// The finite upper bounds (seconds) of the histograms the SLOs read (request duration,
/// accept wait): the fine scale the proxy and its eBPF program share.
fn bucket_bounds() -> impl Iterator<Item = f64> {
    proxy_common::Scale::Fine.finite_bounds_seconds()
}

/// A number as the monitoring prints it: no float noise (`1 - 0.999` is 0.1%, not
/// 0.10000000000000009%).
fn number(value: f64) -> String {
    let rounded = format!("{value:.6}");
    rounded
        .trim_end_matches('0')
        .trim_end_matches('.')
        .to_owned()
}

/// A duration in the unit an operator reads it in.
fn duration(seconds: f64) -> String {
    if seconds >= 1.0 {
        format!("{} s", number(seconds))
    } else {
        format!("{} ms", number(seconds * 1e3))
    }
}

#[derive(Serialize)]
struct Slo {
    /// The objective as a share, as PromQL uses it.
    value: String,
    percent: String,
    budget_percent: String,
    /// The threshold as the `le` label value, for latency SLOs.
    le: String,
    threshold: String,
}

impl Slo {
    fn new(objective: f64, threshold_seconds: Option<f64>) -> Self {
        Slo {
            value: number(objective),
            percent: number(objective * 100.0),
            budget_percent: number((1.0 - objective) * 100.0),
            le: threshold_seconds.map(|s| s.to_string()).unwrap_or_default(),
            threshold: threshold_seconds.map(duration).unwrap_or_default(),
        }
    }
}

/// One speed of the multi-window, multi-burn-rate alerts (SRE workbook, ch. 5).
#[derive(Serialize)]
struct Burn {
    factor: &'static str,
    long: &'static str,
    short: &'static str,
    r#for: &'static str,
    severity: &'static str,
    budget_gone: &'static str,
    comment: String,
}

fn burns() -> Vec<Burn> {
    [
        ("14.4", "1h", "5m", "2m", "critical", "2 days", "2%", "1 h"),
        ("6", "6h", "30m", "15m", "critical", "5 days", "5%", "6 h"),
        ("3", "1d", "2h", "1h", "warning", "10 days", "10%", "1 d"),
        ("1", "3d", "6h", "3h", "warning", "30 days", "10%", "3 d"),
    ]
    .into_iter()
    .map(
        |(factor, long, short, r#for, severity, budget_gone, share, long_words)| Burn {
            factor,
            long,
            short,
            r#for,
            severity,
            budget_gone,
            comment: format!(
                "{:<5} over {long:<2} and {short:<3} -> {:<9} for {:<4} ({share} of the budget in {long_words})",
                format!("{factor}x"),
                format!("{severity},"),
                r#for,
            ),
        },
    )
    .collect()
}

fn slos(config: &Config) -> Value {
    let o = &config.objectives;
    context! {
        availability => Slo::new(o.availability, None),
        tls_handshake => Slo::new(o.tls_handshake, None),
        latency => Slo::new(o.latency, Some(o.latency_threshold_seconds)),
        accept_wait => Slo::new(o.accept_wait, Some(o.accept_wait_threshold_seconds)),
    }
}

/// How an alert's description names its group, in Prometheus's template language: the
/// innermost label plainly, the outer ones only when the series has them. One line per label
/// (`{{-` joins them without a space), indented for the descriptions' folded scalars.
fn scope(config: &Config) -> String {
    let mut labels = config.group_by.iter().rev();
    let mut lines = Vec::new();
    if let Some(first) = labels.next() {
        lines.push(format!("{first} {{{{ $labels.{first} }}}}"));
    }
    for label in labels {
        lines.push(format!(
            "{{{{- with $labels.{label} }}}}, {label} {{{{ . }}}}{{{{ end }}}}"
        ));
    }
    lines.join("\n            ")
}

fn yaml_context(config: &Config) -> Value {
    context! {
        sel => config.selector,
        by => config.group_by.join(", "),
        level => config.level(),
        scope => scope(config),
        scope_noun => config.group_by.join("/"),
        windows => ["5m", "30m", "1h", "2h", "6h", "1d", "3d"],
        burns => burns(),
        slos => slos(config),
        runbook => config.runbook_url,
    }
}

/// `text` as the inside of a JSON string.
fn json_inner(text: &str) -> String {
    let quoted = serde_json::to_string(text).unwrap_or_default();
    quoted[1..quoted.len() - 1].to_owned()
}

#[derive(Serialize)]
struct Variable {
    name: String,
    title: String,
    /// JSON-escaped.
    query: String,
}

fn json_context(config: &Config) -> Value {
    // Each group variable lists the values under the ones before it; `instance` comes last.
    let mut variables = Vec::new();
    let mut matchers = vec![config.selector.clone()];
    for name in config
        .group_by
        .iter()
        .chain(std::iter::once(&"instance".to_owned()))
    {
        let mut title = name.replace('_', " ");
        if let Some(first) = title.get_mut(..1) {
            first.make_ascii_uppercase();
        }
        variables.push(Variable {
            name: name.clone(),
            title,
            query: json_inner(&format!(
                "label_values(proxy_build_info{{{}}}, {name})",
                matchers.join(", ")
            )),
        });
        matchers.push(format!("{name}=~\"${name}\""));
    }
    let group_matchers: Vec<String> = config
        .group_by
        .iter()
        .map(|name| format!("{name}=~\"${name}\""))
        .collect();
    context! {
        dsel => json_inner(&matchers.join(", ")),
        rsel => json_inner(&group_matchers.join(", ")),
        group_variables => variables,
        by => config.group_by.join(", "),
        level => config.level(),
        legend => config.group_by.iter().rev().map(|l| format!("{{{{{l}}}}}")).collect::<Vec<_>>().join(" "),
        slos => slos(config),
        runbook => json_inner(&config.runbook_url),
    }
}

fn environment() -> Result<Environment<'static>> {
    let mut env = Environment::new();
    env.set_syntax(
        SyntaxConfig::builder()
            .block_delimiters("<%", "%>")
            .variable_delimiters("<<", ">>")
            .comment_delimiters("<#", "#>")
            .build()?,
    );
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_keep_trailing_newline(true);
    // The outputs are YAML and JSON whose values the templates quote themselves.
    env.set_auto_escape_callback(|_| AutoEscape::None);
    env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
    for (name, source) in [
        ("recording.yml", include_str!("../templates/recording.yml")),
        ("alerts.yml", include_str!("../templates/alerts.yml")),
        (
            "alertmanager.yml",
            include_str!("../templates/alertmanager.yml"),
        ),
        ("overview.json", include_str!("../templates/overview.json")),
        (
            "kernel-latency.json",
            include_str!("../templates/kernel-latency.json"),
        ),
        (
            "dashboard.macros",
            include_str!("../templates/dashboard.macros"),
        ),
    ] {
        env.add_template(name, source)?;
    }
    Ok(env)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_thresholds_are_bucket_bounds() {
        Config::default().validate().expect("default config");
    }

    #[test]
    fn a_threshold_between_bounds_is_refused_naming_its_neighbours() {
        let mut config = Config::default();
        config.objectives.latency_threshold_seconds = 0.25;
        let error = config
            .validate()
            .expect_err("0.25 s is no bound")
            .to_string();
        assert!(error.contains("0.25 s is not a bucket bound"), "{error}");
        assert!(error.contains("0.262144 s"), "{error}");
    }

    #[test]
    fn bad_parameters_are_refused() {
        for broken in [
            Config {
                selector: "{job=\"proxy\"}".into(),
                ..Config::default()
            },
            Config {
                group_by: vec![],
                ..Config::default()
            },
            Config {
                group_by: vec!["instance".into()],
                ..Config::default()
            },
            Config {
                runbook_url: "https://wiki/runbook#x".into(),
                ..Config::default()
            },
        ] {
            assert!(broken.validate().is_err(), "{broken:?} was accepted");
        }
    }

    #[test]
    fn objectives_print_without_float_noise() {
        let slo = Slo::new(0.999, Some(0.004_096));
        assert_eq!(
            (
                slo.value.as_str(),
                slo.percent.as_str(),
                slo.budget_percent.as_str()
            ),
            ("0.999", "99.9", "0.1")
        );
        assert_eq!(
            (slo.le.as_str(), slo.threshold.as_str()),
            ("0.004096", "4.096 ms")
        );
    }

    #[test]
    fn another_selector_and_grouping_reach_every_rule_and_panel() {
        let config = Config {
            selector: r#"job="edge""#.into(),
            group_by: vec!["region".into(), "job".into()],
            runbook_url: "https://runbooks.example/proxy.md".into(),
            ..Config::default()
        };
        let files = render(&config).expect("renders");
        for file in &files {
            assert!(
                !file.text.contains(r#"job="proxy""#) && !file.text.contains(r#"job=\"proxy\""#),
                "{} still selects job=\"proxy\"",
                file.path
            );
            assert!(
                !file.text.contains("namespace=~") && !file.text.contains(", namespace"),
                "{} groups by namespace",
                file.path
            );
        }
        let recording = &files[1].text;
        assert!(files[2].text.contains("group_by: [alertname, region, job]"));
        assert!(recording.contains("record: region_job:proxy_http_requests_errors:ratio_rate5m"));
        assert!(recording.contains(
            r#"sum by (region, job) (rate(proxy_http_requests_total{job="edge", listener="https""#
        ));
        let alerts = &files[0].text;
        assert!(alerts.contains("runbook_url: https://runbooks.example/proxy.md#proxydown"));
        let overview = &files[3].text;
        assert!(overview.contains(r#"label_values(proxy_build_info{job=\"edge\"}, region)"#));
        assert!(overview.contains(r#"region_job:proxy_http_requests_errors:ratio_rate3d{region=~\"$region\", job=~\"$job\"}"#));
    }
}
