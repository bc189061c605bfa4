//! The monitoring end to end under another fleet's name: rules, routing and dashboards
//! generated for job `edge`, a real Prometheus and Alertmanager scraping the real proxy (eBPF
//! attached) on non-default ports while traffic flows, then a real failure paging through
//! Alertmanager.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use proxy_e2e::TestEnv;
use proxy_e2e::client::{self, Req};
use proxy_e2e::monitoring::{
    WebhookSink, alerts, copy_tree, equality_matchers, files, grafana_to_promql, monitoring_dir,
    query, query_labels, start_alertmanager, start_prometheus, targets, tools_present,
    variable_names,
};
use proxy_e2e::poll_until;

/// The job name, ports and addresses of the end-to-end monitoring test: none of them the
/// shipped defaults, so the rules and dashboards must follow the generator's parameters.
const JOB: &str = "edge";
const EDGE_HTTP: &str = "127.0.0.1:8081";
const EDGE_HTTPS: &str = "127.0.0.1:8444";
const EDGE_ADMIN: &str = "127.0.0.1:9190";

#[test]
fn real_prometheus_sees_every_sli_and_panel_under_another_job_and_a_failure_pages() {
    if !tools_present("monitoring-e2e") {
        return;
    }
    let Some(env) = TestEnv::new("monitoring-e2e") else {
        return;
    };
    let mut backend = env.backend("127.0.0.1:8080");
    let proxy = env.serve(&[
        "--ebpf",
        "required",
        "--http-listen",
        EDGE_HTTP,
        "--https-listen",
        EDGE_HTTPS,
        "--admin-listen",
        EDGE_ADMIN,
        "--upstream",
        "http://127.0.0.1:8080",
        "--upstream-connect-timeout",
        "200ms",
    ]);

    // Rules, alerts, routing and dashboards generated for job="edge"; the shipped
    // prometheus.yml scraping the proxy under that job name at its admin address. Test-only
    // timings: scrape and evaluate every second, the fast burn-rate alerts' `for` shortened,
    // and Alertmanager notifying at once.
    let config_dir = env.path("monitoring");
    copy_tree(&config_dir, &|path, text| match path {
        "prometheus/prometheus.yml" => text
            .replace("scrape_interval: 15s", "scrape_interval: 1s")
            .replace("evaluation_interval: 15s", "evaluation_interval: 1s")
            .replace("job_name: proxy", &format!("job_name: {JOB}"))
            .replace("127.0.0.1:9090", EDGE_ADMIN),
        _ => text,
    });
    let generated = proxy_mixin::render(&proxy_mixin::Config {
        selector: format!("job=\"{JOB}\""),
        ..proxy_mixin::Config::default()
    })
    .expect("the mixin renders for job=edge");
    for file in &generated {
        let text = match file.path {
            "prometheus/rules/alerts.yml" => file.text.replace("for: 2m", "for: 5s"),
            "alertmanager/alertmanager.yml" => {
                file.text.replace("group_wait: 30s", "group_wait: 1s")
            }
            _ => file.text.clone(),
        };
        std::fs::write(config_dir.join(file.path), text)
            .unwrap_or_else(|e| panic!("writing {}: {e}", file.path));
    }
    let dashboards: Vec<(&str, serde_json::Value)> = ["overview.json", "kernel-latency.json"]
        .into_iter()
        .map(|file| {
            let path = config_dir.join("grafana/dashboards").join(file);
            let text = std::fs::read_to_string(&path).expect("generated dashboard");
            (
                file,
                serde_json::from_str(&text).expect("generated dashboard is JSON"),
            )
        })
        .collect();
    let sink = WebhookSink::start(&env.ns, Duration::from_secs(180));
    let _alertmanager = start_alertmanager(
        &env.ns,
        &config_dir.join("alertmanager/alertmanager.yml"),
        &env.path("am-data"),
        env.path("alertmanager.stderr"),
    );
    let _prometheus = start_prometheus(
        &env.ns,
        &config_dir.join("prometheus/prometheus.yml"),
        &env.path("prom-data"),
        env.path("prometheus.stderr"),
    );

    // Bounded traffic through both ports, spread over several scrapes.
    let tls = proxy.tls();
    let started = Instant::now();
    let mut sent = 0u32;
    while started.elapsed() < Duration::from_secs(6) && sent < 400 {
        let resp = env
            .run(|| edge_https(&tls))
            .unwrap_or_else(|e| panic!("HTTPS: {e}"));
        assert_eq!(resp.text(), "Hello SRE!");
        let redirect = env
            .run(|| {
                client::raw_http(
                    EDGE_HTTP,
                    b"GET /x HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
                )
            })
            .unwrap_or_else(|e| panic!("HTTP: {e}"));
        assert_eq!(redirect.status, 308);
        sent += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    let scraped = poll_until(Duration::from_secs(20), || {
        let value = query(
            &env.ns,
            &format!("sum(proxy_http_requests_total{{job=\"{JOB}\", listener=\"https\"}})"),
        )
        .ok()?
        .first()?
        .1;
        (value >= f64::from(sent)).then_some(())
    });
    assert!(
        scraped.is_some(),
        "Prometheus never scraped the {sent} requests"
    );
    // A few rule evaluations, with traffic still flowing: if Prometheus's first scrape came
    // after the traffic above (a busy machine), the 5m rates would be 0 and the ratios 0/0.
    let more = Instant::now();
    while more.elapsed() < Duration::from_secs(3) {
        let resp = env
            .run(|| edge_https(&tls))
            .unwrap_or_else(|e| panic!("HTTPS: {e}"));
        assert_eq!(resp.text(), "Hello SRE!");
        std::thread::sleep(Duration::from_millis(100));
    }

    // Every recording rule has a value.
    let recording = std::fs::read_to_string(config_dir.join("prometheus/rules/recording.yml"))
        .expect("recording.yml");
    let records: Vec<&str> = recording
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- record: "))
        .collect();
    assert!(
        records.len() >= 10,
        "only {} recording rules",
        records.len()
    );
    for record in &records {
        let result = query(&env.ns, record).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            !result.is_empty(),
            "recording rule {record} has no data after traffic"
        );
        assert!(
            result.iter().all(|(_, v)| v.is_finite()),
            "recording rule {record} is not a number: {result:?}"
        );
    }
    let availability = query(
        &env.ns,
        "cluster_namespace_job:proxy_http_requests_errors:ratio_rate5m",
    )
    .unwrap_or_default();
    assert!(
        availability.iter().all(|(_, v)| *v == 0.0),
        "no request failed yet: {availability:?}"
    );

    // Every label value the rules, alerts and panels match on is one the proxy exports:
    // promtool checks names, not values, and a value nobody exports matches nothing.
    let scrape = edge_metrics(&env);
    let mut sources = vec![
        recording.clone(),
        std::fs::read_to_string(config_dir.join("prometheus/rules/alerts.yml"))
            .expect("alerts.yml"),
    ];
    for (_, dashboard) in &dashboards {
        sources.extend(targets(dashboard).into_iter().map(|(_, expr)| expr));
    }
    let mut unexported = std::collections::BTreeSet::new();
    let mut checked = 0;
    for (label, value) in sources.iter().flat_map(|text| equality_matchers(text)) {
        // Target labels are Prometheus's, not the proxy's; `$...` are dashboard variables.
        if ["job", "instance", "namespace", "cluster"].contains(&label.as_str())
            || value.contains('$')
        {
            continue;
        }
        checked += 1;
        if !scrape
            .samples
            .iter()
            .any(|s| s.label(&label) == Some(value.as_str()))
        {
            unexported.insert(format!("{label}=\"{value}\""));
        }
    }
    assert!(checked >= 20, "only {checked} label matchers found");
    assert!(
        unexported.is_empty(),
        "label values the monitoring matches on that the live scrape does not have:\n{}",
        unexported.into_iter().collect::<Vec<_>>().join("\n")
    );

    // Every query of every dashboard panel returns data, with the job variable set to the
    // job and the others at "All", as Grafana sends them.
    let mut empty = Vec::new();
    for (file, dashboard) in &dashboards {
        let variables = variable_names(dashboard);
        for (title, expr) in targets(dashboard) {
            let expr = grafana_to_promql(&expr.replace("$job", JOB), &variables);
            match query(&env.ns, &expr) {
                Ok(result) if !result.is_empty() => {}
                Ok(_) => empty.push(format!("{file} / {title}: {expr}")),
                Err(e) => panic!("{file} / {title}: {e}"),
            }
        }
    }
    assert!(
        empty.is_empty(),
        "dashboard queries with no data after traffic:\n{}",
        empty.join("\n")
    );
    // The job and instance variables list the proxy (cluster and namespace are labels this
    // Prometheus does not attach: they list nothing, and "All" matches the series without).
    for (file, dashboard) in &dashboards {
        let variables = variable_names(dashboard);
        for variable in dashboard["templating"]["list"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let name = variable["name"].as_str().unwrap_or_default();
            let Some((selector, label)) = variable["query"]["query"]
                .as_str()
                .and_then(|q| q.strip_prefix("label_values("))
                .and_then(|q| q.strip_suffix(')'))
                .and_then(|q| q.rsplit_once(", "))
            else {
                continue;
            };
            let expr = grafana_to_promql(
                &format!("count by ({label}) ({selector})").replace("$job", JOB),
                &variables,
            );
            let values: Vec<String> = query_labels(&env.ns, &expr, label);
            if ["job", "instance"].contains(&name) {
                let expected = if name == "job" { JOB } else { EDGE_ADMIN };
                assert_eq!(
                    values,
                    vec![expected.to_owned()],
                    "{file}: variable {name} ({expr})"
                );
            }
        }
    }
    for expr in [
        "sum(rate(proxy_tcp_handshake_duration_seconds_count{listener=\"https\"}[1m]))",
        "sum(rate(proxy_tcp_accept_wait_seconds_count{listener=\"http\"}[1m]))",
        "sum(proxy_ebpf_attached)",
    ] {
        let value = query(&env.ns, expr)
            .unwrap_or_default()
            .first()
            .map_or(0.0, |s| s.1);
        assert!(
            value > 0.0,
            "{expr} should be non-zero after traffic, got {value}"
        );
    }

    // Break it for real: the upstream goes away and HTTPS requests fail with 502.
    backend.signal(Signal::SIGKILL);
    let _ = backend.wait_exit(Duration::from_secs(5));
    let fired = poll_until(Duration::from_secs(60), || {
        let resp = env.run(|| edge_https(&tls)).ok()?;
        assert_eq!(
            resp.status.as_u16(),
            502,
            "with the upstream gone the proxy answers 502"
        );
        alerts(&env.ns)
            .iter()
            .any(|(name, state)| name == "ProxyAvailabilityBudgetBurn" && state == "firing")
            .then_some(())
    });
    assert!(
        fired.is_some(),
        "the fast-burn availability alert never fired; alerts: {:?}",
        alerts(&env.ns)
    );
    let paged = poll_until(Duration::from_secs(30), || {
        sink.text()
            .contains("ProxyAvailabilityBudgetBurn")
            .then_some(())
    });
    assert!(
        paged.is_some(),
        "Alertmanager never delivered the alert to the receiver; got: {}",
        sink.text()
    );
    assert!(
        sink.text().contains("\"severity\":\"critical\"")
            && sink.text().contains(&format!("\"job\":\"{JOB}\"")),
        "the page carries its severity and its job: {}",
        sink.text()
    );

    // The promtool tests' input series are shaped like the live ones: every label they give a
    // proxy metric is one the proxy exports on it, and where the proxy exports every value
    // from the start (bucket bounds, listeners, programs, certificates, reset directions) the
    // value is one of them; a test fed series the proxy never exports proves nothing.
    let scrape = edge_metrics(&env);
    let mut unlike = std::collections::BTreeSet::new();
    let mut series_checked = 0;
    for file in files(&monitoring_dir().join("prometheus/tests")) {
        let text = std::fs::read_to_string(&file).expect("promtool test file");
        for series in text
            .lines()
            .filter_map(|l| l.trim().strip_prefix("- series: '"))
        {
            let Some((name, labels)) = series.trim_end_matches('\'').split_once('{') else {
                continue;
            };
            let live: Vec<_> = scrape.samples.iter().filter(|s| s.name == name).collect();
            if !name.starts_with("proxy_") || live.is_empty() {
                continue;
            }
            series_checked += 1;
            for (label, value) in equality_matchers(&format!("{{{labels}")) {
                if ["job", "instance", "namespace", "cluster"].contains(&label.as_str()) {
                    continue;
                }
                let eager =
                    ["le", "listener", "program", "cert", "direction"].contains(&label.as_str());
                let known = live
                    .iter()
                    .any(|s| s.label(&label).is_some_and(|v| !eager || v == value));
                if !known {
                    unlike.insert(format!("{name}{{{label}=\"{value}\"}}"));
                }
            }
        }
    }
    assert!(
        series_checked >= 20,
        "only {series_checked} promtool input series checked"
    );
    assert!(
        unlike.is_empty(),
        "promtool tests feed labels or values the live proxy does not export:\n{}",
        unlike.into_iter().collect::<Vec<_>>().join("\n")
    );
}

/// `GET /` over a new TLS connection to the test's HTTPS address.
async fn edge_https(tls: &proxy_e2e::TlsOptions) -> Result<client::Resp, String> {
    let conn = client::tls_connect(EDGE_HTTPS, tls).await?;
    client::send(conn, Req::get("/")).await
}

/// The proxy's `/metrics` from the test's admin address.
fn edge_metrics(env: &TestEnv) -> proxy_e2e::metrics::Metrics {
    let resp = env
        .run(|| {
            client::raw_http(
                EDGE_ADMIN,
                b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
            )
        })
        .unwrap_or_else(|e| panic!("scraping {EDGE_ADMIN}/metrics: {e}"));
    assert_eq!(resp.status, 200, "GET /metrics answered {}", resp.status);
    proxy_e2e::metrics::Metrics::parse(&String::from_utf8_lossy(&resp.body))
}
