//! Background tasks that keep Redis keys alive independently of the reconciler, which
//! may be busy for longer than a TTL (a service start waits up to its start timeout):
//! - `Renewal` extends the transition lock while a transition runs and flags its loss;
//! - `LeaderKeeper` holds `<key>:leader` continuously while this daemon leads, and while it
//!   is standby, claims the key as soon as the leader's expires.
//!
//! Both use the same token-checked protocol as the transition lock. A renewal that
//! cannot reach Redis keeps retrying until the key might have expired (two thirds of the
//! TTL since the last success), and only then gives the key up as lost.

use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;
use redis::RedisError;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

use super::protocol::{self, Holder};

/// How often a standby looks for a free leader key: a leader that shuts down deletes
/// its key, and the standby should take over well within a second.
const STANDBY_POLL: Duration = Duration::from_millis(250);

/// How often a held key is extended: three chances before it would expire.
fn renew_every(ttl: Duration) -> Duration {
    ttl / 3
}

/// How often a failed renewal is retried.
fn retry_every(ttl: Duration) -> Duration {
    ttl / 10
}

/// After this long without a successful renewal the key may be gone: count it lost.
fn give_up_after(ttl: Duration) -> Duration {
    ttl * 2 / 3
}

/// Keeps the transition lock alive while a transition runs.
pub struct Renewal {
    task: JoinHandle<()>,
    lost: watch::Receiver<Option<String>>,
}

impl Renewal {
    pub fn start(conn: ConnectionManager, key: String, token: String, ttl: Duration) -> Self {
        let (lost_tx, lost) = watch::channel(None);
        let task = tokio::spawn(renew_until_lost(conn, key, token, ttl, lost_tx));
        Self { task, lost }
    }

    /// Why the key was lost, once it was.
    pub fn lost(&self) -> Option<String> {
        self.lost.borrow().clone()
    }
}

impl Drop for Renewal {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn renew_until_lost(
    mut conn: ConnectionManager,
    key: String,
    token: String,
    ttl: Duration,
    lost: watch::Sender<Option<String>>,
) {
    let mut last_ok = Instant::now();
    let mut wait = renew_every(ttl);
    loop {
        tokio::time::sleep(wait).await;
        match protocol::extend(&mut conn, &key, &token, ttl).await {
            Ok(true) => {
                last_ok = Instant::now();
                wait = renew_every(ttl);
            }
            Ok(false) => {
                let now = match protocol::holder(&mut conn, &key).await {
                    Ok(Some(holder)) => format!("{} holds it now", holder.token),
                    Ok(None) => "nobody holds it now".to_owned(),
                    Err(error) => format!("its holder cannot be read: {error}"),
                };
                lost.send_replace(Some(format!(
                    "{key} no longer holds this daemon's token {token}: it expired or was deleted; {now}"
                )));
                return;
            }
            Err(error) if last_ok.elapsed() >= give_up_after(ttl) => {
                lost.send_replace(Some(format!(
                    "{key} could not be extended for {} ms, so it may have expired: {error}",
                    last_ok.elapsed().as_millis()
                )));
                return;
            }
            Err(error) => {
                tracing::warn!(%key, %error, "cannot extend the lease yet; retrying");
                wait = retry_every(ttl);
            }
        }
    }
}

/// The leader key as the leadership task last saw it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeaderState {
    /// This daemon holds the leader key.
    pub leading: bool,
    /// Who holds the leader key (this daemon's token when leading).
    pub leader: Option<String>,
    /// Why Redis could not be asked, at the last attempt.
    pub error: Option<String>,
    /// When the attempt that found this began; None before the first one.
    pub asked_at: Option<Instant>,
}

/// Holds `<key>:leader` for this daemon, or waits to take it over.
pub struct LeaderKeeper {
    task: JoinHandle<()>,
    state: watch::Receiver<LeaderState>,
    /// Wakes the task for an attempt now rather than at its next turn.
    ask_now: Arc<Notify>,
    key: String,
    token: String,
}

impl LeaderKeeper {
    /// Makes the first claim before returning, so a lone daemon leads from its first
    /// round; then keeps claiming in the background.
    pub async fn start(
        mut conn: ConnectionManager,
        key: String,
        token: String,
        ttl: Duration,
    ) -> Self {
        let mut claim = Claim {
            key: key.clone(),
            token: token.clone(),
            ttl,
            last_ok: None,
        };
        let (first, wait) = claim.attempt(&mut conn).await;
        let (state_tx, state) = watch::channel(first);
        let ask_now = Arc::new(Notify::new());
        let asked = Arc::clone(&ask_now);
        let task = tokio::spawn(async move {
            let mut wait = wait;
            loop {
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = asked.notified() => {}
                }
                let (next, next_wait) = claim.attempt(&mut conn).await;
                state_tx.send_replace(next);
                wait = next_wait;
            }
        });
        Self {
            task,
            state,
            ask_now,
            key,
            token,
        }
    }

    pub fn state(&self) -> LeaderState {
        self.state.borrow().clone()
    }

    /// Asks Redis now rather than at the task's next turn (up to a tenth of the TTL
    /// away while Redis is down), and returns the answer of an attempt begun after this
    /// call; or, past `within`, the latest answer there is.
    pub async fn ask_again(&self, within: Duration) -> LeaderState {
        let asked = Instant::now();
        let mut state = self.state.clone();
        self.ask_now.notify_one();
        let fresh = |s: &LeaderState| s.asked_at.is_some_and(|at| at >= asked);
        let answer = match tokio::time::timeout(within, state.wait_for(fresh)).await {
            Ok(Ok(answer)) => answer.clone(),
            // The task stopped (shutdown) or took too long: what it last knew.
            Ok(Err(_)) | Err(_) => self.state(),
        };
        answer
    }

    /// Stops claiming and deletes the leader key if it is still this daemon's.
    pub async fn step_down(self, conn: &mut ConnectionManager) -> Result<(), RedisError> {
        self.task.abort();
        protocol::release(conn, &self.key, &self.token)
            .await
            .map(drop)
    }
}

impl Drop for LeaderKeeper {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Claim {
    key: String,
    token: String,
    ttl: Duration,
    /// The last time the key was confirmed ours; None while standby.
    last_ok: Option<Instant>,
}

impl Claim {
    /// One round: extend the key if leading, else take it if free (or still ours from
    /// before an outage). Returns the state and how long to wait before the next round.
    async fn attempt(&mut self, conn: &mut ConnectionManager) -> (LeaderState, Duration) {
        let asked_at = Some(Instant::now());
        match self.try_lead(conn).await {
            Ok((true, _)) => {
                self.last_ok = Some(Instant::now());
                let state = LeaderState {
                    leading: true,
                    leader: Some(self.token.clone()),
                    error: None,
                    asked_at,
                };
                (state, renew_every(self.ttl))
            }
            Ok((false, holder)) => {
                self.last_ok = None;
                // Wake just after the leader's key would expire, to take over within
                // one TTL of the leader's last renewal, and at least every
                // STANDBY_POLL, to take over at once from a leader that stepped down.
                let wait = holder
                    .as_ref()
                    .and_then(|h| h.expires_in)
                    .map(|left| left + Duration::from_millis(20))
                    .unwrap_or(STANDBY_POLL)
                    .clamp(
                        Duration::from_millis(20),
                        STANDBY_POLL.min(renew_every(self.ttl)),
                    );
                let state = LeaderState {
                    leading: false,
                    leader: holder.map(|h| h.token),
                    error: None,
                    asked_at,
                };
                (state, wait)
            }
            Err(error) => {
                let still_leading = self
                    .last_ok
                    .is_some_and(|at| at.elapsed() < give_up_after(self.ttl));
                if !still_leading {
                    self.last_ok = None;
                }
                let state = LeaderState {
                    leading: still_leading,
                    leader: still_leading.then(|| self.token.clone()),
                    error: Some(error.to_string()),
                    asked_at,
                };
                (state, retry_every(self.ttl))
            }
        }
    }

    async fn try_lead(
        &self,
        conn: &mut ConnectionManager,
    ) -> Result<(bool, Option<Holder>), RedisError> {
        let (key, token, ttl) = (&self.key, &self.token, self.ttl);
        if self.last_ok.is_some() && protocol::extend(conn, key, token, ttl).await? {
            return Ok((true, None));
        }
        if protocol::try_take(conn, key, token, ttl).await? {
            return Ok((true, None));
        }
        let holder = protocol::holder(conn, key).await?;
        if holder.as_ref().is_some_and(|h| &h.token == token)
            && protocol::extend(conn, key, token, ttl).await?
        {
            return Ok((true, None));
        }
        Ok((false, holder))
    }
}
