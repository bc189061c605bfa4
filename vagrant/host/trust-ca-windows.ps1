# Trusts the VM proxy's local CA for the current Windows user (Edge, Chrome, curl.exe and
# PowerShell use that store), or with -Remove takes that trust away again. No administrator
# rights needed; Windows asks for confirmation when a root is added or removed.
#
#   powershell -ExecutionPolicy Bypass -File vagrant\host\trust-ca-windows.ps1          # after vagrant up
#   powershell -ExecutionPolicy Bypass -File vagrant\host\trust-ca-windows.ps1 -Remove  # undo
#
# It reads vagrant\out\proxy-ca.pem, which provisioning copies out of the VM, and prints its
# SHA-256 fingerprint: compare it with the one `vagrant up` printed before trusting it.
# The CA is name-constrained to localhost, the VM's host name, 127.0.0.1 and ::1, so it
# cannot vouch for any other site. Firefox keeps its own store unless
# security.enterprise_roots.enabled is set (the default on Windows in recent versions).
# Works in Windows PowerShell 5.1 and PowerShell 7.
[CmdletBinding()]
param(
    [switch]$Remove,
    [string]$Pem = (Join-Path $PSScriptRoot '..\out\proxy-ca.pem')
)
$ErrorActionPreference = 'Stop'

if (-not (Test-Path -LiteralPath $Pem)) {
    Write-Error ("no CA at ${Pem}: run 'vagrant up' first (or, on a one-way synced folder: " +
        "vagrant ssh -c 'sudo cat /var/lib/proxy/ca.pem' > vagrant\out\proxy-ca.pem)")
}
$path = (Resolve-Path -LiteralPath $Pem).Path
$cert = New-Object System.Security.Cryptography.X509Certificates.X509Certificate2 -ArgumentList $path
$sha256 = [System.Security.Cryptography.SHA256]::Create()
$fingerprint = ($sha256.ComputeHash($cert.RawData) | ForEach-Object { $_.ToString('X2') }) -join ':'
Write-Host "CA certificate: $path"
Write-Host "  $($cert.Subject)"
Write-Host "  SHA-256 Fingerprint: $fingerprint"

$store = New-Object System.Security.Cryptography.X509Certificates.X509Store -ArgumentList 'Root', 'CurrentUser'
$store.Open('ReadWrite')
try {
    $present = $store.Certificates.Find('FindByThumbprint', $cert.Thumbprint, $false)
    if ($Remove) {
        if ($present.Count -eq 0) {
            Write-Host 'not in CurrentUser\Root: nothing to remove'
        } else {
            $store.Remove($present[0])
            Write-Host 'removed from CurrentUser\Root'
        }
    } elseif ($present.Count -gt 0) {
        Write-Host 'already trusted in CurrentUser\Root'
    } else {
        $store.Add($cert)
        Write-Host "trusted in CurrentUser\Root: the VM's https://localhost URLs now verify"
    }
} finally {
    $store.Close()
}
