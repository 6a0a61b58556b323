//! How many requests a connection may make: a token bucket per connection, so that one client cannot keep
//! a router busy (the actors' mailboxes are unbounded; admission is the gateway's, DESIGN.md). A request
//! over the budget is refused `rate_limited`, with how long to wait, and nothing of it is done.
//!
//! A request costs what its answer carries: one request for each [`REPLY_BYTES_PER_REQUEST`] or part of
//! them. A page of a chat's transcript (up to the routers' page, 1 MiB), or the backlog a subscription or a
//! resume writes, would otherwise cost what a `ping` costs, so that a client asking for a long chat's
//! transcript again and again could make the cluster read and write some 50 MiB a second at the default
//! rate. The cost beyond the request's own is taken once the answer is written (its size is known only
//! then): the bucket may go below empty, and the requests after it wait until it has refilled.

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

/// The bytes of an answer that one request pays for: an answer written to the connection (its ack and the
/// events that follow it) costs one more request for each further `REPLY_BYTES_PER_REQUEST` or part of
/// them.
pub const REPLY_BYTES_PER_REQUEST: u64 = 64 * 1024;

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
        self.refill(now_us());
        if self.available >= TOKEN {
            self.available -= TOKEN;
            return Ok(());
        }
        // Both positive here: less than a token is available (less than none after a costly answer), and the
        // rate is not 0.
        let missing = u64::try_from(TOKEN.saturating_sub(self.available)).unwrap_or(1);
        let missing_us = missing.div_ceil(u64::from(self.rate.per_second));
        Err(missing_us.div_ceil(1_000).max(1))
    }

    /// Takes what an answer of `bytes` costs beyond the request that asked for it (whose token [`Budget::take`]
    /// took): one request for each further [`REPLY_BYTES_PER_REQUEST`] or part of them. Never refused: the
    /// answer is written already, and the bucket goes below empty if need be, so that the next requests
    /// wait. `now_us` is read only when there is a limit and something to take.
    pub(crate) fn charge_reply(&mut self, bytes: u64, now_us: impl FnOnce() -> i64) {
        let extra = bytes.saturating_sub(1) / REPLY_BYTES_PER_REQUEST;
        if self.rate.per_second == 0 || extra == 0 {
            return;
        }
        self.refill(now_us());
        let cost = i64::try_from(extra).unwrap_or(i64::MAX).saturating_mul(TOKEN);
        self.available = self.available.saturating_sub(cost);
    }

    /// Adds what the rate refilled since the last look, up to a full bucket.
    fn refill(&mut self, now_us: i64) {
        let refill_per_us = i64::from(self.rate.per_second);
        let full = i64::from(self.rate.burst.max(1)).saturating_mul(TOKEN);
        // A clock that steps back refills nothing (and takes nothing back).
        let elapsed = now_us.saturating_sub(self.at_us).max(0);
        self.available = self.available.saturating_add(elapsed.saturating_mul(refill_per_us)).min(full);
        self.at_us = self.at_us.max(now_us);
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

    #[test]
    fn an_answer_costs_one_request_per_64_kib_and_the_next_requests_wait_for_it() {
        const KIB_64: u64 = REPLY_BYTES_PER_REQUEST;
        let mut budget = Budget::new(RequestRate { per_second: 10, burst: 5 }, 0);
        assert_eq!(budget.take(|| 0), Ok(()));
        // Up to 64 KiB the request's own token pays for its answer.
        for bytes in [0, 1, KIB_64] {
            budget.charge_reply(bytes, || panic!("nothing to take: the clock is not read"));
        }
        assert_eq!(budget.available, 4 * TOKEN);
        budget.charge_reply(KIB_64 + 1, || 0);
        assert_eq!(budget.available, 3 * TOKEN, "a byte over 64 KiB costs a request");
        // A page of 1 MiB costs 16 requests, the one that asked included: the bucket goes 13 below empty,
        // and the next request waits for 14 tokens at 10 a second.
        assert_eq!(budget.take(|| 0), Ok(()));
        budget.charge_reply(16 * KIB_64, || 0);
        assert_eq!(budget.available, -13 * TOKEN);
        assert_eq!(budget.take(|| 0), Err(1_400));
        assert_eq!(budget.take(|| 1_399_999), Err(1));
        assert_eq!(budget.take(|| 1_400_000), Ok(()));
        // What the rate refilled before the answer counts: half a second refills 5, up to the burst, and
        // an answer of 128 KiB takes one of them.
        budget.charge_reply(2 * KIB_64, || 1_900_000);
        assert_eq!(budget.available, 4 * TOKEN);

        let mut unlimited = Budget::new(RequestRate::UNLIMITED, 0);
        unlimited.charge_reply(u64::MAX, || panic!("no limit: the clock is not read"));
        assert!(unlimited.take(|| 0).is_ok());
        // Absurd sizes saturate rather than overflow, and the wait is told all the same.
        let mut budget = Budget::new(RequestRate { per_second: 1, burst: 1 }, 0);
        budget.charge_reply(u64::MAX, || 0);
        budget.charge_reply(u64::MAX, || 0);
        assert!(budget.take(|| i64::MAX).is_err());
    }

    proptest! {
        /// Over any run of requests and answers, what is admitted and answered costs at most the burst
        /// plus what the rate refilled (the last answer aside, which is written before it is charged), and
        /// a client that waits as told is admitted.
        #[test]
        fn never_more_than_the_burst_and_the_rate_allow(
            per_second in 1u32..2_000,
            burst in 1u32..200,
            steps in proptest::collection::vec((0i64..20_000, 0u64..300_000), 1..400),
        ) {
            let mut budget = Budget::new(RequestRate { per_second, burst }, 0);
            let (mut now, mut spent) = (0i64, 0i64);
            for (gap, answer_bytes) in steps {
                now += gap;
                if let Err(wait_ms) = budget.take(|| now) {
                    let later = now + i64::try_from(wait_ms).unwrap() * 1_000;
                    prop_assert!(budget.take(|| later).is_ok(), "told to wait {wait_ms} ms at {now}");
                    now = later;
                }
                spent += 1;
                let allowed = i64::from(burst) + now * i64::from(per_second) / 1_000_000;
                prop_assert!(spent <= allowed, "{spent} requests' worth admitted by {now} us, at most {allowed}");
                budget.charge_reply(answer_bytes, || now);
                spent += i64::try_from(answer_bytes.saturating_sub(1) / REPLY_BYTES_PER_REQUEST).unwrap();
            }
        }
    }
}
