//! The plain-HTTP listener's decision on arbitrary Host headers and request targets: never a
//! panic, and a redirect only to an https URL on a host we serve, with nothing a header
//! cannot carry.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proxy::{Decision, ServedName, decide};

fuzz_target!(|input: (&str, &str, u16)| {
    let (host, target, port) = input;
    // The configuration refuses port 0.
    if port == 0 {
        return;
    }
    let served = ["localhost", "127.0.0.1", "::1", "*.example.com"]
        .map(|n| ServedName::parse(n).expect("valid name"));
    let Ok(request) = http::Request::builder()
        .uri(target)
        .header(http::header::HOST, host)
        .body(())
    else {
        return;
    };
    match decide(&request, |h| served.iter().any(|n| n.covers(h)), port) {
        Decision::Redirect(location) => {
            assert!(location.starts_with("https://"), "{location}");
            assert!(
                location.bytes().all(|b| b.is_ascii_graphic()),
                "{location:?}"
            );
            let uri: http::Uri = location
                .parse()
                .unwrap_or_else(|e| panic!("{location:?} is not a URI: {e}"));
            let authority = uri.authority().expect("an authority").as_str();
            let redirected = proxy::parse_host_header(authority).expect("a valid host");
            assert!(
                served.iter().any(|n| n.covers(&redirected)),
                "redirect to a host we do not serve: {location}"
            );
        }
        Decision::Refuse(status, reason) => {
            assert!(status == 400 || status == 421, "{status}");
            assert!(!reason.is_empty());
        }
    }
});
