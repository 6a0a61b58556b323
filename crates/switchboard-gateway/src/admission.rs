//! How many requests a connection may make: a token bucket per connection, so that one client cannot keep
//! a router busy (the actors' mailboxes are unbounded; admission is the gateway's, DESIGN.md). A request
//! over the budget is refused `rate_limited`, with how long to wait, and nothing of it is done.

/// A connection's request budget: `per_second` requests a second on average, and up to `burst` at once.
/// `per_second: 0` is no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestRate {
    pub per_second: u32,
    pub burst: u32,
}

impl RequestRate {
    /// No limit.
    pub const UNLIMITED: RequestRate = RequestRate { per_second: 0, burst: 0 };
}

impl Default for RequestRate {
    /// 50 a second, 100 at once: far above what a person types or clicks (a console that marks every
    /// message delivered included), low enough that a runaway client is held to it.
    fn default() -> Self {
        RequestRate { per_second: 50, burst: 100 }
    }
}

/// One token, in the bucket's unit (a millionth of a request, so that a microsecond refills `per_second`).
const TOKEN: i64 = 1_000_000;

/// The bucket of one connection.
#[derive(Debug)]
pub(crate) struct Budget {
    rate: RequestRate,
    /// Millionths of a request available at `at_us`.
    available: i64,
    at_us: i64,
}

impl Budget {
    /// A full bucket at `now_us`.
    pub(crate) fn new(rate: RequestRate, now_us: i64) -> Budget {
        let available = i64::from(rate.burst.max(1)).saturating_mul(TOKEN);
        Budget { rate, available, at_us: now_us }
    }

    /// Takes one request's token, or answers how long until there is one, in whole milliseconds (at least 1).
    /// `now_us` is read only when there is a limit.
    pub(crate) fn take(&mut self, now_us: impl FnOnce() -> i64) -> Result<(), u64> {
        if self.rate.per_second == 0 {
            return Ok(());
        }
        let now_us = now_us();
        let refill_per_us = i64::from(self.rate.per_second);
        let full = i64::from(self.rate.burst.max(1)).saturating_mul(TOKEN);
        // A clock that steps back refills nothing (and takes nothing back).
        let elapsed = now_us.saturating_sub(self.at_us).max(0);
        self.available = self.available.saturating_add(elapsed.saturating_mul(refill_per_us)).min(full);
        self.at_us = self.at_us.max(now_us);
        if self.available >= TOKEN {
            self.available -= TOKEN;
            return Ok(());
        }
        // Both positive here: less than a token is available, and the rate is not 0.
        let missing = u64::try_from(TOKEN - self.available).unwrap_or(1);
        let missing_us = missing.div_ceil(u64::from(self.rate.per_second));
        Err(missing_us.div_ceil(1_000).max(1))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn a_burst_then_the_rate_and_how_long_to_wait() {
        let mut budget = Budget::new(RequestRate { per_second: 10, burst: 3 }, 0);
        for _ in 0..3 {
            assert_eq!(budget.take(|| 0), Ok(()));
        }
        assert_eq!(budget.take(|| 0), Err(100), "one token every 100 ms");
        assert_eq!(budget.take(|| 40_000), Err(60));
        assert_eq!(budget.take(|| 100_000), Ok(()));
        assert_eq!(budget.take(|| 100_000), Err(100));
        // Idle for long: the bucket holds the burst, no more.
        for _ in 0..3 {
            assert_eq!(budget.take(|| 60_000_000), Ok(()));
        }
        assert!(budget.take(|| 60_000_000).is_err());
    }

    #[test]
    fn no_limit_admits_everything_and_a_clock_that_steps_back_refills_nothing() {
        let mut unlimited = Budget::new(RequestRate::UNLIMITED, 0);
        assert!((0..10_000).all(|_| unlimited.take(|| 0).is_ok()));
        let mut budget = Budget::new(RequestRate { per_second: 1, burst: 1 }, 5_000_000);
        assert_eq!(budget.take(|| 5_000_000), Ok(()));
        assert_eq!(budget.take(|| 1_000_000), Err(1_000));
        assert_eq!(budget.take(|| 5_999_999), Err(1), "a wait is at least 1 ms");
        assert_eq!(budget.take(|| 6_000_000), Ok(()));
    }

    proptest! {
        /// Over any run of requests, what is admitted is at most the burst plus what the rate refilled,
        /// and a client that waits as told is admitted.
        #[test]
        fn never_more_than_the_burst_and_the_rate_allow(
            per_second in 1u32..2_000,
            burst in 1u32..200,
            gaps in proptest::collection::vec(0i64..20_000, 1..400),
        ) {
            let mut budget = Budget::new(RequestRate { per_second, burst }, 0);
            let (mut now, mut admitted) = (0i64, 0i64);
            for gap in gaps {
                now += gap;
                match budget.take(|| now) {
                    Ok(()) => admitted += 1,
                    Err(wait_ms) => {
                        let later = now + i64::try_from(wait_ms).unwrap() * 1_000;
                        prop_assert!(budget.take(|| later).is_ok(), "told to wait {wait_ms} ms at {now}");
                        admitted += 1;
                        now = later;
                    }
                }
                let allowed = i64::from(burst) + now * i64::from(per_second) / 1_000_000;
                prop_assert!(admitted <= allowed, "{admitted} admitted by {now} us, at most {allowed}");
            }
        }
    }
}
