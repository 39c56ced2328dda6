//! Accepting consumers' connections and serving HTTP/1 on each (with upgrades, for
//! WebSockets) on one of the proxy's workers, until the route is retired (a reload
//! changed it, or the shutdown).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

use super::forward::Forwarder;
use super::headers::Peer;
use super::upstream::UpstreamPool;
use super::Gate;

/// After a failed accept (out of file descriptors, as a rule), a pause, so that the loop
/// does not spin while the cause lasts.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Accepts until the route is retired (a reload that changed it, or the shutdown), then
/// gives the listener back, so that a route moved to another upstream keeps its socket.
pub(super) async fn accept_loop<G: Gate>(
    listener: TcpListener,
    forwarder: Arc<Forwarder<G>>,
) -> TcpListener {
    let retired = forwarder.retired().clone();
    loop {
        let accepted = tokio::select! {
            _ = retired.cancelled() => return listener,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => hand_to_a_worker(stream, peer, &forwarder),
            Err(err) => {
                tracing::warn!(service = %forwarder.service(), error = %err, "proxy: accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

/// The connection leaves this runtime's reactor for its worker's.
fn hand_to_a_worker<G: Gate>(stream: TcpStream, peer: SocketAddr, forwarder: &Arc<Forwarder<G>>) {
    let stream = match stream.into_std() {
        Ok(stream) => stream,
        Err(err) => {
            tracing::debug!(%peer, error = %err, "proxy: an accepted connection could not be handed over");
            return;
        }
    };
    let tasks = forwarder.tasks();
    forwarder.workers().spawn(|upstream| {
        let connection = ConsumerConnection {
            forwarder: forwarder.clone(),
            upstream,
            peer: Peer::new(peer),
        };
        tasks.track_future(connection.serve(stream))
    });
}

/// What each request of one consumer connection is forwarded with.
struct ConsumerConnection<G> {
    forwarder: Arc<Forwarder<G>>,
    /// The pool of the worker this connection is served on.
    upstream: UpstreamPool,
    peer: Peer,
}

impl<G: Gate> ConsumerConnection<G> {
    /// Serves the connection on the worker it was given to (whose reactor it joins). Once
    /// its route is retired (a reload changed it, or the shutdown) the connection finishes
    /// the request under way and closes instead of waiting for the next: a keep-alive client
    /// then reconnects, to the route in force.
    async fn serve(self, stream: std::net::TcpStream) {
        let peer = self.peer.address;
        let stream = match TcpStream::from_std(stream) {
            Ok(stream) => stream,
            Err(err) => {
                tracing::warn!(%peer, error = %err, "proxy: a connection could not join its worker");
                return;
            }
        };
        // Small writes (an SSE event, a WebSocket frame) must leave at once, not wait for Nagle.
        if let Err(err) = stream.set_nodelay(true) {
            tracing::debug!(error = %err, "proxy: TCP_NODELAY not set");
        }
        let retired = self.forwarder.retired().clone();
        let connection = Arc::new(self);
        let service = service_fn(move |request| {
            let connection = connection.clone();
            async move {
                let ConsumerConnection {
                    forwarder,
                    upstream,
                    peer,
                } = &*connection;
                Ok::<_, Infallible>(forwarder.handle(upstream, peer, request).await)
            }
        });
        let http = http1::Builder::new()
            .serve_connection(TokioIo::new(stream), service)
            .with_upgrades();
        tokio::pin!(http);
        let served = tokio::select! {
            served = http.as_mut() => served,
            _ = retired.cancelled() => {
                http.as_mut().graceful_shutdown();
                http.await
            }
        };
        if let Err(err) = served {
            // A client gone mid-answer, or bytes that are not HTTP (answered 400 by hyper).
            tracing::debug!(%peer, error = %err, "proxy: connection ended with an error");
        }
    }
}
