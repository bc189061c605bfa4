//! The contract between the kernel program (crate `proxy-ebpf`, built for
//! `bpfel-unknown-none`) and the proxy that loads it: map layouts, indices and `#[repr(C)]`
//! records without implicit padding. `no_std` so the kernel side can use it; the `user` feature makes the records
//! `aya::Pod` for userspace.
//!
//! Only the proxy's own sockets are recorded: userspace registers each listening socket as
//! (network namespace cookie, local port) in `LISTENERS`, with a slot number that labels its
//! metrics, and each of its own connections to a backend, before `connect()`, by socket
//! cookie in `UPSTREAM_SOCKETS`, with the backend's slot; the program ignores every other
//! socket.
//!
//! Histogram buckets follow the one grid of [`buckets`]: the listeners' handshake and RTT
//! histograms use its fine scale, their lifetime histogram and every per-backend histogram
//! the coarse one ([`listener_scale`], [`UPSTREAM_SCALE`]).
#![no_std]

pub mod buckets;

pub use buckets::{
    COARSE_BUCKETS, FINE_BUCKETS, Scale, coarse_bucket_of_ns, coarse_bucket_upper_bound_seconds,
    fine_bucket_of_ns, fine_bucket_upper_bound_seconds,
};

/// Listening sockets one proxy registers (HTTP, HTTPS and room for more).
pub const MAX_LISTENERS: u32 = 8;

/// Histogram: SYN received to ESTABLISHED (server side). Fine scale.
pub const HIST_HANDSHAKE: u32 = 0;
/// Histogram: smoothed RTT of a connection, sampled when it closes. Fine scale.
pub const HIST_RTT: u32 = 1;
/// Histogram: ESTABLISHED to CLOSE. Coarse scale (lifetimes run to hours).
pub const HIST_LIFETIME: u32 = 2;
/// Number of histograms.
pub const HISTOGRAMS: u32 = 3;
/// Bucket slots per (histogram, listener) row of the `HISTOGRAMS` array: room for the fine
/// scale. A coarse histogram (`HIST_LIFETIME`) uses the first `COARSE_BUCKETS` of its row.
pub const HISTOGRAM_ROW: u32 = FINE_BUCKETS;
/// Entries of the `HISTOGRAMS` per-CPU array.
pub const HISTOGRAM_ENTRIES: u32 = HISTOGRAMS * MAX_LISTENERS * HISTOGRAM_ROW;
/// Entries of the `HISTOGRAM_SUMS` per-CPU array (nanoseconds per histogram and slot).
pub const HISTOGRAM_SUM_ENTRIES: u32 = HISTOGRAMS * MAX_LISTENERS;

/// Counter: connections that reached ESTABLISHED.
pub const CTR_CONNECTIONS: u32 = 0;
/// Counter: connections that closed.
pub const CTR_CLOSED: u32 = 1;
/// Counter: segments retransmitted (SYN-ACKs and tail-loss probes included), added when the
/// connection closes.
pub const CTR_RETRANSMITS: u32 = 2;
/// Counter: connections this side aborted (ESTABLISHED or CLOSE_WAIT straight to CLOSE
/// without a reset from the peer: a RST sent, or given up after retransmission timeouts).
pub const CTR_RESETS_SENT: u32 = 3;
/// Counter: resets received from the peer.
pub const CTR_RESETS_RECEIVED: u32 = 4;
/// Counter: established connections whose SYN was not seen (SYN cookies, or the SYN map
/// was full), so they have no handshake time.
pub const CTR_SYN_UNSEEN: u32 = 5;
/// Counter (slot 0 only): records the program could not store (a map was full).
pub const CTR_DROPPED: u32 = 6;
/// Number of counters.
pub const COUNTERS: u32 = 7;
/// Entries of the `COUNTERS` per-CPU array.
pub const COUNTER_ENTRIES: u32 = COUNTERS * MAX_LISTENERS;

/// Capacity of the map of SYNs waiting for their handshake to complete.
pub const SYN_ENTRIES: u32 = 16_384;
/// Capacity of the map of established connections (the accept join reads it).
pub const CONNECTION_ENTRIES: u32 = 65_536;

/// Backends whose upstream connections one proxy measures. Beyond this many configured
/// backends, the extra ones are served but not measured in the kernel (userspace warns once).
pub const MAX_BACKENDS: u32 = 64;

/// Upstream histogram: SYN sent (`connect()`) to ESTABLISHED.
pub const UPSTREAM_HIST_CONNECT: u32 = 0;
/// Upstream histogram: smoothed RTT of a connection, sampled when it closes.
pub const UPSTREAM_HIST_RTT: u32 = 1;
/// Number of upstream histograms.
pub const UPSTREAM_HISTOGRAMS: u32 = 2;
/// The scale of every upstream histogram: coarse, as they exist per backend.
pub const UPSTREAM_SCALE: Scale = Scale::Coarse;
/// Entries of the `UPSTREAM_HISTOGRAMS` per-CPU array.
pub const UPSTREAM_HISTOGRAM_ENTRIES: u32 =
    UPSTREAM_HISTOGRAMS * MAX_BACKENDS * UPSTREAM_SCALE.buckets();
/// Entries of the `UPSTREAM_HISTOGRAM_SUMS` per-CPU array.
pub const UPSTREAM_HISTOGRAM_SUM_ENTRIES: u32 = UPSTREAM_HISTOGRAMS * MAX_BACKENDS;

/// Upstream counter: connections that reached ESTABLISHED.
pub const UPSTREAM_CTR_CONNECTIONS: u32 = 0;
/// Upstream counter: connections that closed before ESTABLISHED (refused, timed out, given
/// up by the proxy).
pub const UPSTREAM_CTR_CONNECT_FAILURES: u32 = 1;
/// Upstream counter: segments retransmitted (SYNs included), added when the socket closes.
pub const UPSTREAM_CTR_RETRANSMITS: u32 = 2;
/// Upstream counter: established connections this side aborted (as `CTR_RESETS_SENT`).
pub const UPSTREAM_CTR_RESETS_SENT: u32 = 3;
/// Upstream counter: resets received from the backend on established connections (a refused
/// connect is a connect failure, not a reset).
pub const UPSTREAM_CTR_RESETS_RECEIVED: u32 = 4;
/// Number of upstream counters.
pub const UPSTREAM_COUNTERS: u32 = 5;
/// Entries of the `UPSTREAM_COUNTERS` per-CPU array.
pub const UPSTREAM_COUNTER_ENTRIES: u32 = UPSTREAM_COUNTERS * MAX_BACKENDS;

/// Capacity of the map of upstream sockets (registered, connecting or established).
pub const UPSTREAM_SOCKET_ENTRIES: u32 = 65_536;

/// The scale of listener histogram `histogram` (`HIST_*`).
pub const fn listener_scale(histogram: u32) -> Scale {
    if histogram == HIST_LIFETIME {
        Scale::Coarse
    } else {
        Scale::Fine
    }
}

/// Index into `HISTOGRAMS`.
pub const fn histogram_index(histogram: u32, slot: u32, bucket: u32) -> u32 {
    (histogram * MAX_LISTENERS + slot) * HISTOGRAM_ROW + bucket
}

/// Index into `HISTOGRAM_SUMS`.
pub const fn histogram_sum_index(histogram: u32, slot: u32) -> u32 {
    histogram * MAX_LISTENERS + slot
}

/// Index into `COUNTERS`.
pub const fn counter_index(counter: u32, slot: u32) -> u32 {
    counter * MAX_LISTENERS + slot
}

/// Index into `UPSTREAM_HISTOGRAMS`.
pub const fn upstream_histogram_index(histogram: u32, backend: u32, bucket: u32) -> u32 {
    (histogram * MAX_BACKENDS + backend) * UPSTREAM_SCALE.buckets() + bucket
}

/// Index into `UPSTREAM_HISTOGRAM_SUMS`.
pub const fn upstream_histogram_sum_index(histogram: u32, backend: u32) -> u32 {
    histogram * MAX_BACKENDS + backend
}

/// Index into `UPSTREAM_COUNTERS`.
pub const fn upstream_counter_index(counter: u32, backend: u32) -> u32 {
    counter * MAX_BACKENDS + backend
}

/// Key of `LISTENERS`: a listening socket of this proxy.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenerKey {
    /// `SO_NETNS_COOKIE` of the socket (`bpf_get_netns_cookie` in the kernel).
    pub netns_cookie: u64,
    /// Local port, host byte order.
    pub port: u32,
    pub _pad: u32,
}

/// Key of `SYNS`: a connection being set up, by network namespace and 4-tuple.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowKey {
    pub netns_cookie: u64,
    /// `AF_INET` or `AF_INET6`.
    pub family: u32,
    /// Host byte order.
    pub local_port: u32,
    /// Network byte order, as the kernel hands it over.
    pub remote_port: u32,
    pub _pad: u32,
    /// IPv4 addresses in the first word, network byte order.
    pub local_ip: [u32; 4],
    pub remote_ip: [u32; 4],
}

/// Value of `CONNECTIONS` and `UPSTREAM_SOCKETS`, keyed by socket cookie: what the kernel saw
/// of one connection. Userspace inserts upstream records with the times at 0, before
/// `connect()`; the program fills them in.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionRecord {
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC) when the SYN arrived (accepted connections) or was
    /// sent (upstream connections); 0 if unseen.
    pub syn_ns: u64,
    /// When the handshake completed; 0 until then.
    pub established_ns: u64,
    /// The listener slot (`CONNECTIONS`) or the backend slot (`UPSTREAM_SOCKETS`).
    pub slot: u32,
    /// `FLAG_*` bits.
    pub flags: u32,
}

/// The peer reset this connection.
pub const FLAG_RESET_RECEIVED: u32 = 1;

#[cfg(feature = "user")]
#[allow(
    unsafe_code,
    reason = "Pod is an unsafe marker trait; the records below meet its contract"
)]
mod pod {
    // SAFETY: plain `#[repr(C)]` integers and arrays with explicit padding fields: every bit
    // pattern is valid and there are no implicit padding bytes.
    unsafe impl aya::Pod for super::ListenerKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FlowKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ConnectionRecord {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_slot_of_each_array_is_its_last_entry() {
        assert_eq!(
            histogram_index(HISTOGRAMS - 1, MAX_LISTENERS - 1, HISTOGRAM_ROW - 1),
            HISTOGRAM_ENTRIES - 1
        );
        assert_eq!(
            upstream_histogram_index(
                UPSTREAM_HISTOGRAMS - 1,
                MAX_BACKENDS - 1,
                UPSTREAM_SCALE.buckets() - 1
            ),
            UPSTREAM_HISTOGRAM_ENTRIES - 1
        );
        assert_eq!(
            upstream_histogram_sum_index(UPSTREAM_HISTOGRAMS - 1, MAX_BACKENDS - 1),
            UPSTREAM_HISTOGRAM_SUM_ENTRIES - 1
        );
        assert_eq!(
            upstream_counter_index(UPSTREAM_COUNTERS - 1, MAX_BACKENDS - 1),
            UPSTREAM_COUNTER_ENTRIES - 1
        );
    }

    #[test]
    fn every_listener_histogram_fits_its_row() {
        for histogram in 0..HISTOGRAMS {
            assert!(listener_scale(histogram).buckets() <= HISTOGRAM_ROW);
        }
        assert_eq!(listener_scale(HIST_HANDSHAKE), Scale::Fine);
        assert_eq!(listener_scale(HIST_RTT), Scale::Fine);
        assert_eq!(listener_scale(HIST_LIFETIME), Scale::Coarse);
    }

    #[test]
    fn records_have_no_implicit_padding() {
        assert_eq!(core::mem::size_of::<ListenerKey>(), 16);
        assert_eq!(core::mem::size_of::<FlowKey>(), 56);
        assert_eq!(core::mem::size_of::<ConnectionRecord>(), 24);
    }
}
