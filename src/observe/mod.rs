//! Observation: what is, as the GPU, Docker, /proc and health endpoints say it is.

pub mod gpu;
pub mod health;
pub mod nvml;
pub mod open;
pub mod owners;
pub mod process;
pub mod simulated;
