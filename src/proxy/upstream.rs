//! Each consumer connection's own keep-alive connection to its upstream, driven by the
//! consumer connection's task (docs/ARCHITECTURE.md, "The demand proxy: HTTP").
//!
//! A shared pool hands each request to the task of whichever pooled connection is free,
//! on either worker thread: a wake across threads on the way there and another on the
//! way back, which the benchmark (benches/proxy.rs) showed as the proxy's main cost.
//! Here a request, its answer and the upstream connection that carries them are polled
//! by one task, as nginx's worker does.

use std::convert::Infallible;
use std::io;
use std::sync::{Mutex, PoisonError};

use futures_util::stream::{FuturesUnordered, StreamExt};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

type Connection = http1::Connection<TokioIo<TcpStream>, Incoming>;

/// Why the upstream gave no answer; a 502 says which.
#[derive(Debug, thiserror::Error)]
pub(super) enum UpstreamError {
    #[error("cannot connect to {authority}")]
    Connect {
        authority: String,
        source: io::Error,
    },
    #[error(transparent)]
    Exchange(#[from] hyper::Error),
}

/// One consumer connection's way to its upstream: a keep-alive connection made at its
/// first request and made again when the upstream closed it (a restart, a swap).
pub(super) struct UpstreamLink {
    /// `host:port`, as `proxy.upstream` names it.
    authority: String,
    /// The connection between two requests (HTTP/1 serves one request at a time).
    idle: Mutex<Option<SendRequest<Incoming>>>,
    /// New connections, for the [`LinkDriver`] to poll.
    connections: mpsc::UnboundedSender<Connection>,
}

/// Polls a link's connections; run beside the consumer connection, in its task.
pub(super) struct LinkDriver {
    connections: mpsc::UnboundedReceiver<Connection>,
}

impl UpstreamLink {
    pub(super) fn new(authority: String) -> (Self, LinkDriver) {
        let (connections, receiver) = mpsc::unbounded_channel();
        let link = Self {
            authority,
            idle: Mutex::new(None),
            connections,
        };
        (
            link,
            LinkDriver {
                connections: receiver,
            },
        )
    }

    /// Sends `request` and waits for its answer's head; the body streams on as the
    /// driver polls the connection.
    pub(super) async fn send(
        &self,
        request: Request<Incoming>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let kept = self.take_idle().await;
        let reused = kept.is_some();
        let mut sender = match kept {
            Some(sender) => sender,
            None => self.connect().await?,
        };
        let response = match sender.try_send_request(request).await {
            Ok(response) => response,
            // The upstream closed a kept connection just as the request went: it was not
            // written, so it goes once more, on a new connection.
            Err(mut unsent) if reused && unsent.message().is_some() => {
                let request = unsent.take_message().expect("checked just above");
                sender = self.connect().await?;
                sender.send_request(request).await?
            }
            Err(failed) => return Err(failed.into_error().into()),
        };
        *self.idle.lock().unwrap_or_else(PoisonError::into_inner) = Some(sender);
        Ok(response)
    }

    /// An upgrade (WebSocket) on a connection of its own, spawned: once switched, it
    /// outlives the consumer connection it came from, as the tunnel's other end.
    pub(super) async fn send_upgrade(
        &self,
        request: Request<Incoming>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let (mut sender, connection) = self.handshake().await?;
        tokio::spawn(async move {
            if let Err(err) = connection.with_upgrades().await {
                tracing::debug!(error = %err, "proxy: upstream connection for an upgrade failed");
            }
        });
        Ok(sender.send_request(request).await?)
    }

    /// The kept connection, once it is ready for the next request; none if the upstream
    /// closed it.
    async fn take_idle(&self) -> Option<SendRequest<Incoming>> {
        let mut sender = self
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()?;
        sender.ready().await.ok()?;
        Some(sender)
    }

    async fn connect(&self) -> Result<SendRequest<Incoming>, UpstreamError> {
        let (sender, connection) = self.handshake().await?;
        // Only fails once the driver is gone, with the consumer connection: then
        // nobody waits for this answer.
        let _ = self.connections.send(connection);
        Ok(sender)
    }

    async fn handshake(&self) -> Result<(SendRequest<Incoming>, Connection), UpstreamError> {
        let stream = TcpStream::connect(&self.authority)
            .await
            .map_err(|source| UpstreamError::Connect {
                authority: self.authority.clone(),
                source,
            })?;
        // A streamed chunk (an SSE event) must leave at once, not wait for Nagle.
        if let Err(err) = stream.set_nodelay(true) {
            tracing::debug!(error = %err, "proxy: TCP_NODELAY not set upstream");
        }
        Ok(http1::handshake(TokioIo::new(stream)).await?)
    }
}

impl LinkDriver {
    /// Polls every connection the link made until it ends; never returns by itself (it
    /// is dropped with the consumer connection, and its connections with it).
    pub(super) async fn run(mut self) -> Infallible {
        let mut running = FuturesUnordered::new();
        loop {
            tokio::select! {
                Some(connection) = self.connections.recv() => running.push(connection),
                Some(ended) = running.next(), if !running.is_empty() => {
                    if let Err(err) = ended {
                        tracing::debug!(error = %err, "proxy: upstream connection ended with an error");
                    }
                }
                else => return std::future::pending().await,
            }
        }
    }
}
