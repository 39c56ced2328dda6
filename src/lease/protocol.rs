//! The redis-py `Lock` protocol on one key, so that a gpu-manager holder and a Python
//! `redis.lock.Lock` on the same key exclude each other. The value is the holder's
//! token, taken with `SET key token NX PX ttl`; extend and release are redis-py's own
//! Lua scripts (`LUA_EXTEND_SCRIPT`, `LUA_RELEASE_SCRIPT`), which compare the token
//! before touching the key, so nobody ever extends or deletes a key it does not hold.
//!
//! Every command that finds Redis refusing connections is sent once more:
//! `ConnectionManager` answers a command with the connection attempt it began after the
//! previous failure, however long ago, so the first command after Redis comes up would
//! fail with a stale "Connection refused". A refused command never reached Redis, so
//! sending it again is safe, and the second try connects now.

use std::future::Future;
use std::sync::LazyLock;
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::{RedisError, Script};

/// redis-py's `LUA_EXTEND_SCRIPT`, unchanged: ARGV = token, milliseconds, and "1" to
/// replace the TTL ("0" adds to it). Returns 1 when extended.
static EXTEND: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
        local token = redis.call('get', KEYS[1])
        if not token or token ~= ARGV[1] then
            return 0
        end
        local expiration = redis.call('pttl', KEYS[1])
        if not expiration then
            expiration = 0
        end
        if expiration < 0 then
            return 0
        end

        local newttl = ARGV[2]
        if ARGV[3] == "0" then
            newttl = ARGV[2] + expiration
        end
        redis.call('pexpire', KEYS[1], newttl)
        return 1
    "#,
    )
});

/// redis-py's `LUA_RELEASE_SCRIPT`, unchanged: ARGV = token. Returns 1 when deleted.
static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
        local token = redis.call('get', KEYS[1])
        if not token or token ~= ARGV[1] then
            return 0
        end
        redis.call('del', KEYS[1])
        return 1
    "#,
    )
});

/// Who holds a key now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub token: String,
    /// None: the key has no expiry (someone set it without a TTL).
    pub expires_in: Option<Duration>,
}

fn millis(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX)
}

/// Sends a command, and once more on a fresh connection attempt if it was refused (see
/// the module's comment).
async fn once_more_if_refused<T, F, Fut>(
    conn: &mut ConnectionManager,
    send: F,
) -> Result<T, RedisError>
where
    F: Fn(ConnectionManager) -> Fut,
    Fut: Future<Output = Result<T, RedisError>>,
{
    match send(conn.clone()).await {
        Err(error) if error.is_connection_refusal() => send(conn.clone()).await,
        answer => answer,
    }
}

/// `SET key token NX PX ttl`: true when `token` now holds the key.
pub async fn try_take(
    conn: &mut ConnectionManager,
    key: &str,
    token: &str,
    ttl: Duration,
) -> Result<bool, RedisError> {
    let reply: Option<String> = once_more_if_refused(conn, |mut conn| async move {
        redis::cmd("SET")
            .arg(key)
            .arg(token)
            .arg("NX")
            .arg("PX")
            .arg(millis(ttl))
            .query_async(&mut conn)
            .await
    })
    .await?;
    Ok(reply.is_some())
}

/// Resets the key's TTL to `ttl` if `token` still holds it (redis-py's
/// `extend(ttl, replace_ttl=True)`): false when it does not.
pub async fn extend(
    conn: &mut ConnectionManager,
    key: &str,
    token: &str,
    ttl: Duration,
) -> Result<bool, RedisError> {
    let extended: i64 = once_more_if_refused(conn, |mut conn| async move {
        EXTEND
            .key(key)
            .arg(token)
            .arg(millis(ttl))
            .arg("1")
            .invoke_async(&mut conn)
            .await
    })
    .await?;
    Ok(extended == 1)
}

/// Deletes the key if `token` still holds it (redis-py's `release`): false when it
/// did not (it had expired, or someone else holds it now).
pub async fn release(
    conn: &mut ConnectionManager,
    key: &str,
    token: &str,
) -> Result<bool, RedisError> {
    let released: i64 = once_more_if_refused(conn, |mut conn| async move {
        RELEASE.key(key).arg(token).invoke_async(&mut conn).await
    })
    .await?;
    Ok(released == 1)
}

/// The key's holder, read atomically with its remaining TTL; None when it is free.
pub async fn holder(conn: &mut ConnectionManager, key: &str) -> Result<Option<Holder>, RedisError> {
    let (value, pttl): (Option<Vec<u8>>, i64) = once_more_if_refused(conn, |mut conn| async move {
        redis::pipe()
            .atomic()
            .cmd("GET")
            .arg(key)
            .cmd("PTTL")
            .arg(key)
            .query_async(&mut conn)
            .await
    })
    .await?;
    Ok(value.map(|bytes| Holder {
        token: String::from_utf8_lossy(&bytes).into_owned(),
        expires_in: u64::try_from(pttl).ok().map(Duration::from_millis),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::test_redis::TestRedis;

    const TTL: Duration = Duration::from_secs(10);

    async fn connect(server: &TestRedis) -> ConnectionManager {
        let client = redis::Client::open(server.url()).unwrap();
        ConnectionManager::new(client).await.unwrap()
    }

    #[tokio::test]
    async fn take_extend_release_compare_the_token() {
        let Some(server) = TestRedis::start() else {
            return;
        };
        let mut conn = connect(&server).await;
        assert!(try_take(&mut conn, "k", "a", TTL).await.unwrap());
        assert!(
            !try_take(&mut conn, "k", "b", TTL).await.unwrap(),
            "NX refuses a held key"
        );
        assert!(!extend(&mut conn, "k", "b", TTL).await.unwrap());
        assert!(
            !release(&mut conn, "k", "b").await.unwrap(),
            "only the holder releases"
        );
        let held = holder(&mut conn, "k").await.unwrap().expect("held");
        assert_eq!(held.token, "a");
        assert!(held.expires_in.is_some_and(|left| left <= TTL));
        assert!(extend(&mut conn, "k", "a", Duration::from_secs(100))
            .await
            .unwrap());
        let extended = holder(&mut conn, "k").await.unwrap().expect("held");
        assert!(
            extended.expires_in.is_some_and(|left| left > TTL),
            "the TTL was replaced: {extended:?}"
        );
        assert!(release(&mut conn, "k", "a").await.unwrap());
        assert_eq!(holder(&mut conn, "k").await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_taken_key_expires_after_its_ttl() {
        let Some(server) = TestRedis::start() else {
            return;
        };
        let mut conn = connect(&server).await;
        assert!(try_take(&mut conn, "k", "a", Duration::from_millis(200))
            .await
            .unwrap());
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while holder(&mut conn, "k").await.unwrap().is_some() {
            assert!(
                std::time::Instant::now() < deadline,
                "the key never expired"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            !extend(&mut conn, "k", "a", TTL).await.unwrap(),
            "an expired key is not revived"
        );
    }
}
