//! The in-process lease of a single daemon (no `lease.redis_url`): it always leads, and
//! only records who holds the lease, for status. Python consumers' Redis locks are not
//! seen, which status says plainly.

use crate::clock::now_ms;

use super::{LeaseRole, LockStatus};

use super::Leadership;

#[derive(Debug)]
pub struct InProcessLease {
    identity: String,
    held_since_ms: Option<u64>,
    refreshed: bool,
}

impl InProcessLease {
    pub fn new(identity: String) -> Self {
        Self {
            identity,
            held_since_ms: None,
            refreshed: false,
        }
    }

    /// The first refresh is the moment this daemon starts leading.
    pub fn refresh(&mut self) -> Leadership {
        Leadership::between(std::mem::replace(&mut self.refreshed, true), true)
    }

    pub fn acquire(&mut self) -> Result<(), super::LeaseError> {
        self.held_since_ms.get_or_insert_with(now_ms);
        Ok(())
    }

    pub fn release(&mut self) {
        self.held_since_ms = None;
    }

    pub fn status(&self) -> LockStatus {
        LockStatus {
            holder: self.held_since_ms.map(|_| self.identity.clone()),
            since_ms: self.held_since_ms,
            backend: "in-process".to_owned(),
            key: None,
            reachable: Some(true),
            error: None,
            ours: self.held_since_ms.is_some(),
            expires_in_ms: None,
            role: LeaseRole::Leader,
            leader: Some(self.identity.clone()),
            identity: self.identity.clone(),
            summary: "in-process lease (lease.redis_url is not set): only this daemon's own transitions are serialized; Python consumers' Redis locks are not seen".to_owned(),
            last_refusal: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leads_from_the_first_refresh_and_says_what_it_is() {
        let mut lease = InProcessLease::new("me".into());
        assert_eq!(lease.refresh(), Leadership::Gained);
        assert_eq!(lease.refresh(), Leadership::Leading);
        assert_eq!(lease.status().holder, None);
        lease.acquire().unwrap();
        let status = lease.status();
        assert_eq!(status.holder.as_deref(), Some("me"));
        assert!(status.ours && status.since_ms.is_some());
        assert_eq!(status.backend, "in-process");
        assert!(status.summary.contains("redis_url is not set"));
        lease.release();
        assert_eq!(lease.status().holder, None);
    }
}
