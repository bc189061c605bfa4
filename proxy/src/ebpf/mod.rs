//! The kernel observer: loads the eBPF program (crate `proxy-ebpf`, embedded at build time),
//! attaches it, registers the proxy's listening sockets and its own upstream sockets with it,
//! exports what it measures, and joins its per-connection timings to each accepted connection
//! and each upstream connection.
//!
//! Attachment: `sock_ops` on the root of the cgroup v2 hierarchy, so that it sees sockets
//! whatever cgroup created them (systemd socket activation, a predecessor handing over its
//! listeners), filtered in the kernel to this process's listeners by network namespace
//! cookie and port, and to the upstream sockets this process registered by socket cookie;
//! several proxies attach side by side (bpf links), each counting only its own sockets.
//! `tcp:tcp_receive_reset` counts resets received, matched by socket cookie.
//!
//! Upstream sockets: the connector registers each one before `connect()`
//! ([`KernelObserver::register_upstream`]) under its backend's slot; the configured backends
//! get slots with [`KernelObserver::set_backends`], at most `MAX_BACKENDS` (64) of them: the
//! rest are served without kernel metrics, after one warning.
//!
//! Degraded mode: without privilege, BTF, cgroup v2 or an embedded object the proxy serves
//! anyway, logs one warning with the reason and reports `proxy_ebpf_attached 0`, unless
//! `--ebpf required`.

mod collector;
mod kernel;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuArray};
use aya::programs::{CgroupAttachMode, SockOps, TracePoint};
use aya::{Ebpf, EbpfLoader};
use prometheus::{HistogramVec, IntGaugeVec, Opts, Registry};
use proxy_common::{ConnectionRecord, ListenerKey, MAX_BACKENDS, MAX_LISTENERS};
use strum::IntoEnumIterator as _;
use tokio::net::{TcpListener, TcpStream};

use crate::config::EbpfMode;
use crate::error_chain::error_chain;
use collector::{Arrays, BackendSlots, KernelCollector, Slot};

/// The program object, embedded when the build had `PROXY_EBPF_OBJECT` set (as every
/// `cargo xtask` build does).
#[cfg(proxy_ebpf_embedded)]
const OBJECT: Option<&[u8]> = Some(aya::include_bytes_aligned!(env!("PROXY_EBPF_OBJECT")));
#[cfg(not(proxy_ebpf_embedded))]
const OBJECT: Option<&[u8]> = None;

/// Whether this build carries the eBPF object, as `--version` and the `ebpf` label of
/// `proxy_build_info` say it.
pub(crate) const BUILD: &str = if OBJECT.is_some() {
    "embedded"
} else {
    "absent"
};

/// Why the kernel observer could not start.
#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    /// The binary was built without the eBPF object.
    #[error(
        "this build has no eBPF object (build with `cargo xtask run`, or set PROXY_EBPF_OBJECT after `cargo xtask build-ebpf`)"
    )]
    NoObject,
    /// The kernel refused the object (no privilege, no BTF, verifier).
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    /// A program could not be loaded or attached.
    #[error("{program}: {source}")]
    Program {
        program: &'static str,
        source: aya::programs::ProgramError,
    },
    /// A map is missing or could not be read or written.
    #[error("map {map}: {reason}")]
    Map { map: &'static str, reason: String },
    /// No cgroup v2 hierarchy to attach to.
    #[error("no cgroup v2 hierarchy is mounted")]
    NoCgroup2,
    /// The cgroup or a socket option could not be opened or read.
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    /// The metrics could not be registered.
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// What the kernel saw of one connection before the proxy accepted it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct KernelTimings {
    /// SYN received to ESTABLISHED; `None` if the SYN was not seen.
    pub(crate) handshake: Option<Duration>,
    /// ESTABLISHED to the proxy's `accept()`.
    pub(crate) accept_wait: Duration,
}

/// The loaded, attached program and the maps userspace uses.
pub(crate) struct KernelObserver {
    /// Owns the programs and their links: dropping it detaches everything.
    _ebpf: Ebpf,
    listeners: Mutex<BpfHashMap<MapData, ListenerKey, u32>>,
    connections: BpfHashMap<MapData, u64, ConnectionRecord>,
    slots: Arc<RwLock<Vec<Slot>>>,
    accept_wait: HistogramVec,
    /// `UPSTREAM_SOCKETS`: upstream sockets by cookie, registered here, filled in and removed
    /// by the program.
    upstream_sockets: Mutex<BpfHashMap<MapData, u64, ConnectionRecord>>,
    backend_slots: Arc<RwLock<BackendSlots>>,
    /// The backends' arrays, zeroed here when a slot changes hands.
    backend_arrays: Arc<Mutex<Arrays>>,
    /// Whether a failed registration has been reported (once per process).
    registration_failure_reported: AtomicBool,
}

impl std::fmt::Debug for KernelObserver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelObserver").finish_non_exhaustive()
    }
}

/// The programs whose attachment `proxy_ebpf_attached` reports: label `program`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, strum::EnumIter, strum::IntoStaticStr)]
#[strum(serialize_all = "snake_case")]
enum Program {
    /// Connection events on the proxy's listeners: everything but resets received.
    SockOps,
    /// The `tcp:tcp_receive_reset` tracepoint: resets received.
    TcpReceiveReset,
}

impl Program {
    fn as_str(self) -> &'static str {
        self.into()
    }
}

/// `proxy_ebpf_attached{program}`: 1 when the program is attached, else 0.
#[derive(Clone)]
struct Attached(IntGaugeVec);

impl Attached {
    fn register(registry: &Registry) -> Result<Self, EbpfError> {
        let gauge = IntGaugeVec::new(
            Opts::new(
                "proxy_ebpf_attached",
                "1 if the eBPF program is attached, else 0.",
            ),
            &["program"],
        )?;
        registry.register(Box::new(gauge.clone()))?;
        for program in Program::iter() {
            gauge.with_label_values(&[program.as_str()]).set(0);
        }
        Ok(Attached(gauge))
    }

    fn attached(&self, program: Program) {
        self.0.with_label_values(&[program.as_str()]).set(1);
    }
}

/// Starts the kernel observer as `mode` asks, its metrics in `registry`. `Ok(None)` means
/// serving without it.
pub(crate) fn start(
    mode: EbpfMode,
    registry: &Registry,
) -> Result<Option<Arc<KernelObserver>>, EbpfError> {
    let attached = Attached::register(registry)?;
    if mode == EbpfMode::Off {
        tracing::info!("kernel metrics disabled (--ebpf off)");
        return Ok(None);
    }
    let observer = KernelObserver::attach(registry, &attached);
    release_freed_memory();
    match observer {
        Ok(observer) => Ok(Some(Arc::new(observer))),
        Err(e) if mode == EbpfMode::Required => Err(e),
        Err(e) => {
            // The root cause carries the kernel's errno, which the outer messages leave out.
            let cause = crate::error_chain::root_cause(&e);
            tracing::warn!(reason = %e, %cause, "kernel metrics unavailable; serving without them (proxy_ebpf_attached 0)");
            Ok(None)
        }
    }
}

/// Loading parses the kernel's BTF (several MiB) and frees it again; the allocator keeps
/// freed pages for reuse and returns them only as it sees more work, so an idle proxy
/// would hold them resident.
fn release_freed_memory() {
    // `arena.<MALLCTL_ARENAS_ALL>.purge`: every arena's unused pages go back to the kernel.
    const PURGE_ALL_ARENAS: &std::ffi::CStr = c"arena.4096.purge";
    #[allow(
        unsafe_code,
        reason = "jemalloc's control call has no safe wrapper; see SAFETY"
    )]
    // SAFETY: the name is NUL-terminated; purge reads and writes no value, so every value
    // pointer is null and the length 0, as jemalloc requires of this command.
    let status = unsafe {
        tikv_jemalloc_sys::mallctl(
            PURGE_ALL_ARENAS.as_ptr(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        )
    };
    if status != 0 {
        tracing::debug!(status, "returning freed memory to the kernel failed");
    }
}

impl KernelObserver {
    fn attach(registry: &Registry, attached: &Attached) -> Result<Self, EbpfError> {
        let object = OBJECT.ok_or(EbpfError::NoObject)?;
        let reset_offset = kernel::receive_reset_cookie_offset();
        let mut loader = EbpfLoader::new();
        if let Ok(offset) = &reset_offset {
            loader.override_global("RECEIVE_RESET_COOKIE_OFFSET", offset, true);
        }
        let mut ebpf = loader.load(object)?;
        start_logger(&mut ebpf);

        let cgroup_root = kernel::cgroup2_root().ok_or(EbpfError::NoCgroup2)?;
        let cgroup = std::fs::File::open(&cgroup_root).map_err(|source| EbpfError::Io {
            what: format!("opening {}", cgroup_root.display()),
            source,
        })?;
        let sock_ops: &mut SockOps = program(&mut ebpf, "proxy_sock_ops")?;
        sock_ops.load().map_err(|source| EbpfError::Program {
            program: "sock_ops",
            source,
        })?;
        // A link-based attachment: several proxies can attach to the same cgroup side by side.
        sock_ops
            .attach(&cgroup, CgroupAttachMode::Single)
            .map_err(|source| EbpfError::Program {
                program: "sock_ops",
                source,
            })?;
        attached.attached(Program::SockOps);

        match reset_offset {
            Ok(_) => {
                let tracepoint: &mut TracePoint = program(&mut ebpf, "proxy_receive_reset")?;
                let outcome = tracepoint
                    .load()
                    .and_then(|()| tracepoint.attach("tcp", "tcp_receive_reset"));
                match outcome {
                    Ok(_) => attached.attached(Program::TcpReceiveReset),
                    Err(e) => tracing::warn!(
                        error = error_chain(&e),
                        hint = perf_event_hint(),
                        "resets received will not be counted"
                    ),
                }
            }
            Err(reason) => tracing::warn!(%reason, "resets received will not be counted"),
        }

        let slots = Arc::new(RwLock::new(Vec::new()));
        let backend_slots = Arc::new(RwLock::new(BackendSlots::new()));
        let backend_arrays = Arc::new(Mutex::new(Arrays::backends(
            per_cpu_array(&mut ebpf, "UPSTREAM_HISTOGRAMS")?,
            per_cpu_array(&mut ebpf, "UPSTREAM_HISTOGRAM_SUMS")?,
            per_cpu_array(&mut ebpf, "UPSTREAM_COUNTERS")?,
        )));
        let collector = KernelCollector::new(
            Arrays::listeners(
                per_cpu_array(&mut ebpf, "HISTOGRAMS")?,
                per_cpu_array(&mut ebpf, "HISTOGRAM_SUMS")?,
                per_cpu_array(&mut ebpf, "COUNTERS")?,
            ),
            slots.clone(),
            backend_arrays.clone(),
            backend_slots.clone(),
        )?;
        registry.register(Box::new(collector))?;
        let accept_wait = collector::accept_wait_histogram(registry)?;

        let listeners = take_map(&mut ebpf, "LISTENERS", BpfHashMap::try_from)?;
        let connections = take_map(&mut ebpf, "CONNECTIONS", BpfHashMap::try_from)?;
        let upstream_sockets = take_map(&mut ebpf, "UPSTREAM_SOCKETS", BpfHashMap::try_from)?;
        tracing::info!(cgroup = %cgroup_root.display(), "kernel observer attached");
        Ok(KernelObserver {
            _ebpf: ebpf,
            listeners: Mutex::new(listeners),
            connections,
            slots,
            accept_wait,
            upstream_sockets: Mutex::new(upstream_sockets),
            backend_slots,
            backend_arrays,
            registration_failure_reported: AtomicBool::new(false),
        })
    }

    /// Tells the program that `listener` is ours, so that its connections are measured
    /// under label `listener="{name}"` (the application metrics' name for it, not its port,
    /// so that rules and panels work behind any port).
    pub(crate) fn register_listener(
        &self,
        listener: &TcpListener,
        name: &'static str,
    ) -> Result<(), EbpfError> {
        let netns_cookie = kernel::netns_cookie(listener).map_err(|source| EbpfError::Io {
            what: "SO_NETNS_COOKIE".into(),
            source,
        })?;
        let port = listener
            .local_addr()
            .map_err(|source| EbpfError::Io {
                what: "listener address".into(),
                source,
            })?
            .port();
        let mut slots = self.slots.write().map_err(|_| EbpfError::Map {
            map: "LISTENERS",
            reason: "lock poisoned".into(),
        })?;
        let index = u32::try_from(slots.len()).unwrap_or(u32::MAX);
        if index >= MAX_LISTENERS {
            return Err(EbpfError::Map {
                map: "LISTENERS",
                reason: format!("at most {MAX_LISTENERS} listeners"),
            });
        }
        let key = ListenerKey {
            netns_cookie,
            port: u32::from(port),
            _pad: 0,
        };
        let mut listeners = self.listeners.lock().map_err(|_| EbpfError::Map {
            map: "LISTENERS",
            reason: "lock poisoned".into(),
        })?;
        listeners
            .insert(key, index, 0)
            .map_err(|e| EbpfError::Map {
                map: "LISTENERS",
                reason: e.to_string(),
            })?;
        slots.push(Slot {
            index,
            label: name.to_owned(),
        });
        self.accept_wait.with_label_values(&[name]);
        Ok(())
    }

    /// The kernel's timings for a connection just accepted; records its accept wait.
    pub(crate) fn join(&self, stream: &TcpStream) -> Option<KernelTimings> {
        let cookie = socket2::SockRef::from(stream).cookie().ok()?;
        let record = self.connections.get(&cookie, 0).ok()?;
        let accept_wait =
            Duration::from_nanos(kernel::monotonic_ns().saturating_sub(record.established_ns));
        let slots = self.slots.read().ok()?;
        let slot = slots.iter().find(|slot| slot.index == record.slot)?;
        self.accept_wait
            .with_label_values(&[&slot.label])
            .observe(accept_wait.as_secs_f64());
        drop(slots);
        let handshake = (record.syn_ns != 0)
            .then(|| Duration::from_nanos(record.established_ns.saturating_sub(record.syn_ns)));
        Some(KernelTimings {
            handshake,
            accept_wait,
        })
    }

    /// Makes `backends` (their `backend` label values, e.g. `10.0.0.5:8080`) the backends
    /// measured in the kernel: at start and after each reload. Each gets a slot and its series
    /// at 0; backends that stay keep theirs; removed ones release theirs and their series
    /// disappear. Their connections still open (draining) keep counting into the released slot
    /// until they close; the slot is given to a new backend only once no registered socket
    /// uses it, unless no other slot is free (see `collector::BackendSlots`). Beyond
    /// `MAX_BACKENDS` backends the extra ones are served without kernel metrics, after one
    /// warning.
    pub(crate) fn set_backends(&self, backends: &[String]) {
        // Writers of the slots, then the socket map, then the arrays: the order every caller
        // takes them in. Holding the slots' write lock keeps registrations out until the
        // slots given out are zeroed.
        let mut slots = self
            .backend_slots
            .write()
            .unwrap_or_else(|e| e.into_inner());
        let in_use = self.backend_slots_in_use();
        let assignment = slots.assign(backends, &in_use);
        let mut arrays = self
            .backend_arrays
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for &slot in &assignment.given {
            if let Err(e) = arrays.zero_slot(slot) {
                tracing::warn!(error = %e, slot, "could not zero a backend's kernel counters: they may start above 0");
            }
        }
        if !assignment.unmeasured.is_empty() {
            tracing::warn!(
                max = MAX_BACKENDS,
                unmeasured = ?assignment.unmeasured,
                "more backends than the kernel observer measures: these are served without kernel metrics"
            );
        }
    }

    /// Backend slots that sockets still registered in `UPSTREAM_SOCKETS` use.
    fn backend_slots_in_use(&self) -> HashSet<u32> {
        let sockets = self
            .upstream_sockets
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        sockets
            .iter()
            .filter_map(|entry| entry.ok())
            .map(|(_, record)| record.slot)
            .collect()
    }

    /// Registers an upstream socket of `backend`, before its `connect()`, so that the kernel
    /// measures its connect time and what happens to it until it closes. Returns its socket
    /// cookie, the key of [`KernelObserver::upstream_connect_time`]; `None` when it is not
    /// measured (the backend has no slot: warned once per backend). If `connect()` then fails,
    /// call [`KernelObserver::unregister_upstream`] after closing the socket.
    pub(crate) fn register_upstream(&self, socket: &socket2::Socket, backend: &str) -> Option<u64> {
        let slots = self.backend_slots.read().unwrap_or_else(|e| e.into_inner());
        let Some(slot) = slots.slot_of(backend) else {
            drop(slots);
            let mut slots = self
                .backend_slots
                .write()
                .unwrap_or_else(|e| e.into_inner());
            if slots.first_warning(backend) {
                tracing::warn!(
                    backend,
                    max = MAX_BACKENDS,
                    "no kernel metrics for this backend's connections: it is not among the configured backends the kernel observer measures"
                );
            }
            return None;
        };
        let record = ConnectionRecord {
            syn_ns: 0,
            established_ns: 0,
            slot,
            flags: 0,
        };
        // Under the slots' read lock, so that `set_backends` cannot hand the slot to another
        // backend between the lookup and the insert.
        let registered = socket.cookie().and_then(|cookie| {
            let mut sockets = self
                .upstream_sockets
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            sockets
                .insert(cookie, record, 0)
                .map(|()| cookie)
                .map_err(std::io::Error::other)
        });
        drop(slots);
        match registered {
            Ok(cookie) => Some(cookie),
            Err(e) => {
                if !self
                    .registration_failure_reported
                    .swap(true, Ordering::Relaxed)
                {
                    tracing::warn!(error = %e, backend, "could not register an upstream socket with the kernel observer: some upstream connections are not measured (reported once)");
                }
                None
            }
        }
    }

    /// Forgets an upstream socket whose `connect()` failed. The program removes the sockets it
    /// saw close; this covers a `connect()` that failed before the kernel sent a SYN.
    pub(crate) fn unregister_upstream(&self, cookie: u64) {
        let mut sockets = self
            .upstream_sockets
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let _ = sockets.remove(&cookie);
    }

    /// The kernel's connect time of an established upstream socket: SYN sent to ESTABLISHED
    /// (SYN retransmissions included). `None` if the socket is not registered or the kernel
    /// did not see both events.
    pub(crate) fn upstream_connect_time(&self, cookie: u64) -> Option<Duration> {
        let record = self
            .upstream_sockets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&cookie, 0)
            .ok()?;
        (record.syn_ns != 0 && record.established_ns != 0)
            .then(|| Duration::from_nanos(record.established_ns.saturating_sub(record.syn_ns)))
    }
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, EbpfError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let program = ebpf.program_mut(name).ok_or(EbpfError::Map {
        map: name,
        reason: "program missing from the object".into(),
    })?;
    program.try_into().map_err(|source| EbpfError::Program {
        program: name,
        source,
    })
}

fn take_map<T>(
    ebpf: &mut Ebpf,
    name: &'static str,
    convert: impl FnOnce(aya::maps::Map) -> Result<T, aya::maps::MapError>,
) -> Result<T, EbpfError> {
    let map = ebpf.take_map(name).ok_or(EbpfError::Map {
        map: name,
        reason: "missing from the object".into(),
    })?;
    convert(map).map_err(|e| EbpfError::Map {
        map: name,
        reason: e.to_string(),
    })
}

fn per_cpu_array(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<PerCpuArray<MapData, u64>, EbpfError> {
    take_map(ebpf, name, PerCpuArray::try_from)
}

/// Forwards aya-log records from the program into `tracing` (through the `log` bridge).
fn start_logger(ebpf: &mut Ebpf) {
    let logger = match aya_log::EbpfLogger::init(ebpf) {
        Ok(logger) => logger,
        Err(e) => {
            tracing::debug!(error = %e, "eBPF logs unavailable");
            return;
        }
    };
    // The program logs only rare diagnostics: polling beats registering its fd with the reactor.
    let mut logger = logger;
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            logger.flush();
        }
    });
}

/// Why a tracepoint may be refused although the process has `CAP_PERFMON`: Debian's kernels
/// add `kernel.perf_event_paranoid = 3`, which reserves `perf_event_open` to `CAP_SYS_ADMIN`.
fn perf_event_hint() -> &'static str {
    let paranoid = std::fs::read_to_string("/proc/sys/kernel/perf_event_paranoid")
        .ok()
        .and_then(|v| v.trim().parse::<i32>().ok());
    match paranoid {
        Some(level) if level > 2 => {
            "kernel.perf_event_paranoid is above 2 (Debian's default 3 lets only CAP_SYS_ADMIN open tracepoints): set it to 2, the upstream default, e.g. in /etc/sysctl.d/"
        }
        _ => "",
    }
}
