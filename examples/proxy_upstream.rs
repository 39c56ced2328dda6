//! The demand-proxy benchmark's upstream (benches/proxy.rs): a small HTTP/1.1 server on
//! hyper 1, fast enough not to be what a proxy in front of it is measured by (the
//! stand-in, gpu-standin, serves one request per connection on a thread of its own).
//! The daemon runs it as a native service, so that the proxy starts and stops it.
//!
//! `proxy_upstream --port P [--start-delay-ms MS]`, on 127.0.0.1:
//! - `GET /health`: 503 until `--start-delay-ms` has passed since it started, then 200
//!   (what a loading model server answers);
//! - `GET /stream?chunks=N&ms=M`: `text/plain`, chunked: N lines "chunk I of N\n", the
//!   first at once, then one every M ms;
//! - anything else: 200 with a 13-byte body, `hello, world\n`.
//!
//! Built by `benches/proxy.sh` (`cargo build --release --example proxy_upstream`).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_util::stream;
use http_body_util::{Either, Full, StreamBody};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{header, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

const USAGE: &str = "usage: proxy_upstream --port P [--start-delay-ms MS]";
const HELLO: &[u8] = b"hello, world\n";

type Chunks = StreamBody<stream::BoxStream<'static, Result<Frame<Bytes>, Infallible>>>;
type Body = Either<Full<Bytes>, Chunks>;

fn main() {
    let (port, start_delay) = match options() {
        Ok(options) => options,
        Err(message) => {
            eprintln!("{message}\n{USAGE}");
            std::process::exit(64);
        }
    };
    let ready_at = Instant::now() + start_delay;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(async move {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let listener = TcpListener::bind(addr)
            .await
            .unwrap_or_else(|err| panic!("cannot listen on {addr}: {err}"));
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let service = service_fn(move |request| async move {
                    Ok::<_, Infallible>(answer(&request, ready_at))
                });
                // A client that goes away mid-answer is no concern of the benchmark's.
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
}

fn answer(request: &Request<Incoming>, ready_at: Instant) -> Response<Body> {
    match request.uri().path() {
        "/health" if Instant::now() < ready_at => {
            full(StatusCode::SERVICE_UNAVAILABLE, b"loading\n")
        }
        "/stream" => {
            let query = request.uri().query().unwrap_or("");
            let chunks = parameter(query, "chunks").unwrap_or(3);
            let pace = Duration::from_millis(parameter(query, "ms").unwrap_or(10));
            Response::builder()
                .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
                .body(Either::Right(lines(chunks, pace)))
                .expect("a valid response")
        }
        _ => full(StatusCode::OK, HELLO),
    }
}

fn full(status: StatusCode, body: &'static [u8]) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain")
        .body(Either::Left(Full::new(Bytes::from_static(body))))
        .expect("a valid response")
}

/// N lines, the first at once, then one every `pace`; no length, so sent chunked.
fn lines(chunks: u64, pace: Duration) -> Chunks {
    let pieces = stream::unfold(1, move |n| async move {
        if n > chunks {
            return None;
        }
        if n > 1 {
            tokio::time::sleep(pace).await;
        }
        let line = Bytes::from(format!("chunk {n} of {chunks}\n"));
        Some((Ok(Frame::data(line)), n + 1))
    });
    StreamBody::new(Box::pin(pieces))
}

fn parameter(query: &str, name: &str) -> Option<u64> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(key, _)| *key == name)
        .and_then(|(_, value)| value.parse().ok())
}

fn options() -> Result<(u16, Duration), String> {
    let mut port = None;
    let mut start_delay = Duration::ZERO;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let number: u64 = value
            .parse()
            .map_err(|_| format!("{flag} {value:?} is not a number"))?;
        match flag.as_str() {
            "--port" => {
                port = Some(u16::try_from(number).map_err(|_| format!("no port {number}"))?)
            }
            "--start-delay-ms" => start_delay = Duration::from_millis(number),
            _ => return Err(format!("unknown option {flag}")),
        }
    }
    Ok((port.ok_or("--port is required")?, start_delay))
}
