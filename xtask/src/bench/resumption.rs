//! Resumed TLS 1.3 handshakes: several clients on the client core, each connection a
//! handshake resumed with a session ticket the server sent earlier, one `GET /` with
//! `connection: close`, then the next. The client sees for itself whether each handshake was
//! resumed (rustls's handshake kind), so every measured handshake is proved, and the run fails
//! for a contender when fewer than [`MIN_RESUMED_SHARE`] of them were.
//!
//! `openssl s_time -reuse` does not do this: it reconnects with the session of its first
//! connection, and a TLS 1.3 ticket is meant for one use (rustls, the proxy's TLS, takes it
//! out of its cache when used), so against the proxy only its second connection resumes.

use std::{
    path::Path,
    rc::Rc,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use proxy_testkit::NetNs;

use super::tls_client::{self, Alpn};

/// Below this share of resumed handshakes the run is not a resumption run.
pub(super) const MIN_RESUMED_SHARE: f64 = 0.95;

/// What a run of resumed handshakes did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Resumptions {
    /// Connections completed in the measured period (handshake and answer).
    pub handshakes: u64,
    /// Of those, resumed TLS 1.3 handshakes.
    pub resumed: u64,
    /// Completed connections per second.
    pub per_second: f64,
}

impl Resumptions {
    /// Fails unless at least [`MIN_RESUMED_SHARE`] of the handshakes were resumed.
    pub(super) fn check(&self, who: &str) -> Result<()> {
        if self.handshakes == 0 {
            bail!("{who}: no resumed-handshake connection completed");
        }
        let share = self.resumed as f64 / self.handshakes as f64;
        if share < MIN_RESUMED_SHARE {
            bail!(
                "{who}: only {} of {} handshakes ({:.1}%) were resumed TLS 1.3 handshakes, \
                 below {:.0}%: not a resumption figure",
                self.resumed,
                self.handshakes,
                share * 100.0,
                MIN_RESUMED_SHARE * 100.0
            );
        }
        Ok(())
    }
}

/// `clients` connections at a time for `period`, each a TLS 1.3 handshake resumed with a
/// ticket from an earlier connection and one request; run in `ns` on core `cpu`. Before the
/// period, `clients` full handshakes fetch the first tickets.
pub(super) fn run(
    ns: &NetNs,
    cpu: usize,
    ca_pem: &Path,
    clients: usize,
    period: Duration,
) -> Result<Resumptions> {
    let connector = tls_client::connector(ca_pem, Alpn::Http1, true)?;
    ns.run(move || {
        let runtime = tls_client::runtime_on(cpu)?;
        runtime.block_on(async move {
            let connector = Rc::new(connector);
            for _ in 0..clients {
                one(&connector).await?;
            }
            let local = tokio::task::LocalSet::new();
            let started = Instant::now();
            let deadline = started + period;
            let tasks: Vec<_> = (0..clients)
                .map(|_| {
                    let connector = connector.clone();
                    local.spawn_local(async move {
                        let (mut handshakes, mut resumed) = (0, 0);
                        while Instant::now() < deadline {
                            resumed += u64::from(one(&connector).await?);
                            handshakes += 1;
                        }
                        anyhow::Ok((handshakes, resumed))
                    })
                })
                .collect();
            let (mut handshakes, mut resumed) = (0, 0);
            local
                .run_until(async {
                    for task in tasks {
                        let (h, r) = task.await??;
                        handshakes += h;
                        resumed += r;
                    }
                    anyhow::Ok(())
                })
                .await?;
            Ok(Resumptions {
                handshakes,
                resumed,
                per_second: handshakes as f64 / started.elapsed().as_secs_f64(),
            })
        })
    })?
}

/// One connection: handshake, `GET /` with `connection: close`; whether it was resumed.
async fn one(connector: &tokio_rustls::TlsConnector) -> Result<bool> {
    let tcp = tls_client::tcp_connect().await?;
    let mut tls = tls_client::handshake(connector, tcp, Alpn::Http1).await?;
    let resumed = tls_client::resumed_tls13(&tls);
    // The answer comes after the server's tickets, so reading it stores them.
    tls_client::get_h1(&mut tls, true).await?;
    Ok(resumed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(handshakes: u64, resumed: u64, expected: Result<(), &str>) {
        let r = Resumptions {
            handshakes,
            resumed,
            per_second: 1.0,
        };
        match (r.check("nginx"), expected) {
            (Ok(()), Ok(())) => {}
            (Err(a), Err(e)) => assert!(format!("{a:#}").contains(e), "{a:#} lacks {e:?}"),
            (a, e) => panic!("{handshakes}/{resumed}: got {a:?}, expected {e:?}"),
        }
    }

    #[test]
    fn requires_nearly_every_handshake_resumed() {
        check(100, 100, Ok(()));
        check(100, 95, Ok(()));
        check(100, 94, Err("only 94 of 100 handshakes (94.0%)"));
        check(0, 0, Err("no resumed-handshake connection"));
    }
}
