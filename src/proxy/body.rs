//! The body of every answer the proxy gives: the upstream's streamed body or one of our own
//! JSON bodies, carrying the gate's pass so that a request counts as in flight exactly until
//! its answer has been sent (or the client went away and hyper dropped the body).

use std::pin::Pin;
use std::task::{Context, Poll};

use http_body_util::{Either, Full};
use hyper::body::{Body, Bytes, Frame, Incoming, SizeHint};

pub(super) type BoxError = Box<dyn std::error::Error + Send + Sync>;

pub(super) struct ProxyBody<P> {
    inner: Either<Incoming, Full<Bytes>>,
    /// Released at the body's last frame, its error, or its drop, whichever comes first.
    pass: Option<P>,
}

impl<P> ProxyBody<P> {
    /// The upstream's body, streamed frame by frame as it arrives.
    pub(super) fn streamed(upstream: Incoming, pass: P) -> Self {
        Self {
            inner: Either::Left(upstream),
            pass: Some(pass),
        }
    }

    /// A body of our own (a refusal, a 502), or none (`Bytes::new()`).
    pub(super) fn full(bytes: Bytes) -> Self {
        Self {
            inner: Either::Right(Full::new(bytes)),
            pass: None,
        }
    }
}

// `pass` is never pinned: only `inner` is polled, and both of its sides are `Unpin`.
impl<P> Unpin for ProxyBody<P> {}

impl<P> Body for ProxyBody<P> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None | Some(Err(_)))) {
            self.pass = None;
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
