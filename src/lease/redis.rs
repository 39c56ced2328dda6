//! The Redis lease: the transition lock on `lease.key` with the redis-py `Lock`
//! protocol, taken only while a transition acts (renewed in the background meanwhile),
//! and the leadership key `<key>:leader`, held continuously by the one daemon that acts.
//!
//! Redis calls have short connect and response timeouts, so a dead Redis costs a round
//! about a second at most: status keeps working and says so, transitions are refused
//! (503), and everything resumes by itself when Redis answers again.

use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::RedisError;

use crate::clock::now_ms;
use crate::config::LeaseConfig;

use super::{LeaseRefusal, LeaseRole, LockStatus};

use super::keeper::{LeaderKeeper, LeaderState, Renewal};
use super::protocol::{self, Holder};
use super::{Leadership, LeaseError};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(1);

/// How long a change waits for Redis to say again who leads (`confirm_lead`): one
/// leadership attempt, a few commands on a connection made now.
const ASK_AGAIN_WITHIN: Duration = Duration::from_secs(3);

/// The transition lock while this daemon holds it.
struct Held {
    token: String,
    since_ms: u64,
    renewal: Renewal,
    /// `check` already reported it lost.
    loss_reported: bool,
}

/// Whether Redis answered at its last use.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Reach {
    NotAskedYet,
    Answers,
    Unreachable(String),
}

impl Reach {
    fn error(&self) -> Option<&str> {
        match self {
            Reach::Unreachable(error) => Some(error),
            Reach::NotAskedYet | Reach::Answers => None,
        }
    }
}

/// The transition lock's holder as last read from Redis.
#[derive(Default)]
struct Seen {
    holder: Option<String>,
    since_ms: Option<u64>,
    expires_in_ms: Option<u64>,
}

pub struct RedisLease {
    /// The URL without its password, for messages.
    url: String,
    key: String,
    leader_key: String,
    ttl: Duration,
    identity: String,
    conn: ConnectionManager,
    leadership: Option<LeaderKeeper>,
    leading: bool,
    leader: Option<String>,
    standby_reported: bool,
    acquisitions: u64,
    held: Option<Held>,
    seen: Seen,
    reach: Reach,
    /// Since when this daemon has been trying to take the transition lock.
    waiting_since: Option<Instant>,
    last_refusal: Option<LeaseRefusal>,
}

impl RedisLease {
    /// Connects lazily (Redis may be down when the daemon starts); claims nothing.
    pub fn new(config: &LeaseConfig, identity: String) -> Result<Self, LeaseError> {
        let raw_url = config.redis_url.as_deref().unwrap_or_default();
        let url = redacted(raw_url);
        let invalid = |error: RedisError| LeaseError::Unreachable {
            detail: format!("cannot use lease.redis_url {url}: {error}"),
        };
        let client = redis::Client::open(raw_url).map_err(invalid)?;
        let manager = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_number_of_retries(0);
        let conn = ConnectionManager::new_lazy_with_config(client, manager).map_err(invalid)?;
        Ok(Self {
            url,
            leader_key: format!("{}:leader", config.key),
            key: config.key.clone(),
            ttl: config.ttl,
            identity,
            conn,
            leadership: None,
            leading: false,
            leader: None,
            standby_reported: false,
            acquisitions: 0,
            held: None,
            seen: Seen::default(),
            reach: Reach::NotAskedYet,
            waiting_since: None,
            last_refusal: None,
        })
    }

    /// The leadership task, started (with its first claim) on first use.
    async fn keeper(&mut self) -> &LeaderKeeper {
        match self.leadership {
            Some(ref keeper) => keeper,
            None => self.leadership.insert(
                LeaderKeeper::start(
                    self.conn.clone(),
                    self.leader_key.clone(),
                    self.identity.clone(),
                    self.ttl,
                )
                .await,
            ),
        }
    }

    pub async fn refresh(&mut self) -> Leadership {
        let state = self.keeper().await.state();
        // While Redis cannot be asked, nobody is known to lead: the role stays as it
        // was (a leader still plans, and its transitions are refused with 503).
        let leading = match (&state.leader, state.leading) {
            (_, true) => true,
            (Some(_), false) => false,
            (None, false) => self.leading,
        };
        let change = Leadership::between(self.leading, leading);
        self.leading = leading;
        self.leader = state.leader;
        let problem = match protocol::holder(&mut self.conn, &self.key).await {
            Ok(holder) => {
                self.see(holder);
                state.error
            }
            Err(error) => Some(error.to_string()),
        };
        self.set_unreachable(problem);
        self.log_role(change);
        change
    }

    /// Says when this daemon starts leading, and once per standby spell who leads.
    fn log_role(&mut self, change: Leadership) {
        let (key, leader_key) = (&self.key, &self.leader_key);
        match (change, &self.leader) {
            (Leadership::Gained, _) => {
                self.standby_reported = false;
                tracing::info!(identity = %self.identity, "leading: this daemon acts; transitions take {key} while they run");
            }
            (Leadership::Lost, leader) => {
                self.standby_reported = true;
                let leader = leader.as_deref().unwrap_or("another gpu-manager");
                tracing::warn!(%leader, "standby: this daemon no longer leads; it takes over again when {leader_key} expires");
            }
            (Leadership::Standby, Some(leader)) if !self.standby_reported => {
                self.standby_reported = true;
                tracing::info!(%leader, "standby: another daemon leads; this one takes over when {leader_key} expires");
            }
            _ => {}
        }
    }

    /// A change came while standby. With another daemon known to lead, that is the
    /// answer; with nobody known to lead (Redis did not answer), Redis is asked again
    /// now, since the last answer may be from before it came up.
    pub async fn confirm_lead(&mut self) -> Result<(), LeaseError> {
        if self.leading {
            return Ok(());
        }
        if let Some(leader) = &self.leader {
            return Err(LeaseError::NotLeader {
                leader: leader.clone(),
            });
        }
        let state = self.keeper().await.ask_again(ASK_AGAIN_WITHIN).await;
        if state.leading {
            return Ok(());
        }
        let why = state
            .error
            .unwrap_or_else(|| format!("Redis at {} has not answered yet", self.url));
        Err(LeaseError::not_leading(state.leader, &why))
    }

    /// One attempt at the transition lock; never waits for another holder.
    pub async fn try_acquire(&mut self) -> Result<(), LeaseError> {
        let result = self.take().await;
        match &result {
            Ok(()) => {
                self.last_refusal = None;
                self.waiting_since = None;
            }
            Err(error) => self.refuse(error),
        }
        result
    }

    async fn take(&mut self) -> Result<(), LeaseError> {
        // Acting needs the lead confirmed by Redis now, not as of the last round.
        let state = self.leadership.as_ref().map(LeaderKeeper::state);
        match state {
            Some(state) if state.leading => {}
            Some(LeaderState {
                leader: Some(leader),
                ..
            }) => return Err(LeaseError::NotLeader { leader }),
            Some(LeaderState { error, .. }) => {
                return Err(LeaseError::Unreachable {
                    detail: format!(
                        "Redis at {} does not confirm this daemon's lead ({}); transitions are refused until it does",
                        self.url,
                        error.as_deref().unwrap_or("no answer yet")
                    ),
                })
            }
            None => {
                return Err(LeaseError::Unreachable {
                    detail: "the lease was not refreshed yet".to_owned(),
                })
            }
        }
        let started = *self.waiting_since.get_or_insert_with(Instant::now);
        loop {
            self.acquisitions += 1;
            let token = format!("{}:{}", self.identity, self.acquisitions);
            let taken = protocol::try_take(&mut self.conn, &self.key, &token, self.ttl)
                .await
                .map_err(|e| self.unreachable_error(&e))?;
            self.set_unreachable(None);
            if taken {
                let renewal =
                    Renewal::start(self.conn.clone(), self.key.clone(), token.clone(), self.ttl);
                let since_ms = now_ms();
                self.seen = Seen {
                    holder: Some(token.clone()),
                    since_ms: Some(since_ms),
                    expires_in_ms: Some(millis(self.ttl)),
                };
                self.held = Some(Held {
                    token,
                    since_ms,
                    renewal,
                    loss_reported: false,
                });
                return Ok(());
            }
            let holder = protocol::holder(&mut self.conn, &self.key)
                .await
                .map_err(|e| self.unreachable_error(&e))?;
            let Some(holder) = holder else {
                continue; // released between SET and GET: try again at once
            };
            if holder.token.starts_with(&format!("{}:", self.identity)) {
                // This daemon's own key from an earlier transition whose release did not
                // reach Redis: no one else can hold this token, so delete it.
                protocol::release(&mut self.conn, &self.key, &holder.token)
                    .await
                    .map_err(|e| self.unreachable_error(&e))?;
                continue;
            }
            let token_now = holder.token.clone();
            self.see(Some(holder));
            return Err(LeaseError::HeldElsewhere {
                key: self.key.clone(),
                holder: token_now,
                since_ms: self.seen.since_ms,
                waited_ms: millis(started.elapsed()),
            });
        }
    }

    /// At shutdown: the transition lock and the lead go, so a standby takes over now.
    pub async fn step_down(&mut self) {
        self.release().await;
        self.waiting_since = None;
        if let Some(keeper) = self.leadership.take() {
            if let Err(error) = keeper.step_down(&mut self.conn).await {
                tracing::warn!(key = %self.leader_key, %error, "cannot release the lead: a standby takes over when it expires");
            }
        }
        self.leading = false;
    }

    pub async fn check(&mut self) -> Result<(), LeaseError> {
        let result = self.confirm().await;
        if let Err(error) = &result {
            self.refuse(error);
            if let Some(held) = &mut self.held {
                held.loss_reported = true;
            }
        }
        result
    }

    /// The renewal task has not lost the lock, this daemon still leads, and Redis
    /// confirms the token now (extending it before the next action).
    async fn confirm(&mut self) -> Result<(), LeaseError> {
        let lost = |detail: String, holder: Option<String>| LeaseError::Lost {
            key: self.key.clone(),
            detail,
            holder,
        };
        let Some(held) = &self.held else {
            return Err(lost("this daemon does not hold it".into(), None));
        };
        if let Some(why) = held.renewal.lost() {
            return Err(lost(why, None));
        }
        if let Some(state) = self.leadership.as_ref().map(LeaderKeeper::state) {
            if !state.leading {
                let detail = format!(
                    "this daemon no longer leads ({} is held by {})",
                    self.leader_key,
                    state.leader.as_deref().unwrap_or("nobody it can see")
                );
                return Err(lost(detail, state.leader));
            }
        }
        let token = held.token.clone();
        match protocol::extend(&mut self.conn, &self.key, &token, self.ttl).await {
            Ok(true) => Ok(()),
            Ok(false) => {
                let now = protocol::holder(&mut self.conn, &self.key)
                    .await
                    .ok()
                    .flatten()
                    .map(|h| h.token);
                let detail = format!(
                    "it no longer holds this daemon's token {token} (now: {})",
                    now.as_deref().unwrap_or("free")
                );
                Err(lost(detail, now))
            }
            Err(error) => Err(lost(
                format!("Redis at {} cannot confirm it: {error}", self.url),
                None,
            )),
        }
    }

    pub async fn release(&mut self) {
        let Some(held) = self.held.take() else {
            return;
        };
        drop(held.renewal);
        match protocol::release(&mut self.conn, &self.key, &held.token).await {
            Ok(true) => self.see(None),
            Ok(false) if held.loss_reported => {}
            Ok(false) => {
                tracing::warn!(key = %self.key, token = %held.token, "at release the GPU lease was no longer this daemon's: it had expired or been taken")
            }
            Err(error) => {
                tracing::warn!(key = %self.key, %error, "cannot release the GPU lease: it expires by itself within its TTL")
            }
        }
    }

    pub fn status(&self) -> LockStatus {
        let ours = self
            .held
            .as_ref()
            .is_some_and(|h| self.seen.holder.as_deref() == Some(h.token.as_str()));
        LockStatus {
            holder: self.seen.holder.clone(),
            since_ms: self.seen.since_ms,
            backend: "redis".to_owned(),
            key: Some(self.key.clone()),
            reachable: match self.reach {
                Reach::NotAskedYet => None,
                Reach::Answers => Some(true),
                Reach::Unreachable(_) => Some(false),
            },
            error: self.reach.error().map(str::to_owned),
            ours,
            expires_in_ms: self.seen.expires_in_ms,
            role: if self.leading {
                LeaseRole::Leader
            } else {
                LeaseRole::Standby
            },
            leader: self.leader.clone(),
            identity: self.identity.clone(),
            summary: self.summary(ours),
            last_refusal: self.last_refusal.clone(),
        }
    }

    fn summary(&self, ours: bool) -> String {
        let (key, url) = (&self.key, &self.url);
        if self.leadership.is_none() {
            return format!("Redis lease on {key} at {url} (redis-py Lock protocol; {} elects the one acting daemon): not contacted yet", self.leader_key);
        }
        if let Some(error) = self.reach.error() {
            return format!("Redis at {url} is unreachable ({error}): transitions are refused (503) until it answers; running services are left as they are");
        }
        match (&self.seen.holder, self.leading) {
            (Some(_), true) if ours => format!("leader: acting now under {key} at {url}"),
            (Some(holder), true) => {
                format!("leader: {holder} holds {key} at {url}; transitions wait for its release")
            }
            (None, true) => format!(
                "leader: transitions take {key} at {url} while they act; Python consumers' redis-py locks on it are respected"
            ),
            (_, false) => format!(
                "standby: {} leads; this daemon takes over when {} at {url} expires",
                self.leader.as_deref().unwrap_or("another gpu-manager"),
                self.leader_key
            ),
        }
    }

    /// Records who holds the transition lock; `since` is kept while the holder stays.
    fn see(&mut self, holder: Option<Holder>) {
        let Some(holder) = holder else {
            self.seen = Seen::default();
            return;
        };
        let since_ms = match (&self.held, &self.seen.holder) {
            (Some(held), _) if held.token == holder.token => Some(held.since_ms),
            (_, Some(seen)) if *seen == holder.token => self.seen.since_ms,
            _ => Some(now_ms()),
        };
        self.seen = Seen {
            holder: Some(holder.token),
            since_ms,
            expires_in_ms: holder.expires_in.map(millis),
        };
    }

    fn set_unreachable(&mut self, problem: Option<String>) {
        let reach = match problem {
            Some(error) => Reach::Unreachable(error),
            None => Reach::Answers,
        };
        match (&self.reach, &reach) {
            (Reach::NotAskedYet | Reach::Answers, Reach::Unreachable(error)) => {
                tracing::error!(url = %self.url, %error, "Redis is unreachable: transitions are refused until it answers")
            }
            (Reach::Unreachable(_), Reach::Answers) => {
                tracing::info!(url = %self.url, "Redis answers again")
            }
            _ => {}
        }
        self.reach = reach;
    }

    fn unreachable_error(&mut self, error: &RedisError) -> LeaseError {
        self.set_unreachable(Some(error.to_string()));
        LeaseError::Unreachable {
            detail: format!(
                "Redis at {} does not answer ({error}); transitions are refused until it does",
                self.url
            ),
        }
    }

    /// Records a refusal for status and logs it when it is news.
    fn refuse(&mut self, error: &LeaseError) {
        let refusal = error.refusal();
        let repeated = self.last_refusal.as_ref().is_some_and(|last| {
            last.holder == refusal.holder && last.http_status == refusal.http_status
        });
        match error {
            LeaseError::Lost { .. } => {
                tracing::error!(%error, "GPU lease lost: no further actions until it is held again")
            }
            _ if repeated => tracing::debug!(%error, "cannot act now"),
            _ => tracing::warn!(%error, "cannot act now"),
        }
        self.last_refusal = Some(refusal);
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// `redis://user:secret@host:6379/0` -> `redis://user:***@host:6379/0`.
fn redacted(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(user, _)| user);
            format!("{scheme}://{user}:***@{host}{path}")
        }
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::test_redis::TestRedis;

    /// Generous: these machines are small and shared.
    const PATIENCE: Duration = Duration::from_secs(30);

    fn config(server: &TestRedis, ttl_ms: u64, wait_ms: u64) -> LeaseConfig {
        LeaseConfig {
            redis_url: Some(server.url()),
            key: "gpu_lock".into(),
            ttl: Duration::from_millis(ttl_ms),
            wait: Duration::from_millis(wait_ms),
        }
    }

    fn lease(server: &TestRedis, name: &str, ttl_ms: u64, wait_ms: u64) -> RedisLease {
        RedisLease::new(
            &config(server, ttl_ms, wait_ms),
            format!("gpu-manager:test:{name}"),
        )
        .unwrap()
    }

    fn raw(server: &TestRedis) -> redis::Connection {
        redis::Client::open(server.url())
            .unwrap()
            .get_connection()
            .unwrap()
    }

    fn get(server: &TestRedis, key: &str) -> Option<String> {
        redis::cmd("GET").arg(key).query(&mut raw(server)).unwrap()
    }

    /// Refreshes until `lease` leads, as the reconciler's rounds would.
    async fn until_leading(lease: &mut RedisLease) {
        let deadline = Instant::now() + PATIENCE;
        while !lease.refresh().await.leads() {
            assert!(Instant::now() < deadline, "never led: {:?}", lease.status());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lone_daemon_leads_and_holds_the_lock_only_while_acting() {
        let Some(server) = TestRedis::start() else {
            return;
        };
        let mut a = lease(&server, "a", 10_000, 1000);
        assert_eq!(a.refresh().await, Leadership::Gained);
        assert_eq!(
            get(&server, "gpu_lock:leader").as_deref(),
            Some("gpu-manager:test:a")
        );
        let status = a.status();
        assert_eq!(status.role, LeaseRole::Leader);
        assert!(
            status.reachable == Some(true) && status.holder.is_none(),
            "{status:?}"
        );
        assert!(status.summary.starts_with("leader"), "{}", status.summary);

        a.try_acquire().await.unwrap();
        let token = get(&server, "gpu_lock").expect("held while acting");
        assert!(token.starts_with("gpu-manager:test:a:"), "{token}");
        let status = a.status();
        assert!(status.ours && status.holder.as_deref() == Some(token.as_str()));
        assert!(status.since_ms.is_some() && status.expires_in_ms.is_some());
        a.check().await.unwrap();
        a.release().await;
        assert_eq!(get(&server, "gpu_lock"), None, "released after acting");
        assert_eq!(a.refresh().await, Leadership::Leading);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_second_daemon_is_standby_until_the_leader_stops_renewing() {
        let Some(server) = TestRedis::start() else {
            return;
        };
        let mut a = lease(&server, "a", 2000, 0);
        let mut b = lease(&server, "b", 2000, 0);
        assert_eq!(a.refresh().await, Leadership::Gained);
        assert_eq!(b.refresh().await, Leadership::Standby);
        let status = b.status();
        assert_eq!(status.role, LeaseRole::Standby);
        assert_eq!(status.leader.as_deref(), Some("gpu-manager:test:a"));
        let refused = b.try_acquire().await.unwrap_err();
        assert_eq!(refused.http_status(), 423);
        assert_eq!(refused.holder(), Some("gpu-manager:test:a"));
        assert_eq!(b.status().last_refusal.map(|r| r.http_status), Some(423));

        // Longer than the TTL: the leader's renewals keep it the leader.
        tokio::time::sleep(Duration::from_millis(3000)).await;
        assert_eq!(b.refresh().await, Leadership::Standby);
        assert_eq!(a.refresh().await, Leadership::Leading);

        drop(a); // as a killed daemon: its key is left to expire
        until_leading(&mut b).await;
        assert_eq!(
            get(&server, "gpu_lock:leader").as_deref(),
            Some("gpu-manager:test:b")
        );
        b.try_acquire().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_foreign_holder_is_waited_for_then_named_in_the_refusal() {
        let Some(server) = TestRedis::start() else {
            return;
        };
        let _: () = redis::cmd("SET")
            .arg("gpu_lock")
            .arg("5f2a-python")
            .arg("PX")
            .arg(60_000)
            .query(&mut raw(&server))
            .unwrap();
        let mut a = lease(&server, "a", 10_000, 300);
        until_leading(&mut a).await;
        let status = a.status();
        assert_eq!(status.holder.as_deref(), Some("5f2a-python"));
        assert!(!status.ours && status.since_ms.is_some());
        assert!(
            status.summary.contains("5f2a-python holds gpu_lock"),
            "{}",
            status.summary
        );
        match a.try_acquire().await {
            Err(LeaseError::HeldElsewhere { holder, .. }) => assert_eq!(holder, "5f2a-python"),
            other => panic!("expected HeldElsewhere, got {other:?}"),
        }
        let refusal = a.status().last_refusal.expect("recorded");
        assert_eq!(
            (refusal.http_status, refusal.holder.as_deref()),
            (423, Some("5f2a-python"))
        );

        // Released while a transition waits: the transition takes it.
        let mut patient = lease(&server, "a", 10_000, 20_000);
        until_leading(&mut patient).await;
        let releaser = {
            let url = server.url();
            tokio::task::spawn_blocking(move || {
                std::thread::sleep(Duration::from_millis(500));
                let mut conn = redis::Client::open(url).unwrap().get_connection().unwrap();
                let _: () = redis::cmd("DEL").arg("gpu_lock").query(&mut conn).unwrap();
            })
        };
        // The reconciler tries again on its own clock; the first try after the release
        // takes it.
        let deadline = Instant::now() + PATIENCE;
        while let Err(error) = patient.try_acquire().await {
            assert!(
                Instant::now() < deadline,
                "never taken after its release: {error}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        releaser.await.unwrap();
        assert!(patient.status().last_refusal.is_none());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_lock_is_renewed_past_its_ttl_while_acting() {
        let Some(server) = TestRedis::start() else {
            return;
        };
        let mut a = lease(&server, "a", 2000, 0);
        until_leading(&mut a).await;
        a.try_acquire().await.unwrap();
        let token = get(&server, "gpu_lock").expect("held");
        tokio::time::sleep(Duration::from_millis(4500)).await;
        assert_eq!(
            get(&server, "gpu_lock"),
            Some(token),
            "still ours after more than 2 TTLs"
        );
        a.check().await.unwrap();
        a.release().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lock_taken_away_is_reported_lost_and_never_deleted() {
        let Some(server) = TestRedis::start() else {
            return;
        };
        let mut a = lease(&server, "a", 10_000, 0);
        until_leading(&mut a).await;
        a.try_acquire().await.unwrap();
        let _: () = redis::cmd("SET")
            .arg("gpu_lock")
            .arg("intruder")
            .query(&mut raw(&server))
            .unwrap();
        let lost = a.check().await.unwrap_err();
        assert!(matches!(lost, LeaseError::Lost { .. }), "{lost:?}");
        assert_eq!((lost.http_status(), lost.holder()), (423, Some("intruder")));
        assert_eq!(a.status().last_refusal.map(|r| r.http_status), Some(423));
        a.release().await;
        assert_eq!(
            get(&server, "gpu_lock").as_deref(),
            Some("intruder"),
            "not ours to delete"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_key_left_by_this_daemon_does_not_block_it() {
        let Some(server) = TestRedis::start() else {
            return;
        };
        let _: () = redis::cmd("SET")
            .arg("gpu_lock")
            .arg("gpu-manager:test:a:7")
            .arg("PX")
            .arg(60_000)
            .query(&mut raw(&server))
            .unwrap();
        let mut a = lease(&server, "a", 10_000, 0);
        until_leading(&mut a).await;
        a.try_acquire().await.unwrap();
        assert!(a.status().ours);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_down_refuses_with_503_and_everything_resumes_when_it_returns() {
        let Some(mut server) = TestRedis::start() else {
            return;
        };
        let mut a = lease(&server, "a", 2000, 0);
        until_leading(&mut a).await;
        server.stop();
        // Status keeps working: a round with Redis down returns, and says why.
        let deadline = Instant::now() + PATIENCE;
        loop {
            a.refresh().await;
            if a.status().reachable == Some(false) {
                break;
            }
            assert!(Instant::now() < deadline, "never noticed Redis down");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let status = a.status();
        assert!(status.error.is_some(), "{status:?}");
        assert!(
            status.summary.contains("unreachable") && status.summary.contains(&server.url()),
            "{}",
            status.summary
        );
        let refused = a.try_acquire().await.unwrap_err();
        assert_eq!(refused.http_status(), 503, "{refused}");
        assert_eq!(
            a.status().role,
            LeaseRole::Leader,
            "an outage elects nobody else"
        );
        assert!(refused.to_string().contains(&server.url()), "{refused}");

        server.restart();
        until_leading(&mut a).await;
        let deadline = Instant::now() + PATIENCE;
        while a.status().reachable != Some(true) {
            assert!(Instant::now() < deadline, "never noticed Redis back");
            tokio::time::sleep(Duration::from_millis(50)).await;
            a.refresh().await;
        }
        a.try_acquire().await.unwrap();
        assert!(a.status().ours);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lease_made_before_redis_answers_leads_at_the_first_change_after() {
        let Some(mut server) = TestRedis::not_started() else {
            return;
        };
        // The default TTL: the leadership task's own retries are 3 s apart.
        let mut a = lease(&server, "a", 30_000, 0);
        assert_eq!(a.status().reachable, None, "not asked yet");
        assert_eq!(a.refresh().await, Leadership::Standby);
        assert_eq!(a.status().reachable, Some(false));
        let refused = a.confirm_lead().await.unwrap_err();
        assert_eq!(refused.http_status(), 503, "{refused}");
        assert!(
            refused
                .to_string()
                .contains("no daemon is known to lead yet"),
            "{refused}"
        );

        server.restart();
        // Asked again at once, on a connection made now: not the refusal from before.
        a.confirm_lead().await.unwrap();
        assert_eq!(a.refresh().await, Leadership::Gained);
        assert_eq!(a.status().reachable, Some(true));
        a.try_acquire().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_transition_cut_off_from_redis_issues_no_further_action() {
        let Some(mut server) = TestRedis::start() else {
            return;
        };
        let mut a = lease(&server, "a", 2000, 0);
        until_leading(&mut a).await;
        a.try_acquire().await.unwrap();
        server.stop();
        let lost = a.check().await.unwrap_err();
        assert!(
            matches!(lost, LeaseError::Lost { holder: None, .. }),
            "{lost:?}"
        );
        assert_eq!(lost.http_status(), 503);
        assert!(lost.to_string().contains(&server.url()), "{lost}");
        a.release().await; // cannot reach Redis: the key is left to expire
    }

    #[test]
    fn passwords_are_not_shown() {
        assert_eq!(
            redacted("redis://u:secret@h:6379/0"),
            "redis://u:***@h:6379/0"
        );
        assert_eq!(redacted("redis://:secret@h"), "redis://:***@h");
        assert_eq!(redacted("redis://h:6379"), "redis://h:6379");
    }
}
