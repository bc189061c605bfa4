//! Requests as a user of the appliance would make them, with curl and openssl, for the tasks
//! that check a proxy from outside (the VM test, the container test). The caller builds the
//! `curl` command, so that it runs in whichever network namespace the proxy is reached from.

use std::path::Path;
use std::process::Command;

use anyhow::{Context as _, Result, ensure};

/// What one request brought back.
#[derive(Debug)]
pub(crate) struct Answer {
    pub(crate) status: u16,
    pub(crate) content_type: String,
    pub(crate) location: String,
    pub(crate) body: String,
}

/// Runs `curl` (a command the caller made, e.g. in a namespace) with `args` and a 30 s limit;
/// fails when curl does, e.g. on a certificate it does not trust.
pub(crate) fn curl(mut curl: Command, args: &[&str]) -> Result<Answer> {
    const MARK: &str = "\n--curl-write-out--\n";
    let out = curl
        .args(["-sS", "--max-time", "30", "-w"])
        .arg(format!(
            "{MARK}%{{http_code}}\t%{{content_type}}\t%{{redirect_url}}"
        ))
        .args(args)
        .output()
        .context("failed to run curl")?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "curl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let (body, meta) = text.rsplit_once(MARK).context("curl wrote no status")?;
    let mut fields = meta.split('\t');
    Ok(Answer {
        status: fields.next().unwrap_or("").trim().parse().unwrap_or(0),
        content_type: fields.next().unwrap_or("").to_owned(),
        location: fields.next().unwrap_or("").trim().to_owned(),
        body: body.to_owned(),
    })
}

/// Checks that plain HTTP at `url` is redirected (308) to exactly `location`, with `curl`
/// (built by the caller for its namespace), and says so.
pub(crate) fn expect_redirect(curl_cmd: Command, url: &str, location: &str) -> Result<()> {
    let redirect = curl(curl_cmd, &[url])?;
    ensure!(
        redirect.status == 308 && redirect.location == location,
        "{url} answered {redirect:?}"
    );
    println!("ok: {url} -> 308 {}", redirect.location);
    Ok(())
}

/// The SHA-256 fingerprint of a PEM certificate, as uppercase hex without separators.
pub(crate) fn ca_fingerprint(ca: &Path) -> Result<String> {
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-fingerprint", "-sha256", "-in"])
        .arg(ca)
        .output()
        .context("failed to run openssl")?;
    ensure!(
        out.status.success(),
        "{} is not a certificate",
        ca.display()
    );
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(normalise_fingerprint(text.split('=').nth(1).unwrap_or("")))
}

/// A fingerprint as printed anywhere (`ab:CD:01`, `AB CD 01`) in one comparable form.
pub(crate) fn normalise_fingerprint(text: &str) -> String {
    text.chars()
        .filter(char::is_ascii_hexdigit)
        .map(|c| c.to_ascii_uppercase())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_compare_without_separators() {
        assert_eq!(
            normalise_fingerprint(" ab:CD:01\n"),
            normalise_fingerprint("AB CD 01")
        );
    }
}
