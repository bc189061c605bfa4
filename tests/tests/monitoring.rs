//! Monitoring as code, tested with the real tools: promtool, amtool and yamllint on the shipped
//! files, the dashboards' structure, the runbook links, the fleet's promtool tests under
//! another selector, and the availability SLI against a real Prometheus. The end-to-end run
//! under another job name is `monitoring_e2e.rs`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use proxy_e2e::client::{self, Req};
use proxy_e2e::monitoring::{
    all_panels, copy_tree, dashboard, files, monitoring_dir, query, start_prometheus, targets,
    tool, tools_present,
};
use proxy_e2e::upstream::{Behaviour, TestUpstream};
use proxy_e2e::{Alpn, TestEnv, poll_until};

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
