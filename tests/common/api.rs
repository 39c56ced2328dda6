//! The HTTP side of the harness: a daemon started with `serve`, and a blocking HTTP/1.1
//! client over std::net (requests, JSON answers and the SSE event stream).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{free_port, Harness, CONVERGE};

/// A request is given this long to answer: transitions wait for services to converge.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

/// An action of a report or a plan as "op service".
pub fn op_service(action: &Value) -> String {
    format!(
        "{} {}",
        action["op"].as_str().expect("op"),
        action["service"].as_str().expect("service")
    )
}

/// An HTTP answer: status code and body.
#[derive(Debug)]
pub struct Reply {
    pub code: u16,
    pub body: String,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("HTTP {} body is not JSON ({e}): {}", self.code, self.body))
    }
}

/// The daemon's API on 127.0.0.1.
#[derive(Clone, Debug)]
pub struct Api {
    pub port: u16,
    /// Sent as `Authorization: Bearer` with every POST when set.
    pub token: Option<String>,
}

impl Harness {
    /// Writes the config with `api: { listen: 127.0.0.1:<free port> <api_extra> }`, starts
    /// `gpu-manager serve` and waits until it answers `/healthz`.
    pub fn serve(&mut self, api_extra: &str) -> Api {
        self.serve_with(api_extra, "")
    }

    /// `serve` with more top-level config (e.g. a `lease:` block).
    pub fn serve_with(&mut self, api_extra: &str, config_extra: &str) -> Api {
        let port = free_port();
        self.write_config(&format!(
            "api: {{ listen: \"127.0.0.1:{port}\"{api_extra} }}\n{config_extra}"
        ));
        self.start_daemon_with(&["serve"]);
        let api = Api { port, token: None };
        self.wait_until("the API answers /healthz", |_| {
            api.try_request("GET", "/healthz", None)
                .is_some_and(|r| r.code == 200)
        });
        api
    }
}

impl Api {
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn get(&self, path: &str) -> Reply {
        self.request("GET", path, None)
    }

    /// A POST with the configured token (if any).
    pub fn post(&self, path: &str) -> Reply {
        let header = self.token.as_ref().map(|t| format!("Bearer {t}"));
        self.request("POST", path, header.as_deref())
    }

    /// A POST with exactly this Authorization header (or none).
    pub fn post_authorized(&self, path: &str, authorization: Option<&str>) -> Reply {
        self.request("POST", path, authorization)
    }

    pub fn status(&self) -> Value {
        let reply = self.get("/gpu/status");
        assert_eq!(reply.code, 200, "GET /gpu/status: {}", reply.body);
        reply.json()
    }

    /// The state `GET /gpu/status` reports for a service.
    pub fn state(&self, service: &str) -> String {
        self.status()["services"][service]["state"]
            .as_str()
            .unwrap_or_else(|| panic!("no state for {service}"))
            .to_owned()
    }

    /// Polls status until `service` is in `state`.
    pub fn wait_state(&self, service: &str, state: &str) {
        self.wait_status(&format!("{service} to become {state}"), |status| {
            status["services"][service]["state"] == state
        });
    }

    /// The first status for which `done` holds, polled until `CONVERGE` has passed.
    pub fn wait_status(&self, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + CONVERGE;
        loop {
            let status = self.status();
            if done(&status) {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "waited in vain for {what}: {status}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn request(&self, method: &str, path: &str, authorization: Option<&str>) -> Reply {
        self.try_request(method, path, authorization)
            .unwrap_or_else(|| panic!("{method} {path}: no HTTP answer from {}", self.url()))
    }

    /// The answer, or None when nothing listens (or the connection broke).
    pub fn try_request(
        &self,
        method: &str,
        path: &str,
        authorization: Option<&str>,
    ) -> Option<Reply> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        stream.set_read_timeout(Some(ANSWER_TIMEOUT)).ok()?;
        let auth = authorization
            .map(|value| format!("Authorization: {value}\r\n"))
            .unwrap_or_default();
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Connection: close\r\n\r\n"
        )
        .ok()?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).ok()?;
        let response = String::from_utf8(response).ok()?;
        let code = response.split_whitespace().nth(1)?.parse().ok()?;
        let body = response.split_once("\r\n\r\n")?.1.to_owned();
        Some(Reply { code, body })
    }

    /// Subscribes to `GET /gpu/events`; returns once the daemon has answered, so every
    /// event after this call is delivered.
    pub fn events(&self) -> EventStream {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).expect("connect");
        stream.set_read_timeout(Some(CONVERGE)).unwrap();
        write!(
            stream,
            "GET /gpu/events HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n"
        )
        .unwrap();
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        assert!(line.contains(" 200 "), "GET /gpu/events: {line}");
        while line != "\r\n" {
            line.clear();
            reader.read_line(&mut line).unwrap();
            assert!(!line.is_empty(), "the event stream closed in its headers");
        }
        EventStream { reader }
    }
}

/// The SSE stream: one JSON event per `data:` line. The body is chunked; chunk-size lines
/// are skipped (event lines are short and never split across chunks by warp).
pub struct EventStream {
    reader: BufReader<TcpStream>,
}

impl EventStream {
    /// The next event; panics when none comes within [`CONVERGE`].
    pub fn next_event(&mut self) -> Value {
        let mut line = String::new();
        loop {
            line.clear();
            let read = self.reader.read_line(&mut line).expect("an event in time");
            assert!(read > 0, "the event stream ended");
            if let Some(data) = line.trim_end().strip_prefix("data:") {
                return serde_json::from_str(data.trim_start())
                    .unwrap_or_else(|e| panic!("event is not JSON ({e}): {data}"));
            }
        }
    }
}
