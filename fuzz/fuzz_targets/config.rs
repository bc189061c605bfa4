//! Configuration files: any text gives a valid configuration or a clear error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proxy::cli::ServeArgs;
use proxy::config::Config;

fuzz_target!(|text: &str| {
    if let Err(e) = Config::resolve(&ServeArgs::default(), Some(text), "fuzz-host") {
        assert!(!e.to_string().is_empty());
    }
});
