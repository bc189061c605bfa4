#!/bin/bash
# Provisions the proxy appliance inside the Vagrant VM (Debian 12), as root:
#   the proxy's Debian package (built on the host, or here), which installs the binary, the
#   units of deploy/systemd and the monitoring files; the VM's own settings; Prometheus,
#   Alertmanager and Grafana with the package's monitoring files; then the CA exported to
#   the host through the synced folder.
#
# Idempotent: every step checks before it acts, so a second run changes nothing and says so
# on its last line ("provisioning changed nothing"). Switches (set on the host, passed on by
# the Vagrantfile):
#   PROXY_VM_PREBUILT=1  install the newest vagrant/bin/proxy_*_amd64.deb from the synced
#                        folder instead of building (a CI VM reaches no crates.io, and
#                        compiling under emulation is slow)
#   PROXY_VM_GRAFANA=0   skip Grafana (its apt repository is not the Debian mirror)
#   PROXY_VM_HOST_PORT_{HTTP,HTTPS,GRAFANA,PROMETHEUS,ALERTMANAGER}
#                        the host ports the Vagrantfile forwards (8080, 8443, 3000, 9091,
#                        9093 unless one was busy): redirects name the HTTPS one
set -euo pipefail

SRC=${PROXY_VM_SRC:-/proxy-src}
OUT=$SRC/vagrant/out
PREBUILT=${PROXY_VM_PREBUILT:-0}
GRAFANA=${PROXY_VM_GRAFANA:-1}
HTTP_PORT=${PROXY_VM_HOST_PORT_HTTP:-8080}
HTTPS_PORT=${PROXY_VM_HOST_PORT_HTTPS:-8443}
GRAFANA_PORT=${PROXY_VM_HOST_PORT_GRAFANA:-3000}
PROMETHEUS_PORT=${PROXY_VM_HOST_PORT_PROMETHEUS:-9091}
ALERTMANAGER_PORT=${PROXY_VM_HOST_PORT_ALERTMANAGER:-9093}
for port in "$HTTP_PORT" "$HTTPS_PORT" "$GRAFANA_PORT" "$PROMETHEUS_PORT" "$ALERTMANAGER_PORT"; do
    [[ $port =~ ^[0-9]+$ ]] || { echo "provision: host port $port is not a number" >&2; exit 1; }
done
BUILD_DIR=/var/cache/proxy-build
# The package installed last and the one before it, for the rollback.
KEEP=/var/lib/proxy-provision
BIN=/usr/bin/proxy
SHARE=/usr/share/proxy/monitoring
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
        elif systemctl start "$unit"; then
            changed "started $unit"
        else
            echo "   failed: start $unit (journalctl -u $unit)"
        fi
    done
}

wait_ready() {  # URL SECONDS
    # Each try is bounded: a socket-activated port whose service cannot start accepts the
    # connection into the kernel's queue and never answers.
    local deadline=$((SECONDS + $2))
    while [ "$SECONDS" -lt "$deadline" ]; do
        curl -fsS --max-time 5 -o /dev/null "$1" 2>/dev/null && return 0
        sleep 1
    done
    return 1
}

step "base packages"
[ -d "$SRC/deploy/systemd" ] || die "$SRC/deploy/systemd not found: is the project synced to $SRC?"
packages ca-certificates curl openssl

# The newest of the packages given (dpkg's version order).
newest_deb() {
    local best="" deb
    for deb in "$@"; do
        [ -f "$deb" ] || continue
        if [ -z "$best" ] || dpkg --compare-versions "$(dpkg-deb -f "$deb" Version)" gt "$(dpkg-deb -f "$best" Version)"; then
            best=$deb
        fi
    done
    [ -n "$best" ] && echo "$best"
}

# What a package holds, whatever the time stamps of its build: version and file checksums.
deb_id() {
    dpkg-deb -f "$1" Version
    dpkg-deb -I "$1" md5sums
}

# dpkg -i without a prompt. The VM's /etc/proxy/proxy.env is a conffile this script edits
# (below): a package with a changed default keeps the VM's file and leaves its own beside it
# as proxy.env.dpkg-dist, which is said.
install_deb() {
    dpkg -i --force-confdef --force-confold "$1" </dev/null
    if [ -f /etc/proxy/proxy.env.dpkg-dist ]; then
        echo "   note: proxy $(dpkg-deb -f "$1" Version) ships a changed /etc/proxy/proxy.env; the VM's settings were kept, the package's defaults are in /etc/proxy/proxy.env.dpkg-dist"
    fi
}

step "proxy package"
if [ "$PREBUILT" = 1 ]; then
    DEB=$(newest_deb "$SRC"/vagrant/bin/proxy_*_amd64.deb) || die "PROXY_VM_PREBUILT=1 but there is no vagrant/bin/proxy_*_amd64.deb: build it on the host with cargo xtask package --out-dir vagrant/bin"
    echo "   using the prebuilt $DEB"
else
    # Debian's rustc-web/cargo-web (1.96) build both sides; bpf-linker from
    # crates.io against LLVM 22; cargo xtask package installs cargo-deb.
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
    (cd "$SRC" && cargo xtask package --no-check --out-dir "$BUILD_DIR/debian")
    DEB=$(newest_deb "$BUILD_DIR"/debian/proxy_*_amd64.deb) || die "cargo xtask package wrote no package"
fi
PROXY_UPDATED=0
if dpkg-query -W -f='${Status}' proxy 2>/dev/null | grep -q ' installed$' &&
    [ -f "$KEEP/current.deb" ] && [ "$(deb_id "$DEB")" = "$(deb_id "$KEEP/current.deb")" ]; then
    unchanged "proxy $(dpkg-query -W -f='${Version}' proxy)"
else
    # Canary: the new binary validates the live configuration before anything is replaced.
    CANARY=$(mktemp -d)
    dpkg-deb --fsys-tarfile "$DEB" | tar -x -C "$CANARY" ./usr/bin/proxy
    # shellcheck source=/dev/null
    (set -a; [ ! -f /etc/proxy/proxy.env ] || . /etc/proxy/proxy.env; "$CANARY/usr/bin/proxy" check >/dev/null) ||
        { rm -rf "$CANARY"; die "the new package's proxy rejects the configuration: nothing installed"; }
    rm -rf "$CANARY"
    install -d -m 0755 "$KEEP"
    [ -f "$KEEP/current.deb" ] && mv -f "$KEEP/current.deb" "$KEEP/previous.deb"
    # The package's scripts enable and start proxy.socket and proxy.service, and restart the
    # service on an upgrade.
    install_deb "$DEB"
    cp "$DEB" "$KEEP/current.deb"
    changed "installed proxy $(dpkg-deb -f "$DEB" Version)"
    PROXY_UPDATED=1
    needs_restart proxy-backend.service
fi

step "kernel settings (the package's /usr/lib/sysctl.d/60-proxy.conf)"
# The package applies it when installed; a VM provisioned before that gets it here.
if [ "$(cat /proc/sys/kernel/perf_event_paranoid)" = 2 ]; then
    unchanged "kernel.perf_event_paranoid = 2"
else
    /lib/systemd/systemd-sysctl 60-proxy.conf
    changed "kernel.perf_event_paranoid = 2"
    # The observer attaches its tracepoint at start.
    needs_restart proxy.service
fi

step "the VM's settings"
# Redirects name the host's forwarded HTTPS port; GET / goes to the backend. Everything else
# is the shipped default.
if put_text /etc/proxy/proxy.env 0644 <<ENV
# Written by vagrant/provision.sh: PROXY_* settings of proxy.service (see \`proxy serve --help\`).
PROXY_PUBLIC_HTTPS_PORT=$HTTPS_PORT
PROXY_UPSTREAM=http://127.0.0.1:8080
ENV
then needs_restart proxy.service; else unchanged /etc/proxy/proxy.env; fi

step "monitoring configuration from the package ($SHARE)"
for f in prometheus/prometheus.yml prometheus/rules/recording.yml prometheus/rules/alerts.yml \
    alertmanager/alertmanager.yml; do
    if put "$SHARE/$f" "$MONITORING/$f" 0644; then
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
    for pair in "$SHARE/systemd/$unit.service.d/proxy.conf:proxy.conf" \
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
    step "Grafana from its official repository, provisioned from the package's grafana/"
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
    if put "$SHARE/grafana/provisioning/datasources/prometheus.yml" \
        /etc/grafana/provisioning/datasources/proxy-prometheus.yml 0644; then
        needs_restart grafana-server.service
    else
        unchanged datasource
    fi
    if put "$SHARE/grafana/provisioning/dashboards/dashboards.yml" \
        /etc/grafana/provisioning/dashboards/proxy.yml 0644; then
        needs_restart grafana-server.service
    else
        unchanged "dashboard provider"
    fi
    # The provider re-reads this directory every 30 s: no restart for a dashboard change.
    for f in "$SHARE"/grafana/dashboards/*.json; do
        put "$f" "/var/lib/grafana/dashboards/proxy/$(basename "$f")" 0644 || unchanged "$(basename "$f")"
    done
else
    step "Grafana skipped (PROXY_VM_GRAFANA=0)"
fi

step "services"
UNITS=(proxy-backend.service proxy.socket proxy.service prometheus.service prometheus-alertmanager.service)
[ "$GRAFANA" = 1 ] && UNITS+=(grafana-server.service)
# A unit that fails to (re)start is reported here and judged by the readiness checks below,
# which roll a new proxy package back.
for unit in $(printf '%s\n' "${RESTART[@]}" | sort -u); do
    if [[ " ${UNITS[*]} " == *" $unit "* ]] && systemctl is-active --quiet "$unit"; then
        if systemctl restart "$unit"; then
            changed "restarted $unit"
        else
            echo "   failed: restart $unit (journalctl -u $unit)"
        fi
    fi
done
enable_now "${UNITS[@]}"

if ! wait_ready http://127.0.0.1:9090/readyz 60; then
    if [ "$PROXY_UPDATED" = 1 ] && [ -f "$KEEP/previous.deb" ]; then
        # Rollback: the new package did not become ready; the previous one serves again (a
        # downgrade, which dpkg allows; its postinst restarts proxy.service, which may have
        # hit its start limit meanwhile).
        NEW_VERSION=$(dpkg-query -W -f='${Version}' proxy)
        systemctl reset-failed proxy.service || true
        install_deb "$KEEP/previous.deb"
        mv -f "$KEEP/previous.deb" "$KEEP/current.deb"
        OLD_VERSION=$(dpkg-deb -f "$KEEP/current.deb" Version)
        wait_ready http://127.0.0.1:9090/readyz 60 ||
            die "proxy $NEW_VERSION did not become ready within 60 s; rolled back to proxy $OLD_VERSION, which is not ready either (journalctl -u proxy)"
        die "proxy $NEW_VERSION did not become ready within 60 s; rolled back to proxy $OLD_VERSION, which serves (journalctl -u proxy)"
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
ATTACHED=$(curl -fsS --max-time 10 http://127.0.0.1:9090/metrics | sed -n 's/^proxy_ebpf_attached{program="\(.*\)"} \(.*\)/\1=\2/p' | paste -sd ' ')
URLS=$(printf '  %-30s %s\n' \
    "https://localhost:$HTTPS_PORT/" "Hello SRE! (through the backend)" \
    "http://localhost:$HTTP_PORT/" "308 to https://localhost:$HTTPS_PORT/" \
    "http://localhost:$GRAFANA_PORT/" 'Grafana (admin/admin the first time), folder "Proxy"' \
    "http://localhost:$PROMETHEUS_PORT/" "Prometheus (targets, rules, alerts)" \
    "http://localhost:$ALERTMANAGER_PORT/" "Alertmanager")
[ "$GRAFANA" = 1 ] || URLS=$(grep -v Grafana <<<"$URLS")

cat <<MSG

The proxy appliance is up (kernel observer: ${ATTACHED:-unknown}).
$URLS
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
