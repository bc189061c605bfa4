//! Resumed TLS 1.3 handshakes (`openssl s_time -reuse`, see [`super::load`]): each
//! connection a handshake resumed with a session ticket from an earlier one and one
//! `GET / HTTP/1.0`. s_time marks every connection resumed or not, so every measured handshake
//! is proved, and the line fails for a contender when fewer than [`MIN_RESUMED_SHARE`] of them
//! were resumed.

use anyhow::{Result, bail};

/// Below this share of resumed handshakes the run is not a resumption run.
pub(super) const MIN_RESUMED_SHARE: f64 = 0.95;

/// What a run of `openssl s_time` did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Resumptions {
    /// Connections completed in the measured period (handshake and answer).
    pub handshakes: u64,
    /// Of those, resumed handshakes.
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
                "{who}: only {} of {} handshakes ({:.1}%) were resumed, below {:.0}%: not a \
                 resumption figure",
                self.resumed,
                self.handshakes,
                share * 100.0,
                MIN_RESUMED_SHARE * 100.0
            );
        }
        Ok(())
    }
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
