//! The lease every transition runs under, so one actor at a time changes what runs on
//! the GPU.
//!
//! - With `lease.redis_url`: the redis-py `Lock` protocol on `lease.key` (`gpu_lock`),
//!   taken only while a transition acts, so the Python consumers that lock the GPU with
//!   redis-py and this daemon exclude each other; and `<key>:leader`, held continuously
//!   by the one daemon that acts, so a second daemon on the same Redis stays standby
//!   and takes over when the leader's key expires.
//! - Without: an in-process lease; this daemon is the only actor and the lease only
//!   records who holds it, for status.

mod in_process;
mod keeper;
mod protocol;
mod redis;
#[cfg(test)]
#[path = "../../tests/common/redis_server.rs"]
mod test_redis;

use crate::config::LeaseConfig;
use std::future::Future;

use serde::{Deserialize, Serialize};

use crate::clock::now_ms;

pub use self::in_process::InProcessLease;
pub use self::redis::RedisLease;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaseError {
    #[error("the GPU lease {key} is held by {holder} (waited {waited_ms} ms for it); retry when it is released")]
    HeldElsewhere {
        key: String,
        holder: String,
        /// When this daemon first saw that holder.
        since_ms: Option<u64>,
        waited_ms: u64,
    },
    #[error("this daemon is standby: {leader} leads and acts; send requests to it (this daemon takes over if it stops)")]
    NotLeader { leader: String },
    #[error("the lease backend is unreachable: {detail}")]
    Unreachable { detail: String },
    #[error("the GPU lease {key} was lost while acting: {detail}")]
    Lost {
        key: String,
        detail: String,
        /// Who holds it now, when known.
        holder: Option<String>,
    },
}

impl LeaseError {
    /// The HTTP status an API answer should carry: 423 while someone else holds the
    /// lease, 503 while its backend cannot be reached.
    pub fn http_status(&self) -> u16 {
        match self {
            LeaseError::HeldElsewhere { .. } | LeaseError::NotLeader { .. } => 423,
            LeaseError::Lost {
                holder: Some(_), ..
            } => 423,
            LeaseError::Lost { holder: None, .. } | LeaseError::Unreachable { .. } => 503,
        }
    }

    /// Who holds the lease instead of this daemon, when known.
    pub fn holder(&self) -> Option<&str> {
        match self {
            LeaseError::HeldElsewhere { holder, .. } => Some(holder),
            LeaseError::NotLeader { leader } => Some(leader),
            LeaseError::Lost { holder, .. } => holder.as_deref(),
            LeaseError::Unreachable { .. } => None,
        }
    }

    /// Why a daemon that does not lead refuses a transition: 423 naming the leader when
    /// another daemon leads; 503 when nobody is known to lead because the backend does
    /// not answer (a daemon started before Redis is not a standby).
    pub fn not_leading(leader: Option<String>, why: &str) -> Self {
        match leader {
            Some(leader) => LeaseError::NotLeader { leader },
            None => LeaseError::Unreachable {
                detail: format!("no daemon is known to lead yet: {why}"),
            },
        }
    }

    pub fn refusal(&self) -> LeaseRefusal {
        LeaseRefusal {
            http_status: self.http_status(),
            error: self.to_string(),
            holder: self.holder().map(str::to_owned),
            at_ms: now_ms(),
        }
    }
}

/// What `Lease::refresh` found: whether this daemon acts, and whether that just changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leadership {
    /// Leads, as at the last refresh.
    Leading,
    /// Just became the leader: adopt what runs before acting.
    Gained,
    /// Standby, as at the last refresh.
    Standby,
    /// Just lost the lead: another daemon acts now; let go of what this one tracked.
    Lost,
}

impl Leadership {
    pub fn leads(self) -> bool {
        matches!(self, Leadership::Leading | Leadership::Gained)
    }

    fn between(was_leading: bool, leading: bool) -> Self {
        match (was_leading, leading) {
            (true, true) => Leadership::Leading,
            (false, true) => Leadership::Gained,
            (false, false) => Leadership::Standby,
            (true, false) => Leadership::Lost,
        }
    }
}

/// What the reconciler needs of a lease (docs/ARCHITECTURE.md, "The lease"). No method
/// waits for another holder: the reconciler tries again on its own clock, so that it
/// keeps hearing events while a Python consumer holds the lock.
pub trait LeaseBackend: Send + 'static {
    /// Once per round: reads who leads and who holds the transition lock (background
    /// tasks renew the keys), for status and for the round.
    fn refresh(&mut self) -> impl Future<Output = Leadership> + Send;

    /// One attempt at the transition lock. `HeldElsewhere` says how long this daemon
    /// has been trying, so the caller decides when to give up.
    fn try_acquire(&mut self) -> impl Future<Output = Result<(), LeaseError>> + Send;

    /// Before new actions begin: is the transition lock still ours?
    fn check(&mut self) -> impl Future<Output = Result<(), LeaseError>> + Send;

    /// Releases the transition lock, if held.
    fn release(&mut self) -> impl Future<Output = ()> + Send;

    /// A change came while this daemon is standby: asks the backend once more, bounded,
    /// whether it leads, so that an answer from before the backend came up does not
    /// refuse it. Ok: it leads now, and the next `refresh` says `Gained`. The default
    /// suits a backend whose status is always current.
    fn confirm_lead(&mut self) -> impl Future<Output = Result<(), LeaseError>> + Send {
        let answer = self.status().lead();
        async move { answer }
    }

    /// At shutdown: releases the transition lock and the lead, so that a standby takes
    /// over at once rather than after a TTL.
    fn step_down(&mut self) -> impl Future<Output = ()> + Send;

    fn status(&self) -> LockStatus;
}

/// The lease the reconciler acts under.
pub enum Lease {
    InProcess(InProcessLease),
    Redis(Box<RedisLease>),
}

impl Lease {
    /// The configured lease: Redis when `redis_url` is set, else in-process. Connects
    /// lazily: nothing is claimed before the first `refresh`.
    pub fn from_config(config: &LeaseConfig) -> Result<Self, LeaseError> {
        let identity = holder_identity();
        let lease = match &config.redis_url {
            Some(_) => Lease::Redis(Box::new(RedisLease::new(config, identity)?)),
            None => Lease::InProcess(InProcessLease::new(identity)),
        };
        tracing::info!(summary = %lease.status().summary, "lease");
        Ok(lease)
    }
}

impl LeaseBackend for Lease {
    async fn refresh(&mut self) -> Leadership {
        match self {
            Lease::InProcess(lease) => lease.refresh(),
            Lease::Redis(lease) => lease.refresh().await,
        }
    }

    async fn try_acquire(&mut self) -> Result<(), LeaseError> {
        match self {
            Lease::InProcess(lease) => lease.acquire(),
            Lease::Redis(lease) => lease.try_acquire().await,
        }
    }

    async fn check(&mut self) -> Result<(), LeaseError> {
        match self {
            Lease::InProcess(_) => Ok(()),
            Lease::Redis(lease) => lease.check().await,
        }
    }

    async fn release(&mut self) {
        match self {
            Lease::InProcess(lease) => lease.release(),
            Lease::Redis(lease) => lease.release().await,
        }
    }

    async fn confirm_lead(&mut self) -> Result<(), LeaseError> {
        match self {
            Lease::InProcess(lease) => lease.status().lead(),
            Lease::Redis(lease) => lease.confirm_lead().await,
        }
    }

    async fn step_down(&mut self) {
        match self {
            Lease::InProcess(lease) => lease.release(),
            Lease::Redis(lease) => lease.step_down().await,
        }
    }

    fn status(&self) -> LockStatus {
        match self {
            Lease::InProcess(lease) => lease.status(),
            Lease::Redis(lease) => lease.status(),
        }
    }
}

/// Names this daemon as a lease holder: host, pid, and a per-run id.
pub fn holder_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "localhost".to_owned());
    format!("gpu-manager:{host}:{}:{:x}", std::process::id(), now_ms())
}

/// The lease transitions run under (`lease:` in the config).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LockStatus {
    /// Who holds the transition lock (`key`) now, this daemon or another (a Python
    /// consumer's redis-py token, another gpu-manager); None: free.
    pub holder: Option<String>,
    /// Since when: when this daemon took it, or first saw a foreign holder.
    pub since_ms: Option<u64>,
    /// "in-process" or "redis".
    pub backend: String,
    pub key: Option<String>,
    /// Whether the backend answered at its last use; None until it was first asked.
    pub reachable: Option<bool>,
    pub error: Option<String>,
    /// The holder is this daemon.
    #[serde(default)]
    pub ours: bool,
    /// How long until the holder's key expires unless renewed (Redis only).
    #[serde(default)]
    pub expires_in_ms: Option<u64>,
    /// Whether this daemon acts (leader) or waits to take over (standby).
    #[serde(default)]
    pub role: LeaseRole,
    /// The daemon that acts: its identity (host, pid, run id).
    #[serde(default)]
    pub leader: Option<String>,
    /// This daemon's identity.
    #[serde(default)]
    pub identity: String,
    /// The lease's situation in one sentence.
    #[serde(default)]
    pub summary: String,
    /// The last time a transition could not run, or was cut short, for lack of the lease.
    #[serde(default)]
    pub last_refusal: Option<LeaseRefusal>,
}

impl LockStatus {
    /// Why this daemon, were it not leading, refuses a transition.
    pub fn standby_refusal(self) -> LeaseError {
        let why = self.error.unwrap_or(self.summary);
        LeaseError::not_leading(self.leader, &why)
    }

    /// Ok when this daemon leads; else why it refuses a transition.
    pub fn lead(self) -> Result<(), LeaseError> {
        match self.role {
            LeaseRole::Leader => Ok(()),
            LeaseRole::Standby => Err(self.standby_refusal()),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LeaseRole {
    Leader,
    #[default]
    Standby,
}

/// A transition refused (or stopped) for lack of the lease, for API answers: 423 while
/// someone else holds it, 503 while its backend is unreachable.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeaseRefusal {
    pub http_status: u16,
    pub error: String,
    /// Who held the lease instead, when known.
    pub holder: Option<String>,
    pub at_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_the_contract_http_statuses() {
        let held = LeaseError::HeldElsewhere {
            key: "gpu_lock".into(),
            holder: "5f2a".into(),
            since_ms: None,
            waited_ms: 3000,
        };
        assert_eq!(held.http_status(), 423);
        assert_eq!(held.refusal().holder.as_deref(), Some("5f2a"));
        assert!(held.to_string().contains("held by 5f2a"), "{held}");
        let down = LeaseError::Unreachable {
            detail: "connection refused".into(),
        };
        assert_eq!(down.http_status(), 503);
        let taken = LeaseError::Lost {
            key: "gpu_lock".into(),
            detail: "taken".into(),
            holder: Some("x".into()),
        };
        assert_eq!(taken.http_status(), 423);
        let vanished = LeaseError::Lost {
            key: "gpu_lock".into(),
            detail: "gone".into(),
            holder: None,
        };
        assert_eq!(vanished.http_status(), 503);
        let standby = LeaseError::NotLeader {
            leader: "gpu-manager:h:1:a".into(),
        };
        assert_eq!(standby.http_status(), 423);
    }

    #[test]
    fn leadership_changes() {
        assert_eq!(Leadership::between(false, true), Leadership::Gained);
        assert_eq!(Leadership::between(true, false), Leadership::Lost);
        assert!(Leadership::Gained.leads() && Leadership::Leading.leads());
        assert!(!Leadership::Standby.leads() && !Leadership::Lost.leads());
    }
}
