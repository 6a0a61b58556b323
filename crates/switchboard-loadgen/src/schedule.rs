//! Open-loop schedules: every operation has an intended time fixed before the run starts.
//!
//! A sender that falls behind sends at once and its latency is still measured from the intended time, so a
//! stall of the server shows in the latencies instead of silently slowing the load down (coordinated
//! omission).

use std::time::Duration;

use tokio::time::Instant;

use crate::pacer::Pacer;

/// The intended times `start + offset + k × interval` for `k = 0, 1, 2, …`.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    start: Instant,
    offset_ns: f64,
    interval_ns: f64,
}

impl Schedule {
    /// `rate_per_s` operations per second in total, shared by `shard_count` processes: this process does
    /// every `shard_count`-th operation of the whole schedule, starting with number `shard_index`, so that
    /// the processes together produce one evenly spaced stream.
    pub fn sharded(start: Instant, rate_per_s: f64, shard_index: u32, shard_count: u32) -> Schedule {
        let slot_ns = 1e9 / rate_per_s;
        Schedule { start, offset_ns: slot_ns * f64::from(shard_index), interval_ns: slot_ns * f64::from(shard_count) }
    }

    /// One operation every `interval`, the first at `start + offset`.
    pub fn every(start: Instant, offset: Duration, interval: Duration) -> Schedule {
        Schedule { start, offset_ns: offset.as_nanos() as f64, interval_ns: interval.as_nanos() as f64 }
    }

    /// The intended time of operation `k`.
    pub fn intended(&self, k: u64) -> Instant {
        let nanos = self.offset_ns + self.interval_ns * k as f64;
        self.start + Duration::from_nanos(nanos.round() as u64)
    }

    /// How many operations are due strictly before `start + window`.
    pub fn count_before(&self, window: Duration) -> u64 {
        let window_ns = window.as_nanos() as f64;
        if window_ns <= self.offset_ns || self.interval_ns <= 0.0 {
            return 0;
        }
        ((window_ns - self.offset_ns) / self.interval_ns).ceil() as u64
    }

    /// Waits on `pacer` until operation `k` is due and returns its intended time; returns at once when it
    /// is late.
    pub async fn wait_for(&self, k: u64, pacer: &mut Pacer) -> Instant {
        let intended = self.intended(k);
        pacer.sleep_until(intended).await;
        intended
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operations_are_evenly_spaced() {
        let start = Instant::now();
        let schedule = Schedule::sharded(start, 200.0, 0, 1);
        assert_eq!(schedule.intended(0), start);
        assert_eq!(schedule.intended(1), start + Duration::from_millis(5));
        assert_eq!(schedule.intended(200), start + Duration::from_secs(1));
    }

    #[test]
    fn shards_interleave_into_one_even_stream() {
        let start = Instant::now();
        let shards: Vec<Schedule> = (0..3).map(|index| Schedule::sharded(start, 300.0, index, 3)).collect();
        let mut all: Vec<Instant> = shards.iter().flat_map(|s| (0..100).map(move |k| s.intended(k))).collect();
        all.sort();
        for (k, at) in all.iter().enumerate() {
            assert_eq!(at.duration_since(start), Duration::from_nanos((k as f64 * 1e9 / 300.0).round() as u64));
        }
    }

    #[test]
    fn counts_the_operations_due_in_a_window() {
        let start = Instant::now();
        assert_eq!(Schedule::sharded(start, 100.0, 0, 1).count_before(Duration::from_secs(2)), 200);
        // Shard 1 of 2 at 100/s: 10 ms, 30 ms, …, 1990 ms.
        assert_eq!(Schedule::sharded(start, 100.0, 1, 2).count_before(Duration::from_secs(2)), 100);
        let every = Schedule::every(start, Duration::from_millis(3), Duration::from_millis(10));
        assert_eq!(every.count_before(Duration::from_millis(3)), 0);
        assert_eq!(every.count_before(Duration::from_millis(4)), 1);
        assert_eq!(every.count_before(Duration::from_millis(14)), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_sender_waits_for_its_time_but_never_past_it() {
        let start = Instant::now();
        let schedule = Schedule::sharded(start, 10.0, 0, 1);
        let mut pacer = Pacer::coarse();
        assert_eq!(schedule.wait_for(3, &mut pacer).await, start + Duration::from_millis(300));
        assert_eq!(Instant::now(), start + Duration::from_millis(300));
        // A stalled sender: the clock is already past operations 4 to 9.
        tokio::time::advance(Duration::from_secs(1)).await;
        let late = Instant::now();
        assert_eq!(schedule.wait_for(4, &mut pacer).await, start + Duration::from_millis(400));
        assert_eq!(Instant::now(), late, "a late operation goes at once");
        assert_eq!(late.duration_since(schedule.intended(4)), Duration::from_millis(900));
    }
}
