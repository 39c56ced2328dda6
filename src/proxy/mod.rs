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
mod upstream;
mod workers;

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, ServiceName};
use crate::reconcile::ReconcilerHandle;

/// One proxied service: where consumers connect and where the service really listens.
#[derive(Debug, Clone, PartialEq)]
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
    #[error(
        "the proxy's worker threads cannot start: {0}; raise the daemon's limit on threads \
         (ulimit -u, or TasksMax= in its systemd unit) and start it again"
    )]
    Workers(#[source] io::Error),
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
/// clearly before anything else starts, and the worker threads that will serve them.
#[derive(Debug)]
pub struct Listeners {
    bound: Vec<(Route, TcpListener)>,
    workers: workers::Workers,
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

/// Binds every proxied service's listener and serves them, admitted by the loop's gate,
/// until `shutdown`, following the config in force: a reload's new routes are bound and
/// served, and its limits are the gate's (docs/ARCHITECTURE.md, "The demand proxy").
pub async fn start(
    handle: &ReconcilerHandle,
    shutdown: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, ProxyError> {
    let mut config = handle.config.clone();
    let first = config.borrow_and_update().clone();
    let first_routes = routes(&first);
    let listeners = bind(&first_routes).await?;
    for (route, _) in &listeners.bound {
        tracing::info!(service = %route.service, listen = %route.listen, upstream = %route.upstream, "proxy listening");
    }
    let gate = Arc::new(gate::DemandGate::new(&first, handle));
    let (routes_tx, routes_rx) = watch::channel(first_routes);
    tokio::spawn(follow_config(
        config,
        gate.clone(),
        routes_tx,
        shutdown.clone(),
    ));
    Ok(tokio::spawn(listeners.serve(gate, routes_rx, shutdown)))
}

/// Each config a reload puts in force: its limits to the gate, its routes to the
/// listeners.
async fn follow_config(
    mut config: watch::Receiver<Arc<Config>>,
    gate: Arc<gate::DemandGate>,
    routes_tx: watch::Sender<Vec<Route>>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = config.changed() => if changed.is_err() { return },
        }
        let config = config.borrow_and_update().clone();
        gate.reconfigure(&config);
        routes_tx.send_replace(routes(&config));
    }
}

/// Binds every route's listen address (the first that cannot be bound is the error) and
/// starts the workers.
pub async fn bind(routes: &[Route]) -> Result<Listeners, ProxyError> {
    let mut bound = Vec::with_capacity(routes.len());
    for route in routes {
        bound.push((route.clone(), bind_route(route).await?));
    }
    let workers = workers::Workers::start()
        .await
        .map_err(ProxyError::Workers)?;
    Ok(Listeners { bound, workers })
}

async fn bind_route(route: &Route) -> Result<TcpListener, ProxyError> {
    forward::check_upstream(route)?;
    TcpListener::bind(route.listen)
        .await
        .map_err(|source| ProxyError::Bind {
            service: route.service.clone(),
            addr: route.listen,
            source,
        })
}

impl Listeners {
    /// Where `service`'s listener really is (the port the OS chose for `:0`).
    pub fn local_addr(&self, service: &ServiceName) -> Option<SocketAddr> {
        self.bound
            .iter()
            .find(|(route, _)| &route.service == service)
            .and_then(|(_, listener)| listener.local_addr().ok())
    }

    /// Serves until `shutdown`, and each new set of `routes` from then on (see
    /// [`Serving::follow`]); then stops accepting, lets the requests under way finish
    /// (closing each connection after its answer) for up to [`DRAIN_TIMEOUT`], and
    /// returns. Tunnels (WebSockets) close at once: they have no end to wait for.
    pub async fn serve<G: Gate>(
        self,
        gate: Arc<G>,
        mut routes: watch::Receiver<Vec<Route>>,
        shutdown: CancellationToken,
    ) {
        let tasks = TaskTracker::new();
        let mut serving = Serving {
            gate,
            workers: Arc::new(self.workers),
            tasks: tasks.clone(),
            shutdown: shutdown.clone(),
            accepting: BTreeMap::new(),
        };
        for (route, listener) in self.bound {
            serving.accept(route, listener);
        }
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                changed = routes.changed() => match changed {
                    Ok(()) => {
                        let next = routes.borrow_and_update().clone();
                        serving.follow(next).await;
                    }
                    // No more changes: serve what is served until the shutdown.
                    Err(_) => {
                        shutdown.cancelled().await;
                        break;
                    }
                },
            }
        }
        serving.close_listeners().await;
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

/// The routes being served, each by its accept loop.
struct Serving<G> {
    gate: Arc<G>,
    workers: Arc<workers::Workers>,
    /// Accept loops, connections and tunnels, so that shutdown can wait for them.
    tasks: TaskTracker,
    shutdown: CancellationToken,
    accepting: BTreeMap<ServiceName, Accepting>,
}

/// One route's accept loop: stopped, it gives its listener back, and the route's
/// connections close after their answers under way.
struct Accepting {
    route: Route,
    stop: CancellationToken,
    listener: tokio::task::JoinHandle<TcpListener>,
}

impl Accepting {
    /// Stops the accept loop; its listener, unless the loop panicked.
    async fn stop(self) -> Option<TcpListener> {
        self.stop.cancel();
        self.listener.await.ok()
    }
}

impl<G: Gate> Serving<G> {
    fn accept(&mut self, route: Route, listener: TcpListener) {
        let stop = self.shutdown.child_token();
        let forwarder = Arc::new(forward::Forwarder::new(
            route.clone(),
            self.gate.clone(),
            self.workers.clone(),
            self.tasks.clone(),
            stop.clone(),
            self.shutdown.clone(),
        ));
        let listener = self
            .tasks
            .spawn(connection::accept_loop(listener, forwarder));
        let service = route.service.clone();
        let accepting = Accepting {
            route,
            stop,
            listener,
        };
        self.accepting.insert(service, accepting);
    }

    /// At shutdown (whose token stops every accept loop): closes every listener at once,
    /// so that no connection waits in a backlog that nobody accepts from.
    async fn close_listeners(&mut self) {
        for (_, accepting) in std::mem::take(&mut self.accepting) {
            drop(accepting.stop().await);
        }
    }

    /// Serves `routes` from now on. A route that did not change keeps its listener
    /// untouched; one that changed stops accepting, and its address is bound again only
    /// if the new routes no longer name it. Connections already open on a changed route
    /// finish the answer under way and close, so a keep-alive client reconnects to the
    /// new route rather than going on to the old upstream. An address that cannot be
    /// bound is logged, not fatal: the reload checked it was free, so only a race with
    /// another program gets there.
    async fn follow(&mut self, routes: Vec<Route>) {
        let (kept, changed): (BTreeMap<_, _>, BTreeMap<_, _>) = std::mem::take(&mut self.accepting)
            .into_iter()
            .partition(|(_, a)| routes.contains(&a.route));
        self.accepting = kept;
        let mut freed = BTreeMap::new();
        for (_, accepting) in changed {
            let listen = accepting.route.listen;
            if let Some(listener) = accepting.stop().await {
                freed.insert(listen, listener);
            }
        }
        // Closed before anything is bound: a route may move from 0.0.0.0:P to
        // 127.0.0.1:P.
        freed.retain(|addr, _| routes.iter().any(|r| &r.listen == addr));
        for route in routes {
            if self.accepting.contains_key(&route.service) {
                continue;
            }
            let listener = match freed.remove(&route.listen) {
                Some(listener) => listener,
                None => match bind_route(&route).await {
                    Ok(listener) => listener,
                    Err(err) => {
                        tracing::error!(error = %err, "proxy: a reloaded route cannot be served: its consumers get \"connection refused\" until the next reload");
                        continue;
                    }
                },
            };
            tracing::info!(service = %route.service, listen = %route.listen, upstream = %route.upstream, "proxy listening (reloaded)");
            self.accept(route, listener);
        }
    }
}

#[cfg(test)]
mod tests;
