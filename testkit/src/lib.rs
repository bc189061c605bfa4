//! What the end-to-end tests (`tests/`, crate `proxy-e2e`) and the task runner (`xtask/`)
//! share, written once: private network namespaces ([`netns`]), child processes held by a
//! guard and polled until ready ([`process`]), what the kernel says a process uses
//! ([`usage`]), commands run with their output captured ([`command`]), temporary directories
//! kept for a post-mortem ([`tempdir`]), directory trees copied ([`tree`]), the Prometheus
//! text format ([`metrics`]) and timed
//! phases with a closing summary ([`phase`]).
//!
//! Errors are returned, never panicked: the tests turn them into panics with a message, the
//! task runner into `anyhow` errors with context. Nothing here needs an async runtime; the
//! tests run their futures on a thread the namespace gives them ([`NetNs::run`]).

#![forbid(unsafe_code)]

pub mod command;
pub mod metrics;
pub mod netns;
pub mod phase;
pub mod process;
pub mod tempdir;
pub mod tree;
pub mod usage;

pub use metrics::{Metrics, Sample};
pub use netns::NetNs;
/// The process id and signal types of the [`process`] and [`usage`] functions.
pub use nix::{sys::signal::Signal, unistd::Pid};
pub use process::{Process, poll_until};
pub use tempdir::TempDir;
