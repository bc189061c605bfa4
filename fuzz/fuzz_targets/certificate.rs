//! Certificate loading (bring-your-own files, reloads): arbitrary PEM or DER bytes are refused
//! with an error, never a panic.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (&[u8], &[u8])| {
    let (cert, key) = input;
    let provider = proxy::tls::provider();
    let _ = proxy::certificates::from_pem(Path::new("fuzz.pem"), cert, key, &provider);
    let _ = proxy::cert_info::CertInfo::from_der(cert);
});
