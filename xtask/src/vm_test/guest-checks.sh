#!/bin/bash
# Runs inside the VM as root (uploaded by `cargo xtask vm-test`): what the package and
# proxy.socket promise, under real systemd. Each command prints key=value lines the test reads.
#   guest-checks.sh state              package version, CA fingerprint, main PID and its binary
#   guest-checks.sh load ACTION        ACTION = restart | reload | kill: a client opens new
#                                      HTTPS connections one after another (at most 400, and
#                                      120 s) while ACTION happens, then counts them
#   guest-checks.sh broken-reload      `systemctl reload` with a broken setting, then fixed
#   guest-checks.sh remove-reinstall DEB
#   guest-checks.sh purge
set -euo pipefail

URL=https://localhost/
CA=/run/proxy-guest-checks-ca.pem
MAX_REQUESTS=400
MAX_SECONDS=120

ready() { curl -fsS -o /dev/null --max-time 5 http://127.0.0.1:9090/readyz 2>/dev/null; }

wait_ready() {
    local i
    for ((i = 0; i < 90; i++)); do
        ready && return 0
        sleep 1
    done
    return 1
}

main_pid() { systemctl show -p MainPID --value proxy.service; }

fingerprint() { proxy ca export --state-dir /var/lib/proxy | sed -n 's/^SHA-256 Fingerprint: *//p'; }

https_code() {
    curl -sS -o /dev/null --max-time 10 --cacert "$CA" -w '%{http_code}' "$URL" 2>/dev/null || true
}

# The answer once it is 200, or the last one after 30 s: a proxy just started marks its
# backend healthy after its first checks.
https_code_settled() {
    local i code
    for ((i = 0; i < 30; i++)); do
        code=$(https_code)
        [ "$code" = 200 ] && break
        sleep 1
    done
    echo "$code"
}

# A copy the client can read after a purge or while the state directory is replaced.
copy_ca() { [ -f "$CA" ] || cp /var/lib/proxy/ca.pem "$CA"; }

state() {
    local pid
    pid=$(main_pid)
    copy_ca
    echo "version=$(dpkg-query -W -f='${Version}' proxy)"
    echo "fingerprint=$(fingerprint)"
    echo "pid=$pid"
    # "/usr/bin/proxy (deleted)" while a process still runs a binary an upgrade replaced.
    echo "exe=$(readlink "/proc/$pid/exe")"
    echo "active=$(systemctl is-active proxy.socket proxy.service | paste -sd, -)"
    echo "env_kept=$(grep -c '^PROXY_PUBLIC_HTTPS_PORT=[0-9]' /etc/proxy/proxy.env || true)"
    echo "dpkg_files=$(find /etc/proxy -maxdepth 1 -name '*.dpkg-*' -printf '%f ' | sed 's/ $//')"
    echo "serving=$(https_code)"
}

load() {
    local action=$1 log stop client status=0 pid_before restarts_before t0 t1
    copy_ca
    log=$(mktemp)
    stop=$(mktemp -u)
    (
        n=0
        start=$SECONDS
        while [ ! -e "$stop" ] && [ "$n" -lt "$MAX_REQUESTS" ] && [ $((SECONDS - start)) -lt "$MAX_SECONDS" ]; do
            # A new connection each time; curl writes its line on failure too.
            curl -sS -o /dev/null --max-time 30 --cacert "$CA" \
                -w '%{exitcode} %{http_code} %{time_connect} %{time_starttransfer}\n' \
                "$URL" >>"$log" 2>/dev/null || true
            n=$((n + 1))
        done
    ) &
    client=$!
    sleep 3
    pid_before=$(main_pid)
    restarts_before=$(systemctl show -p NRestarts --value proxy.service)
    t0=$EPOCHREALTIME
    case $action in
        restart) systemctl restart proxy.service || status=$? ;;
        reload) systemctl reload proxy.service || status=$? ;;
        kill) kill -9 "$pid_before" ;;
        *) echo "unknown action $action" >&2; exit 2 ;;
    esac
    # A killed proxy is replaced by systemd (Restart=on-failure, RestartSec=2s).
    sleep 1
    wait_ready || status=99
    t1=$EPOCHREALTIME
    sleep 3
    touch "$stop"
    wait "$client"
    rm -f "$stop"
    echo "action=$action"
    echo "status=$status"
    echo "pid_changed=$([ "$(main_pid)" != "$pid_before" ] && echo yes || echo no)"
    echo "restarts=$(($(systemctl show -p NRestarts --value proxy.service) - restarts_before))"
    echo "ready_again_ms=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%d", (b - a) * 1000 }')"
    # curl exit 7: refused; 35, 52, 56: reset or closed after connecting.
    awk '{
            n++
            if ($1 != 0 || $2 != 200) failed++
            if ($1 == 7) refused++
            if ($1 == 35 || $1 == 52 || $1 == 56) reset++
            if ($3 > connect) connect = $3
            if ($4 > answer) answer = $4
        }
        END {
            printf "requests=%d\nfailed=%d\nrefused=%d\nreset=%d\n", n, failed, refused, reset
            printf "longest_connect_ms=%d\nlongest_answer_ms=%d\n", connect * 1000, answer * 1000
        }' "$log"
    awk '$1 != 0 || $2 != 200 { printf "failure=curl exit %s, HTTP %s\n", $1, $2 }' "$log"
    rm -f "$log"
}

broken_reload() {
    local pid saved status=0 fixed=0 since
    copy_ca
    pid=$(main_pid)
    saved=$(mktemp)
    cp -p /etc/proxy/proxy.env "$saved"
    since=$(date '+%Y-%m-%d %H:%M:%S')
    sleep 1
    echo 'PROXY_IDLE_TIMEOUT=not-a-duration' >>/etc/proxy/proxy.env
    systemctl reload proxy.service 2>/dev/null || status=$?
    echo "broken_status=$status"
    echo "pid_unchanged=$([ "$(main_pid)" = "$pid" ] && echo yes || echo no)"
    echo "active=$(systemctl is-active proxy.service)"
    echo "serving=$(https_code)"
    echo "journal=$(journalctl -u proxy.service --since "$since" --no-pager -o cat | grep -m1 -i 'not-a-duration' || true)"
    cp -p "$saved" /etc/proxy/proxy.env
    rm -f "$saved"
    systemctl reload proxy.service || fixed=$?
    echo "fixed_status=$fixed"
}

remove_reinstall() {
    local deb=$1 before
    copy_ca
    before=$(fingerprint)
    dpkg -r proxy </dev/null >/dev/null
    echo "removed=$(dpkg-query -W -f='${Status}' proxy)"
    echo "unit_after_remove=$([ -e /usr/lib/systemd/system/proxy.service ] && echo present || echo gone)"
    echo "https_after_remove=curl exit $(curl -sS -o /dev/null --max-time 5 --cacert "$CA" -w '%{exitcode}' "$URL" 2>/dev/null || true)"
    echo "ca_kept=$([ -f /var/lib/private/proxy/ca.pem ] && echo yes || echo no)"
    dpkg -i "$deb" </dev/null >/dev/null
    echo "env_kept=$(grep -c '^PROXY_PUBLIC_HTTPS_PORT=[0-9]' /etc/proxy/proxy.env || true)"
    wait_ready || echo "not_ready=yes"
    echo "fingerprint_before=$before"
    echo "fingerprint_after=$(fingerprint)"
    echo "active=$(systemctl is-active proxy.socket proxy.service proxy-backend.service | paste -sd, -)"
    echo "serving=$(https_code_settled)"
}

purge() {
    local path left=""
    dpkg --purge proxy </dev/null >/dev/null
    for path in /var/lib/proxy /var/lib/private/proxy /usr/bin/proxy /etc/proxy/proxy.env /etc/proxy/proxy.env.dpkg-dist \
        /usr/lib/systemd/system/proxy.service /usr/lib/systemd/system/proxy.socket \
        /usr/lib/systemd/system/proxy-backend.service; do
        if [ -e "$path" ] || [ -L "$path" ]; then left="$left $path"; fi
    done
    echo "left=${left# }"
    # Enable links and masks of the package's units (the monitoring drop-ins the VM added,
    # named proxy.conf, are the administrator's and stay).
    echo "unit_links=$(find /etc/systemd/system \( -name proxy.service -o -name proxy.socket \
        -o -name proxy-backend.service \) -printf '%p ' | sed 's/ $//')"
    echo "unit_files=$(systemctl list-unit-files --no-legend 'proxy*' | wc -l)"
    echo "status=$(dpkg-query -W -f='${Status}' proxy 2>/dev/null || echo not-installed)"
    rm -f "$CA"
}

case ${1:-} in
    state) state ;;
    load) load "${2:?load restart|reload|kill}" ;;
    broken-reload) broken_reload ;;
    remove-reinstall) remove_reinstall "${2:?remove-reinstall DEB}" ;;
    purge) purge ;;
    *) echo "usage: $0 state | load ACTION | broken-reload | remove-reinstall DEB | purge" >&2; exit 2 ;;
esac
