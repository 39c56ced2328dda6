//! One worker's keep-alive connections to the upstreams, as nginx's `keepalive` in an
//! `upstream` block (docs/ARCHITECTURE.md, "The demand proxy: HTTP"): a request borrows an
//! idle connection to its upstream, or opens one, and the connection goes back once the
//! answer has been read to its end. Only the worker's own thread uses its pool, so the
//! lock is never contended.

use std::sync::{Arc, Mutex, PoisonError};

use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper::http::uri::Authority;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Idle connections kept to one upstream by one worker; past it, a connection whose
/// answer ended is closed (nginx's `keepalive 64` in the bench's anchor does the same).
const MAX_IDLE_PER_UPSTREAM: usize = 64;

/// Why the upstream gave no answer.
#[derive(Debug, thiserror::Error)]
pub(super) enum UpstreamError {
    #[error("the connection failed")]
    Connect(#[source] std::io::Error),
    #[error("the HTTP exchange failed")]
    Exchange(#[source] hyper::Error),
}

type Sender = SendRequest<Incoming>;

/// A worker's idle connections, by upstream.
#[derive(Debug, Clone, Default)]
pub(super) struct UpstreamPool {
    /// One entry per upstream, found by a scan: a daemon proxies a handful of services,
    /// and comparing a few authorities costs less than hashing one twice a request.
    idle: Arc<Mutex<Vec<IdleTo>>>,
}

/// The idle connections to one upstream.
#[derive(Debug)]
struct IdleTo {
    upstream: Authority,
    senders: Vec<Sender>,
}

/// A connection lent to one request; given back with [`Lent::give_back`] once its answer
/// has been read in full, else closed when dropped.
#[derive(Debug)]
pub(super) struct Lent {
    pool: UpstreamPool,
    upstream: Authority,
    sender: Sender,
}

impl Lent {
    pub(super) fn give_back(self) {
        let Lent {
            pool,
            upstream,
            sender,
        } = self;
        if sender.is_closed() {
            return;
        }
        let mut idle = pool.lock();
        let index = match idle.iter().position(|to| to.upstream == upstream) {
            Some(index) => index,
            None => {
                idle.push(IdleTo {
                    upstream,
                    senders: Vec::new(),
                });
                idle.len() - 1
            }
        };
        let senders = &mut idle[index].senders;
        if senders.len() < MAX_IDLE_PER_UPSTREAM {
            senders.push(sender);
        }
    }
}

impl UpstreamPool {
    /// Sends `request` (its URI in origin form, its `Host` set) to `upstream` on an idle
    /// connection, or a new one. A request that an idle connection closed under could not
    /// even begin to send goes on the next one, as hyper-util's client does.
    pub(super) async fn send(
        &self,
        upstream: &Authority,
        mut request: Request<Incoming>,
    ) -> Result<(Response<Incoming>, Lent), UpstreamError> {
        loop {
            let (mut sender, reused) = match self.take_idle(upstream) {
                Some(sender) => (sender, true),
                None => (connect(upstream).await?, false),
            };
            if let Err(err) = sender.ready().await {
                match reused {
                    true => continue,
                    false => return Err(UpstreamError::Exchange(err)),
                }
            }
            match sender.try_send_request(request).await {
                Ok(response) => {
                    let lent = Lent {
                        pool: self.clone(),
                        upstream: upstream.clone(),
                        sender,
                    };
                    return Ok((response, lent));
                }
                Err(mut err) => match err.take_message() {
                    Some(unsent) if reused => request = unsent,
                    _ => return Err(UpstreamError::Exchange(err.into_error())),
                },
            }
        }
    }

    fn take_idle(&self, upstream: &Authority) -> Option<Sender> {
        let mut idle = self.lock();
        let to = idle.iter_mut().find(|to| to.upstream == *upstream)?;
        std::iter::from_fn(|| to.senders.pop()).find(|sender| !sender.is_closed())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<IdleTo>> {
        // A pool is plain data: still usable after a panic elsewhere.
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A new connection, driven by a task of its own on this worker (with upgrades, for
/// WebSockets).
async fn connect(upstream: &Authority) -> Result<Sender, UpstreamError> {
    let port = upstream.port_u16().unwrap_or(80);
    // An IPv6 host is written in brackets in a URL, not in an address.
    let host = upstream
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let stream = TcpStream::connect((host, port))
        .await
        .map_err(UpstreamError::Connect)?;
    // Small writes (an SSE event, a WebSocket frame) must leave at once, not wait for Nagle.
    if let Err(err) = stream.set_nodelay(true) {
        tracing::debug!(error = %err, "proxy: TCP_NODELAY not set upstream");
    }
    let (sender, connection) = http1::handshake(TokioIo::new(stream))
        .await
        .map_err(UpstreamError::Exchange)?;
    let upstream = upstream.clone();
    tokio::spawn(async move {
        if let Err(err) = connection.with_upgrades().await {
            tracing::debug!(%upstream, error = %err, "proxy: upstream connection ended with an error");
        }
    });
    Ok(sender)
}
