//! The proxy against small hyper upstreams on 127.0.0.1:0, with a gate that admits at once,
//! refuses, or never answers, and counts the passes alive.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{header, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Notify};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;

use super::{bind, Gate, Refusal, RequestKind, Route};
use crate::config::ServiceName;

const WAIT: Duration = Duration::from_secs(5);

enum Admission {
    Now,
    Refuse(Refusal),
    Never,
}

struct TestGate {
    admission: Admission,
    live: Arc<AtomicUsize>,
    kinds: Mutex<Vec<RequestKind>>,
    /// Admit futures dropped before they finished.
    abandoned: Arc<AtomicUsize>,
    answered: Mutex<Vec<StatusCode>>,
}

impl TestGate {
    fn new(admission: Admission) -> Self {
        Self {
            admission,
            live: Arc::default(),
            kinds: Mutex::default(),
            abandoned: Arc::default(),
            answered: Mutex::default(),
        }
    }

    fn live(&self) -> usize {
        self.live.load(Ordering::SeqCst)
    }

    fn kinds(&self) -> Vec<RequestKind> {
        self.kinds.lock().unwrap().clone()
    }

    fn answered(&self) -> Vec<StatusCode> {
        self.answered.lock().unwrap().clone()
    }
}

/// Counts one down when dropped: a pass, or a waiting admit.
struct CountDown(Arc<AtomicUsize>);

impl Drop for CountDown {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Counts one up when dropped.
struct CountUp(Arc<AtomicUsize>);

impl Drop for CountUp {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

impl Gate for TestGate {
    type Pass = CountDown;

    fn admit(
        &self,
        _service: &ServiceName,
        kind: RequestKind,
    ) -> impl Future<Output = Result<CountDown, Refusal>> + Send {
        self.kinds.lock().unwrap().push(kind);
        async move {
            match &self.admission {
                Admission::Now => {
                    self.live.fetch_add(1, Ordering::SeqCst);
                    Ok(CountDown(self.live.clone()))
                }
                Admission::Refuse(refusal) => Err(refusal.clone()),
                Admission::Never => {
                    let _abandoned = CountUp(self.abandoned.clone());
                    std::future::pending().await
                }
            }
        }
    }

    fn answered(&self, _service: &ServiceName, status: StatusCode) {
        self.answered.lock().unwrap().push(status);
    }
}

type TestBody = BoxBody<Bytes, Infallible>;

fn text(body: &'static str) -> TestBody {
    Full::new(Bytes::from_static(body.as_bytes())).boxed()
}

fn ollama() -> ServiceName {
    ServiceName::parse("ollama").unwrap()
}

/// A hyper server on 127.0.0.1:0 answering every request with `handler`.
async fn upstream<F, Fut>(handler: F) -> SocketAddr
where
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<TestBody>> + Send + 'static,
{
    counted_upstream(handler, KeepAlive::On).await.0
}

#[derive(Clone, Copy)]
enum KeepAlive {
    On,
    /// Every connection closes after its first answer.
    Off,
}

/// [`upstream`], and how many connections it has accepted.
async fn counted_upstream<F, Fut>(
    handler: F,
    keep_alive: KeepAlive,
) -> (SocketAddr, Arc<AtomicUsize>)
where
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<TestBody>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counted = accepted.clone();
    let handler = Arc::new(handler);
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            counted.fetch_add(1, Ordering::SeqCst);
            let handler = handler.clone();
            let service = service_fn(move |request| {
                let answer = handler(request);
                async move { Ok::<_, Infallible>(answer.await) }
            });
            tokio::spawn(
                http1::Builder::new()
                    .keep_alive(matches!(keep_alive, KeepAlive::On))
                    .serve_connection(TokioIo::new(stream), service)
                    .with_upgrades(),
            );
        }
    });
    (addr, accepted)
}

/// An address where nothing listens.
async fn nothing_listening() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap()
}

/// The proxy for "ollama" in front of `upstream`; shut down when dropped.
struct Proxy {
    addr: SocketAddr,
    gate: Arc<TestGate>,
    /// What a reload would send.
    routes: watch::Sender<Vec<Route>>,
    shutdown: CancellationToken,
    served: tokio::task::JoinHandle<()>,
}

fn ollama_route(listen: SocketAddr, upstream: SocketAddr) -> Route {
    Route {
        service: ollama(),
        listen,
        upstream: format!("http://{upstream}").parse().unwrap(),
    }
}

impl Proxy {
    async fn start(upstream: SocketAddr, admission: Admission) -> Self {
        Self::start_on("127.0.0.1:0".parse().unwrap(), upstream, admission).await
    }

    async fn start_on(listen: SocketAddr, upstream: SocketAddr, admission: Admission) -> Self {
        let route = ollama_route(listen, upstream);
        let listeners = bind(std::slice::from_ref(&route)).await.unwrap();
        let addr = listeners.local_addr(&ollama()).unwrap();
        let gate = Arc::new(TestGate::new(admission));
        let shutdown = CancellationToken::new();
        let (routes, followed) = watch::channel(vec![route]);
        let served = tokio::spawn(listeners.serve(gate.clone(), followed, shutdown.clone()));
        Self {
            addr,
            gate,
            routes,
            shutdown,
            served,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn eventually(what: &str, check: impl Fn() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, future)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// Reads from a raw connection until the end of the response's headers.
async fn read_head(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        let read = within("response headers", stream.read(&mut byte))
            .await
            .unwrap();
        assert_eq!(read, 1, "connection closed mid-headers: {head:?}");
        head.push(byte[0]);
    }
    String::from_utf8(head).unwrap()
}

#[derive(Debug)]
struct Seen {
    method: String,
    uri: String,
    header: Option<String>,
    hop_header: bool,
    forwarded_for: Option<String>,
    forwarded_host: Option<String>,
    body: Bytes,
}

fn header_text(request: &Request<Incoming>, name: &str) -> Option<String> {
    request
        .headers()
        .get(name)
        .map(|value| value.to_str().unwrap().to_owned())
}

#[tokio::test]
async fn a_request_is_forwarded_and_its_pass_ends_with_the_body() {
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel();
    let upstream = upstream(move |request: Request<Incoming>| {
        let seen_tx = seen_tx.clone();
        async move {
            let mut seen = Seen {
                method: request.method().to_string(),
                uri: request.uri().to_string(),
                header: header_text(&request, "x-test"),
                hop_header: request.headers().contains_key("x-hop"),
                forwarded_for: header_text(&request, "x-forwarded-for"),
                forwarded_host: header_text(&request, "x-forwarded-host"),
                body: Bytes::new(),
            };
            seen.body = request.into_body().collect().await.unwrap().to_bytes();
            seen_tx.send(seen).unwrap();
            Response::builder()
                .status(StatusCode::CREATED)
                .header("x-upstream", "yes")
                .body(text("the answer"))
                .unwrap()
        }
    })
    .await;
    let proxy = Proxy::start(upstream, Admission::Now).await;

    let response = reqwest::Client::new()
        .post(proxy.url("/api/chat?model=llama&x=1"))
        .header("x-test", "hello")
        .header("connection", "x-hop")
        .header("x-hop", "1")
        .body("the question")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(response.headers()["x-upstream"], "yes");
    assert_eq!(response.text().await.unwrap(), "the answer");

    let seen = seen_rx.recv().await.unwrap();
    assert_eq!(seen.method, "POST");
    assert_eq!(seen.uri, "/api/chat?model=llama&x=1");
    assert_eq!(seen.header.as_deref(), Some("hello"));
    assert!(
        !seen.hop_header,
        "a header named in Connection is hop-by-hop"
    );
    assert_eq!(seen.forwarded_for.as_deref(), Some("127.0.0.1"));
    assert_eq!(seen.forwarded_host, Some(proxy.addr.to_string()));
    assert_eq!(seen.body, "the question");
    eventually("the pass to be dropped", || proxy.gate.live() == 0).await;
    assert_eq!(proxy.gate.kinds(), [RequestKind::Plain]);
    assert_eq!(proxy.gate.answered(), [StatusCode::CREATED]);
}

/// An upstream that answers "one", waits for `go`, then answers "two" and ends.
async fn two_chunks(go: Arc<Notify>) -> SocketAddr {
    upstream(move |_request| {
        let go = go.clone();
        async move {
            let (chunks, body) = mpsc::channel::<Bytes>(2);
            tokio::spawn(async move {
                chunks.send(Bytes::from_static(b"one")).await.unwrap();
                go.notified().await;
                chunks.send(Bytes::from_static(b"two")).await.unwrap();
            });
            let frames = ReceiverStream::new(body).map(|chunk| Ok(Frame::data(chunk)));
            Response::new(StreamBody::new(frames).boxed())
        }
    })
    .await
}

#[tokio::test]
async fn a_streamed_answer_reaches_the_client_chunk_by_chunk() {
    let go = Arc::new(Notify::new());
    let upstream = two_chunks(go.clone()).await;
    let proxy = Proxy::start(upstream, Admission::Now).await;

    let mut response = reqwest::get(proxy.url("/api/generate")).await.unwrap();
    let first = within("the first chunk", response.chunk()).await.unwrap();
    assert_eq!(first.as_deref(), Some(&b"one"[..]));
    assert_eq!(proxy.gate.live(), 1, "the request is in flight mid-stream");
    go.notify_one();
    let second = within("the second chunk", response.chunk()).await.unwrap();
    assert_eq!(second.as_deref(), Some(&b"two"[..]));
    assert_eq!(within("the end", response.chunk()).await.unwrap(), None);
    eventually("the pass to be dropped", || proxy.gate.live() == 0).await;
}

/// Three requests, one after another on one consumer connection (so one worker and its
/// pool), each answered "ok": how many connections the upstream accepted for them.
async fn upstream_connections_for_three_requests(keep_alive: KeepAlive) -> usize {
    let (upstream, accepted) =
        counted_upstream(|_request| async { Response::new(text("ok")) }, keep_alive).await;
    let proxy = Proxy::start(upstream, Admission::Now).await;
    let client = reqwest::Client::new();
    for _ in 0..3 {
        let response = client.get(proxy.url("/")).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.text().await.unwrap(), "ok");
    }
    assert_eq!(proxy.gate.answered(), [StatusCode::OK; 3]);
    accepted.load(Ordering::SeqCst)
}

#[tokio::test]
async fn requests_one_after_another_share_one_upstream_connection() {
    assert_eq!(
        upstream_connections_for_three_requests(KeepAlive::On).await,
        1
    );
}

#[tokio::test]
async fn a_connection_the_upstream_closed_is_replaced() {
    assert_eq!(
        upstream_connections_for_three_requests(KeepAlive::Off).await,
        3,
        "each request on a new connection, none answered 502"
    );
}

#[tokio::test]
async fn an_answer_cut_short_closes_its_upstream_connection() {
    let (closed_tx, mut closed) = mpsc::unbounded_channel();
    let upstream = upstream(move |request: Request<Incoming>| {
        let closed_tx = closed_tx.clone();
        async move {
            if request.uri().path() != "/stream" {
                return Response::new(text("ok"));
            }
            let (chunks, body) = mpsc::channel::<Bytes>(1);
            tokio::spawn(async move {
                chunks.send(Bytes::from_static(b"one")).await.unwrap();
                // Ends when hyper drops the body: its connection closed.
                chunks.closed().await;
                closed_tx.send(()).unwrap();
            });
            let frames = ReceiverStream::new(body).map(|chunk| Ok(Frame::data(chunk)));
            Response::new(StreamBody::new(frames).boxed())
        }
    })
    .await;
    let proxy = Proxy::start(upstream, Admission::Now).await;

    let client = reqwest::Client::new();
    let mut cut = client.get(proxy.url("/stream")).send().await.unwrap();
    let first = within("the first chunk", cut.chunk()).await.unwrap();
    assert_eq!(first.as_deref(), Some(&b"one"[..]));
    drop(cut);
    within("the upstream to see its connection closed", closed.recv()).await;
    eventually("the pass of the cut answer to end", || {
        proxy.gate.live() == 0
    })
    .await;

    let response = client.get(proxy.url("/")).send().await.unwrap();
    assert_eq!(response.text().await.unwrap(), "ok");
}

#[tokio::test]
async fn an_upload_streams_to_the_upstream() {
    let (first_tx, mut first_rx) = mpsc::unbounded_channel();
    let upstream = upstream(move |request: Request<Incoming>| {
        let first_tx = first_tx.clone();
        async move {
            let mut body = request.into_body();
            let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
            first_tx.send(first).unwrap();
            let rest = body.collect().await.unwrap().to_bytes();
            let answer = format!("then {}", String::from_utf8_lossy(&rest));
            Response::new(Full::new(Bytes::from(answer)).boxed())
        }
    })
    .await;
    let proxy = Proxy::start(upstream, Admission::Now).await;

    let mut client = TcpStream::connect(proxy.addr).await.unwrap();
    client
        .write_all(
            b"POST /upload HTTP/1.1\r\nHost: proxy\r\nConnection: close\r\n\
              Transfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n",
        )
        .await
        .unwrap();
    let first = within("the upload's first part upstream", first_rx.recv()).await;
    assert_eq!(first.unwrap(), "first");
    client.write_all(b"4\r\nrest\r\n0\r\n\r\n").await.unwrap();
    let mut answer = String::new();
    within("the answer", client.read_to_string(&mut answer))
        .await
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("then rest"), "{answer}");
}

#[tokio::test]
async fn an_upstream_that_refuses_the_connection_is_a_502_naming_the_service() {
    let upstream = nothing_listening().await;
    let proxy = Proxy::start(upstream, Admission::Now).await;

    let response = reqwest::get(proxy.url("/api/tags")).await.unwrap();
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(
        response.headers()[header::CONTENT_TYPE.as_str()],
        "application/json"
    );
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["kind"], "upstream");
    assert_eq!(body["service"], "ollama");
    let error = body["error"].as_str().unwrap();
    assert!(
        error.starts_with(&format!("ollama at http://{upstream} could not be reached")),
        "{error}"
    );
    assert!(error.contains("refused"), "{error}");
    assert_eq!(proxy.gate.live(), 0);
    assert_eq!(proxy.gate.answered(), [StatusCode::BAD_GATEWAY]);
}

#[tokio::test]
async fn a_refusal_is_answered_with_its_status_json_and_retry_after() {
    let mut detail = serde_json::Map::new();
    detail.insert("holders".into(), serde_json::json!(["comfyui"]));
    let refusal = Refusal {
        status: StatusCode::SERVICE_UNAVAILABLE,
        kind: "cannot_fit",
        error: "ollama does not fit".into(),
        retry_after_s: Some(30),
        detail,
    };
    // Were it forwarded, the answer would be a 502.
    let proxy = Proxy::start(nothing_listening().await, Admission::Refuse(refusal)).await;

    let response = reqwest::get(proxy.url("/api/tags")).await.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(response.headers()[header::RETRY_AFTER.as_str()], "30");
    assert_eq!(
        response.headers()[header::CONTENT_TYPE.as_str()],
        "application/json"
    );
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(
        body,
        serde_json::json!({
            "error": "ollama does not fit",
            "kind": "cannot_fit",
            "service": "ollama",
            "holders": ["comfyui"],
        })
    );
    assert_eq!(proxy.gate.answered(), [StatusCode::SERVICE_UNAVAILABLE]);
}

#[tokio::test]
async fn an_upgrade_is_tunnelled_and_holds_its_pass_until_it_closes() {
    let upstream = upstream(|mut request: Request<Incoming>| async move {
        if request.headers().get(header::UPGRADE).is_none() {
            return Response::builder()
                .status(StatusCode::BAD_REQUEST)
                .body(text("no upgrade header"))
                .unwrap();
        }
        let upgraded = hyper::upgrade::on(&mut request);
        tokio::spawn(async move {
            let mut io = TokioIo::new(upgraded.await.unwrap());
            let mut buffer = [0u8; 64];
            loop {
                match io.read(&mut buffer).await {
                    Ok(0) | Err(_) => return,
                    Ok(read) => io.write_all(&buffer[..read]).await.unwrap(),
                }
            }
        });
        Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header(header::CONNECTION, "upgrade")
            .header(header::UPGRADE, "websocket")
            .header("sec-websocket-accept", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
            .body(text(""))
            .unwrap()
    })
    .await;
    let proxy = Proxy::start(upstream, Admission::Now).await;

    let mut client = TcpStream::connect(proxy.addr).await.unwrap();
    client
        .write_all(
            b"GET /ws HTTP/1.1\r\nHost: proxy\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        )
        .await
        .unwrap();
    let head = read_head(&mut client).await.to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    assert!(head.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="));

    client.write_all(b"ping").await.unwrap();
    let mut echo = [0u8; 4];
    within("the echo", client.read_exact(&mut echo))
        .await
        .unwrap();
    assert_eq!(&echo, b"ping");
    assert_eq!(proxy.gate.live(), 1, "the open tunnel holds its pass");
    assert_eq!(proxy.gate.kinds(), [RequestKind::Upgrade]);
    assert_eq!(proxy.gate.answered(), [StatusCode::SWITCHING_PROTOCOLS]);

    drop(client);
    eventually("the tunnel's pass to be dropped", || proxy.gate.live() == 0).await;
}

#[tokio::test]
async fn bytes_that_are_not_http_are_a_400() {
    let proxy = Proxy::start(nothing_listening().await, Admission::Now).await;

    let mut client = TcpStream::connect(proxy.addr).await.unwrap();
    client
        .write_all(b"THIS IS NOT HTTP AT ALL\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    within("the answer", client.read_to_string(&mut answer))
        .await
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(proxy.gate.kinds().is_empty(), "never admitted");
}

#[tokio::test]
async fn shutdown_stops_accepting_and_lets_a_stream_under_way_finish() {
    let go = Arc::new(Notify::new());
    let mut proxy = Proxy::start(two_chunks(go.clone()).await, Admission::Now).await;

    let mut response = reqwest::get(proxy.url("/api/generate")).await.unwrap();
    let first = within("the first chunk", response.chunk()).await.unwrap();
    assert_eq!(first.as_deref(), Some(&b"one"[..]));
    proxy.shutdown.cancel();
    let deadline = Instant::now() + WAIT;
    while TcpStream::connect(proxy.addr).await.is_ok() {
        assert!(Instant::now() < deadline, "still accepting after shutdown");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!proxy.served.is_finished(), "a stream is under way");
    go.notify_one();
    let second = within("the second chunk", response.chunk()).await.unwrap();
    assert_eq!(second.as_deref(), Some(&b"two"[..]));
    assert_eq!(within("the end", response.chunk()).await.unwrap(), None);
    within("serve to return", &mut proxy.served).await.unwrap();
    assert_eq!(proxy.gate.live(), 0);
}

/// Sends `request`, goes away while the gate has not answered, and checks that the admit
/// future was dropped.
async fn go_away_while_waiting(request: &[u8]) {
    let proxy = Proxy::start(nothing_listening().await, Admission::Never).await;

    let mut client = TcpStream::connect(proxy.addr).await.unwrap();
    client.write_all(request).await.unwrap();
    eventually("the admit to begin", || proxy.gate.kinds().len() == 1).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(proxy.gate.abandoned.load(Ordering::SeqCst), 0);
    drop(client);
    eventually("the admit to be dropped", || {
        proxy.gate.abandoned.load(Ordering::SeqCst) == 1
    })
    .await;
    assert!(proxy.gate.answered().is_empty(), "nobody to answer");
}

#[tokio::test]
async fn a_client_that_goes_away_while_waiting_drops_its_admit() {
    go_away_while_waiting(b"GET /api/tags HTTP/1.1\r\nHost: proxy\r\n\r\n").await;
}

#[tokio::test]
async fn a_client_that_goes_away_while_its_post_waits_drops_its_admit() {
    go_away_while_waiting(
        b"POST /api/chat HTTP/1.1\r\nHost: proxy\r\nContent-Type: application/json\r\n\
          Content-Length: 17\r\n\r\n{\"model\":\"llama\"}",
    )
    .await;
}

/// Answers every request with `name`.
async fn upstream_named(name: &'static str) -> SocketAddr {
    upstream(move |_| async move { Response::new(text(name)) }).await
}

async fn get_text(url: &str) -> String {
    let answer = within("the answer", reqwest::get(url)).await.unwrap();
    assert_eq!(answer.status(), StatusCode::OK);
    answer.text().await.unwrap()
}

#[tokio::test]
async fn new_routes_move_a_service_to_another_address_and_upstream_without_a_restart() {
    let (first, second) = (
        upstream_named("first").await,
        upstream_named("second").await,
    );
    let proxy = Proxy::start_on(nothing_listening().await, first, Admission::Now).await;
    assert_eq!(get_text(&proxy.url("/")).await, "first");

    // Same address, another upstream: the listener is kept.
    proxy
        .routes
        .send_replace(vec![ollama_route(proxy.addr, second)]);
    eventually_async("the new upstream", || async {
        get_text(&proxy.url("/")).await == "second"
    })
    .await;

    // Another address: the old one is closed, the new one serves.
    let moved = nothing_listening().await;
    proxy.routes.send_replace(vec![ollama_route(moved, first)]);
    eventually_async("the new address", || async {
        TcpStream::connect(moved).await.is_ok()
    })
    .await;
    assert_eq!(get_text(&format!("http://{moved}/")).await, "first");
    eventually_async("the old address closed", || async {
        TcpStream::connect(proxy.addr).await.is_err()
    })
    .await;

    // No route any more: nothing listens.
    proxy.routes.send_replace(Vec::new());
    eventually_async("the last address closed", || async {
        TcpStream::connect(moved).await.is_err()
    })
    .await;
}

#[tokio::test]
async fn a_changed_route_closes_its_keep_alive_connections_after_their_answer() {
    let (first, second) = (
        upstream_named("first").await,
        upstream_named("second").await,
    );
    let proxy = Proxy::start(first, Admission::Now).await;
    // One client: its idle keep-alive connection would be reused for every request. A
    // request may meet that connection as the proxy closes it (a client's retry, as
    // with any server that closes idle connections): `None`, not a failure.
    let client = reqwest::Client::new();
    let get = || async {
        let answer = within("the answer", client.get(proxy.url("/")).send())
            .await
            .ok()?;
        answer.text().await.ok()
    };
    assert_eq!(get().await.as_deref(), Some("first"));
    assert_eq!(get().await.as_deref(), Some("first"));

    proxy
        .routes
        .send_replace(vec![ollama_route(proxy.addr, second)]);
    eventually_async(
        "the kept-alive client to reach the new upstream",
        || async { get().await.as_deref() == Some("second") },
    )
    .await;
    assert!(
        proxy.gate.answered().iter().all(|s| *s == StatusCode::OK),
        "no request failed on the way: {:?}",
        proxy.gate.answered()
    );
}

async fn eventually_async<F: Future<Output = bool>>(what: &str, check: impl Fn() -> F) {
    let deadline = Instant::now() + WAIT;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn an_address_in_use_is_an_error_naming_the_service_and_the_address() {
    let taken = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = taken.local_addr().unwrap();
    let route = Route {
        service: ollama(),
        listen: addr,
        upstream: "http://127.0.0.1:11435".parse().unwrap(),
    };
    let err = bind(&[route]).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("services.ollama.proxy.listen {addr} cannot be bound: address in use")
    );
}

#[tokio::test]
async fn an_https_upstream_is_an_error_at_startup() {
    let route = Route {
        service: ollama(),
        listen: "127.0.0.1:0".parse().unwrap(),
        upstream: "https://127.0.0.1:11435".parse().unwrap(),
    };
    let err = bind(&[route]).await.unwrap_err();
    assert!(
        err.to_string()
            .starts_with("services.ollama.proxy.upstream https://127.0.0.1:11435/ cannot be used"),
        "{err}"
    );
}
