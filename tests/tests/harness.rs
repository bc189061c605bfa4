//! Checks of the harness itself, needing no proxy: namespaces really isolate ports, and the
//! raw HTTP client reads what a server wrote.

use std::time::{Duration, Instant};

use proxy_e2e::TestEnv;
use proxy_e2e::client;
use proxy_e2e::upstream::{SLOW_BODY, SlowUpstream};

#[test]
fn namespaces_isolate_the_same_port() {
    let Some(a) = TestEnv::new("harness-a") else {
        return;
    };
    let Some(b) = TestEnv::new("harness-b") else {
        return;
    };
    let _sa = SlowUpstream::start(&a.ns, "127.0.0.1:443", Duration::ZERO);
    // The same port in another namespace is free...
    let _sb = SlowUpstream::start(&b.ns, "127.0.0.1:443", Duration::from_millis(300));
    // ...and each client reaches its own namespace's server.
    let start = Instant::now();
    let resp = a
        .run(|| client::raw_http("127.0.0.1:443", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
        .unwrap_or_else(|e| panic!("request inside namespace a: {e}"));
    assert_eq!(resp.status, 200);
    assert_eq!(resp.text(), SLOW_BODY);
    assert!(
        start.elapsed() < Duration::from_millis(300),
        "reached b's slow server from a"
    );
    let resp = b
        .run(|| client::raw_http("127.0.0.1:443", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
        .unwrap_or_else(|e| panic!("request inside namespace b: {e}"));
    assert_eq!(resp.status, 200);
    // A third, empty namespace has nothing on 443.
    let Some(c) = TestEnv::new("harness-c") else {
        return;
    };
    let refused = c.run(|| client::raw_http("127.0.0.1:443", b"GET / HTTP/1.1\r\n\r\n"));
    assert!(refused.is_err(), "an empty namespace answered on 443");
}
