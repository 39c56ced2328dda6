//! `GET /gpu/status` serializes each snapshot once, not once per request, and never
//! while it holds the snapshot watch's lock, which the reconcile loop's `send_replace`
//! waits for: a request that finds the cached JSON stale clones the snapshot under the
//! lock, lets go of it, then serializes the clone. A request that finds it current takes
//! no lock but a read of the latest `Arc`.

use std::sync::{Arc, Mutex, PoisonError, RwLock};

use tokio::sync::watch;

use crate::status::{now_ms, Status};

#[derive(Clone)]
pub(super) struct StatusCache {
    snapshots: watch::Receiver<Status>,
    latest: Arc<RwLock<Arc<SerializedStatus>>>,
    /// Held while a stale cache is refreshed, so that the requests of a burst after a
    /// new snapshot serialize it once between them, not once each.
    refreshing: Arc<Mutex<()>>,
}

/// One snapshot's JSON object.
pub(super) struct SerializedStatus {
    /// Has seen the snapshot this is from: `has_changed` says when a newer one is out.
    seen: watch::Receiver<Status>,
    json: Vec<u8>,
    observed_at_ms: u64,
}

impl StatusCache {
    pub(super) fn new(snapshots: watch::Receiver<Status>) -> Self {
        let latest = SerializedStatus::of(&snapshots);
        Self {
            snapshots,
            latest: Arc::new(RwLock::new(Arc::new(latest))),
            refreshing: Arc::new(Mutex::new(())),
        }
    }

    /// The latest snapshot's JSON with `"snapshot_age_ms"` added.
    pub(super) fn body(&self) -> Vec<u8> {
        let current = self.current();
        let json = &current.json;
        let age = now_ms().saturating_sub(current.observed_at_ms);
        let mut body = Vec::with_capacity(json.len() + 32);
        // The object without its closing brace, then the age as its last member.
        body.extend_from_slice(&json[..json.len() - 1]);
        body.extend_from_slice(format!(",\"snapshot_age_ms\":{age}}}").as_bytes());
        body
    }

    /// The JSON of the latest snapshot, serialized now if no request did yet.
    fn current(&self) -> Arc<SerializedStatus> {
        let latest = self.latest();
        if latest.is_current() {
            return latest;
        }
        let _one_at_a_time = self
            .refreshing
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // Another request may have refreshed it while this one waited.
        let latest = self.latest();
        if latest.is_current() {
            return latest;
        }
        let fresh = Arc::new(SerializedStatus::of(&self.snapshots));
        *self.latest.write().unwrap_or_else(PoisonError::into_inner) = Arc::clone(&fresh);
        fresh
    }

    fn latest(&self) -> Arc<SerializedStatus> {
        Arc::clone(&self.latest.read().unwrap_or_else(PoisonError::into_inner))
    }
}

impl SerializedStatus {
    fn of(snapshots: &watch::Receiver<Status>) -> Self {
        let mut seen = snapshots.clone();
        // The clone is made under the watch's read lock; the serialization after it.
        let status = seen.borrow_and_update().clone();
        let json =
            serde_json::to_vec(&status).expect("a status always serializes to a JSON object");
        Self {
            seen,
            json,
            observed_at_ms: status.observed_at_ms,
        }
    }

    /// No newer snapshot is out. An error means the reconciler is gone: its last
    /// snapshot stays, aging.
    fn is_current(&self) -> bool {
        !self.seen.has_changed().unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_snapshot_is_serialized_once_until_the_next_one() {
        let (snapshots, receiver) = watch::channel(Status::default());
        let cache = StatusCache::new(receiver);
        let first = cache.current();
        assert!(
            Arc::ptr_eq(&first, &cache.current()),
            "served from the cache"
        );

        let mut next = Status::default();
        next.vram.total_mb = 24576;
        snapshots.send_replace(next.clone());
        let second = cache.current();
        assert!(
            !Arc::ptr_eq(&first, &second),
            "a new snapshot is serialized"
        );
        let parsed: Status = serde_json::from_slice(&second.json).unwrap();
        assert_eq!(parsed, next);
        assert!(
            Arc::ptr_eq(&second, &cache.clone().current()),
            "shared by clones"
        );

        drop(snapshots);
        assert!(
            Arc::ptr_eq(&second, &cache.current()),
            "the last snapshot stays once the reconciler is gone"
        );
    }
}
