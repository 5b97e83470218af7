//! Every call into provider code runs here: on its own task, under a deadline, with panics contained.

use std::future::Future;
use std::time::Instant;

use providers_core::{ErrorCode, ProviderError};

/// Runs `work` (provider code) to completion or until `deadline`.
///
/// The work runs on its own task so that a panic unwinds there and comes back as a
/// `PROVIDER_ERROR`, and so that a timeout can abort it. `what` names the call in messages.
pub async fn run<T, F>(what: &str, deadline: Instant, work: F) -> Result<T, ProviderError>
where
    T: Send + 'static,
    F: Future<Output = Result<T, ProviderError>> + Send + 'static,
{
    let mut task = tokio::spawn(work);
    match tokio::time::timeout_at(deadline.into(), &mut task).await {
        Ok(Ok(result)) => result,
        Ok(Err(join)) if join.is_panic() => {
            let panic = join.into_panic();
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "non-string panic".to_owned());
            tracing::error!(call = what, panic = %message, "provider panicked");
            Err(ProviderError::new(
                ErrorCode::ProviderError,
                format!("{what} failed: the provider panicked"),
            ))
        }
        Ok(Err(_cancelled)) => Err(ProviderError::internal(format!("{what} was cancelled"))),
        Err(_elapsed) => {
            task.abort();
            Err(ProviderError::new(
                ErrorCode::Timeout,
                format!("{what} did not finish before its deadline"),
            ))
        }
    }
}
