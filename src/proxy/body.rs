//! The body of every answer the proxy gives: the upstream's streamed body or one of our own
//! JSON bodies, carrying the gate's pass so that a request counts as in flight exactly until
//! its answer has been sent (or the client went away and hyper dropped the body), and the
//! upstream connection it comes on, given back to its pool only once read to the end.

use std::pin::Pin;
use std::task::{Context, Poll};

use http_body_util::{Either, Full};
use hyper::body::{Body, Bytes, Frame, Incoming, SizeHint};

use super::upstream::Lent;

pub(super) type BoxError = Box<dyn std::error::Error + Send + Sync>;

pub(super) struct ProxyBody<P> {
    inner: Either<Incoming, Full<Bytes>>,
    /// Released at the body's last frame, its error, or its drop, whichever comes first.
    pass: Option<P>,
    /// The upstream connection the body is read from: given back to its pool once the body
    /// has been read to its end, closed (dropped) if it is cut short.
    upstream: Option<Lent>,
}

impl<P> ProxyBody<P> {
    /// The upstream's body, streamed frame by frame as it arrives.
    pub(super) fn streamed(body: Incoming, pass: P, upstream: Lent) -> Self {
        Self {
            inner: Either::Left(body),
            pass: Some(pass),
            upstream: Some(upstream),
        }
    }

    /// A body of our own (a refusal, a 502), or none (`Bytes::new()`).
    pub(super) fn full(bytes: Bytes) -> Self {
        Self {
            inner: Either::Right(Full::new(bytes)),
            pass: None,
            upstream: None,
        }
    }

    fn give_back_upstream(&mut self) {
        if let Some(upstream) = self.upstream.take() {
            upstream.give_back();
        }
    }
}

// `pass` and `upstream` are never pinned: only `inner` is polled, and both of its sides
// are `Unpin`.
impl<P> Unpin for ProxyBody<P> {}

impl<P> Body for ProxyBody<P> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match polled {
            Poll::Ready(None) => {
                self.pass = None;
                self.give_back_upstream();
            }
            Poll::Ready(Some(Err(_))) => {
                // The connection is not fit to be lent again.
                self.upstream = None;
                self.pass = None;
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<P> Drop for ProxyBody<P> {
    /// hyper drops a body without polling it again once it says it has ended (a
    /// `Content-Length` body's last bytes, as a rule); any other body dropped here was cut
    /// short, and its connection closes with it.
    fn drop(&mut self) {
        if self.inner.is_end_stream() {
            self.give_back_upstream();
        }
    }
}
