//! Effects: starting, stopping and adopting services.

pub mod native;
