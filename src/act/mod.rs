//! Effects: starting, stopping and adopting services.

pub mod exit;
pub mod instance;
pub mod native;

pub use exit::ExitInfo;
