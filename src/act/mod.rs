//! Effects: starting, stopping, adopting and parking services. The drivers
//! (`native.rs`, `docker.rs` with `container.rs`, and for parking and draining
//! `park.rs`, `ollama.rs`, `cuda_checkpoint.rs`, `drain.rs`) import none of each other;
//! what they share is in `common.rs`, and `instance.rs` dispatches to them.

pub mod common;
pub mod container;
pub mod cuda_checkpoint;
pub mod docker;
pub mod drain;
pub mod instance;
pub mod native;
pub mod ollama;
pub mod park;
pub mod reaper;
pub mod service_log;

pub use crate::process_exit::ExitInfo;
