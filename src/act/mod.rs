//! Effects: starting, stopping and adopting services. The drivers (`native.rs`,
//! `docker.rs` with `container.rs`, `evict.rs`) import none of each other; what they
//! share is in `common.rs`, and `instance.rs` dispatches to them. `cuda_checkpoint.rs`
//! parks any CUDA process through the driver's checkpoint API.

pub mod common;
pub mod container;
pub mod cuda_checkpoint;
pub mod docker;
pub mod evict;
pub mod instance;
pub mod native;
pub mod reaper;
pub mod service_log;

pub use crate::process_exit::ExitInfo;
