//! Monitoring as code, tested with the real tools: promtool and amtool on the shipped files,
//! the dashboards' structure, and a real Prometheus and Alertmanager scraping the real proxy
//! (eBPF attached) while traffic flows, then a real failure paging through Alertmanager.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use proxy_e2e::client::{self, Req};
use proxy_e2e::monitoring::{
    WebhookSink, alerts, copy_tree, monitoring_dir, query, start_alertmanager, start_prometheus,
    tool,
};
use proxy_e2e::upstream::{Behaviour, TestUpstream};
use proxy_e2e::{Alpn, TestEnv, on_path, poll_until, skip};

/// Whether the monitoring tools are installed; skips loudly, or fails under PROXY_E2E_REQUIRE.
fn tools_present(test: &str) -> bool {
    let tools = [
        "promtool",
        "amtool",
        "yamllint",
        "prometheus",
        "prometheus-alertmanager",
    ];
    tools.iter().all(|tool| on_path(tool))
        || skip(
            test,
            "needs Prometheus, Alertmanager and yamllint (apt-get install prometheus \
             prometheus-alertmanager yamllint; `cargo xtask test` installs them)",
        )
}

#[test]
fn shipped_configs_rules_and_dashboards_pass_the_real_tools() {
    if !tools_present("monitoring-static") {
        return;
    }
    let dir = monitoring_dir();
    let prometheus_dir = dir.join("prometheus");
    let checks: [(&str, Vec<String>, &Path); 5] = [
        (
            "promtool",
            vec!["check".into(), "config".into(), "prometheus.yml".into()],
            &prometheus_dir,
        ),
        (
            "promtool",
            [
                vec!["check".into(), "rules".into()],
                files(&prometheus_dir.join("rules")),
            ]
            .concat(),
            &prometheus_dir,
        ),
        (
            "promtool",
            [
                vec!["test".into(), "rules".into()],
                files(&prometheus_dir.join("tests")),
            ]
            .concat(),
            &prometheus_dir,
        ),
        (
            "amtool",
            vec![
                "check-config".into(),
                "alertmanager/alertmanager.yml".into(),
            ],
            &dir,
        ),
        ("yamllint", vec!["--strict".into(), ".".into()], &dir),
    ];
    for (program, args, cwd) in checks {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (ok, output) = tool(program, &args, cwd);
        assert!(ok, "{program} {} failed:\n{output}", args.join(" "));
    }

    // Every alert has the annotations and labels on-call needs, and a runbook section.
    let alerts_yml =
        std::fs::read_to_string(prometheus_dir.join("rules/alerts.yml")).expect("alerts.yml");
    let runbook = std::fs::read_to_string(dir.join("runbook.md"))
        .expect("runbook.md")
        .to_lowercase();
    let mut alert_names = Vec::new();
    for block in alerts_yml.split("- alert: ").skip(1) {
        let name = block.lines().next().unwrap_or_default().trim().to_owned();
        for field in ["severity:", "summary:", "description:", "runbook_url:"] {
            assert!(block.contains(field), "alert {name} lacks {field}");
        }
        let anchor = block
            .split("runbook_url:")
            .nth(1)
            .and_then(|rest| rest.split('#').nth(1))
            .map(|a| {
                a.split(['"', '\'', '\n'])
                    .next()
                    .unwrap_or_default()
                    .trim()
                    .to_owned()
            })
            .unwrap_or_default();
        assert!(
            !anchor.is_empty(),
            "alert {name}: runbook_url has no #anchor"
        );
        assert!(
            runbook.contains(&format!("# {}", anchor.replace('-', " ")))
                || runbook.contains(&anchor),
            "runbook.md has no section for #{anchor} ({name})"
        );
        alert_names.push(name);
    }
    for required in [
        "ProxyDown",
        "ProxyEbpfDetached",
        "ProxyAvailabilityBudgetBurn",
        "ProxyLatencyBudgetBurn",
    ] {
        assert!(
            alert_names.iter().any(|n| n == required),
            "no {required} alert"
        );
    }

    // Dashboards: JSON a current Grafana accepts, stable uids, an instance variable, and
    // every target a PromQL query that promtool-grade Prometheus will evaluate below.
    for (file, uid) in [
        ("overview.json", "proxy-overview"),
        ("kernel-latency.json", "proxy-kernel-latency"),
    ] {
        let dashboard = dashboard(file);
        assert_eq!(dashboard["uid"], uid, "{file} uid");
        assert!(
            dashboard["schemaVersion"].as_u64().unwrap_or(0) >= 39,
            "{file} schemaVersion"
        );
        let variables = dashboard["templating"]["list"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        for name in ["cluster", "namespace", "job", "instance"] {
            assert!(
                variables.iter().any(|v| v["name"] == name),
                "{file} has no {name} variable"
            );
        }
        let targets = targets(&dashboard);
        assert!(
            targets.len() >= 5,
            "{file} has only {} queries",
            targets.len()
        );
        // Every query follows the group variables; all but the SLO panels (whose recorded
        // series aggregate the instances away) follow the instance one as well.
        for (title, expr) in &targets {
            for variable in ["$cluster", "$namespace", "$job"] {
                assert!(
                    expr.contains(variable),
                    "{file} panel {title:?} ignores {variable}: {expr}"
                );
            }
            assert!(
                expr.contains("$instance") || expr.contains("cluster_namespace_job:"),
                "{file} panel {title:?} ignores the instance variable: {expr}"
            );
        }
        let panels = all_panels(&dashboard);
        for panel in &panels {
            if panel["type"] != "row" {
                assert!(
                    panel["title"].as_str().is_some_and(|t| !t.is_empty()),
                    "{file}: a panel has no title"
                );
                assert!(
                    panel["fieldConfig"]["defaults"]["unit"].is_string() || panel["type"] == "text",
                    "{file} panel {:?} has no unit",
                    panel["title"]
                );
            }
        }
    }
    let kernel = serde_json::to_string(&dashboard("kernel-latency.json")).unwrap_or_default();
    for metric in [
        "proxy_tcp_handshake_duration_seconds_bucket",
        "proxy_tcp_accept_wait_seconds_bucket",
        "proxy_tcp_rtt_seconds_bucket",
    ] {
        assert!(
            kernel.contains(metric),
            "the kernel dashboard has no {metric} heatmap"
        );
    }
}

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
    std::thread::sleep(Duration::from_secs(3)); // a few rule evaluations

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

fn files(dir: &Path) -> Vec<String> {
    let mut files: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|e| e.path().display().to_string())
        .filter(|p| p.ends_with(".yml") || p.ends_with(".yaml"))
        .collect();
    files.sort();
    files
}

fn dashboard(file: &str) -> serde_json::Value {
    let path = monitoring_dir().join("grafana/dashboards").join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

fn all_panels(dashboard: &serde_json::Value) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    let mut stack: Vec<serde_json::Value> =
        dashboard["panels"].as_array().cloned().unwrap_or_default();
    while let Some(panel) = stack.pop() {
        stack.extend(panel["panels"].as_array().cloned().unwrap_or_default());
        out.push(panel);
    }
    out
}

/// (panel title, expr) of every query target.
fn targets(dashboard: &serde_json::Value) -> Vec<(String, String)> {
    all_panels(dashboard)
        .iter()
        .flat_map(|panel| {
            let title = panel["title"].as_str().unwrap_or_default().to_owned();
            panel["targets"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .filter_map(move |t| t["expr"].as_str().map(|e| (title.clone(), e.to_owned())))
        })
        .collect()
}

/// The `label="value"` matchers of the PromQL in `text` (equality only: `=~`, `!=` and
/// `!~` are left out).
fn equality_matchers(text: &str) -> Vec<(String, String)> {
    let mut found = Vec::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("=\"") {
        let eq = i + at;
        i = eq + 2;
        // The label name right before `=`, itself right after `{` or `,` (and spaces).
        let name_start = text[..eq]
            .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map_or(0, |p| p + 1);
        let name = &text[name_start..eq];
        let before = text[..name_start].trim_end();
        if name.is_empty() || !(before.ends_with('{') || before.ends_with(',')) {
            continue;
        }
        if eq > 0 && matches!(bytes[eq - 1], b'!' | b'~') {
            continue;
        }
        let Some(len) = text[i..].find('"') else {
            break;
        };
        found.push((name.to_owned(), text[i..i + len].to_owned()));
        i += len + 1;
    }
    found
}

/// The dashboard's template variables.
fn variable_names(dashboard: &serde_json::Value) -> Vec<String> {
    dashboard["templating"]["list"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter_map(|v| v["name"].as_str().map(str::to_owned))
        .collect()
}

/// The query as Grafana would send it for "All" of every variable over the last minutes.
fn grafana_to_promql(expr: &str, variables: &[String]) -> String {
    let mut expr = expr
        .replace("$__rate_interval", "1m")
        .replace("${__rate_interval}", "1m")
        .replace("$__interval", "15s")
        .replace("$__range", "5m");
    // Longest names first, so that `$instance` never eats part of `$instance_group`.
    let mut variables = variables.to_vec();
    variables.sort_by_key(|name| std::cmp::Reverse(name.len()));
    for name in variables {
        for form in [
            format!("${{{name}:regex}}"),
            format!("${{{name}:pipe}}"),
            format!("${{{name}}}"),
            format!("${name}"),
        ] {
            expr = expr.replace(&form, ".*");
        }
    }
    expr
}

/// A response the backend breaks off mid-body reaches the client as a broken `200`: the
/// shipped availability SLI, evaluated by a real Prometheus, counts every one as failed.
#[test]
fn the_availability_sli_counts_responses_broken_mid_body_as_failed() {
    if !tools_present("monitoring-broken") {
        return;
    }
    let Some(env) = TestEnv::new("monitoring-broken") else {
        return;
    };
    let _backend = TestUpstream::with(
        &env.ns,
        "127.0.0.1:8081",
        Behaviour::CloseMidBody {
            declared: 10_000,
            sent: 100,
        },
    );
    let proxy = env.serve(&["--upstream", "http://127.0.0.1:8081"]);
    let config_dir = env.path("monitoring");
    copy_tree(&config_dir, &|path, text| match path {
        "prometheus/prometheus.yml" => text
            .replace("scrape_interval: 15s", "scrape_interval: 1s")
            .replace("evaluation_interval: 15s", "evaluation_interval: 1s"),
        _ => text,
    });
    let _prometheus = start_prometheus(
        &env.ns,
        &config_dir.join("prometheus/prometheus.yml"),
        &env.path("prom-data"),
        env.path("prometheus.stderr"),
    );
    // Counters must be seen before the failures for a rate to show them.
    let up = poll_until(Duration::from_secs(30), || {
        let value = query(&env.ns, "up{job=\"proxy\"}").ok()?.first()?.1;
        (value == 1.0).then_some(())
    });
    assert!(up.is_some(), "Prometheus never scraped the proxy");
    // HTTP/1.1: the head always arrives before the break (with HTTP/2 the client may see
    // only the reset).
    let tls = proxy.tls().alpn(Alpn::H1);
    let mut broken = 0;
    for _ in 0..40 {
        let got = env
            .run(|| client::https_streamed(&tls, Req::get("/")))
            .unwrap_or_else(|e| panic!("GET: {e}"));
        assert_eq!(got.status.as_u16(), 200, "{got:?}");
        assert!(got.end.is_err(), "the body must break visibly: {got:?}");
        broken += 1;
        std::thread::sleep(Duration::from_millis(150));
    }
    let ratio = poll_until(Duration::from_secs(30), || {
        let value = query(
            &env.ns,
            "cluster_namespace_job:proxy_http_requests_errors:ratio_rate5m",
        )
        .ok()?
        .first()?
        .1;
        (value > 0.0).then_some(value)
    });
    eprintln!("{broken} responses broken mid-body: availability error ratio {ratio:?}");
    assert!(
        ratio.is_some_and(|r| r > 0.99),
        "{broken} broken 200s should make the error ratio 1, got {ratio:?}; scrape:\n{}",
        env.metrics().text
    );
}

/// Every alert's `runbook_url` ends in an anchor that names a heading of `runbook.md` (as a
/// rendered repository makes anchors: lower case, punctuation dropped, spaces as `-`), and
/// every alert has a runbook section.
#[test]
fn every_runbook_link_lands_on_a_heading() {
    let dir = monitoring_dir();
    let runbook = std::fs::read_to_string(dir.join("runbook.md")).expect("runbook.md");
    let anchors: Vec<String> = runbook
        .lines()
        .filter_map(|line| line.strip_prefix('#'))
        .map(|heading| {
            heading
                .trim_start_matches('#')
                .trim()
                .to_lowercase()
                .chars()
                .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
                .map(|c| if c == ' ' { '-' } else { c })
                .collect()
        })
        .collect();
    let alerts =
        std::fs::read_to_string(dir.join("prometheus/rules/alerts.yml")).expect("alerts.yml");
    // Each link, from the directory of the file that holds it: relative addresses must reach
    // runbook.md itself (so they work in a checkout and a rendered repository).
    let mut urls: Vec<(PathBuf, String)> = alerts
        .lines()
        .filter_map(|line| line.trim().strip_prefix("runbook_url: "))
        .map(|url| (dir.join("prometheus/rules"), url.to_owned()))
        .collect();
    let links = urls.len();
    let mut slo_panel_links = 0;
    for file in ["overview.json", "kernel-latency.json"] {
        for panel in all_panels(&dashboard(file)) {
            for link in panel["links"].as_array().cloned().unwrap_or_default() {
                if let Some(url) = link["url"].as_str().filter(|u| u.contains("runbook")) {
                    slo_panel_links += 1;
                    urls.push((dir.join("grafana/dashboards"), url.to_owned()));
                }
            }
        }
    }
    assert!(
        slo_panel_links >= 8,
        "only {slo_panel_links} dashboard panels link to the runbook"
    );
    let mut broken = Vec::new();
    for (from, url) in &urls {
        let Some((address, anchor)) = url.split_once('#') else {
            broken.push(format!("{url} (no #anchor)"));
            continue;
        };
        if !anchors.iter().any(|a| a == anchor) {
            broken.push(format!("{url} (no heading #{anchor})"));
        }
        if !address.contains("://") {
            let target = from.join(address);
            let reaches_runbook = target
                .canonicalize()
                .ok()
                .zip(dir.join("runbook.md").canonicalize().ok())
                .is_some_and(|(a, b)| a == b);
            if !reaches_runbook {
                broken.push(format!(
                    "{url} (from {} it is not runbook.md)",
                    from.display()
                ));
            }
        }
    }
    let alert_names: std::collections::BTreeSet<&str> = alerts
        .lines()
        .filter_map(|line| line.trim().strip_prefix("- alert: "))
        .collect();
    assert!(
        links >= alert_names.len(),
        "{links} runbook links for {} alerts",
        alert_names.len()
    );
    assert!(
        broken.is_empty(),
        "runbook links that do not land on a heading of runbook.md:\n{}",
        broken.join("\n")
    );
    for name in alert_names {
        assert!(
            anchors.iter().any(|a| *a == name.to_lowercase()),
            "alert {name} has no section in runbook.md"
        );
    }
}

/// The fleet's promtool tests (two namespaces, one failing) pass for a job named `edge` with
/// rules generated for its selector, and fail against the shipped ones, which select
/// job="proxy": the selector is what makes them match.
#[test]
fn fleet_alerts_follow_the_generated_selector() {
    if !tools_present("monitoring-fleet") {
        return;
    }
    let fleet = std::fs::read_to_string(monitoring_dir().join("prometheus/tests/fleet.yml"))
        .expect("fleet.yml");
    let edge_tests = fleet
        .replace("job=\"proxy\"", "job=\"edge\"")
        .replace("job: proxy", "job: edge")
        .replace("(job proxy,", "(job edge,");
    assert!(
        !edge_tests.contains("proxy\""),
        "fleet.yml names job proxy somewhere else"
    );
    let run = |config: Option<proxy_mixin::Config>| {
        let dir = proxy_e2e::scratch_dir("mixin-fleet");
        let rules = match config {
            Some(config) => proxy_mixin::render(&config).expect("the mixin renders"),
            None => proxy_mixin::render(&proxy_mixin::Config::default()).expect("renders"),
        };
        for file in rules
            .iter()
            .filter(|f| f.path.starts_with("prometheus/rules/"))
        {
            let path = dir.path().join(file.path);
            std::fs::create_dir_all(path.parent().expect("parent")).expect("rules dir");
            std::fs::write(&path, &file.text).expect("rule file");
        }
        let tests = dir.path().join("prometheus/tests");
        std::fs::create_dir_all(&tests).expect("tests dir");
        std::fs::write(tests.join("fleet.yml"), &edge_tests).expect("fleet.yml");
        tool(
            "promtool",
            &["test", "rules", "tests/fleet.yml"],
            &dir.path().join("prometheus"),
        )
    };
    let (ok, output) = run(Some(proxy_mixin::Config {
        selector: "job=\"edge\"".into(),
        ..proxy_mixin::Config::default()
    }));
    assert!(
        ok,
        "the fleet tests fail for job edge with rules generated for it:\n{output}"
    );
    let (ok, output) = run(None);
    assert!(
        !ok && output.contains("FAILED"),
        "rules selecting job=\"proxy\" should not alert on job edge:\n{output}"
    );
}

/// The values of `label` in the result of `expr` (one label kept, e.g. by `count by`).
fn query_labels(ns: &proxy_e2e::netns::NetNs, expr: &str, label: &str) -> Vec<String> {
    let mut values: Vec<String> = query(ns, expr)
        .unwrap_or_else(|e| panic!("{e}"))
        .into_iter()
        .filter_map(|(labels, _)| {
            labels
                .strip_prefix(&format!("{label}="))
                .map(|v| v.trim_matches('"').to_owned())
        })
        .collect();
    values.sort();
    values
}
