//! Effects: starting, stopping and adopting services.

pub mod container;
pub mod docker;
pub mod evict;
pub mod exit;
pub mod instance;
pub mod native;
pub mod reaper;
pub mod service_log;

pub use exit::ExitInfo;

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
