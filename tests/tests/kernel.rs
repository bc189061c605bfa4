//! The kernel observer, for real: the eBPF program loaded and attached by the proxy, real TCP
//! connections on ports 80 and 443, and conditions injected in the kernel (a stalled accept
//! loop, SYN-ACKs and data segments dropped by nftables, aborted connections) showing up in
//! the kernel metrics as exactly what happened.
//!
//! Every test starts the proxy with `--ebpf required`: on this machine (root with BPF) a
//! proxy that cannot attach fails the test instead of silently serving without metrics.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use proxy_e2e::client::{self, Req};
use proxy_e2e::kernel::{
    Cgroup, cgroup_of, drop_syn_acks_from, http_requests, https_requests, nft, poll_metrics,
    wait_for_closed,
};
use proxy_e2e::{
    HTTP, HTTPS, Metrics, NetNs, Proxy, TestEnv, poll_until, proxy_bin, run_with_timeout,
};
use tokio::io::AsyncWriteExt as _;
use tokio::net::{TcpListener, TcpStream};

const REQUIRED: &[&str] = &["--ebpf", "required"];

#[test]
fn connections_to_80_and_443_are_counted_exactly_and_nothing_else_is() {
    let Some(env) = TestEnv::new("kernel-exact") else {
        return;
    };
    let proxy = env.serve(REQUIRED);
    let before = env.metrics();
    assert_eq!(
        before.value("proxy_ebpf_attached", &[("program", "sock_ops")]),
        1.0,
        "eBPF should be attached"
    );

    // Another process's connections, on another port of this namespace and on port 443 of
    // another namespace, must not be counted.
    let other_ns = NetNs::new();
    let foreign = [(&env.ns, "127.0.0.1:8443"), (&other_ns, "127.0.0.1:443")];
    for (ns, addr) in foreign {
        ns.run(|| async move {
            let listener = TcpListener::bind(addr)
                .await
                .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
            for _ in 0..3 {
                let client = TcpStream::connect(addr)
                    .await
                    .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
                let (server, _) = listener
                    .accept()
                    .await
                    .expect("accept the foreign connection");
                drop((client, server));
            }
        });
    }

    const HTTPS_CONNECTIONS: u32 = 7;
    const HTTP_CONNECTIONS: u32 = 5;
    https_requests(&env, &proxy, HTTPS_CONNECTIONS);
    http_requests(&env, HTTP_CONNECTIONS);

    for (listener, n) in [("https", HTTPS_CONNECTIONS), ("http", HTTP_CONNECTIONS)] {
        let n = f64::from(n);
        let after = wait_for_closed(&env, &before, listener, n);
        let delta = |name: &str| {
            after.value(name, &[("listener", listener)])
                - before.get(name, &[("listener", listener)]).unwrap_or(0.0)
        };
        assert_eq!(
            delta("proxy_tcp_connections_total"),
            n,
            "connections to the {listener} listener"
        );
        for histogram in [
            "proxy_tcp_handshake_duration_seconds_count",
            "proxy_tcp_accept_wait_seconds_count",
            "proxy_tcp_connection_duration_seconds_count",
            "proxy_tcp_rtt_seconds_count",
        ] {
            assert_eq!(
                delta(histogram),
                n,
                "{histogram} for the {listener} listener should move by exactly {n}"
            );
        }
        assert_eq!(
            delta("proxy_tcp_syn_unseen_total"),
            0.0,
            "every SYN to the {listener} listener should be seen"
        );
        // Loopback handshakes take microseconds, not seconds.
        let handshake_sum = delta("proxy_tcp_handshake_duration_seconds_sum");
        assert!(
            handshake_sum > 0.0 && handshake_sum < 0.1 * n,
            "handshake time sum {handshake_sum}s for {n} loopback connections"
        );
    }
    let after = env.metrics();
    let listeners: Vec<Option<&str>> = after
        .named("proxy_tcp_connections_total")
        .map(|s| s.label("listener"))
        .collect();
    assert_eq!(
        listeners,
        [Some("http"), Some("https")],
        "only the proxy's two listeners, labelled as in the application metrics"
    );
    assert_eq!(after.value("proxy_ebpf_dropped_records_total", &[]), 0.0);

    // One access-log line tells the story of a request, kernel timings included.
    let log = proxy.process.stderr();
    let line = log
        .lines()
        .find(|l| l.contains("proxy::access") && l.contains("listener=\"https\""))
        .unwrap_or_else(|| panic!("no HTTPS access-log line in:\n{log}"));
    for field in [
        "tcp_handshake_ms=",
        "accept_wait_ms=",
        "tls_handshake_ms=",
        "duration_ms=",
    ] {
        assert!(
            line.contains(field),
            "access log line lacks {field}: {line}"
        );
    }
}

#[test]
fn a_stalled_accept_loop_shows_as_accept_wait() {
    let Some(env) = TestEnv::new("kernel-accept-wait") else {
        return;
    };
    let proxy = env.serve(REQUIRED);
    let tls = proxy.tls();
    const STALL: Duration = Duration::from_millis(700);
    const CLIENTS: usize = 3;

    // Stop the proxy: the kernel still completes handshakes and queues the connections.
    proxy.signal(Signal::SIGSTOP);
    let responses = env.run(|| async {
        let mut queued = Vec::new();
        for _ in 0..CLIENTS {
            queued.push(
                TcpStream::connect(HTTPS)
                    .await
                    .expect("the kernel accepts the handshake"),
            );
        }
        tokio::time::sleep(STALL).await;
        proxy.signal(Signal::SIGCONT);
        let mut responses = Vec::new();
        for tcp in queued {
            let conn = client::tls_over(tcp, &tls).await;
            let conn = conn.unwrap_or_else(|e| panic!("TLS on a queued connection failed: {e}"));
            responses.push(client::send(conn, Req::get("/")).await);
        }
        responses
    });
    for resp in responses {
        let resp = resp.unwrap_or_else(|e| panic!("queued client failed: {e}"));
        assert_eq!(resp.text(), "Hello SRE!");
    }

    let metrics = env.metrics();
    let count = metrics.value(
        "proxy_tcp_accept_wait_seconds_count",
        &[("listener", "https")],
    );
    let sum = metrics.value(
        "proxy_tcp_accept_wait_seconds_sum",
        &[("listener", "https")],
    );
    assert_eq!(
        count, CLIENTS as f64,
        "one accept wait per queued connection"
    );
    let floor = 0.8 * STALL.as_secs_f64() * CLIENTS as f64;
    assert!(
        sum >= floor,
        "accept wait sum {sum}s should show the {STALL:?} stall of {CLIENTS} connections (>= {floor}s)"
    );
    let fast = metrics.value(
        "proxy_tcp_accept_wait_seconds_bucket",
        &[("listener", "https"), ("le", "0.262144")],
    );
    assert_eq!(
        fast, 0.0,
        "no queued connection can have waited under 262 ms"
    );
    // The handshakes themselves were fast: the kernel, not the proxy, completed them.
    assert!(
        metrics.value(
            "proxy_tcp_handshake_duration_seconds_sum",
            &[("listener", "https")]
        ) < 0.1
    );
}

#[test]
fn a_lost_syn_ack_shows_as_handshake_time_and_lost_segments_as_retransmits() {
    let Some(env) = TestEnv::new("kernel-packet-loss") else {
        return;
    };
    let proxy = env.serve(REQUIRED);
    let tls = proxy.tls();

    // Lose the SYN-ACKs of :443 for a moment: the kernel retransmits after its 1 s timeout.
    drop_syn_acks_from(&env.ns, 443);
    let started = Instant::now();
    let client = env.ns.spawn({
        let tls = tls.clone();
        move || async move { client::https(&tls, Req::get("/")).await }
    });
    std::thread::sleep(Duration::from_millis(300));
    nft(&env.ns, &["flush", "table", "inet", "e2e"]);
    let resp = client
        .join()
        .expect("client thread")
        .unwrap_or_else(|e| panic!("client after a lost SYN-ACK: {e}"));
    assert_eq!(resp.text(), "Hello SRE!");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "the SYN-ACK was not lost: {:?}",
        started.elapsed()
    );

    let metrics = env.metrics();
    assert_eq!(
        metrics.value(
            "proxy_tcp_handshake_duration_seconds_count",
            &[("listener", "https")]
        ),
        1.0
    );
    let handshake = metrics.value(
        "proxy_tcp_handshake_duration_seconds_sum",
        &[("listener", "https")],
    );
    assert!(
        (0.9..5.0).contains(&handshake),
        "handshake time {handshake}s should show the ~1 s SYN-ACK retransmission"
    );
    let fast = metrics.value(
        "proxy_tcp_handshake_duration_seconds_bucket",
        &[("listener", "https"), ("le", "0.524288")],
    );
    assert_eq!(
        fast, 0.0,
        "the slow handshake must not land in a sub-second bucket"
    );

    // Now drop the proxy's data segments for a moment on an established connection.
    // Retransmits are counted at close: take the baseline once the first connection closed.
    let metrics = wait_for_closed(&env, &Metrics::parse(""), "https", 1.0);
    let retransmits_before = metrics.value("proxy_tcp_retransmits_total", &[("listener", "https")]);
    nft(
        &env.ns,
        &[
            "add",
            "rule",
            "inet",
            "e2e",
            "lossy",
            "tcp",
            "sport",
            "443",
            "tcp",
            "flags",
            "&",
            "(syn|fin|rst)",
            "==",
            "0",
            "meta",
            "length",
            ">",
            "100",
            "drop",
        ],
    );
    let client = env
        .ns
        .spawn(move || async move { client::https(&tls, Req::get("/")).await });
    std::thread::sleep(Duration::from_millis(800));
    nft(&env.ns, &["delete", "table", "inet", "e2e"]);
    let resp = client
        .join()
        .expect("client thread")
        .unwrap_or_else(|e| panic!("client after lost segments: {e}"));
    assert_eq!(resp.text(), "Hello SRE!");
    // Counted when the connection closes.
    poll_metrics(&env, |m| {
        let retransmits =
            m.value("proxy_tcp_retransmits_total", &[("listener", "https")]) - retransmits_before;
        (retransmits >= 1.0).then_some(())
    });
}

#[test]
fn a_full_accept_queue_is_counted_as_overflows() {
    let Some(env) = TestEnv::new("kernel-overflow") else {
        return;
    };
    let proxy = env.serve(&["--ebpf", "required", "--listen-backlog", "4"]);
    let before = env.metrics().value("proxy_tcp_listen_overflows_total", &[]);
    proxy.signal(Signal::SIGSTOP);
    let queued = env.run(|| async {
        let mut attempts = tokio::task::JoinSet::new();
        for _ in 0..20 {
            attempts.spawn(tokio::time::timeout(
                Duration::from_millis(300),
                TcpStream::connect(HTTPS),
            ));
        }
        let mut connected = Vec::new();
        while let Some(attempt) = attempts.join_next().await {
            if let Ok(Ok(Ok(stream))) = attempt {
                connected.push(stream);
            }
        }
        connected
    });
    proxy.signal(Signal::SIGCONT);
    assert!(
        queued.len() < 20,
        "with a backlog of 4 some of 20 connections must not fit"
    );
    drop(queued);
    let overflows = env.metrics().value("proxy_tcp_listen_overflows_total", &[]) - before;
    assert!(
        overflows >= 1.0,
        "a full accept queue must show as overflows, got {overflows}"
    );
    // And the proxy serves again once it accepts.
    https_requests(&env, &proxy, 1);
}

#[test]
fn resets_are_counted_by_direction() {
    let Some(env) = TestEnv::new("kernel-resets") else {
        return;
    };
    let _proxy = env.serve(REQUIRED);
    const ABORTS: usize = 2;
    const GARBAGE: usize = 3;
    env.run(|| async {
        // The client aborts (RST) a connection the proxy holds.
        for _ in 0..ABORTS {
            let stream = TcpStream::connect(HTTPS).await.expect("connect to :443");
            tokio::time::sleep(Duration::from_millis(100)).await;
            stream.set_zero_linger().expect("SO_LINGER 0");
            drop(stream);
        }
        // Not TLS: the proxy gives up with the client's bytes unread, so the kernel resets.
        for _ in 0..GARBAGE {
            let mut stream = TcpStream::connect(HTTPS).await.expect("connect to :443");
            let _ = stream.write_all(&[b'x'; 64 * 1024]).await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let metrics = poll_metrics(&env, |m| {
        let received = m.value(
            "proxy_tcp_resets_total",
            &[("listener", "https"), ("direction", "received")],
        );
        let sent = m.value(
            "proxy_tcp_resets_total",
            &[("listener", "https"), ("direction", "sent")],
        );
        (received >= ABORTS as f64 && sent >= GARBAGE as f64).then_some(())
    });
    assert_eq!(
        metrics.value(
            "proxy_tcp_resets_total",
            &[("listener", "https"), ("direction", "received")]
        ),
        ABORTS as f64
    );
    assert_eq!(
        metrics.value(
            "proxy_tcp_resets_total",
            &[("listener", "https"), ("direction", "sent")]
        ),
        GARBAGE as f64
    );
    assert_eq!(
        metrics.value(
            "proxy_tcp_resets_total",
            &[("listener", "http"), ("direction", "sent")]
        ),
        0.0
    );
}

#[test]
fn sockets_created_by_another_cgroup_and_handed_over_are_measured() {
    let Some(env) = TestEnv::new("kernel-handover") else {
        return;
    };
    let creator = Cgroup::new("creator");
    let server = Cgroup::new("server");
    // systemd-socket-activate creates the listening sockets in the creator's cgroup, then on
    // the first connection runs the proxy, which moves to another cgroup before it starts.
    let script = format!(
        "echo $$ > {creator}/cgroup.procs && exec systemd-socket-activate -l [::]:80 -l [::]:443 \
         sh -c 'echo $$ > {server}/cgroup.procs && exec \"$0\" \"$@\"' \"$0\" \"$@\"",
        creator = creator.path.display(),
        server = server.path.display(),
    );
    let proxy = Proxy::start_via(
        &env.ns,
        env.dir.path(),
        &["sh", "-c", &script],
        REQUIRED,
        &[],
        || {
            // The first connection makes systemd-socket-activate start the proxy.
            let kicked = poll_until(Duration::from_secs(10), || {
                env.run(|| async { TcpStream::connect(HTTP).await.ok().map(drop) })
            });
            assert!(
                kicked.is_some(),
                "systemd-socket-activate never listened on :80"
            );
        },
    );
    let log = proxy.process.stderr();
    assert!(
        log.contains("using inherited listening socket"),
        "the proxy should use the handed-over sockets:\n{log}"
    );
    assert_ne!(
        cgroup_of(&proxy),
        creator.relative,
        "the proxy should run outside the sockets' cgroup"
    );

    let before = env.metrics();
    const N: u32 = 4;
    https_requests(&env, &proxy, N);
    http_requests(&env, N);
    for listener in ["https", "http"] {
        let after = wait_for_closed(&env, &before, listener, f64::from(N));
        let delta = after.value("proxy_tcp_connections_total", &[("listener", listener)])
            - before
                .get("proxy_tcp_connections_total", &[("listener", listener)])
                .unwrap_or(0.0);
        assert_eq!(
            delta,
            f64::from(N),
            "connections to the handed-over {listener} listener"
        );
        let handshakes = after.value(
            "proxy_tcp_handshake_duration_seconds_count",
            &[("listener", listener)],
        ) - before
            .get(
                "proxy_tcp_handshake_duration_seconds_count",
                &[("listener", listener)],
            )
            .unwrap_or(0.0);
        assert_eq!(
            handshakes,
            f64::from(N),
            "handshake times on the handed-over {listener} listener"
        );
    }
}

#[test]
fn without_privilege_the_proxy_serves_and_reports_ebpf_detached() {
    let Some(env) = TestEnv::new("kernel-unprivileged") else {
        return;
    };
    let drop_bpf = ["setpriv", "--bounding-set", "-bpf,-perfmon,-sys_admin"];
    let proxy = Proxy::start_via(&env.ns, env.dir.path(), &drop_bpf, &[], &[], || {});
    let resp = env
        .run(|| {
            let tls = proxy.tls();
            async move { client::https(&tls, Req::get("/")).await }
        })
        .unwrap_or_else(|e| panic!("the unprivileged proxy does not serve: {e}"));
    assert_eq!(resp.text(), "Hello SRE!");
    let metrics = env.metrics();
    assert_eq!(
        metrics.value("proxy_ebpf_attached", &[("program", "sock_ops")]),
        0.0
    );
    assert!(
        !metrics.has("proxy_tcp_connections_total"),
        "no kernel metrics without the program"
    );
    let log = proxy.process.stderr();
    let warnings: Vec<_> = log
        .lines()
        .filter(|l| l.contains("kernel metrics unavailable"))
        .collect();
    assert_eq!(warnings.len(), 1, "exactly one clear warning, got:\n{log}");
    assert!(
        warnings[0].contains("cause=") && warnings[0].contains("os error"),
        "the warning names the kernel's answer (an errno): {}",
        warnings[0]
    );

    // Made mandatory, the same lack of privilege is a clear start-up error.
    let mut cmd = env.ns.command("setpriv");
    cmd.args(["--bounding-set", "-bpf,-perfmon,-sys_admin"])
        .arg(proxy_bin());
    cmd.args(["serve", "--ebpf", "required", "--state-dir"])
        .arg(env.path("state-required"));
    cmd.args([
        "--http-listen",
        "127.0.0.1:8080",
        "--https-listen",
        "127.0.0.1:8443",
        "--admin-listen",
        "127.0.0.1:9091",
    ]);
    let output = run_with_timeout(cmd, Duration::from_secs(20));
    assert!(
        !output.status.success(),
        "--ebpf required must refuse to start without privilege"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--ebpf required"),
        "the error should name the flag: {stderr}"
    );
}
