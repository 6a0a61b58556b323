//! Wake-ups at an operation's intended time, to within the kernel's timer precision.
//!
//! tokio's timer is too coarse for an open-loop schedule: it rounds every deadline up to the next whole
//! millisecond and parks its driver for whole milliseconds, so a task waiting for an instant wakes 0–2 ms
//! after it. Measured on the 2-core machine at 500 chat starts/s, the load generator began its operations
//! 1.0 ms late at p50 and 1.7 ms at p99, and every latency measured from the intended time counted that as
//! the server's (the bare relay's message p50 of 1.2 ms at 5,000/s was mostly that). A [`Pacer`] waits on
//! a `timerfd` of its own instead, armed with a nanosecond timeout and polled by tokio's reactor like a
//! socket: the worker is woken by the kernel when the time comes, with no thread in between.
//!
//! The precision costs a wake-up of a worker per operation, where tokio's timer wakes once a millisecond
//! for all that are due: measured against the bare relay at 5,000 messages/s, the load generator's CPU
//! went from 3.6 to 6.8 s a run, and at 30,000/s it fell behind. So the scenarios that open a connection
//! per operation, at hundreds a second (`chat-storm`, `storm`), pace precisely, and `steady`, thousands of
//! messages a second, paces on tokio's timer ([`Pacer::coarse`]); every scenario reports its own
//! lateness as `schedule_lag`. A precise pacer follows the real clock, not tokio's paused one: tests on
//! the paused clock use a coarse one.

use std::io;
use std::time::Duration;

use rustix::fd::OwnedFd;
use rustix::time::{Itimerspec, TimerfdClockId, TimerfdFlags, TimerfdTimerFlags, Timespec};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::time::Instant;

/// One waiter's timer: a task that waits for one operation after the other owns one.
#[derive(Debug)]
pub struct Pacer {
    /// `None` when the timer could not be made: tokio's timer then waits, late as it is.
    timer: Option<AsyncFd<OwnedFd>>,
}

impl Pacer {
    /// A pacer on a `timerfd` of its own. Must be called within a tokio runtime.
    pub fn precise() -> Pacer {
        let timer =
            rustix::time::timerfd_create(TimerfdClockId::Monotonic, TimerfdFlags::NONBLOCK | TimerfdFlags::CLOEXEC)
                .map_err(io::Error::from)
                .and_then(register);
        match timer {
            Ok(timer) => Pacer { timer: Some(timer) },
            Err(error) => {
                eprintln!("no timerfd ({error}): operations are paced by tokio's timer, up to 2 ms late");
                Pacer { timer: None }
            }
        }
    }

    /// A pacer on tokio's timer: up to 2 ms late, but cheap at thousands of operations a second, and
    /// driven by tokio's paused clock in tests.
    pub fn coarse() -> Pacer {
        Pacer { timer: None }
    }

    /// Waits until `at`; returns at once when `at` has passed. Never returns before `at` (the timer runs
    /// on the monotonic clock, as `Instant` does). A timer that fails is said once and given up: this wait
    /// and every later one are on tokio's timer.
    pub async fn sleep_until(&mut self, at: Instant) {
        if let Some(timer) = &self.timer {
            match Self::wait(timer, at).await {
                Ok(()) => return,
                Err(error) => {
                    eprintln!("the timer failed ({error}): operations are paced by tokio's timer, up to 2 ms late");
                    self.timer = None;
                }
            }
        }
        tokio::time::sleep_until(at).await;
    }

    async fn wait(timer: &AsyncFd<OwnedFd>, at: Instant) -> io::Result<()> {
        let now = Instant::now();
        if at <= now {
            return Ok(());
        }
        let timeout = timespec(at - now)?;
        let zero = timespec(Duration::ZERO)?;
        // Arming it again also clears an expiry a cancelled wait left unread.
        rustix::time::timerfd_settime(
            timer.get_ref(),
            TimerfdTimerFlags::empty(),
            &Itimerspec { it_interval: zero, it_value: timeout },
        )?;
        loop {
            let mut ready = timer.readable().await?;
            let mut expirations = [0u8; 8];
            match rustix::io::read(timer.get_ref(), &mut expirations) {
                Ok(_) => return Ok(()),
                // Readiness left from an earlier expiry, or a spurious wake-up: not yet.
                Err(rustix::io::Errno::AGAIN) => ready.clear_ready(),
                Err(error) => return Err(error.into()),
            }
        }
    }
}

/// Registers the timer with tokio's reactor. tokio 1.54 deprecated its safe constructors for any `AsRawFd`
/// (a type could hand out a different descriptor later) in favour of `unsafe` ones, which this workspace
/// forbids. An `OwnedFd` owns its descriptor and always returns that one: the deprecated call is sound here.
#[allow(deprecated)]
fn register(timer: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    AsyncFd::with_interest(timer, Interest::READABLE)
}

fn timespec(duration: Duration) -> io::Result<Timespec> {
    Timespec::try_from(duration)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a wait too long for the timer"))
}

#[cfg(test)]
mod tests {
    use futures_util::FutureExt;

    use super::*;

    #[tokio::test]
    async fn a_pacer_wakes_on_the_real_clock_never_before_its_time() {
        let mut pacer = Pacer::precise();
        assert!(pacer.timer.is_some(), "this machine has timerfd");
        let start = Instant::now();
        let mut early = Vec::new();
        for k in 1..=20u64 {
            let at = start + Duration::from_micros(500 * k);
            pacer.sleep_until(at).await;
            let now = Instant::now();
            if now < at {
                early.push((k, at - now));
            }
        }
        assert!(early.is_empty(), "woken before their time: {early:?}");
    }

    #[tokio::test]
    async fn a_cancelled_wait_does_not_end_the_next_one_early() {
        let mut pacer = Pacer::precise();
        let start = Instant::now();
        // Armed for 200 ms by its first poll, then dropped unfinished: its expiry comes while nobody waits.
        let cancelled = pacer.sleep_until(start + Duration::from_millis(200)).now_or_never();
        assert!(cancelled.is_none());
        // The stale expiry arrives, and is left unread.
        let timer = pacer.timer.as_ref().unwrap();
        drop(timer.readable().await.unwrap());
        let at = Instant::now() + Duration::from_millis(5);
        pacer.sleep_until(at).await;
        assert!(Instant::now() >= at, "the stale expiry ended the wait early");
    }
}
