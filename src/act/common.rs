//! Small things every driver shares, kept apart from the drivers so that none of them
//! imports another (native, docker and the dispatch in `instance.rs` all use these).

use std::time::Duration;

/// How many log lines an error message carries.
pub(crate) const LOG_LINES_IN_ERRORS: usize = 10;

/// The outcome of a stop that succeeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StopReport {
    /// The polite stop (SIGTERM, `docker stop`'s signal) was not enough within the stop
    /// timeout; SIGKILL ended it.
    pub forced: bool,
    pub elapsed: Duration,
}

/// An error with its causes, which say what actually went wrong ("Connection refused")
/// where the error's own message is generic.
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// `spawn_blocking`, passing a panic on to the caller as if the call had run here.
pub(crate) async fn blocking<T: Send + 'static>(call: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(call).await {
        Ok(value) => value,
        Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
        // Cancelled: the runtime is shutting down, and drops this future with the rest.
        Err(_) => std::future::pending().await,
    }
}
