//! The lease every transition runs under, so one actor at a time changes what runs on
//! the GPU. Without `lease.redis_url` it is in-process: this daemon's reconciler is the
//! only actor, and the lease only records who holds it for status.

use crate::status::{now_ms, LockStatus};

#[derive(Debug, Clone, thiserror::Error)]
pub enum LeaseError {
    #[error("the GPU lease {key} is held by {holder}; retry when it is released")]
    HeldElsewhere { key: String, holder: String },
    #[error("the lease backend is unreachable: {detail}")]
    Unreachable { detail: String },
    #[error("the GPU lease {key} was lost while acting: {detail}")]
    Lost { key: String, detail: String },
}

/// Names this daemon as a lease holder: host, pid, and a per-run id.
pub fn holder_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "localhost".to_owned());
    format!("gpu-manager:{host}:{}:{:x}", std::process::id(), now_ms())
}

/// The in-process lease of a single daemon.
#[derive(Debug)]
pub struct InProcessLease {
    identity: String,
    held_since_ms: Option<u64>,
}

impl InProcessLease {
    pub fn new(identity: String) -> Self {
        Self {
            identity,
            held_since_ms: None,
        }
    }

    pub async fn acquire(&mut self) -> Result<(), LeaseError> {
        self.held_since_ms.get_or_insert_with(now_ms);
        Ok(())
    }

    pub async fn release(&mut self) {
        self.held_since_ms = None;
    }

    pub fn status(&self) -> LockStatus {
        LockStatus {
            holder: self.held_since_ms.map(|_| self.identity.clone()),
            since_ms: self.held_since_ms,
            backend: "in-process".to_owned(),
            key: None,
            reachable: true,
            error: None,
        }
    }
}
