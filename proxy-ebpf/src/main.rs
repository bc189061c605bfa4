//! The kernel side of the proxy: measures the proxy's own TCP connections and nothing else.
//!
//! - `sock_ops` (attached to a cgroup that contains every socket the proxy may be handed):
//!   SYN time of each connection to a registered listener (TIMEOUT_INIT, on the request
//!   socket), handshake time and the connection record at ESTABLISHED, and at CLOSE the
//!   lifetime, smoothed RTT, retransmitted segments and whether this side aborted it.
//! - The same program on the proxy's own connections to its backends, which userspace
//!   registers by socket cookie before `connect()`: SYN sent (TCP_CONNECT_CB), connect time at
//!   ESTABLISHED (ACTIVE_ESTABLISHED_CB), and at CLOSE a connect failure (never established)
//!   or RTT, retransmits and aborts, per backend slot.
//! - tracepoint `tcp:tcp_receive_reset`: resets received, matched by socket cookie.
//!
//! Results go to per-CPU arrays that userspace reads at scrape time; the only per-connection
//! state userspace reads is `CONNECTIONS`, once, when it accepts the connection, and
//! `UPSTREAM_SOCKETS`, once, when its `connect()` completes.
#![no_std]
#![no_main]

use core::ptr::read_volatile;

use aya_ebpf::EbpfContext as _;
use aya_ebpf::bindings::{
    BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB,
    BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_SOCK_OPS_TIMEOUT_INIT,
    BPF_TCP_CLOSE, BPF_TCP_CLOSE_WAIT, BPF_TCP_ESTABLISHED,
};
use aya_ebpf::helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns};
use aya_ebpf::macros::{map, sock_ops, tracepoint};
use aya_ebpf::maps::{HashMap, LruHashMap, PerCpuArray};
use aya_ebpf::programs::{SockOpsContext, TracePointContext};
use aya_log_ebpf::warn;
use proxy_common::{
    CONNECTION_ENTRIES, COUNTER_ENTRIES, CTR_CLOSED, CTR_CONNECTIONS, CTR_DROPPED,
    CTR_RESETS_RECEIVED, CTR_RESETS_SENT, CTR_RETRANSMITS, CTR_SYN_UNSEEN, ConnectionRecord,
    FLAG_RESET_RECEIVED, FlowKey, HIST_HANDSHAKE, HIST_LIFETIME, HIST_RTT, HISTOGRAM_ENTRIES,
    HISTOGRAM_SUM_ENTRIES, ListenerKey, MAX_BACKENDS, MAX_LISTENERS, SYN_ENTRIES,
    UPSTREAM_COUNTER_ENTRIES, UPSTREAM_CTR_CONNECT_FAILURES, UPSTREAM_CTR_CONNECTIONS,
    UPSTREAM_CTR_RESETS_RECEIVED, UPSTREAM_CTR_RESETS_SENT, UPSTREAM_CTR_RETRANSMITS,
    UPSTREAM_HIST_CONNECT, UPSTREAM_HIST_RTT, UPSTREAM_HISTOGRAM_ENTRIES,
    UPSTREAM_HISTOGRAM_SUM_ENTRIES, UPSTREAM_SCALE, UPSTREAM_SOCKET_ENTRIES, counter_index,
    histogram_index, histogram_sum_index, listener_scale, upstream_counter_index,
    upstream_histogram_index, upstream_histogram_sum_index,
};

/// The proxy's listening sockets: (netns cookie, port) to slot.
#[map]
static LISTENERS: HashMap<ListenerKey, u32> = HashMap::with_max_entries(MAX_LISTENERS, 0);
/// SYN arrival time of connections still in their handshake.
#[map]
static SYNS: LruHashMap<FlowKey, u64> = LruHashMap::with_max_entries(SYN_ENTRIES, 0);
/// Established connections by socket cookie, until they close.
#[map]
static CONNECTIONS: LruHashMap<u64, ConnectionRecord> =
    LruHashMap::with_max_entries(CONNECTION_ENTRIES, 0);
#[map]
static HISTOGRAMS: PerCpuArray<u64> = PerCpuArray::with_max_entries(HISTOGRAM_ENTRIES, 0);
#[map]
static HISTOGRAM_SUMS: PerCpuArray<u64> = PerCpuArray::with_max_entries(HISTOGRAM_SUM_ENTRIES, 0);
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_ENTRIES, 0);
/// The proxy's own connections to its backends by socket cookie, from registration (by
/// userspace, before `connect()`) until they close. LRU: a record whose close was never seen
/// cannot fill the map for good.
#[map]
static UPSTREAM_SOCKETS: LruHashMap<u64, ConnectionRecord> =
    LruHashMap::with_max_entries(UPSTREAM_SOCKET_ENTRIES, 0);
#[map]
static UPSTREAM_HISTOGRAMS: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(UPSTREAM_HISTOGRAM_ENTRIES, 0);
#[map]
static UPSTREAM_HISTOGRAM_SUMS: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(UPSTREAM_HISTOGRAM_SUM_ENTRIES, 0);
#[map]
static UPSTREAM_COUNTERS: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(UPSTREAM_COUNTER_ENTRIES, 0);

/// Offset of `sock_cookie` in the `tcp:tcp_receive_reset` record; it differs between kernels,
/// so the loader reads it from tracefs and sets it before loading.
#[unsafe(no_mangle)]
static RECEIVE_RESET_COOKIE_OFFSET: u32 = 64;

const AF_INET: u32 = 2;

/// Reads one `u32` field of the sock_ops context: `field!(ctx, family)`,
/// `field!(ctx, local_ip6[0])`. The verifier refuses some plain copies of sock_ops fields
/// ("dereference of modified ctx ptr"); one volatile load per field, at the field's own
/// offset from the unmodified context pointer, passes.
macro_rules! field {
    ($ctx:expr, $field:ident $([$index:literal])?) => {{
        let ctx: &SockOpsContext = $ctx;
        let ops = ctx.ops;
        // SAFETY: `ops` is the context pointer the kernel passed to this run of the program
        // (aya's `#[sock_ops]` wraps it in the `SockOpsContext`; nothing here builds another),
        // so it points to a readable `bpf_sock_ops` for the whole run, aligned for its `u32`
        // fields. The place is a named field of that struct, or an element of one of its
        // arrays at a literal index that the compiler checks against the array's length, so
        // the pointer stays inside the struct. The verifier checks each context load against
        // the fields sock_ops programs may read, before the program ever runs.
        unsafe { read_volatile(&raw const (*ops).$field $([$index])?) }
    }};
}

#[sock_ops]
pub fn proxy_sock_ops(ctx: SockOpsContext) -> u32 {
    match field!(&ctx, op) {
        BPF_SOCK_OPS_TIMEOUT_INIT => on_syn(&ctx),
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => on_established(&ctx),
        BPF_SOCK_OPS_TCP_CONNECT_CB => on_upstream_connect(&ctx),
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => on_upstream_established(&ctx),
        BPF_SOCK_OPS_STATE_CB => on_state_change(&ctx),
        _ => {}
    }
    // 1: let the operation proceed unchanged (the reply stays 0: kernel defaults).
    1
}

#[tracepoint]
pub fn proxy_receive_reset(ctx: TracePointContext) -> u32 {
    // SAFETY: a pointer made from a shared static is valid and aligned for a `u32` read. The
    // read is volatile so that the compiler keeps the load instead of folding in the initial
    // 64: the loader rewrites the value in the object before the kernel loads it.
    let offset = unsafe { read_volatile(&raw const RECEIVE_RESET_COOKIE_OFFSET) } as usize;
    // SAFETY: `read_at` is `bpf_probe_read_kernel` of 8 bytes at the tracepoint record plus
    // `offset` into a local `u64`: the helper checks the source address and returns an error
    // (→ `Err`, nothing counted) instead of faulting if it is not readable kernel memory, and
    // every bit pattern is a valid `u64`. A wrong offset gives a wrong cookie, not a fault.
    let Ok(cookie) = (unsafe { ctx.read_at::<u64>(offset) }) else {
        return 0;
    };
    if let Some(record) = CONNECTIONS.get_ptr_mut(cookie) {
        #[expect(
            clippy::multiple_unsafe_ops_per_block,
            reason = "one update of one record through one pointer, under one SAFETY argument"
        )]
        // SAFETY: a non-null pointer from a map lookup points to the element's value in the
        // map's own memory, which the kernel aligns to 8 bytes and keeps allocated for this
        // whole run (LRU maps are preallocated, and the program runs under RCU). The
        // `ConnectionRecord` is plain integers. Another CPU may remove or recycle the element
        // at the same time (the CLOSE of this very connection, or LRU eviction): then the flag
        // is lost or lands on the record of another connection, and `slot` may be another
        // connection's, which `count` bounds-checks. A wrong count, never an access outside
        // the element.
        let slot = unsafe {
            (*record).flags |= FLAG_RESET_RECEIVED;
            (*record).slot
        };
        count(CTR_RESETS_RECEIVED, slot, 1);
    } else if let Some(record) = UPSTREAM_SOCKETS.get_ptr_mut(cookie) {
        #[expect(
            clippy::multiple_unsafe_ops_per_block,
            reason = "one update of one record through one pointer, under one SAFETY argument"
        )]
        // SAFETY: as for `CONNECTIONS` above: the pointer is into the LRU map's preallocated,
        // 8-byte aligned memory for this whole run, the record is plain integers, and a race
        // with the close of this connection or an eviction makes a wrong count (`slot` is
        // bounds-checked by `count_upstream`), never an access outside the element.
        let (established_ns, slot) = unsafe {
            (*record).flags |= FLAG_RESET_RECEIVED;
            ((*record).established_ns, (*record).slot)
        };
        // A reset answering the SYN is a refused connect, counted as a connect failure.
        if established_ns != 0 {
            count_upstream(UPSTREAM_CTR_RESETS_RECEIVED, slot, 1);
        }
    }
    0
}

/// A SYN reached one of our listeners: remember when, by 4-tuple (the request socket's
/// cookie is not the cookie of the connection it becomes).
fn on_syn(ctx: &SockOpsContext) {
    let Some(flow) = flow_key(ctx) else { return };
    if listener_slot(ctx, flow.netns_cookie).is_none() {
        return;
    }
    if SYNS.insert(&flow, &now(), 0).is_err() {
        count(CTR_DROPPED, 0, 1);
        warn!(ctx, "SYN map update failed: a handshake time is lost");
    }
}

/// The three-way handshake completed on a connection to one of our listeners.
fn on_established(ctx: &SockOpsContext) {
    let Some(flow) = flow_key(ctx) else { return };
    let Some(slot) = listener_slot(ctx, flow.netns_cookie) else {
        return;
    };
    let established_ns = now();
    let syn_ns = match lru_value(&SYNS, &flow) {
        Some(syn_ns) => {
            let _ = SYNS.remove(&flow);
            observe(HIST_HANDSHAKE, slot, established_ns.saturating_sub(syn_ns));
            syn_ns
        }
        None => {
            count(CTR_SYN_UNSEEN, slot, 1);
            0
        }
    };
    count(CTR_CONNECTIONS, slot, 1);
    let cookie = socket_cookie(ctx);
    let record = ConnectionRecord {
        syn_ns,
        established_ns,
        slot,
        flags: 0,
    };
    if CONNECTIONS.insert(&cookie, &record, 0).is_err() {
        count(CTR_DROPPED, 0, 1);
        warn!(
            ctx,
            "connection map update failed: a connection is not measured"
        );
        return;
    }
    let flags = field!(ctx, bpf_sock_ops_cb_flags);
    let _ = ctx.set_cb_flags((flags | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
}

/// The proxy is sending the SYN of one of its upstream connections: if userspace registered
/// the socket, remember when, and ask for state callbacks (to see it close).
fn on_upstream_connect(ctx: &SockOpsContext) {
    let Some(record) = UPSTREAM_SOCKETS.get_ptr_mut(socket_cookie(ctx)) else {
        return;
    };
    // SAFETY: a non-null pointer from a lookup in the LRU map points to the element's value in
    // the map's preallocated memory, aligned to 8 bytes and allocated for this whole run (the
    // program runs under RCU). The record is plain integers. Userspace wrote it before
    // `connect()` and only deletes it after `connect()` failed; an eviction racing this write
    // stamps a recycled element, a wrong time, never an access outside the element.
    unsafe { (*record).syn_ns = now() };
    let flags = field!(ctx, bpf_sock_ops_cb_flags);
    let _ = ctx.set_cb_flags((flags | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
}

/// One of the proxy's upstream connections completed its handshake: connect time and count,
/// and the established time in the record, where userspace reads the connect time.
fn on_upstream_established(ctx: &SockOpsContext) {
    let Some(record) = UPSTREAM_SOCKETS.get_ptr_mut(socket_cookie(ctx)) else {
        return;
    };
    let established_ns = now();
    #[expect(
        clippy::multiple_unsafe_ops_per_block,
        reason = "one update of one record through one pointer, under one SAFETY argument"
    )]
    // SAFETY: as in `on_upstream_connect`: the pointer is into the LRU map's preallocated,
    // aligned memory for this whole run and the record is plain integers; a racing eviction
    // gives a wrong time or a slot that `observe_upstream`/`count_upstream` bounds-check.
    let (syn_ns, slot) = unsafe {
        (*record).established_ns = established_ns;
        ((*record).syn_ns, (*record).slot)
    };
    if syn_ns != 0 {
        observe_upstream(
            UPSTREAM_HIST_CONNECT,
            slot,
            established_ns.saturating_sub(syn_ns),
        );
    }
    count_upstream(UPSTREAM_CTR_CONNECTIONS, slot, 1);
}

/// At CLOSE: for an accepted connection, lifetime, RTT, retransmits, and whether this side
/// aborted the connection; for an upstream connection, a connect failure if it never
/// established, else RTT and aborts, and its retransmits either way (SYNs included).
/// Retransmits are read from the socket's own total (which includes SYN, SYN-ACK and tail-
/// loss-probe retransmissions, unlike the RETRANS callback) once, here.
fn on_state_change(ctx: &SockOpsContext) {
    let (old, new) = (ctx.arg(0), ctx.arg(1));
    if new != BPF_TCP_CLOSE {
        return;
    }
    let cookie = socket_cookie(ctx);
    if let Some(record) = lru_value(&CONNECTIONS, &cookie) {
        let _ = CONNECTIONS.remove(&cookie);
        on_close(ctx, old, record);
    } else if let Some(record) = lru_value(&UPSTREAM_SOCKETS, &cookie) {
        let _ = UPSTREAM_SOCKETS.remove(&cookie);
        on_upstream_close(ctx, old, record);
    }
}

fn on_close(ctx: &SockOpsContext, old: u32, record: ConnectionRecord) {
    let slot = record.slot;
    count(CTR_CLOSED, slot, 1);
    observe(
        HIST_LIFETIME,
        slot,
        now().saturating_sub(record.established_ns),
    );
    if let Some(rtt_ns) = smoothed_rtt_ns(ctx) {
        observe(HIST_RTT, slot, rtt_ns);
    }
    count(CTR_RETRANSMITS, slot, retransmits(ctx));
    if aborted(old, &record) {
        count(CTR_RESETS_SENT, slot, 1);
    }
}

fn on_upstream_close(ctx: &SockOpsContext, old: u32, record: ConnectionRecord) {
    let slot = record.slot;
    count_upstream(UPSTREAM_CTR_RETRANSMITS, slot, retransmits(ctx));
    if record.established_ns == 0 {
        count_upstream(UPSTREAM_CTR_CONNECT_FAILURES, slot, 1);
        return;
    }
    if let Some(rtt_ns) = smoothed_rtt_ns(ctx) {
        observe_upstream(UPSTREAM_HIST_RTT, slot, rtt_ns);
    }
    if aborted(old, &record) {
        count_upstream(UPSTREAM_CTR_RESETS_SENT, slot, 1);
    }
}

/// The smoothed RTT of a closing connection, if it has one.
fn smoothed_rtt_ns(ctx: &SockOpsContext) -> Option<u64> {
    // srtt_us holds the smoothed RTT in microseconds, shifted left by 3.
    let srtt_us = u64::from(field!(ctx, srtt_us) >> 3);
    (srtt_us > 0).then_some(srtt_us * 1000)
}

/// Segments the closing socket retransmitted over its life.
fn retransmits(ctx: &SockOpsContext) -> u64 {
    u64::from(field!(ctx, total_retrans))
}

/// Whether this side aborted an established connection: straight to CLOSE from ESTABLISHED
/// or CLOSE_WAIT, without a reset from the peer.
fn aborted(old: u32, record: &ConnectionRecord) -> bool {
    let abrupt = old == BPF_TCP_ESTABLISHED || old == BPF_TCP_CLOSE_WAIT;
    abrupt && record.flags & FLAG_RESET_RECEIVED == 0
}

/// The connection's network namespace and 4-tuple.
fn flow_key(ctx: &SockOpsContext) -> Option<FlowKey> {
    let family = field!(ctx, family);
    let (local_ip, remote_ip) = if family == AF_INET {
        let local = field!(ctx, local_ip4);
        let remote = field!(ctx, remote_ip4);
        ([local, 0, 0, 0], [remote, 0, 0, 0])
    } else {
        (ip6(ctx, true), ip6(ctx, false))
    };
    Some(FlowKey {
        netns_cookie: netns_cookie(ctx),
        family,
        local_port: field!(ctx, local_port),
        remote_port: field!(ctx, remote_port),
        _pad: 0,
        local_ip,
        remote_ip,
    })
}

fn ip6(ctx: &SockOpsContext, local: bool) -> [u32; 4] {
    if local {
        [
            field!(ctx, local_ip6[0]),
            field!(ctx, local_ip6[1]),
            field!(ctx, local_ip6[2]),
            field!(ctx, local_ip6[3]),
        ]
    } else {
        [
            field!(ctx, remote_ip6[0]),
            field!(ctx, remote_ip6[1]),
            field!(ctx, remote_ip6[2]),
            field!(ctx, remote_ip6[3]),
        ]
    }
}

fn listener_slot(ctx: &SockOpsContext, netns_cookie: u64) -> Option<u32> {
    let port = field!(ctx, local_port);
    let key = ListenerKey {
        netns_cookie,
        port,
        _pad: 0,
    };
    // SAFETY: as in `lru_value`: the reference points into the map's preallocated memory for
    // this whole run and the `u32` is copied out at once. Only userspace writes this map, when
    // it registers a listener; a lookup racing such an update may read a stale or mixed slot,
    // which the filter below bounds.
    unsafe { LISTENERS.get(&key) }
        .copied()
        .filter(|slot| *slot < MAX_LISTENERS)
}

/// Copies the value of `key` out of an LRU map, at once: the element may be recycled for
/// another key while the program runs.
#[inline(always)]
fn lru_value<K, V: Copy>(map: &LruHashMap<K, V>, key: &K) -> Option<V> {
    // SAFETY: `get` is unsafe because the kernel may delete or evict the element, and reuse it
    // for another key, while we hold the reference. The reference still points into the map's
    // own memory (LRU maps are always preallocated, and the program runs under RCU), valid and
    // aligned for this whole run; the value is copied out before anything else happens. The
    // values stored here (`u64`, `ConnectionRecord`) are plain integers, so a copy that races
    // an update is a wrong number (a time, or a slot that `count`/`observe` bounds-check),
    // never an invalid value or an access outside the element.
    unsafe { map.get(key) }.copied()
}

/// The socket cookie of the connection, the value userspace reads with `SO_COOKIE`.
#[inline(always)]
fn socket_cookie(ctx: &SockOpsContext) -> u64 {
    // SAFETY: `bpf_get_socket_cookie` takes the program's context pointer, which is what
    // `as_ptr` returns: the kernel's own `bpf_sock_ops` for this run (the verifier checks that
    // the argument is the unmodified context). The helper only reads the socket's cookie.
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}

/// The cookie of the connection's network namespace (userspace: `SO_NETNS_COOKIE`).
#[inline(always)]
fn netns_cookie(ctx: &SockOpsContext) -> u64 {
    // SAFETY: as in `socket_cookie`: `bpf_get_netns_cookie` takes the unmodified context
    // pointer (checked by the verifier) and only reads the socket's namespace cookie.
    unsafe { bpf_get_netns_cookie(ctx.as_ptr()) }
}

fn now() -> u64 {
    // SAFETY: `bpf_ktime_get_ns` takes no argument and only reads CLOCK_MONOTONIC.
    unsafe { bpf_ktime_get_ns() }
}

fn observe(histogram: u32, slot: u32, ns: u64) {
    // Fine or coarse by histogram; a coarse one fills the first slots of its row.
    let scale = listener_scale(histogram);
    let bucket = scale.bucket_of_ns(ns);
    if bucket >= scale.buckets() || slot >= MAX_LISTENERS {
        return;
    }
    add(&HISTOGRAMS, histogram_index(histogram, slot, bucket), 1);
    add(&HISTOGRAM_SUMS, histogram_sum_index(histogram, slot), ns);
}

fn count(counter: u32, slot: u32, by: u64) {
    if slot >= MAX_LISTENERS {
        return;
    }
    add(&COUNTERS, counter_index(counter, slot), by);
}

fn observe_upstream(histogram: u32, slot: u32, ns: u64) {
    let bucket = UPSTREAM_SCALE.bucket_of_ns(ns);
    if bucket >= UPSTREAM_SCALE.buckets() || slot >= MAX_BACKENDS {
        return;
    }
    add(
        &UPSTREAM_HISTOGRAMS,
        upstream_histogram_index(histogram, slot, bucket),
        1,
    );
    add(
        &UPSTREAM_HISTOGRAM_SUMS,
        upstream_histogram_sum_index(histogram, slot),
        ns,
    );
}

fn count_upstream(counter: u32, slot: u32, by: u64) {
    if slot >= MAX_BACKENDS {
        return;
    }
    add(
        &UPSTREAM_COUNTERS,
        upstream_counter_index(counter, slot),
        by,
    );
}

/// Adds `by` to this CPU's copy of entry `index` of a per-CPU array; an index past the end
/// finds no entry and adds nothing.
#[inline(always)]
fn add(map: &PerCpuArray<u64>, index: u32, by: u64) {
    if let Some(cell) = map.get_ptr_mut(index) {
        // SAFETY: a non-null pointer from an array lookup points to this CPU's copy of the
        // entry, in memory the map owns for its whole life, aligned for a `u64`. Only program
        // runs on this CPU touch that copy (userspace only reads it, at scrape time). A run in
        // process context can be interrupted between its load and its store by a run in
        // softirq context, whose addition is then lost: a miscount, never a torn value or an
        // access outside the entry, as each 8-byte load and store is one aligned instruction.
        unsafe { *cell += by };
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
