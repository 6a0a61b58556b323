//! The signals that stop a role (SIGTERM, as Kubernetes sends, and ctrl-c), listened for once, from the role's
//! start: a gateway waits for the first to begin its drain and cuts the drain delay short at the second, and a
//! signal is seen however soon it follows the one before (a listener made after a signal came never sees it).

use anyhow::Context;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tracing::info;

/// How many stop signals the process has received, counted by a task of its own.
#[derive(Clone)]
pub struct StopSignals {
    received: watch::Receiver<u32>,
}

impl StopSignals {
    /// Installs the handlers (from here on, SIGTERM and SIGINT no longer end the process at once) and starts
    /// counting. Needs a tokio runtime.
    pub fn listen() -> anyhow::Result<Self> {
        let mut terminate = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
        let mut interrupt = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
        let (count, received) = watch::channel(0);
        tokio::spawn(async move {
            loop {
                let name = tokio::select! {
                    Some(()) = terminate.recv() => "SIGTERM",
                    Some(()) = interrupt.recv() => "SIGINT",
                    else => return,
                };
                count.send_modify(|count| *count += 1);
                info!(signal = name, received = *count.borrow(), "shutting down");
            }
        });
        Ok(StopSignals { received })
    }

    /// Resolves once `n` stop signals have been received in all, however long ago.
    pub async fn nth(&self, n: u32) {
        let mut received = self.received.clone();
        if received.wait_for(|count| *count >= n).await.is_err() {
            // The counter is gone only with the runtime: no signal will come.
            std::future::pending::<()>().await;
        }
    }

    /// Resolves once the first stop signal has been received.
    pub async fn first(&self) {
        self.nth(1).await;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rustix::process::{Signal, getpid, kill_process};

    use super::*;

    /// Signals received while nothing waits for them are not lost: a wait begun after two came (as the
    /// drain delay's wait may begin after its second SIGTERM came) ends at once. The handlers are this test
    /// process's (no other test here sends signals, and a handled signal does not end the process).
    #[tokio::test]
    async fn signals_are_counted_from_the_start_whoever_waits() {
        let signals = StopSignals::listen().unwrap();
        kill_process(getpid(), Signal::TERM).unwrap();
        kill_process(getpid(), Signal::INT).unwrap();
        tokio::time::timeout(Duration::from_secs(10), signals.nth(2)).await.expect("a past signal was lost");
        signals.first().await;
    }
}
