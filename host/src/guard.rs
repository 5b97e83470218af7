//! Every call into provider code runs here: under a deadline, with panics contained, and
//! cancellable at shutdown.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use futures_util::FutureExt;
use providers_core::{ErrorCode, ProviderError};
use tokio::sync::Notify;

/// Cancels every guarded call at once: shutdown fires it when calls outlive the grace, so
/// that `disconnect` only ever runs after the last call into an instance has stopped.
#[derive(Default)]
pub struct Cancel {
    fired: AtomicBool,
    notify: Notify,
}

impl Cancel {
    /// Cancels every call running under this signal, and every later one.
    pub fn fire(&self) {
        self.fired.store(true, Ordering::Release);
        self.notify.notify_waiters();
    }

    /// Whether it has fired.
    pub fn fired(&self) -> bool {
        self.fired.load(Ordering::Acquire)
    }

    async fn wait(&self) {
        let notified = self.notify.notified();
        let mut notified = std::pin::pin!(notified);
        // Registered before the flag is read, so a fire in between is not missed.
        notified.as_mut().enable();
        if self.fired() {
            return;
        }
        notified.await;
    }
}

/// Runs `work` (provider code) to completion, until `deadline`, or until `cancel` fires.
///
/// A panic unwinds to here and comes back as `PROVIDER_ERROR`; at the deadline the work is
/// dropped (cancelled at its next await) and the result is `TIMEOUT`; on cancellation it is
/// dropped the same way and the result is `PROVIDER_UNAVAILABLE`. The work runs in place
/// rather than on a task of its own: a spawn per call costs a cross-thread hand-off on the
/// hot path and buys nothing that `catch_unwind` does not. `what` names the call in
/// messages and is only built when one is needed.
pub async fn run<T, F>(
    what: impl FnOnce() -> String,
    deadline: Instant,
    cancel: &Cancel,
    work: F,
) -> Result<T, ProviderError>
where
    F: Future<Output = Result<T, ProviderError>>,
{
    // AssertUnwindSafe: after a panic the provider's own state may be inconsistent, which is
    // the provider's concern; the host's state touched here is only atomics and guards whose
    // drops run during unwinding.
    let work = tokio::time::timeout_at(deadline.into(), AssertUnwindSafe(work).catch_unwind());
    let outcome = tokio::select! {
        biased;
        outcome = work => outcome,
        () = cancel.wait() => {
            return Err(ProviderError::unavailable(format!(
                "{} was cancelled: the host is shutting down",
                what()
            )));
        }
    };
    match outcome {
        Ok(Ok(result)) => result,
        Ok(Err(panic)) => {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "non-string panic".to_owned());
            let what = what();
            tracing::error!(call = %what, panic = ?message, "provider panicked");
            Err(ProviderError::new(
                ErrorCode::ProviderError,
                format!("{what} failed: the provider panicked"),
            ))
        }
        Err(_elapsed) => Err(ProviderError::new(
            ErrorCode::Timeout,
            format!("{} did not finish before its deadline", what()),
        )),
    }
}
