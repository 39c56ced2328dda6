//! Accepting consumers' connections and serving HTTP/1 on each (with upgrades, for
//! WebSockets), until the route is retired (a reload changed it, or the shutdown).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

use super::forward::Forwarder;
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
            Ok((stream, peer)) => {
                let forwarder = forwarder.clone();
                forwarder
                    .tasks()
                    .clone()
                    .spawn(serve(stream, peer, forwarder));
            }
            Err(err) => {
                tracing::warn!(service = %forwarder.service(), error = %err, "proxy: accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

/// One consumer connection. Once its route is retired (a reload changed it, or the
/// shutdown) the connection finishes the request under way and closes instead of
/// waiting for the next: a keep-alive client then reconnects, to the route in force.
async fn serve<G: Gate>(stream: TcpStream, peer: SocketAddr, forwarder: Arc<Forwarder<G>>) {
    // Small writes (an SSE event, a WebSocket frame) must leave at once, not wait for Nagle.
    if let Err(err) = stream.set_nodelay(true) {
        tracing::debug!(error = %err, "proxy: TCP_NODELAY not set");
    }
    let retired = forwarder.retired().clone();
    let service = service_fn(move |request| {
        let forwarder = forwarder.clone();
        async move { Ok::<_, Infallible>(forwarder.handle(peer, request).await) }
    });
    let connection = http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    tokio::pin!(connection);
    let served = tokio::select! {
        served = connection.as_mut() => served,
        _ = retired.cancelled() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(err) = served {
        // A client gone mid-answer, or bytes that are not HTTP (answered 400 by hyper).
        tracing::debug!(%peer, error = %err, "proxy: connection ended with an error");
    }
}
