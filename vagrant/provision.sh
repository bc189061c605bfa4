#!/bin/bash
# Provisions the proxy appliance inside the Vagrant VM (Debian 12), as root:
#   toolchain and build (or binaries from the synced folder), the systemd units of
#   deploy/systemd exactly as shipped, Prometheus, Alertmanager and Grafana with monitoring/,
#   then the CA exported to the host through the synced folder.
#
# Idempotent: every step checks before it acts, so a second run changes nothing and says so
# on its last line ("provisioning changed nothing"). Switches (set on the host, passed on by
# the Vagrantfile):
#   PROXY_VM_PREBUILT=1  use vagrant/bin/proxy from the synced folder instead of building
#                        (a CI VM reaches no crates.io, and compiling under emulation is slow)
#   PROXY_VM_GRAFANA=0   skip Grafana (its apt repository is not the Debian mirror)
set -euo pipefail

SRC=${PROXY_VM_SRC:-/proxy-src}
OUT=$SRC/vagrant/out
PREBUILT=${PROXY_VM_PREBUILT:-0}
GRAFANA=${PROXY_VM_GRAFANA:-1}
BUILD_DIR=/var/cache/proxy-build
BIN=/usr/local/bin/proxy
UNIT_DIR=/etc/systemd/system
MONITORING=/etc/proxy/monitoring
export DEBIAN_FRONTEND=noninteractive

CHANGES=0
APT_UPDATED=0
RESTART=()   # units to restart because something they read changed
RELOAD=0     # systemd unit files changed

step() { printf '\n== %s\n' "$*"; }
changed() { CHANGES=$((CHANGES + 1)); echo "   changed: $*"; }
unchanged() { echo "   unchanged: $*"; }
die() { echo "provision: $*" >&2; exit 1; }
needs_restart() { RESTART+=("$@"); }

# Installs the Debian packages of "$@" that are not installed yet.
packages() {
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q ' installed$' || missing+=("$p")
    done
    if [ ${#missing[@]} -eq 0 ]; then
        unchanged "packages $*"
        return
    fi
    if [ "$APT_UPDATED" = 0 ]; then
        apt-get update -q
        APT_UPDATED=1
    fi
    apt-get install -y -q --no-install-recommends "${missing[@]}"
    changed "installed ${missing[*]}"
}

# Copies SRC to DEST (mode MODE) unless DEST already has the same bytes; returns 1 if unchanged.
put() {
    local src=$1 dest=$2 mode=$3
    if [ -f "$dest" ] && cmp -s "$src" "$dest"; then
        return 1
    fi
    install -D -m "$mode" "$src" "$dest"
    changed "$dest"
}

# Writes stdin to DEST (mode MODE) unless DEST already holds it; returns 1 if unchanged.
put_text() {
    local dest=$1 mode=$2 tmp
    tmp=$(mktemp)
    cat > "$tmp"
    local rc=0
    put "$tmp" "$dest" "$mode" || rc=$?
    rm -f "$tmp"
    return "$rc"
}

enable_now() {
    local unit
    for unit in "$@"; do
        if systemctl is-enabled --quiet "$unit"; then
            unchanged "$unit enabled"
        else
            systemctl enable "$unit"
            changed "enabled $unit"
        fi
        if systemctl is-active --quiet "$unit"; then
            unchanged "$unit active"
        else
            systemctl start "$unit"
            changed "started $unit"
        fi
    done
}

wait_ready() {  # URL SECONDS
    local i
    for ((i = 0; i < $2; i++)); do
        curl -fsS -o /dev/null "$1" 2>/dev/null && return 0
        sleep 1
    done
    return 1
}

step "base packages"
[ -d "$SRC/deploy/systemd" ] || die "$SRC/deploy/systemd not found: is the project synced to $SRC?"
packages ca-certificates curl openssl

step "proxy binary"
if [ "$PREBUILT" = 1 ]; then
    NEW=$SRC/vagrant/bin/proxy
    [ -x "$NEW" ] || die "PROXY_VM_PREBUILT=1 but $NEW is missing: build it on the host (cargo xtask build-ebpf, then PROXY_EBPF_OBJECT=target/bpf/bpfel-unknown-none/release/proxy-ebpf cargo build --release -p proxy) and copy target/release/proxy there"
    echo "   using the prebuilt $NEW"
else
    # toolchain.md: Debian's rustc-web/cargo-web (1.96) build both sides; bpf-linker from
    # crates.io against LLVM 22.
    packages build-essential cargo-web rustc-web libstd-rust-web-dev-bpf llvm-22-dev libpolly-22-dev libzstd-dev
    if [ -x /root/.cargo/bin/bpf-linker ] && /root/.cargo/bin/bpf-linker --version | grep -q ' 0\.13\.0'; then
        unchanged "bpf-linker 0.13.0"
    else
        LLVM_PREFIX=/usr/lib/llvm-22 cargo install --locked bpf-linker --version 0.13.0 \
            --no-default-features --features llvm-22
        changed "bpf-linker 0.13.0"
    fi
    export PATH=/root/.cargo/bin:$PATH CARGO_TARGET_DIR=$BUILD_DIR/target
    # Cargo builds nothing when nothing changed; the source stays read-only in the synced folder.
    (cd "$SRC" && cargo xtask build-ebpf)
    (cd "$SRC" && PROXY_EBPF_OBJECT=$CARGO_TARGET_DIR/bpf/bpfel-unknown-none/release/proxy-ebpf \
        cargo build --release --locked -p proxy)
    NEW=$CARGO_TARGET_DIR/release/proxy
fi
PROXY_UPDATED=0
if [ -f "$BIN" ] && cmp -s "$NEW" "$BIN"; then
    unchanged "$BIN"
else
    # Canary: the new binary validates the live configuration before it replaces anything;
    # the one it replaces is kept as proxy.previous for the rollback below.
    # shellcheck source=/dev/null
    (set -a; [ ! -f /etc/proxy/proxy.env ] || . /etc/proxy/proxy.env; "$NEW" check >/dev/null) || die "the new binary rejects the configuration: $BIN left as it was"
    [ -f "$BIN" ] && cp -p "$BIN" "$BIN.previous"
    install -m 0755 "$NEW" "$BIN.new" && mv -f "$BIN.new" "$BIN"
    changed "$BIN"
    PROXY_UPDATED=1
    needs_restart proxy.service proxy-backend.service
fi

step "kernel settings from deploy/sysctl.d"
put "$SRC/deploy/sysctl.d/60-proxy.conf" /etc/sysctl.d/60-proxy.conf 0644 || unchanged /etc/sysctl.d/60-proxy.conf
if [ "$(cat /proc/sys/kernel/perf_event_paranoid)" = 2 ]; then
    unchanged "kernel.perf_event_paranoid = 2"
else
    sysctl -q -p /etc/sysctl.d/60-proxy.conf
    changed "kernel.perf_event_paranoid = 2"
    # The observer attaches its tracepoint at start.
    needs_restart proxy.service
fi

step "systemd units from deploy/systemd"
install -d -m 0755 /usr/local/lib/proxy
put "$SRC/deploy/systemd/proxy-tracefs" /usr/local/lib/proxy/proxy-tracefs 0755 || unchanged proxy-tracefs
for unit in proxy.socket proxy.service proxy-backend.service; do
    if put "$SRC/deploy/systemd/$unit" "$UNIT_DIR/$unit" 0644; then
        RELOAD=1
        needs_restart "$unit"
    else
        unchanged "$unit"
    fi
done
# The VM's own settings: redirects name the host's forwarded port 8443; GET / goes to the
# backend. Everything else is the shipped default.
if put_text /etc/proxy/proxy.env 0644 <<'ENV'
# Written by vagrant/provision.sh: PROXY_* settings of proxy.service (see `proxy serve --help`).
PROXY_PUBLIC_HTTPS_PORT=8443
PROXY_UPSTREAM=http://127.0.0.1:8080
ENV
then needs_restart proxy.service; else unchanged /etc/proxy/proxy.env; fi

step "monitoring configuration from monitoring/"
for f in prometheus/prometheus.yml prometheus/rules/recording.yml prometheus/rules/alerts.yml \
    alertmanager/alertmanager.yml; do
    if put "$SRC/monitoring/$f" "$MONITORING/$f" 0644; then
        case $f in
            prometheus/*) needs_restart prometheus.service ;;
            alertmanager/*) needs_restart prometheus-alertmanager.service ;;
        esac
    else
        unchanged "$MONITORING/$f"
    fi
done
# Drop-ins first, so that the packages' first start already uses 9091/9093 (9090 is the
# proxy's admin listener), then the VM's own drop-ins that open them to the forwarded ports.
for unit in prometheus prometheus-alertmanager grafana-server; do
    for pair in "$SRC/deploy/systemd/$unit.service.d/proxy.conf:proxy.conf" \
        "$SRC/vagrant/systemd/$unit.service.d/vagrant.conf:vagrant.conf"; do
        if put "${pair%%:*}" "$UNIT_DIR/$unit.service.d/${pair##*:}" 0644; then
            RELOAD=1
            needs_restart "$unit.service"
        else
            unchanged "$unit.service.d/${pair##*:}"
        fi
    done
done
if [ "$RELOAD" = 1 ]; then
    systemctl daemon-reload
fi
packages prometheus prometheus-alertmanager

if [ "$GRAFANA" = 1 ]; then
    step "Grafana from its official repository, provisioned from monitoring/grafana"
    install -d -m 0755 /etc/apt/keyrings
    if [ -s /etc/apt/keyrings/grafana.asc ]; then
        unchanged /etc/apt/keyrings/grafana.asc
    else
        curl -fsSL https://apt.grafana.com/gpg.key -o /etc/apt/keyrings/grafana.asc
        changed /etc/apt/keyrings/grafana.asc
    fi
    if put_text /etc/apt/sources.list.d/grafana.sources 0644 <<'SOURCES'
Types: deb
URIs: https://apt.grafana.com
Suites: stable
Components: main
Signed-By: /etc/apt/keyrings/grafana.asc
SOURCES
    then APT_UPDATED=0; else unchanged grafana.sources; fi
    packages grafana
    if put "$SRC/monitoring/grafana/provisioning/datasources/prometheus.yml" \
        /etc/grafana/provisioning/datasources/proxy-prometheus.yml 0644; then
        needs_restart grafana-server.service
    else
        unchanged datasource
    fi
    if put "$SRC/monitoring/grafana/provisioning/dashboards/dashboards.yml" \
        /etc/grafana/provisioning/dashboards/proxy.yml 0644; then
        needs_restart grafana-server.service
    else
        unchanged "dashboard provider"
    fi
    # The provider re-reads this directory every 30 s: no restart for a dashboard change.
    for f in "$SRC"/monitoring/grafana/dashboards/*.json; do
        put "$f" "/var/lib/grafana/dashboards/proxy/$(basename "$f")" 0644 || unchanged "$(basename "$f")"
    done
else
    step "Grafana skipped (PROXY_VM_GRAFANA=0)"
fi

step "services"
UNITS=(proxy-backend.service proxy.socket proxy.service prometheus.service prometheus-alertmanager.service)
[ "$GRAFANA" = 1 ] && UNITS+=(grafana-server.service)
if [[ " ${RESTART[*]} " == *" proxy.socket "* ]] && systemctl is-active --quiet proxy.socket; then
    # systemd refuses to restart a socket whose service runs: stop both, start below.
    systemctl stop proxy.service proxy.socket
    changed "stopped proxy.socket and proxy.service for the new socket unit"
fi
for unit in $(printf '%s\n' "${RESTART[@]}" | sort -u); do
    if [[ " ${UNITS[*]} " == *" $unit "* ]] && systemctl is-active --quiet "$unit"; then
        systemctl restart "$unit"
        changed "restarted $unit"
    fi
done
enable_now "${UNITS[@]}"

if ! wait_ready http://127.0.0.1:9090/readyz 60; then
    if [ "$PROXY_UPDATED" = 1 ] && [ -f "$BIN.previous" ]; then
        # Rollback: the new binary did not become ready; the previous one serves again.
        mv -f "$BIN.previous" "$BIN"
        systemctl restart proxy.service
        die "the new proxy did not become ready within 60 s; rolled back to the previous binary (journalctl -u proxy)"
    fi
    die "the proxy did not become ready within 60 s (journalctl -u proxy)"
fi
wait_ready http://127.0.0.1:9091/-/ready 60 || die "Prometheus is not ready (journalctl -u prometheus)"
wait_ready http://127.0.0.1:9093/-/ready 60 || die "Alertmanager is not ready (journalctl -u prometheus-alertmanager)"
if [ "$GRAFANA" = 1 ]; then
    wait_ready http://127.0.0.1:3000/api/health 90 || die "Grafana is not ready (journalctl -u grafana-server)"
fi

step "CA for the host (synced folder vagrant/out)"
install -d -m 0755 "$OUT"
put /var/lib/proxy/ca.pem "$OUT/proxy-ca.pem" 0644 || unchanged "$OUT/proxy-ca.pem"
FINGERPRINT=$("$BIN" ca export --state-dir /var/lib/proxy | sed -n 's/^SHA-256 Fingerprint: *//p')
printf '%s\n' "$FINGERPRINT" | put_text "$OUT/proxy-ca.sha256" 0644 || unchanged "$OUT/proxy-ca.sha256"
ATTACHED=$(curl -fsS http://127.0.0.1:9090/metrics | sed -n 's/^proxy_ebpf_attached{program="\(.*\)"} \(.*\)/\1=\2/p' | paste -sd ' ')

cat <<MSG

The proxy appliance is up (kernel observer: ${ATTACHED:-unknown}).
  https://localhost:8443/        Hello SRE! (through the backend)
  http://localhost:8080/         308 to https://localhost:8443/
  http://localhost:3000/         Grafana (admin/admin the first time), folder "Proxy"
  http://localhost:9091/         Prometheus (targets, rules, alerts)
  http://localhost:9093/         Alertmanager
CA certificate: vagrant/out/proxy-ca.pem on the host
  SHA-256 Fingerprint: $FINGERPRINT
  trust it: vagrant/host/trust-ca-windows.ps1 (Windows), vagrant/host/trust-ca-macos.sh (macOS);
  compare the fingerprint they show with this one. Undo: -Remove / --remove.
  No two-way synced folder (libvirt, rsync)? vagrant ssh -c 'sudo cat /var/lib/proxy/ca.pem' > vagrant/out/proxy-ca.pem
MSG
if [ "$CHANGES" = 0 ]; then
    echo "provisioning changed nothing"
else
    echo "provisioning changed $CHANGES things"
fi
