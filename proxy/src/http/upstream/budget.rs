//! The retry budget: retries may add at most a share of the recent requests, plus a small
//! floor so that a quiet pool can still retry (Finagle's and Envoy's budgets work alike). A
//! sick pool then sees at most (1 + share) times the requests, instead of twice as many.

use std::sync::Mutex;
use std::time::Instant;

/// The window the budget counts over, in one-second slots.
const WINDOW_SECONDS: usize = 10;
/// Retries allowed in any window whatever the traffic.
pub(super) const RETRY_FLOOR: u64 = 10;

/// Requests and retries of the last [`WINDOW_SECONDS`] seconds.
#[derive(Debug)]
pub(super) struct RetryBudget {
    percent: u64,
    origin: Instant,
    window: Mutex<Window>,
}

#[derive(Debug, Default)]
struct Window {
    /// The second (since `origin`) that slot `second % WINDOW_SECONDS` counts.
    seconds: [u64; WINDOW_SECONDS],
    requests: [u64; WINDOW_SECONDS],
    retries: [u64; WINDOW_SECONDS],
}

impl Window {
    /// The slot of `second`, emptied first if it held an older second.
    fn slot(&mut self, second: u64) -> usize {
        let index = usize::try_from(second).unwrap_or(0) % WINDOW_SECONDS;
        if self.seconds[index] != second {
            self.seconds[index] = second;
            self.requests[index] = 0;
            self.retries[index] = 0;
        }
        index
    }

    fn totals(&self, now: u64) -> (u64, u64) {
        let recent = |i: usize| now.saturating_sub(self.seconds[i]) < WINDOW_SECONDS as u64;
        (0..WINDOW_SECONDS)
            .filter(|i| recent(*i))
            .fold((0, 0), |(req, ret), i| {
                (req + self.requests[i], ret + self.retries[i])
            })
    }
}

impl RetryBudget {
    pub(super) fn new(percent: u32) -> Self {
        RetryBudget {
            percent: u64::from(percent),
            origin: Instant::now(),
            window: Mutex::new(Window::default()),
        }
    }

    fn second(&self) -> u64 {
        self.origin.elapsed().as_secs()
    }

    /// Counts a request (its first attempt).
    pub(super) fn request(&self) {
        let now = self.second();
        let mut window = self.window.lock().unwrap_or_else(|e| e.into_inner());
        let slot = window.slot(now);
        window.requests[slot] += 1;
    }

    /// Takes a retry from the budget; false if it is spent.
    pub(super) fn try_retry(&self) -> bool {
        let now = self.second();
        let mut window = self.window.lock().unwrap_or_else(|e| e.into_inner());
        let (requests, retries) = window.totals(now);
        // retries < share × requests + floor, in integers.
        if retries * 100 >= requests * self.percent + RETRY_FLOOR * 100 {
            return false;
        }
        let slot = window.slot(now);
        window.retries[slot] += 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_stay_within_the_share_plus_the_floor() {
        let budget = RetryBudget::new(20);
        let mut retries = 0;
        for _ in 0..1000 {
            budget.request();
            if budget.try_retry() {
                retries += 1;
            }
        }
        // All within one window: 20% of 1000 plus the floor.
        assert!(retries <= 200 + RETRY_FLOOR, "{retries} retries");
        assert!(
            retries >= 200,
            "{retries} retries: the budget should allow its share"
        );
    }

    #[test]
    fn a_quiet_pool_still_gets_the_floor() {
        let budget = RetryBudget::new(0);
        let allowed = (0..100).filter(|_| budget.try_retry()).count();
        assert_eq!(allowed as u64, RETRY_FLOOR);
    }
}
