//! [`Backoff`]: the one retry delay of twill's long-running loops.

use std::time::Duration;

use rand::Rng;

/// The first delay, and the delay after [`Backoff::reset`].
const FIRST: Duration = Duration::from_millis(100);

/// Backoff for retries: 100 ms doubling up to `max`, with ±20 % jitter (so that many nodes
/// that lost etcd together do not retry in lockstep).
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    /// Starts at 100 ms (or `max` if smaller).
    pub fn new(max: Duration) -> Self {
        Backoff {
            next: FIRST.min(max),
            max,
        }
    }

    /// After a success: the next delay is the first one again.
    pub fn reset(&mut self) {
        self.next = FIRST.min(self.max);
    }

    /// The delay before the next retry; doubles the one after it.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        let jitter = rand::rng().random_range(0.8..1.2);
        d.mul_f64(jitter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn within(d: Duration, nominal: Duration) -> bool {
        d >= nominal.mul_f64(0.8) && d <= nominal.mul_f64(1.2)
    }

    #[test]
    fn doubles_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_secs(1));
        for ms in [100, 200, 400, 800, 1000, 1000] {
            let d = b.next_delay();
            assert!(within(d, Duration::from_millis(ms)), "{d:?} vs {ms} ms");
        }
        b.reset();
        assert!(within(b.next_delay(), Duration::from_millis(100)));
    }

    #[test]
    fn a_cap_below_the_first_delay_is_the_delay() {
        let mut b = Backoff::new(Duration::from_millis(50));
        for _ in 0..3 {
            assert!(within(b.next_delay(), Duration::from_millis(50)));
        }
    }
}
