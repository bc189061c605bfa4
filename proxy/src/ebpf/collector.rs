//! Kernel metrics for Prometheus, read from the program's per-CPU arrays at scrape time
//! (nothing per event crosses into userspace) and converted from the microsecond buckets of
//! `proxy_common::buckets` (fine or coarse, by histogram) and nanosecond sums to seconds here, the one place that turns the BPF units into Prometheus
//! units (the accept-wait histogram, observed at accept, is declared here too). Two sets of
//! arrays: the listeners' (label `listener`: `http` or `https`, as in the application
//! metrics) and the backends' (label `backend`), whose slots
//! [`BackendSlots`] hands out.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, RwLock};

use aya::maps::{MapData, PerCpuArray, PerCpuValues};
use prometheus::core::{Collector, Desc};
use prometheus::proto::{Bucket, Counter, Histogram, LabelPair, Metric, MetricFamily, MetricType};
use prometheus::{HistogramOpts, HistogramVec, Registry};
use proxy_common::{
    COUNTERS, CTR_CLOSED, CTR_CONNECTIONS, CTR_DROPPED, CTR_RESETS_RECEIVED, CTR_RESETS_SENT,
    CTR_RETRANSMITS, CTR_SYN_UNSEEN, HIST_HANDSHAKE, HIST_LIFETIME, HIST_RTT, HISTOGRAMS,
    MAX_BACKENDS, Scale, UPSTREAM_COUNTERS, UPSTREAM_CTR_CONNECT_FAILURES,
    UPSTREAM_CTR_CONNECTIONS, UPSTREAM_CTR_RESETS_RECEIVED, UPSTREAM_CTR_RESETS_SENT,
    UPSTREAM_CTR_RETRANSMITS, UPSTREAM_HIST_CONNECT, UPSTREAM_HIST_RTT, UPSTREAM_HISTOGRAMS,
    UPSTREAM_SCALE, counter_index, histogram_index, histogram_sum_index, listener_scale,
    upstream_counter_index, upstream_histogram_index, upstream_histogram_sum_index,
};

/// A registered listener or a configured backend: its slot in the BPF arrays and its
/// `listener` or `backend` label value.
#[derive(Debug, Clone)]
pub(crate) struct Slot {
    pub(crate) index: u32,
    pub(crate) label: String,
}

/// Which backend owns which slot of the backends' arrays. A backend removed from the
/// configuration gives its slot back at once and its series disappear; its connections still
/// open (draining) keep counting into the slot in the kernel until they close. A released
/// slot goes to the back of the free queue, and a new backend takes the first free slot that
/// no registered socket uses any more; only when every free slot is still in use does it take
/// one anyway, and then the close-time figures of those draining connections (RTT,
/// retransmits, resets) are counted for the new backend. A slot is zeroed when it is given
/// out, so a new backend's series start at 0.
#[derive(Debug)]
pub(crate) struct BackendSlots {
    assigned: Vec<Slot>,
    free: VecDeque<u32>,
    /// Backends already warned about (no slot): one warning each.
    warned: HashSet<String>,
}

/// What [`BackendSlots::assign`] changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Assignment {
    /// Slots given to new backends: to be zeroed before anything counts into them.
    pub(crate) given: Vec<u32>,
    /// Backends beyond `MAX_BACKENDS`, served without kernel metrics.
    pub(crate) unmeasured: Vec<String>,
}

impl BackendSlots {
    pub(crate) fn new() -> Self {
        BackendSlots {
            assigned: Vec::new(),
            free: (0..MAX_BACKENDS).collect(),
            warned: HashSet::new(),
        }
    }

    /// The slot of `backend`, if it has one.
    pub(crate) fn slot_of(&self, backend: &str) -> Option<u32> {
        self.assigned
            .iter()
            .find(|slot| slot.label == backend)
            .map(|slot| slot.index)
    }

    /// Makes `backends` (in order, duplicates ignored) the configured set: backends that stay
    /// keep their slot, removed ones release theirs, new ones take a free one, preferring a
    /// slot not in `in_use` (slots of sockets still registered in the kernel).
    pub(crate) fn assign(&mut self, backends: &[String], in_use: &HashSet<u32>) -> Assignment {
        let (kept, released): (Vec<Slot>, Vec<Slot>) = std::mem::take(&mut self.assigned)
            .into_iter()
            .partition(|slot| backends.contains(&slot.label));
        self.assigned = kept;
        self.free.extend(released.iter().map(|slot| slot.index));
        let mut assignment = Assignment::default();
        for backend in backends {
            if self.slot_of(backend).is_some() || assignment.unmeasured.contains(backend) {
                continue;
            }
            let idle = self.free.iter().position(|slot| !in_use.contains(slot));
            let Some(index) = self.free.remove(idle.unwrap_or(0)) else {
                assignment.unmeasured.push(backend.clone());
                continue;
            };
            self.warned.remove(backend);
            self.assigned.push(Slot {
                index,
                label: backend.clone(),
            });
            assignment.given.push(index);
        }
        for backend in &assignment.unmeasured {
            self.warned.insert(backend.clone());
        }
        assignment
    }

    /// Whether `backend` (which has no slot) has been warned about; remembers that it now is.
    pub(crate) fn first_warning(&mut self, backend: &str) -> bool {
        self.warned.insert(backend.to_owned())
    }

    pub(crate) fn assigned(&self) -> &[Slot] {
        &self.assigned
    }
}

/// The kernel-side metric families.
struct Family {
    name: &'static str,
    help: &'static str,
    kind: Kind,
}

enum Kind {
    Histogram(u32),
    Counter(u32),
    /// Resets, with a `direction` label: the counters of resets sent and received.
    Resets {
        sent: u32,
        received: u32,
    },
    /// A process-wide counter kept in slot 0, without a `listener` label.
    Global(u32),
}

const FAMILIES: &[Family] = &[
    Family {
        name: "proxy_tcp_handshake_duration_seconds",
        help: "TCP handshake time seen by the kernel: SYN received to ESTABLISHED.",
        kind: Kind::Histogram(HIST_HANDSHAKE),
    },
    Family {
        name: "proxy_tcp_rtt_seconds",
        help: "Smoothed round-trip time of each connection, sampled when it closes.",
        kind: Kind::Histogram(HIST_RTT),
    },
    Family {
        name: "proxy_tcp_connection_duration_seconds",
        help: "Connection lifetime: ESTABLISHED to CLOSE.",
        kind: Kind::Histogram(HIST_LIFETIME),
    },
    Family {
        name: "proxy_tcp_connections_total",
        help: "Connections that completed the TCP handshake.",
        kind: Kind::Counter(CTR_CONNECTIONS),
    },
    Family {
        name: "proxy_tcp_connections_closed_total",
        help: "Connections that reached CLOSE.",
        kind: Kind::Counter(CTR_CLOSED),
    },
    Family {
        name: "proxy_tcp_retransmits_total",
        help: "Segments retransmitted (SYN-ACKs included), counted when the connection closes.",
        kind: Kind::Counter(CTR_RETRANSMITS),
    },
    Family {
        name: "proxy_tcp_resets_total",
        help: "Connections reset: received from the peer, or aborted by this side.",
        kind: Kind::Resets {
            sent: CTR_RESETS_SENT,
            received: CTR_RESETS_RECEIVED,
        },
    },
    Family {
        name: "proxy_tcp_syn_unseen_total",
        help: "Established connections whose SYN the program did not see (no handshake time).",
        kind: Kind::Counter(CTR_SYN_UNSEEN),
    },
    Family {
        name: "proxy_ebpf_dropped_records_total",
        help: "Records the eBPF program could not store because a map was full.",
        kind: Kind::Global(CTR_DROPPED),
    },
];

/// The kernel's view of the proxy's own connections to its backends, label `backend`.
const BACKEND_FAMILIES: &[Family] = &[
    Family {
        name: "proxy_upstream_tcp_connect_duration_seconds",
        help: "Upstream TCP connect time seen by the kernel: SYN sent to ESTABLISHED.",
        kind: Kind::Histogram(UPSTREAM_HIST_CONNECT),
    },
    Family {
        name: "proxy_upstream_tcp_rtt_seconds",
        help: "Smoothed round-trip time of each upstream connection, sampled when it closes.",
        kind: Kind::Histogram(UPSTREAM_HIST_RTT),
    },
    Family {
        name: "proxy_upstream_tcp_connections_total",
        help: "Upstream connections that completed the TCP handshake.",
        kind: Kind::Counter(UPSTREAM_CTR_CONNECTIONS),
    },
    Family {
        name: "proxy_upstream_tcp_connect_failures_total",
        help: "Upstream connections that closed before ESTABLISHED (refused, timed out, given up).",
        kind: Kind::Counter(UPSTREAM_CTR_CONNECT_FAILURES),
    },
    Family {
        name: "proxy_upstream_tcp_retransmits_total",
        help: "Segments retransmitted on upstream connections (SYNs included), counted when they close.",
        kind: Kind::Counter(UPSTREAM_CTR_RETRANSMITS),
    },
    Family {
        name: "proxy_upstream_tcp_resets_total",
        help: "Established upstream connections reset: received from the backend, or aborted by this side.",
        kind: Kind::Resets {
            sent: UPSTREAM_CTR_RESETS_SENT,
            received: UPSTREAM_CTR_RESETS_RECEIVED,
        },
    },
];

/// How one set of arrays is indexed.
struct Layout {
    histograms: u32,
    counters: u32,
    /// The bucket scale of each histogram.
    scale: fn(u32) -> Scale,
    histogram: fn(u32, u32, u32) -> u32,
    histogram_sum: fn(u32, u32) -> u32,
    counter: fn(u32, u32) -> u32,
}

const LISTENER_LAYOUT: Layout = Layout {
    histograms: HISTOGRAMS,
    counters: COUNTERS,
    scale: listener_scale,
    histogram: histogram_index,
    histogram_sum: histogram_sum_index,
    counter: counter_index,
};

const BACKEND_LAYOUT: Layout = Layout {
    histograms: UPSTREAM_HISTOGRAMS,
    counters: UPSTREAM_COUNTERS,
    scale: |_| UPSTREAM_SCALE,
    histogram: upstream_histogram_index,
    histogram_sum: upstream_histogram_sum_index,
    counter: upstream_counter_index,
};

/// One set of the program's per-CPU arrays: histogram buckets, histogram sums, counters.
pub(crate) struct Arrays {
    histograms: PerCpuArray<MapData, u64>,
    histogram_sums: PerCpuArray<MapData, u64>,
    counters: PerCpuArray<MapData, u64>,
    layout: &'static Layout,
}

impl Arrays {
    /// The listeners' arrays (`HISTOGRAMS`, `HISTOGRAM_SUMS`, `COUNTERS`).
    pub(crate) fn listeners(
        histograms: PerCpuArray<MapData, u64>,
        histogram_sums: PerCpuArray<MapData, u64>,
        counters: PerCpuArray<MapData, u64>,
    ) -> Self {
        Arrays {
            histograms,
            histogram_sums,
            counters,
            layout: &LISTENER_LAYOUT,
        }
    }

    /// The backends' arrays (`UPSTREAM_HISTOGRAMS`, `UPSTREAM_HISTOGRAM_SUMS`,
    /// `UPSTREAM_COUNTERS`).
    pub(crate) fn backends(
        histograms: PerCpuArray<MapData, u64>,
        histogram_sums: PerCpuArray<MapData, u64>,
        counters: PerCpuArray<MapData, u64>,
    ) -> Self {
        Arrays {
            histograms,
            histogram_sums,
            counters,
            layout: &BACKEND_LAYOUT,
        }
    }

    fn read(array: &PerCpuArray<MapData, u64>, index: u32) -> u64 {
        // A failed read (the map is gone) reports 0 rather than failing the whole scrape.
        array
            .get(&index, 0)
            .map(|values| values.iter().sum())
            .unwrap_or(0)
    }

    fn counter(&self, counter: u32, slot: u32) -> u64 {
        Self::read(&self.counters, (self.layout.counter)(counter, slot))
    }

    /// One histogram of one slot: a read (one `bpf` syscall) per bucket.
    fn histogram(&self, histogram: u32, slot: u32) -> Histogram {
        let scale = (self.layout.scale)(histogram);
        let mut cumulative = 0;
        let mut buckets = Vec::with_capacity(scale.buckets() as usize);
        for bucket in 0..scale.buckets() {
            cumulative += Self::read(
                &self.histograms,
                (self.layout.histogram)(histogram, slot, bucket),
            );
            // The last bucket is open-ended: it is the +Inf bucket the encoder adds.
            if bucket < scale.buckets() - 1 {
                let mut b = Bucket::default();
                b.set_cumulative_count(cumulative);
                b.set_upper_bound(scale.upper_bound_seconds(bucket));
                buckets.push(b);
            }
        }
        let mut h = Histogram::default();
        h.set_bucket(buckets);
        h.set_sample_count(cumulative);
        h.set_sample_sum(
            Self::read(
                &self.histogram_sums,
                (self.layout.histogram_sum)(histogram, slot),
            ) as f64
                / 1e9,
        );
        h
    }

    /// Sets every entry of `slot` to 0 on every CPU, for a slot given to a new owner.
    pub(crate) fn zero_slot(&mut self, slot: u32) -> Result<(), aya::maps::MapError> {
        let cpus = self.counters.get(&0, 0)?.iter().count();
        let zeros = || PerCpuValues::try_from(vec![0u64; cpus]);
        for histogram in 0..self.layout.histograms {
            for bucket in 0..(self.layout.scale)(histogram).buckets() {
                let index = (self.layout.histogram)(histogram, slot, bucket);
                self.histograms.set(index, zeros()?, 0)?;
            }
            let index = (self.layout.histogram_sum)(histogram, slot);
            self.histogram_sums.set(index, zeros()?, 0)?;
        }
        for counter in 0..self.layout.counters {
            let index = (self.layout.counter)(counter, slot);
            self.counters.set(index, zeros()?, 0)?;
        }
        Ok(())
    }
}

/// Reads the program's arrays on every scrape.
pub(crate) struct KernelCollector {
    listeners: Arrays,
    listener_slots: Arc<RwLock<Vec<Slot>>>,
    backends: Arc<Mutex<Arrays>>,
    backend_slots: Arc<RwLock<BackendSlots>>,
    descs: Vec<Desc>,
}

impl KernelCollector {
    pub(crate) fn new(
        listeners: Arrays,
        listener_slots: Arc<RwLock<Vec<Slot>>>,
        backends: Arc<Mutex<Arrays>>,
        backend_slots: Arc<RwLock<BackendSlots>>,
    ) -> prometheus::Result<Self> {
        let descs = FAMILIES
            .iter()
            .map(|family| (family, "listener"))
            .chain(BACKEND_FAMILIES.iter().map(|family| (family, "backend")))
            .map(|(family, owner)| {
                let labels = match family.kind {
                    Kind::Global(_) => vec![],
                    Kind::Resets { .. } => vec![owner.to_owned(), "direction".to_owned()],
                    _ => vec![owner.to_owned()],
                };
                Desc::new(
                    family.name.to_owned(),
                    family.help.to_owned(),
                    labels,
                    HashMap::new(),
                )
            })
            .collect::<prometheus::Result<_>>()?;
        Ok(KernelCollector {
            listeners,
            listener_slots,
            backends,
            backend_slots,
            descs,
        })
    }
}

/// One family's metric for each slot of `arrays`, labelled `owner` (`listener` or `backend`).
fn family(family: &Family, arrays: &Arrays, owner: &str, slots: &[Slot]) -> MetricFamily {
    let mut metrics = Vec::new();
    match family.kind {
        Kind::Histogram(histogram) => {
            for slot in slots {
                let mut m = labelled(&[(owner, &slot.label)]);
                m.set_histogram(arrays.histogram(histogram, slot.index));
                metrics.push(m);
            }
        }
        Kind::Counter(counter) => {
            for slot in slots {
                let value = arrays.counter(counter, slot.index);
                metrics.push(counter_metric(&[(owner, &slot.label)], value));
            }
        }
        Kind::Resets { sent, received } => {
            for slot in slots {
                for (direction, counter) in [("sent", sent), ("received", received)] {
                    let value = arrays.counter(counter, slot.index);
                    metrics.push(counter_metric(
                        &[(owner, &slot.label), ("direction", direction)],
                        value,
                    ));
                }
            }
        }
        Kind::Global(counter) => {
            metrics.push(counter_metric(&[], arrays.counter(counter, 0)));
        }
    }
    let mut mf = MetricFamily::default();
    mf.set_name(family.name.to_owned());
    mf.set_help(family.help.to_owned());
    mf.set_field_type(match family.kind {
        Kind::Histogram(_) => MetricType::HISTOGRAM,
        _ => MetricType::COUNTER,
    });
    mf.set_metric(metrics);
    mf
}

impl Collector for KernelCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let listener_slots = self
            .listener_slots
            .read()
            .map(|s| s.clone())
            .unwrap_or_default();
        let mut families: Vec<MetricFamily> = FAMILIES
            .iter()
            .map(|f| family(f, &self.listeners, "listener", &listener_slots))
            .collect();
        let backend_slots = self
            .backend_slots
            .read()
            .map(|s| s.assigned().to_vec())
            .unwrap_or_default();
        // A panic elsewhere while holding the lock leaves the arrays as valid as before.
        let backends = self.backends.lock().unwrap_or_else(|e| e.into_inner());
        families.extend(
            BACKEND_FAMILIES
                .iter()
                .map(|f| family(f, &backends, "backend", &backend_slots)),
        );
        families
    }
}

fn labelled(labels: &[(&str, &str)]) -> Metric {
    let pairs = labels
        .iter()
        .map(|(name, value)| {
            let mut pair = LabelPair::default();
            pair.set_name((*name).to_owned());
            pair.set_value((*value).to_owned());
            pair
        })
        .collect();
    let mut m = Metric::default();
    m.set_label(pairs);
    m
}

fn counter_metric(labels: &[(&str, &str)], value: u64) -> Metric {
    let mut m = labelled(labels);
    let mut c = Counter::default();
    c.set_value(value as f64);
    m.set_counter(c);
    m
}
/// `proxy_tcp_accept_wait_seconds`, registered in `registry`: observed in userspace at
/// accept, on the fine scale like the kernel's handshake and RTT histograms.
pub(super) fn accept_wait_histogram(registry: &Registry) -> prometheus::Result<HistogramVec> {
    let histogram = HistogramVec::new(
        HistogramOpts::new(
            "proxy_tcp_accept_wait_seconds",
            "Time connections waited in the accept queue: ESTABLISHED to the proxy's accept().",
        )
        .buckets(Scale::Fine.finite_bounds_seconds().collect()),
        &["listener"],
    )?;
    registry.register(Box::new(histogram.clone()))?;
    Ok(histogram)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(names: &[&str]) -> Vec<String> {
        names.iter().map(|name| (*name).to_owned()).collect()
    }

    fn slots_of(slots: &BackendSlots) -> Vec<(String, u32)> {
        slots
            .assigned()
            .iter()
            .map(|slot| (slot.label.clone(), slot.index))
            .collect()
    }

    #[test]
    fn backends_keep_their_slot_across_reloads_and_new_ones_get_fresh_slots() {
        let mut slots = BackendSlots::new();
        let none = HashSet::new();
        let first = slots.assign(&labels(&["a:1", "b:1", "a:1"]), &none);
        assert_eq!(first.given, vec![0, 1]);
        assert!(first.unmeasured.is_empty());
        assert_eq!(slots.slot_of("b:1"), Some(1));

        // b leaves, c arrives: a keeps 0; c takes the first free slot (2), not b's, which
        // went to the back of the queue.
        let second = slots.assign(&labels(&["c:1", "a:1"]), &none);
        assert_eq!(second.given, vec![2]);
        assert_eq!(
            slots_of(&slots),
            vec![("a:1".to_owned(), 0), ("c:1".to_owned(), 2)]
        );
        assert_eq!(slots.slot_of("b:1"), None);
    }

    #[test]
    fn a_slot_still_used_by_draining_sockets_is_given_out_last() {
        let mut slots = BackendSlots::new();
        let none = HashSet::new();
        let all: Vec<String> = (0..MAX_BACKENDS).map(|i| format!("b{i}:1")).collect();
        slots.assign(&all, &none);
        // Remove b0 and b1; b0's sockets are still open.
        slots.assign(&all[2..], &none);
        let in_use = HashSet::from([0]);
        let mut configured = all[2..].to_vec();
        configured.push("new:1".to_owned());
        let assignment = slots.assign(&configured, &in_use);
        assert_eq!(assignment.given, vec![1], "the idle slot first");
        // Only the busy slot is left: taken anyway.
        configured.push("newer:1".to_owned());
        let assignment = slots.assign(&configured, &in_use);
        assert_eq!(assignment.given, vec![0]);
        assert!(assignment.unmeasured.is_empty());
    }

    #[test]
    fn backends_beyond_the_maximum_are_unmeasured_and_warned_about_once() {
        let mut slots = BackendSlots::new();
        let mut all: Vec<String> = (0..MAX_BACKENDS).map(|i| format!("b{i}:1")).collect();
        all.push("extra:1".to_owned());
        let assignment = slots.assign(&all, &HashSet::new());
        assert_eq!(assignment.given.len(), MAX_BACKENDS as usize);
        assert_eq!(assignment.unmeasured, labels(&["extra:1"]));
        assert_eq!(slots.slot_of("extra:1"), None);
        // Already warned about by `set_backends`: no second warning per connection.
        assert!(!slots.first_warning("extra:1"));
        assert!(slots.first_warning("unknown:1"));
        assert!(!slots.first_warning("unknown:1"));
    }
}
