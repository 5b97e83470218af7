//! Every call into provider code runs here: under a deadline, with panics contained.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::time::Instant;

use futures_util::FutureExt;
use providers_core::{ErrorCode, ProviderError};

/// Runs `work` (provider code) to completion or until `deadline`.
///
/// A panic unwinds to here and comes back as `PROVIDER_ERROR`; at the deadline the work is
/// dropped (cancelled at its next await) and the result is `TIMEOUT`. The work runs in
/// place rather than on a task of its own: a spawn per call costs a cross-thread hand-off
/// on the hot path and buys nothing that `catch_unwind` does not. `what` names the call in
/// messages and is only built when one is needed.
pub async fn run<T, F>(
    what: impl FnOnce() -> String,
    deadline: Instant,
    work: F,
) -> Result<T, ProviderError>
where
    F: Future<Output = Result<T, ProviderError>>,
{
    // AssertUnwindSafe: after a panic the provider's own state may be inconsistent, which is
    // the provider's concern; the host's state touched here is only atomics and guards whose
    // drops run during unwinding.
    match tokio::time::timeout_at(deadline.into(), AssertUnwindSafe(work).catch_unwind()).await {
        Ok(Ok(result)) => result,
        Ok(Err(panic)) => {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "non-string panic".to_owned());
            let what = what();
            tracing::error!(call = %what, panic = %message, "provider panicked");
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
