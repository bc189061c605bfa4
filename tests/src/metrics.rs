//! A small parser for the Prometheus text format served on the admin `/metrics`.

/// One sample line: `name{labels} value`.
#[derive(Clone, Debug)]
pub struct Sample {
    /// Metric name, including any `_bucket`/`_sum`/`_count` suffix.
    pub name: String,
    /// Label pairs, unescaped.
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

    /// The sum of every sample named `name` whose labels include all of `labels`, or `None`
    /// when no sample matches.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut found = None;
        for s in self.samples.iter().filter(|s| s.name == name) {
            let matches = labels
                .iter()
                .all(|(k, v)| s.labels.iter().any(|(lk, lv)| lk == k && lv == v));
            if matches {
                *found.get_or_insert(0.0) += s.value;
            }
        }
        found
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

    /// Panics, quoting the scrape, unless a sample matches; returns the summed value.
    pub fn expect(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or_else(|| {
            panic!(
                "/metrics has no sample {name}{labels:?}; the scrape was:\n{}",
                self.text
            )
        })
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
    let value = rest.split_whitespace().next()?;
    let value = match value {
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
    use super::Metrics;

    #[test]
    fn parses_labels_and_sums_matches() {
        let m = Metrics::parse(
            "# HELP x y\n\
             proxy_http_requests_total{listener=\"https\",code=\"200\"} 3\n\
             proxy_http_requests_total{listener=\"http\",code=\"308\"} 2\n\
             proxy_build_info{version=\"0.1.0\"} 1\n\
             proxy_tls_handshake_duration_seconds_count 5\n\
             weird{a=\"q\\\"uote,}\"} 7\n",
        );
        assert_eq!(m.get("proxy_http_requests_total", &[]), Some(5.0));
        assert_eq!(
            m.get("proxy_http_requests_total", &[("listener", "https")]),
            Some(3.0)
        );
        assert_eq!(m.get("proxy_http_requests_total", &[("code", "404")]), None);
        assert!(m.has("proxy_tls_handshake_duration_seconds"));
        assert_eq!(m.get("weird", &[("a", "q\"uote,}")]), Some(7.0));
    }
}
