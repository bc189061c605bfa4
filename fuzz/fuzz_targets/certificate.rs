//! Certificate loading (bring-your-own files, reloads): arbitrary PEM or DER bytes are refused
//! with an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (&[u8], &[u8])| {
    let (cert, key) = input;
    if let Err(e) = proxy::check_untrusted_certificate(cert, key) {
        assert!(!e.to_string().is_empty());
    }
});
