//! Accept-queue overflows: connections the kernel refused or dropped because a listening
//! socket's accept queue was full. The kernel counts these per network namespace
//! (`ListenOverflows`, `ListenDrops` in `/proc/net/netstat`), not per socket, so these
//! counters cover the proxy's namespace; in the appliance's own namespace or container
//! that is the proxy's listeners. Read at scrape time; needs no privilege.

use std::collections::HashMap;

use prometheus::core::{Collector, Desc};
use prometheus::proto::{Counter, Metric, MetricFamily, MetricType};

const FAMILIES: [(&str, &str, &str); 2] = [
    (
        "ListenOverflows",
        "proxy_tcp_listen_overflows_total",
        "Connections dropped because an accept queue was full (the proxy's network namespace).",
    ),
    (
        "ListenDrops",
        "proxy_tcp_listen_drops_total",
        "SYNs and handshakes dropped by listening sockets for any reason, overflows included (the proxy's network namespace).",
    ),
];

/// Reads the namespace's listen counters on every scrape.
pub(crate) struct ListenQueueCollector {
    descs: Vec<Desc>,
}

impl ListenQueueCollector {
    pub(crate) fn new() -> prometheus::Result<Self> {
        let descs = FAMILIES
            .iter()
            .map(|(_, name, help)| {
                Desc::new(
                    (*name).to_owned(),
                    (*help).to_owned(),
                    vec![],
                    HashMap::new(),
                )
            })
            .collect::<prometheus::Result<_>>()?;
        Ok(ListenQueueCollector { descs })
    }
}

impl Collector for ListenQueueCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let Ok(netstat) = std::fs::read_to_string("/proc/self/net/netstat") else {
            return Vec::new();
        };
        FAMILIES
            .iter()
            .filter_map(|(field, name, help)| {
                let value = tcp_ext_field(&netstat, field)?;
                let mut counter = Counter::default();
                counter.set_value(value as f64);
                let mut metric = Metric::default();
                metric.set_counter(counter);
                let mut family = MetricFamily::default();
                family.set_name((*name).to_owned());
                family.set_help((*help).to_owned());
                family.set_field_type(MetricType::COUNTER);
                family.set_metric(vec![metric]);
                Some(family)
            })
            .collect()
    }
}

/// A `TcpExt:` field of `/proc/net/netstat` (a header line of names, then a line of values).
fn tcp_ext_field(netstat: &str, field: &str) -> Option<u64> {
    let mut lines = netstat.lines().filter(|line| line.starts_with("TcpExt:"));
    let names = lines.next()?;
    let values = lines.next()?;
    let index = names.split_whitespace().position(|name| name == field)?;
    values.split_whitespace().nth(index)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_tcp_ext_fields() {
        let netstat = "TcpExt: SyncookiesSent ListenOverflows ListenDrops\nTcpExt: 1 7 9\nIpExt: InNoRoutes\nIpExt: 3\n";
        assert_eq!(tcp_ext_field(netstat, "ListenOverflows"), Some(7));
        assert_eq!(tcp_ext_field(netstat, "ListenDrops"), Some(9));
        assert_eq!(tcp_ext_field(netstat, "InNoRoutes"), None);
    }
}
