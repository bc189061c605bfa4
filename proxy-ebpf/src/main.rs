//! The kernel side of the proxy: measures the proxy's own TCP connections and nothing else.
//!
//! - `sock_ops` (attached to a cgroup that contains every socket the proxy may be handed):
//!   SYN time of each connection to a registered listener (TIMEOUT_INIT, on the request
//!   socket), handshake time and the connection record at ESTABLISHED, and at CLOSE the
//!   lifetime, smoothed RTT, retransmitted segments and whether this side aborted it.
//! - tracepoint `tcp:tcp_receive_reset`: resets received, matched by socket cookie.
//!
//! Results go to per-CPU arrays that userspace reads at scrape time; the only per-connection
//! state userspace reads is `CONNECTIONS`, once, when it accepts the connection.
#![no_std]
#![no_main]

use core::ffi::c_void;
use core::ptr::{addr_of, read_volatile};

use aya_ebpf::bindings::{
    BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
    BPF_SOCK_OPS_TIMEOUT_INIT, BPF_TCP_CLOSE, BPF_TCP_CLOSE_WAIT, BPF_TCP_ESTABLISHED,
    bpf_sock_ops,
};
use aya_ebpf::helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns};
use aya_ebpf::macros::{map, sock_ops, tracepoint};
use aya_ebpf::maps::{HashMap, LruHashMap, PerCpuArray};
use aya_ebpf::programs::{SockOpsContext, TracePointContext};
use aya_log_ebpf::warn;
use proxy_common::{
    BUCKETS, CONNECTION_ENTRIES, COUNTER_ENTRIES, CTR_CLOSED, CTR_CONNECTIONS, CTR_DROPPED,
    CTR_RESETS_RECEIVED, CTR_RESETS_SENT, CTR_RETRANSMITS, CTR_SYN_UNSEEN, ConnectionRecord,
    FLAG_RESET_RECEIVED, FlowKey, HIST_HANDSHAKE, HIST_LIFETIME, HIST_RTT, HISTOGRAM_ENTRIES,
    HISTOGRAM_SUM_ENTRIES, ListenerKey, MAX_LISTENERS, SYN_ENTRIES, bucket_of_ns, counter_index,
    histogram_index, histogram_sum_index,
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

/// Offset of `sock_cookie` in the `tcp:tcp_receive_reset` record; it differs between kernels,
/// so the loader reads it from tracefs and sets it before loading.
#[unsafe(no_mangle)]
static RECEIVE_RESET_COOKIE_OFFSET: u32 = 64;

const AF_INET: u32 = 2;

#[sock_ops]
pub fn proxy_sock_ops(ctx: SockOpsContext) -> u32 {
    match field(&ctx, |ops| unsafe { addr_of!((*ops).op) }) {
        BPF_SOCK_OPS_TIMEOUT_INIT => on_syn(&ctx),
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => on_established(&ctx),
        BPF_SOCK_OPS_STATE_CB => on_state_change(&ctx),
        _ => {}
    }
    // 1: let the operation proceed unchanged (the reply stays 0: kernel defaults).
    1
}

#[tracepoint]
pub fn proxy_receive_reset(ctx: TracePointContext) -> u32 {
    let offset = unsafe { read_volatile(&RECEIVE_RESET_COOKIE_OFFSET) } as usize;
    let Ok(cookie) = (unsafe { ctx.read_at::<u64>(offset) }) else {
        return 0;
    };
    if let Some(record) = CONNECTIONS.get_ptr_mut(cookie) {
        let slot = unsafe {
            (*record).flags |= FLAG_RESET_RECEIVED;
            (*record).slot
        };
        count(CTR_RESETS_RECEIVED, slot, 1);
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
    let syn_ns = match unsafe { SYNS.get(&flow) } {
        Some(&syn_ns) => {
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
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops as *mut c_void) };
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
    let flags = field(ctx, |ops| unsafe { addr_of!((*ops).bpf_sock_ops_cb_flags) });
    let _ = ctx.set_cb_flags((flags | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
}

/// At CLOSE: lifetime, RTT, retransmits, and whether this side aborted the connection.
/// Retransmits are read from the socket's own total (which includes SYN-ACK and tail-loss-
/// probe retransmissions, unlike the RETRANS callback) once, here.
fn on_state_change(ctx: &SockOpsContext) {
    let (old, new) = (ctx.arg(0), ctx.arg(1));
    if new != BPF_TCP_CLOSE {
        return;
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops as *mut c_void) };
    let Some(record) = (unsafe { CONNECTIONS.get(&cookie) }).copied() else {
        return;
    };
    let _ = CONNECTIONS.remove(&cookie);
    let slot = record.slot;
    count(CTR_CLOSED, slot, 1);
    observe(
        HIST_LIFETIME,
        slot,
        now().saturating_sub(record.established_ns),
    );
    // srtt_us holds the smoothed RTT in microseconds, shifted left by 3.
    let srtt_us = u64::from(field(ctx, |ops| unsafe { addr_of!((*ops).srtt_us) }) >> 3);
    if srtt_us > 0 {
        observe(HIST_RTT, slot, srtt_us * 1000);
    }
    let retransmits = field(ctx, |ops| unsafe { addr_of!((*ops).total_retrans) });
    count(CTR_RETRANSMITS, slot, u64::from(retransmits));
    let abrupt = old == BPF_TCP_ESTABLISHED || old == BPF_TCP_CLOSE_WAIT;
    if abrupt && record.flags & FLAG_RESET_RECEIVED == 0 {
        count(CTR_RESETS_SENT, slot, 1);
    }
}

/// The connection's network namespace and 4-tuple.
fn flow_key(ctx: &SockOpsContext) -> Option<FlowKey> {
    let family = field(ctx, |ops| unsafe { addr_of!((*ops).family) });
    let (local_ip, remote_ip) = if family == AF_INET {
        let local = field(ctx, |ops| unsafe { addr_of!((*ops).local_ip4) });
        let remote = field(ctx, |ops| unsafe { addr_of!((*ops).remote_ip4) });
        ([local, 0, 0, 0], [remote, 0, 0, 0])
    } else {
        (ip6(ctx, true), ip6(ctx, false))
    };
    Some(FlowKey {
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.ops as *mut c_void) },
        family,
        local_port: field(ctx, |ops| unsafe { addr_of!((*ops).local_port) }),
        remote_port: field(ctx, |ops| unsafe { addr_of!((*ops).remote_port) }),
        _pad: 0,
        local_ip,
        remote_ip,
    })
}

fn ip6(ctx: &SockOpsContext, local: bool) -> [u32; 4] {
    let mut out = [0u32; 4];
    let mut i = 0;
    while i < 4 {
        out[i] = if local {
            field(ctx, |ops| unsafe { addr_of!((*ops).local_ip6[i]) })
        } else {
            field(ctx, |ops| unsafe { addr_of!((*ops).remote_ip6[i]) })
        };
        i += 1;
    }
    out
}

fn listener_slot(ctx: &SockOpsContext, netns_cookie: u64) -> Option<u32> {
    let port = field(ctx, |ops| unsafe { addr_of!((*ops).local_port) });
    let key = ListenerKey {
        netns_cookie,
        port,
        _pad: 0,
    };
    unsafe { LISTENERS.get(&key) }
        .copied()
        .filter(|slot| *slot < MAX_LISTENERS)
}

/// Reads one context field. The verifier refuses some plain copies of sock_ops fields
/// ("dereference of modified ctx ptr"); one volatile load per field passes.
#[inline(always)]
fn field(ctx: &SockOpsContext, at: impl FnOnce(*mut bpf_sock_ops) -> *const u32) -> u32 {
    unsafe { read_volatile(at(ctx.ops)) }
}

fn now() -> u64 {
    unsafe { bpf_ktime_get_ns() }
}

fn observe(histogram: u32, slot: u32, ns: u64) {
    let bucket = bucket_of_ns(ns);
    if bucket >= BUCKETS || slot >= MAX_LISTENERS {
        return;
    }
    if let Some(cell) = HISTOGRAMS.get_ptr_mut(histogram_index(histogram, slot, bucket)) {
        unsafe { *cell += 1 };
    }
    if let Some(sum) = HISTOGRAM_SUMS.get_ptr_mut(histogram_sum_index(histogram, slot)) {
        unsafe { *sum += ns };
    }
}

fn count(counter: u32, slot: u32, by: u64) {
    if slot >= MAX_LISTENERS {
        return;
    }
    if let Some(cell) = COUNTERS.get_ptr_mut(counter_index(counter, slot)) {
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
