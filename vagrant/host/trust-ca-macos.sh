#!/bin/bash
# Trusts the VM proxy's local CA on macOS (System keychain, for Safari, Chrome and curl), or
# with --remove takes that trust away again. Needs an administrator password (sudo).
#
#   vagrant/host/trust-ca-macos.sh            # after `vagrant up`
#   vagrant/host/trust-ca-macos.sh --remove   # before `vagrant destroy`, or any time
#
# It reads vagrant/out/proxy-ca.pem, which provisioning copies out of the VM, and prints its
# SHA-256 fingerprint: compare it with the one `vagrant up` printed before trusting it.
# The CA is name-constrained to localhost, the VM's host name, 127.0.0.1 and ::1, so it
# cannot vouch for any other site. Firefox keeps its own store: import the file there under
# Settings > Privacy & Security > Certificates, or set security.enterprise_roots.enabled.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
pem=${PROXY_CA_PEM:-$here/../out/proxy-ca.pem}
keychain=/Library/Keychains/System.keychain

if [ ! -f "$pem" ]; then
    echo "no CA at $pem: run 'vagrant up' first (or, on a one-way synced folder:" >&2
    echo "  vagrant ssh -c 'sudo cat /var/lib/proxy/ca.pem' > vagrant/out/proxy-ca.pem)" >&2
    exit 1
fi
fingerprint=$(openssl x509 -noout -fingerprint -sha256 -in "$pem" | sed 's/^.*=//')
sha1=$(openssl x509 -noout -fingerprint -sha1 -in "$pem" | sed 's/^.*=//; s/://g')
subject=$(openssl x509 -noout -subject -in "$pem")
echo "CA certificate: $pem"
echo "  $subject"
echo "  SHA-256 Fingerprint: $fingerprint"

case ${1:-} in
    --remove)
        if security find-certificate -a -Z "$keychain" | grep -q "SHA-1 hash: $sha1"; then
            sudo security remove-trusted-cert -d "$pem" || true
            sudo security delete-certificate -Z "$sha1" "$keychain"
            echo "removed from $keychain"
        else
            echo "not in $keychain: nothing to remove"
        fi
        ;;
    "")
        if security find-certificate -a -Z "$keychain" | grep -q "SHA-1 hash: $sha1"; then
            echo "already trusted in $keychain"
        else
            sudo security add-trusted-cert -d -r trustRoot -k "$keychain" "$pem"
            echo "trusted in $keychain: the VM's https://localhost URLs now verify"
        fi
        ;;
    *)
        echo "usage: $0 [--remove]" >&2
        exit 2
        ;;
esac
