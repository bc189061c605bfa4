//! Kernel metrics for Prometheus, read from the program's per-CPU arrays at scrape time
//! (nothing per event crosses into userspace) and converted from log2-microsecond buckets and
//! nanosecond sums to seconds here, the one place that turns the BPF units into Prometheus
//! units (the accept-wait histogram, observed at accept, is declared here too).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use aya::maps::{MapData, PerCpuArray};
use prometheus::core::{Collector, Desc};
use prometheus::proto::{Bucket, Counter, Histogram, LabelPair, Metric, MetricFamily, MetricType};
use prometheus::{HistogramOpts, HistogramVec, Registry};
use proxy_common::{
    BUCKETS, CTR_CLOSED, CTR_CONNECTIONS, CTR_DROPPED, CTR_RESETS_RECEIVED, CTR_RESETS_SENT,
    CTR_RETRANSMITS, CTR_SYN_UNSEEN, HIST_HANDSHAKE, HIST_LIFETIME, HIST_RTT,
    bucket_upper_bound_seconds, counter_index, histogram_index, histogram_sum_index,
};

/// A registered listener: its slot in the BPF arrays and its `port` label.
#[derive(Debug, Clone)]
pub(crate) struct Slot {
    pub(crate) index: u32,
    pub(crate) port: String,
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
    /// Resets, with a `direction` label: (sent counter, received counter).
    Resets,
    /// A process-wide counter kept in slot 0, without a `port` label.
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
        kind: Kind::Resets,
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

/// Reads the program's arrays on every scrape.
pub(crate) struct KernelCollector {
    histograms: PerCpuArray<MapData, u64>,
    histogram_sums: PerCpuArray<MapData, u64>,
    counters: PerCpuArray<MapData, u64>,
    slots: Arc<RwLock<Vec<Slot>>>,
    descs: Vec<Desc>,
}

impl KernelCollector {
    pub(crate) fn new(
        histograms: PerCpuArray<MapData, u64>,
        histogram_sums: PerCpuArray<MapData, u64>,
        counters: PerCpuArray<MapData, u64>,
        slots: Arc<RwLock<Vec<Slot>>>,
    ) -> prometheus::Result<Self> {
        let descs = FAMILIES
            .iter()
            .map(|family| {
                let labels = match family.kind {
                    Kind::Global(_) => vec![],
                    Kind::Resets => vec!["port".to_owned(), "direction".to_owned()],
                    _ => vec!["port".to_owned()],
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
            histograms,
            histogram_sums,
            counters,
            slots,
            descs,
        })
    }

    fn read(array: &PerCpuArray<MapData, u64>, index: u32) -> u64 {
        // A failed read (the map is gone) reports 0 rather than failing the whole scrape.
        array
            .get(&index, 0)
            .map(|values| values.iter().sum())
            .unwrap_or(0)
    }

    fn histogram(&self, histogram: u32, slot: u32) -> Histogram {
        let mut cumulative = 0;
        let mut buckets = Vec::with_capacity(BUCKETS as usize);
        for bucket in 0..BUCKETS {
            cumulative += Self::read(&self.histograms, histogram_index(histogram, slot, bucket));
            // The last bucket is open-ended: it is the +Inf bucket the encoder adds.
            if bucket < BUCKETS - 1 {
                let mut b = Bucket::default();
                b.set_cumulative_count(cumulative);
                b.set_upper_bound(bucket_upper_bound_seconds(bucket));
                buckets.push(b);
            }
        }
        let mut h = Histogram::default();
        h.set_bucket(buckets);
        h.set_sample_count(cumulative);
        h.set_sample_sum(
            Self::read(&self.histogram_sums, histogram_sum_index(histogram, slot)) as f64 / 1e9,
        );
        h
    }
}

impl Collector for KernelCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let slots = self.slots.read().map(|s| s.clone()).unwrap_or_default();
        FAMILIES
            .iter()
            .map(|family| {
                let mut metrics = Vec::new();
                match family.kind {
                    Kind::Histogram(histogram) => {
                        for slot in &slots {
                            let mut m = labelled(&[("port", &slot.port)]);
                            m.set_histogram(self.histogram(histogram, slot.index));
                            metrics.push(m);
                        }
                    }
                    Kind::Counter(counter) => {
                        for slot in &slots {
                            let value =
                                Self::read(&self.counters, counter_index(counter, slot.index));
                            metrics.push(counter_metric(&[("port", &slot.port)], value));
                        }
                    }
                    Kind::Resets => {
                        for slot in &slots {
                            for (direction, counter) in
                                [("sent", CTR_RESETS_SENT), ("received", CTR_RESETS_RECEIVED)]
                            {
                                let value =
                                    Self::read(&self.counters, counter_index(counter, slot.index));
                                metrics.push(counter_metric(
                                    &[("port", &slot.port), ("direction", direction)],
                                    value,
                                ));
                            }
                        }
                    }
                    Kind::Global(counter) => {
                        metrics.push(counter_metric(
                            &[],
                            Self::read(&self.counters, counter_index(counter, 0)),
                        ));
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
            })
            .collect()
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
/// accept, with the same log2-microsecond bounds as the kernel's histograms.
pub(super) fn accept_wait_histogram(registry: &Registry) -> prometheus::Result<HistogramVec> {
    let histogram = HistogramVec::new(
        HistogramOpts::new(
            "proxy_tcp_accept_wait_seconds",
            "Time connections waited in the accept queue: ESTABLISHED to the proxy's accept().",
        )
        .buckets((0..BUCKETS - 1).map(bucket_upper_bound_seconds).collect()),
        &["port"],
    )?;
    registry.register(Box::new(histogram.clone()))?;
    Ok(histogram)
}
