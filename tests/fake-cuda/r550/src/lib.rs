//! A libcuda.so stand-in for a driver older than 570: `cuInit`, `cuDriverGetVersion`
//! (CUDA 12.4, what driver 550 reports) and the error names, but none of the
//! `cuCheckpointProcess*` symbols, which only driver 570 (CUDA 12.8) added. Whoever loads
//! it must find them missing through `dlsym`, as on such a host.

#![deny(unsafe_op_in_unsafe_fn)]
// The exported names are the CUDA driver API's C names.
#![allow(non_snake_case)]

/// What `cuDriverGetVersion` reports: the CUDA version the driver supports, 1000 * major
/// + 10 * minor.
const DRIVER_VERSION: std::ffi::c_int = 12040;

#[path = "../../src/driver.rs"]
pub mod driver;
