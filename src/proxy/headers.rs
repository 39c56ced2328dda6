//! Headers across the proxy: hop-by-hop ones stay on their own hop (RFC 9110 7.6.1), and
//! the upstream learns who really asked (`X-Forwarded-*`).

use std::net::{IpAddr, SocketAddr};

use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Headers that describe one connection, not the message, and so are never forwarded.
static HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Does the request ask to switch protocols (`Connection: upgrade`, a WebSocket as a rule)?
pub(super) fn wants_upgrade(headers: &HeaderMap) -> bool {
    connection_tokens(headers).any(|token| token.eq_ignore_ascii_case("upgrade"))
        && headers.contains_key(header::UPGRADE)
}

/// Removes the hop-by-hop headers, and those the `Connection` header names as such.
pub(super) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: one look at each name costs less than a lookup of each
    // hop-by-hop header (`Connection` among them, so nothing else is named either).
    if !headers.keys().any(|name| HOP_BY_HOP.contains(name)) {
        return;
    }
    let named: Vec<HeaderName> = connection_tokens(headers)
        .filter_map(|token| HeaderName::from_bytes(token.as_bytes()).ok())
        .collect();
    for name in HOP_BY_HOP.iter().chain(&named) {
        headers.remove(name);
    }
}

/// The consumer at the other end of one connection, with its `X-Forwarded-For` value made
/// once for every request the connection carries.
#[derive(Debug)]
pub(super) struct Peer {
    pub(super) address: SocketAddr,
    forwarded_for: HeaderValue,
}

impl Peer {
    pub(super) fn new(address: SocketAddr) -> Self {
        let forwarded_for = HeaderValue::from_str(&address.ip().to_string())
            .expect("an IP address is made of characters a header value may hold");
        Self {
            address,
            forwarded_for,
        }
    }

    fn ip(&self) -> IpAddr {
        self.address.ip()
    }
}

/// A request for the upstream: hop-by-hop headers gone (an upgrade keeps its `Upgrade` and
/// says so in `Connection`), `Host` removed for the forwarder to set to the upstream's
/// authority, and the consumer's address, scheme and host in `X-Forwarded-*`.
pub(super) fn for_upstream(headers: &mut HeaderMap, peer: &Peer, upgrade: bool) {
    let upgrade_to = headers.get(header::UPGRADE).cloned();
    strip_hop_by_hop(headers);
    if let (true, Some(protocol)) = (upgrade, upgrade_to) {
        headers.insert(header::UPGRADE, protocol);
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    let forwarded_for = match headers.get(&X_FORWARDED_FOR).map(HeaderValue::to_str) {
        Some(Ok(earlier)) => HeaderValue::from_str(&format!("{earlier}, {}", peer.ip())).ok(),
        _ => Some(peer.forwarded_for.clone()),
    };
    if let Some(value) = forwarded_for {
        headers.insert(X_FORWARDED_FOR.clone(), value);
    }
    // A TLS terminator in front of us knows the scheme and host better than we do.
    if !headers.contains_key(&X_FORWARDED_PROTO) {
        headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("http"));
    }
    if let Some(host) = headers.remove(header::HOST) {
        headers.entry(X_FORWARDED_HOST.clone()).or_insert(host);
    }
}

fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .filter(|token| !token.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn x_forwarded_for_names_the_peer_after_the_hops_before_it() {
        let peer = Peer::new("10.0.0.7:51000".parse().unwrap());
        let mut direct = HeaderMap::new();
        direct.insert(header::HOST, HeaderValue::from_static("gpu-box:11434"));
        for_upstream(&mut direct, &peer, false);
        assert_eq!(direct[&X_FORWARDED_FOR], "10.0.0.7");
        assert_eq!(direct[&X_FORWARDED_HOST], "gpu-box:11434");
        assert_eq!(direct[&X_FORWARDED_PROTO], "http");
        assert!(!direct.contains_key(header::HOST), "the forwarder sets it");

        // The same connection's next request, relayed by another proxy before us.
        let mut relayed = HeaderMap::new();
        relayed.insert(&X_FORWARDED_FOR, HeaderValue::from_static("192.0.2.1"));
        for_upstream(&mut relayed, &peer, false);
        assert_eq!(relayed[&X_FORWARDED_FOR], "192.0.2.1, 10.0.0.7");

        let mut over_ipv6 = HeaderMap::new();
        for_upstream(
            &mut over_ipv6,
            &Peer::new("[::1]:8080".parse().unwrap()),
            false,
        );
        assert_eq!(over_ipv6[&X_FORWARDED_FOR], "::1");
    }
}
