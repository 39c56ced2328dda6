//! gpu-manager: keeps the GPU services of one host started and stopped so that what the
//! pipeline wants now fits in VRAM. See DESIGN.md for the shape: observe, plan, act.

pub mod act;
pub mod api;
pub mod client;
pub mod config;
pub mod daemon;
pub mod dashboard;
pub mod demo;
pub mod desired;
pub mod history;
pub mod lease;
pub mod metrics;
pub mod observe;
pub mod plan;
pub mod reconcile;
pub mod status;
pub mod transition;
pub mod web;
