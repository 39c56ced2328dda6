//! One request: admitted by the gate, then forwarded to the upstream and its answer
//! streamed back; an upgrade (WebSocket) becomes a byte tunnel that holds its pass.

use std::sync::Arc;

use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::http::uri::{Authority, PathAndQuery, Scheme};
use hyper::upgrade::OnUpgrade;
use hyper::{Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::TokioIo;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::body::ProxyBody;
use super::headers::{self, Peer};
use super::upstream::{Lent, UpstreamPool};
use super::workers::Workers;
use super::{answer, Gate, ProxyError, RequestKind, Route};
use crate::config::ServiceName;

/// Only `http://host:port` can be forwarded (the connector speaks no TLS); said at startup.
pub(super) fn check_upstream(route: &Route) -> Result<(), ProxyError> {
    let upstream = &route.upstream;
    if upstream.scheme() == Some(&Scheme::HTTP) && upstream.authority().is_some() {
        Ok(())
    } else {
        Err(ProxyError::Upstream {
            service: route.service.clone(),
            upstream: upstream.clone(),
        })
    }
}

/// What every request of one route needs.
pub(super) struct Forwarder<G> {
    route: Route,
    /// The upstream's `host:port`, and the same as the `Host` of every request sent there.
    upstream: Authority,
    upstream_host: HeaderValue,
    gate: Arc<G>,
    /// The threads connections are served on.
    workers: Arc<Workers>,
    /// Connections and tunnels, so that shutdown can wait for them.
    tasks: TaskTracker,
    /// Cancelled when this route is no longer served as it is (a reload changed it, or
    /// the daemon shuts down): its connections close after the answer under way.
    retired: CancellationToken,
    /// The daemon's shutdown, which alone ends a tunnel.
    shutdown: CancellationToken,
}

impl<G: Gate> Forwarder<G> {
    pub(super) fn new(
        route: Route,
        gate: Arc<G>,
        workers: Arc<Workers>,
        tasks: TaskTracker,
        retired: CancellationToken,
        shutdown: CancellationToken,
    ) -> Self {
        let upstream = route
            .upstream
            .authority()
            .cloned()
            .expect("check_upstream: the upstream has an authority");
        let upstream_host = HeaderValue::from_str(upstream.as_str())
            .expect("an authority is made of characters a header value may hold");
        Self {
            route,
            upstream,
            upstream_host,
            gate,
            workers,
            tasks,
            retired,
            shutdown,
        }
    }

    pub(super) fn service(&self) -> &ServiceName {
        &self.route.service
    }

    pub(super) fn tasks(&self) -> &TaskTracker {
        &self.tasks
    }

    pub(super) fn workers(&self) -> &Workers {
        &self.workers
    }

    pub(super) fn retired(&self) -> &CancellationToken {
        &self.retired
    }

    /// Admit, forward through `upstream` (the connection's worker's pool), answer; every
    /// answer is reported to the gate.
    pub(super) async fn handle(
        &self,
        upstream: &UpstreamPool,
        peer: &Peer,
        request: Request<Incoming>,
    ) -> Response<ProxyBody<G::Pass>> {
        let kind = if headers::wants_upgrade(request.headers()) {
            RequestKind::Upgrade
        } else {
            RequestKind::Plain
        };
        let response = match self.gate.admit(self.service(), kind).await {
            Err(refusal) => answer::refusal(self.service(), refusal),
            Ok(pass) => match kind {
                RequestKind::Plain => self.forward(upstream, peer, request, pass).await,
                RequestKind::Upgrade => self.upgrade(upstream, peer, request, pass).await,
            },
        };
        self.gate.answered(self.service(), response.status());
        response
    }

    async fn forward(
        &self,
        upstream: &UpstreamPool,
        peer: &Peer,
        request: Request<Incoming>,
        pass: G::Pass,
    ) -> Response<ProxyBody<G::Pass>> {
        let request = self.to_upstream(peer, request, false);
        match upstream.send(&self.upstream, request).await {
            Ok((response, lent)) => streamed_back(response, pass, lent),
            Err(err) => answer::bad_gateway(&self.route, &err),
        }
    }

    /// The upgrade request goes upstream as it is; a 101 from there becomes a 101 to the
    /// consumer and a tunnel between the two upgraded connections. Any other answer is
    /// passed back like a plain one.
    async fn upgrade(
        &self,
        upstream: &UpstreamPool,
        peer: &Peer,
        mut request: Request<Incoming>,
        pass: G::Pass,
    ) -> Response<ProxyBody<G::Pass>> {
        let consumer = hyper::upgrade::on(&mut request);
        let request = self.to_upstream(peer, request, true);
        let (mut response, lent) = match upstream.send(&self.upstream, request).await {
            Ok(sent) => sent,
            Err(err) => return answer::bad_gateway(&self.route, &err),
        };
        if response.status() != StatusCode::SWITCHING_PROTOCOLS {
            return streamed_back(response, pass, lent);
        }
        // The connection is the tunnel's from now on, never lent again.
        drop(lent);
        let upstream = hyper::upgrade::on(&mut response);
        self.tasks.spawn(tunnel(
            self.route.service.clone(),
            consumer,
            upstream,
            pass,
            self.shutdown.clone(),
        ));
        // The 101's own `Connection`, `Upgrade` and `Sec-WebSocket-*` are the consumer's
        // answer: passed back untouched.
        let (parts, _empty) = response.into_parts();
        Response::from_parts(parts, ProxyBody::full(Bytes::new()))
    }

    /// The consumer's request, addressed to the upstream: same method, path, query and
    /// body (streamed), headers fit for the next hop, `Host` the upstream's.
    fn to_upstream(
        &self,
        peer: &Peer,
        request: Request<Incoming>,
        upgrade: bool,
    ) -> Request<Incoming> {
        let (mut parts, body) = request.into_parts();
        // Origin form (`/path?query`): the connection already goes to the upstream.
        let path_and_query = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        parts.uri = Uri::from(path_and_query);
        // HTTP/1.1 upstream whatever the consumer spoke: keep-alive to the upstream.
        parts.version = Version::HTTP_11;
        headers::for_upstream(&mut parts.headers, peer, upgrade);
        parts
            .headers
            .insert(header::HOST, self.upstream_host.clone());
        Request::from_parts(parts, body)
    }
}

fn streamed_back<P>(response: Response<Incoming>, pass: P, lent: Lent) -> Response<ProxyBody<P>> {
    let (mut parts, body) = response.into_parts();
    headers::strip_hop_by_hop(&mut parts.headers);
    Response::from_parts(parts, ProxyBody::streamed(body, pass, lent))
}

/// Bytes both ways until either side closes (or the daemon shuts down); the pass, and so
/// the demand the tunnel stands for, lasts as long.
async fn tunnel<P>(
    service: ServiceName,
    consumer: OnUpgrade,
    upstream: OnUpgrade,
    _pass: P,
    shutdown: CancellationToken,
) {
    let (consumer, upstream) = match tokio::try_join!(consumer, upstream) {
        Ok(both) => both,
        Err(err) => {
            tracing::debug!(%service, error = %err, "proxy: upgrade did not complete");
            return;
        }
    };
    let (mut consumer, mut upstream) = (TokioIo::new(consumer), TokioIo::new(upstream));
    tokio::select! {
        copied = tokio::io::copy_bidirectional(&mut consumer, &mut upstream) => {
            if let Err(err) = copied {
                tracing::debug!(%service, error = %err, "proxy: tunnel ended with an error");
            }
        }
        _ = shutdown.cancelled() => {}
    }
}
