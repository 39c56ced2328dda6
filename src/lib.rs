//! gpu-manager: keeps the GPU services of one host started and stopped so that what the
//! pipeline wants now fits in VRAM. See docs/ARCHITECTURE.md for the shape: observe, plan, act.
// The API's warp filter tree, nested inside hyper's connection futures, is deeper than
// the default limit (128) lets an optimised build check for `Unpin` (E0275 in release only).
#![recursion_limit = "256"]

pub mod act;
pub mod api;
pub mod can_fit;
pub mod claim_request;
pub mod client;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod dashboard;
pub mod demand;
pub mod demo;
pub mod desired;
pub mod doctor;
pub mod durable;
pub mod footprints;
pub mod history;
pub mod lease;
pub mod memory;
pub mod metrics;
pub mod notify;
pub mod observe;
pub mod plan;
pub mod process_exit;
pub mod proxy;
pub mod reconcile;
pub mod reload;
pub mod schedule;
pub mod status;
pub mod traffic;
pub mod transition;
pub mod utc;
pub mod web;
