//! Configuration files: any text gives a valid configuration or a clear error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    if let Err(e) = proxy::check_file_text(text, "fuzz-host") {
        assert!(!e.to_string().is_empty());
    }
});
