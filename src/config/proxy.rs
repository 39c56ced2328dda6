//! The `proxy:` key of a service (docs/ARCHITECTURE.md, "The demand proxy"): the daemon
//! listens where the service's consumers connect, starts the service on the first
//! request and forwards to where it really listens.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::num::NonZeroUsize;
use std::time::Duration;

use serde::Deserialize;

const DEFAULT_IDLE_MS: u64 = 300_000;
const DEFAULT_MAX_WAIT_MS: u64 = 120_000;
const DEFAULT_MAX_QUEUE: usize = 256;
const DEFAULT_DRAIN_TIMEOUT_MS: u64 = 300_000;

/// A validated `services.NAME.proxy`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxySpec {
    /// Where consumers connect; the daemon listens here from startup.
    pub listen: SocketAddr,
    /// Where the service itself listens: `scheme://host:port`, no path.
    pub upstream: String,
    /// No request in flight, waiting or arriving for this long: the demand ends. None:
    /// it never ends by itself.
    pub idle: Option<Duration>,
    /// How long a request may wait for its service to be ready.
    pub max_wait: Duration,
    /// Requests waiting at once; past it, 503 at once.
    pub max_queue: usize,
    /// At most this many requests in flight upstream; more wait in the queue.
    pub concurrency: Option<NonZeroUsize>,
    /// How long a stop or park waits for the requests in flight when the service has no
    /// `drain:` probe (with one, `drain.timeout_ms` rules).
    pub drain_timeout: Duration,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawProxy {
    listen: String,
    upstream: Option<String>,
    /// Absent: the default; `null`: never.
    #[serde(default = "default_idle", deserialize_with = "nullable")]
    idle_ms: Option<u64>,
    max_wait_ms: Option<u64>,
    max_queue: Option<usize>,
    concurrency: Option<usize>,
    drain_timeout_ms: Option<u64>,
}

fn default_idle() -> Option<u64> {
    Some(DEFAULT_IDLE_MS)
}

fn nullable<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    Option::<u64>::deserialize(d)
}

/// A proxy key that is not valid: the key under `proxy` and why.
#[derive(Debug)]
pub(super) struct Invalid {
    pub key: &'static str,
    pub message: String,
}

/// `health_url`: the service's health URL, whose `scheme://host:port` is the default
/// upstream.
pub(super) fn parse_proxy(
    service: &str,
    raw: RawProxy,
    health_url: Option<&str>,
) -> Result<ProxySpec, Invalid> {
    let at = |key: &str| format!("services.{service}.proxy.{key}");
    let invalid = |key: &'static str, message: String| Invalid { key, message };
    let listen: SocketAddr = raw.listen.parse().map_err(|_| {
        invalid(
            "listen",
            format!(
                "{} {:?} is not an address: use HOST:PORT such as \"127.0.0.1:11434\", the port the service's consumers use",
                at("listen"),
                raw.listen
            ),
        )
    })?;
    let upstream = match (raw.upstream, health_url) {
        (Some(url), _) => origin(&url).ok_or_else(|| {
            invalid(
                "upstream",
                format!(
                    "{} {url:?} is not a plain http URL with a host, such as \"http://127.0.0.1:11435\" (the proxy forwards plain HTTP)",
                    at("upstream")
                ),
            )
        })?,
        (None, Some(health)) => origin(health).ok_or_else(|| {
            invalid(
                "upstream",
                format!("{} is not given and health.url {health:?} is not a plain http URL to take it from: write where the service listens, e.g. upstream: \"http://127.0.0.1:11435\"", at("upstream")),
            )
        })?,
        (None, None) => {
            return Err(invalid(
                "upstream",
                format!("{} is missing and the service has no health.url to take it from: write where the service listens, e.g. upstream: \"http://127.0.0.1:11435\"", at("upstream")),
            ))
        }
    };
    if same_address(listen, &upstream) {
        return Err(invalid(
            "upstream",
            format!("{} {upstream} is the proxy's own listen address {listen}: move the service to another port and name that port here", at("upstream")),
        ));
    }
    let positive = |key: &'static str, value: Option<u64>, default: u64| match value {
        Some(0) => Err(invalid(
            key,
            format!("{} is 0: give a time in milliseconds", at(key)),
        )),
        value => Ok(Duration::from_millis(value.unwrap_or(default))),
    };
    let idle = match raw.idle_ms {
        Some(0) => {
            return Err(invalid(
                "idle_ms",
                format!(
                    "{} is 0: give how long after its last request the demand ends, in milliseconds, or null for never",
                    at("idle_ms")
                ),
            ))
        }
        idle => idle.map(Duration::from_millis),
    };
    let concurrency = match raw.concurrency {
        Some(0) => {
            return Err(invalid(
                "concurrency",
                format!(
                "{} is 0: no request could ever go through; give at least 1, or null for no limit",
                at("concurrency")
            ),
            ))
        }
        limit => limit.and_then(NonZeroUsize::new),
    };
    Ok(ProxySpec {
        listen,
        upstream,
        idle,
        max_wait: positive("max_wait_ms", raw.max_wait_ms, DEFAULT_MAX_WAIT_MS)?,
        max_queue: raw.max_queue.unwrap_or(DEFAULT_MAX_QUEUE),
        concurrency,
        drain_timeout: positive(
            "drain_timeout_ms",
            raw.drain_timeout_ms,
            DEFAULT_DRAIN_TIMEOUT_MS,
        )?,
    })
}

/// `http://host:port` of a plain http URL, the port made explicit: the proxy forwards
/// plain HTTP on the host (a TLS upstream is not supported).
fn origin(url: &str) -> Option<String> {
    let parsed = reqwest::Url::parse(url).ok()?;
    if parsed.scheme() != "http" {
        return None;
    }
    let host = parsed.host_str()?;
    let port = parsed.port_or_known_default()?;
    let origin = format!("http://{host}:{port}");
    origin.parse::<hyper::Uri>().ok()?;
    Some(origin)
}

/// Whether an upstream origin points back at the proxy's listen address (the proxy
/// would forward to itself forever).
fn same_address(listen: SocketAddr, upstream: &str) -> bool {
    let Ok(url) = reqwest::Url::parse(upstream) else {
        return false;
    };
    if url.port_or_known_default() != Some(listen.port()) {
        return false;
    }
    let host: Option<IpAddr> = match url.host_str() {
        Some("localhost") => Some(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        Some(host) => host.trim_matches(['[', ']']).parse().ok(),
        None => None,
    };
    match host {
        Some(ip) => ip == listen.ip() || listen.ip().is_unspecified(),
        // A name that does not resolve here cannot be compared: taken as elsewhere.
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(yaml: &str) -> RawProxy {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn defaults_take_the_upstream_from_the_health_url() {
        let spec = parse_proxy(
            "ollama",
            raw("listen: 127.0.0.1:11434"),
            Some("http://127.0.0.1:11435/api/tags"),
        )
        .unwrap();
        assert_eq!(spec.upstream, "http://127.0.0.1:11435");
        assert_eq!(spec.idle, Some(Duration::from_millis(DEFAULT_IDLE_MS)));
        assert_eq!(spec.max_queue, DEFAULT_MAX_QUEUE);
        assert_eq!(spec.concurrency, None);
    }

    #[test]
    fn idle_null_never_ends_the_demand() {
        let spec = parse_proxy(
            "a",
            raw("{listen: 127.0.0.1:9000, upstream: 'http://127.0.0.1:9001', idle_ms: null}"),
            None,
        )
        .unwrap();
        assert_eq!(spec.idle, None);
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases = [
            ("{listen: nowhere, upstream: 'http://h:1'}", "listen"),
            (
                "{listen: 127.0.0.1:9000, upstream: 'ftp://h:1'}",
                "upstream",
            ),
            ("{listen: 127.0.0.1:9000}", "upstream"),
            (
                "{listen: 127.0.0.1:9000, upstream: 'http://localhost:9000'}",
                "upstream",
            ),
            (
                "{listen: 0.0.0.0:9000, upstream: 'http://127.0.0.1:9000'}",
                "upstream",
            ),
            (
                "{listen: 127.0.0.1:9000, upstream: 'http://h:1', concurrency: 0}",
                "concurrency",
            ),
            (
                "{listen: 127.0.0.1:9000, upstream: 'http://h:1', idle_ms: 0}",
                "idle_ms",
            ),
            (
                "{listen: 127.0.0.1:9000, upstream: 'http://h:1', max_wait_ms: 0}",
                "max_wait_ms",
            ),
        ];
        for (yaml, key) in cases {
            let error = parse_proxy("a", raw(yaml), None).unwrap_err();
            assert_eq!(error.key, key, "{yaml}: {}", error.message);
            assert!(
                error.message.contains(&format!("services.a.proxy.{key}")),
                "{}",
                error.message
            );
        }
    }
}
