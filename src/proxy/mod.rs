//! The demand proxy's HTTP side (issue 17): one listener per proxied service, each request
//! admitted by a [`Gate`] and then forwarded, streamed both ways, to the service's real port.
//! The gate (the loop's side) decides whether and when a request may go; this module only
//! speaks HTTP. See docs/ARCHITECTURE.md, "The demand proxy: HTTP".

mod answer;
mod body;
mod connection;
mod forward;
pub mod gate;
mod headers;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, ServiceName};
use crate::reconcile::ReconcilerHandle;

/// One proxied service: where consumers connect and where the service really listens.
#[derive(Debug, Clone)]
pub struct Route {
    pub service: ServiceName,
    pub listen: SocketAddr,
    /// `scheme://host:port`; only `http` is forwarded.
    pub upstream: hyper::Uri,
}

/// Plain requests count as work in flight; an upgraded connection (WebSocket) keeps the
/// service wanted but is not work in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    Plain,
    Upgrade,
}

/// Why a request is not forwarded: answered `status` (503 as a rule) with a JSON body.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub status: hyper::StatusCode,
    /// "held", "cannot_fit", "queue_full", "timed_out", "shutting_down"
    pub kind: &'static str,
    pub error: String,
    pub retry_after_s: Option<u64>,
    /// More fields of the JSON body (who holds the memory, how to release a hold).
    pub detail: serde_json::Map<String, serde_json::Value>,
}

/// What the proxy asks before forwarding (implemented by the loop's side).
pub trait Gate: Send + Sync + 'static {
    /// Held while the request is in flight: dropped when the response body has ended (or
    /// the client went away), for an upgrade when the tunnel closes.
    type Pass: Send + Sync + 'static;
    /// Waits until `service` may take the request. Dropping the future (client gone) must
    /// be safe.
    fn admit(
        &self,
        service: &ServiceName,
        kind: RequestKind,
    ) -> impl std::future::Future<Output = Result<Self::Pass, Refusal>> + Send;
    /// Every answer the proxy gives, for metrics (`gpu_manager_proxy_requests_total{service,code}`).
    fn answered(&self, service: &ServiceName, status: hyper::StatusCode);
}

/// A proxy that cannot start; each names the service's config key.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("services.{service}.proxy.listen {addr} cannot be bound: {}", bind_reason(.source))]
    Bind {
        service: ServiceName,
        addr: SocketAddr,
        source: io::Error,
    },
    #[error(
        "services.{service}.proxy.upstream {upstream} cannot be used: write http://host:port \
         (only plain http is forwarded)"
    )]
    Upstream {
        service: ServiceName,
        upstream: hyper::Uri,
    },
}

/// The common causes in words ("address in use"), the rest as the OS says them.
fn bind_reason(err: &io::Error) -> String {
    match err.kind() {
        io::ErrorKind::AddrInUse
        | io::ErrorKind::AddrNotAvailable
        | io::ErrorKind::PermissionDenied => err.kind().to_string(),
        _ => err.to_string(),
    }
}

/// How long a shutdown waits for the requests under way before it returns; the daemon's
/// own stop budget (`shutdown_timeout_ms`, 10 s by default) is of the same order.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Every route's listener, bound at startup so that a port in use fails the daemon
/// clearly before anything else starts.
#[derive(Debug)]
pub struct Listeners {
    bound: Vec<(Route, TcpListener)>,
}

/// Every service with a `proxy:` key, as a route.
pub fn routes(config: &Config) -> Vec<Route> {
    config
        .inventory
        .iter()
        .filter_map(|spec| {
            let proxy = spec.proxy.as_ref()?;
            Some(Route {
                service: spec.name.clone(),
                listen: proxy.listen,
                upstream: proxy
                    .upstream
                    .parse()
                    .expect("the config checked that proxy.upstream is an http origin"),
            })
        })
        .collect()
}

/// Binds every proxied service's listener and serves them, admitted by the loop's
/// gate, until `shutdown`; None when no service has a proxy.
pub async fn start(
    config: &Config,
    handle: &ReconcilerHandle,
    shutdown: CancellationToken,
) -> Result<Option<tokio::task::JoinHandle<()>>, ProxyError> {
    let routes = routes(config);
    if routes.is_empty() {
        return Ok(None);
    }
    let listeners = bind(&routes).await?;
    for route in &routes {
        tracing::info!(service = %route.service, listen = %route.listen, upstream = %route.upstream, "proxy listening");
    }
    let gate = Arc::new(gate::DemandGate::new(config, handle));
    Ok(Some(tokio::spawn(listeners.serve(gate, shutdown))))
}

/// Binds every route's listen address; the first that cannot be bound is the error.
pub async fn bind(routes: &[Route]) -> Result<Listeners, ProxyError> {
    let mut bound = Vec::with_capacity(routes.len());
    for route in routes {
        forward::check_upstream(route)?;
        let listener =
            TcpListener::bind(route.listen)
                .await
                .map_err(|source| ProxyError::Bind {
                    service: route.service.clone(),
                    addr: route.listen,
                    source,
                })?;
        bound.push((route.clone(), listener));
    }
    Ok(Listeners { bound })
}

impl Listeners {
    /// Where `service`'s listener really is (the port the OS chose for `:0`).
    pub fn local_addr(&self, service: &ServiceName) -> Option<SocketAddr> {
        self.bound
            .iter()
            .find(|(route, _)| &route.service == service)
            .and_then(|(_, listener)| listener.local_addr().ok())
    }

    /// Serves until `shutdown`: then stops accepting, lets the requests under way finish
    /// (closing each connection after its answer) for up to [`DRAIN_TIMEOUT`], and returns.
    /// Tunnels (WebSockets) close at once: they have no end to wait for.
    pub async fn serve<G: Gate>(self, gate: Arc<G>, shutdown: CancellationToken) {
        let tasks = TaskTracker::new();
        let client = forward::upstream_client();
        for (route, listener) in self.bound {
            let forwarder = Arc::new(forward::Forwarder::new(
                route,
                gate.clone(),
                client.clone(),
                tasks.clone(),
                shutdown.clone(),
            ));
            tasks.spawn(connection::accept_loop(listener, forwarder));
        }
        shutdown.cancelled().await;
        tasks.close();
        if tokio::time::timeout(DRAIN_TIMEOUT, tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                connections = tasks.len(),
                "proxy: requests still under way after {DRAIN_TIMEOUT:?} of shutdown are cut"
            );
        }
    }
}

#[cfg(test)]
mod tests;
