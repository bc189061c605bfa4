//! The Prometheus text exposition format, as the proxy's admin `/metrics` serves it: one parser
//! for every scrape the tests, the benchmark and the VM test read, and the queries they ask of
//! it (a sum over the samples whose labels match, whether a family exists).

use std::fmt;

/// One sample line: `name{labels} value`.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// Metric name, including any `_bucket`/`_sum`/`_count` suffix.
    pub name: String,
    /// Label pairs, unescaped, in the order written.
    pub labels: Vec<(String, String)>,
    /// The value.
    pub value: f64,
}

/// A parsed scrape.
#[derive(Clone, Debug)]
pub struct Metrics {
    /// The raw text, for failure messages.
    pub text: String,
    /// Every sample.
    pub samples: Vec<Sample>,
}

impl Metrics {
    /// Parses a scrape, ignoring comments and lines it does not understand.
    pub fn parse(text: &str) -> Metrics {
        let samples = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .filter_map(parse_line)
            .collect();
        Metrics {
            text: text.to_owned(),
            samples,
        }
    }

    /// The samples named exactly `name`.
    pub fn named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Sample> {
        self.samples.iter().filter(move |s| s.name == name)
    }

    /// The sum of every sample named `name` whose labels include all of `labels`, or `None`
    /// when no sample matches.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.named(name)
            .filter(|s| labels.iter().all(|(k, v)| s.label(k) == Some(v)))
            .map(|s| s.value)
            .reduce(|sum, value| sum + value)
    }

    /// Like [`Metrics::get`] but 0 when absent.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or(0.0)
    }

    /// Whether any sample is named `name` or `name_bucket`/`_sum`/`_count`.
    pub fn has(&self, name: &str) -> bool {
        self.samples.iter().any(|s| {
            s.name == name
                || s.name
                    .strip_prefix(name)
                    .is_some_and(|suffix| ["_bucket", "_sum", "_count"].contains(&suffix))
        })
    }
}

impl Sample {
    /// The value of label `key`.
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// The sample as a line of the text format.
impl fmt::Display for Sample {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)?;
        if !self.labels.is_empty() {
            let labels: Vec<String> = self
                .labels
                .iter()
                .map(|(k, v)| {
                    let v = v
                        .replace('\\', r"\\")
                        .replace('"', "\\\"")
                        .replace('\n', r"\n");
                    format!("{k}=\"{v}\"")
                })
                .collect();
            write!(f, "{{{}}}", labels.join(","))?;
        }
        write!(f, " {}", self.value)
    }
}

fn parse_line(line: &str) -> Option<Sample> {
    let (name_end, labels, rest) = match line.find('{') {
        Some(open) => {
            let (labels, after) = parse_labels(&line[open + 1..])?;
            (open, labels, after)
        }
        None => {
            let sp = line.find(' ')?;
            (sp, Vec::new(), &line[sp..])
        }
    };
    let value = match rest.split_whitespace().next()? {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name: line[..name_end].to_owned(),
        labels,
        value,
    })
}

/// Parses `a="b",c="d"}` and returns the labels and the text after `}`.
fn parse_labels(mut s: &str) -> Option<(Vec<(String, String)>, &str)> {
    let mut labels = Vec::new();
    loop {
        s = s.trim_start_matches([',', ' ']);
        if let Some(after) = s.strip_prefix('}') {
            return Some((labels, after));
        }
        let eq = s.find('=')?;
        let key = s[..eq].trim().to_owned();
        let mut chars = s[eq + 1..].strip_prefix('"')?.char_indices();
        let mut value = String::new();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                '"' => break i,
                c => value.push(c),
            }
        };
        labels.push((key, value));
        s = &s[eq + 1 + 1 + end + 1..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCRAPE: &str = "# HELP x y\n\
         proxy_http_requests_total{listener=\"https\",code=\"200\"} 3\n\
         proxy_http_requests_total{listener=\"http\",code=\"308\"} 2\n\
         proxy_build_info{version=\"0.1.0\"} 1\n\
         proxy_tls_handshake_duration_seconds_count 5\n\
         proxy_tcp_connections_totally 9\n\
         weird{a=\"q\\\"uote,}\"} 7\n";

    #[test]
    fn parses_labels_and_sums_matches() {
        let m = Metrics::parse(SCRAPE);
        assert_eq!(m.get("proxy_http_requests_total", &[]), Some(5.0));
        assert_eq!(
            m.get("proxy_http_requests_total", &[("listener", "https")]),
            Some(3.0)
        );
        assert_eq!(m.get("proxy_http_requests_total", &[("code", "404")]), None);
        assert_eq!(
            m.value("proxy_http_requests_total", &[("code", "404")]),
            0.0
        );
        assert!(m.has("proxy_tls_handshake_duration_seconds"));
        assert!(!m.has("proxy_tcp_connections_total"));
        assert_eq!(m.get("weird", &[("a", "q\"uote,}")]), Some(7.0));
    }

    #[test]
    fn shows_samples_as_written() {
        let m = Metrics::parse(SCRAPE);
        let lines: Vec<String> = m
            .named("proxy_http_requests_total")
            .map(Sample::to_string)
            .collect();
        assert_eq!(
            lines,
            [
                "proxy_http_requests_total{listener=\"https\",code=\"200\"} 3",
                "proxy_http_requests_total{listener=\"http\",code=\"308\"} 2",
            ]
        );
        let weird = m.named("weird").next().expect("the weird sample");
        assert_eq!(weird.to_string(), "weird{a=\"q\\\"uote,}\"} 7");
        assert_eq!(weird.label("a"), Some("q\"uote,}"));
        let plain = m.named("proxy_tcp_connections_totally").next();
        assert_eq!(
            plain.map(Sample::to_string).as_deref(),
            Some("proxy_tcp_connections_totally 9")
        );
    }
}
