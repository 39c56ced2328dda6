//! Readiness and liveness: a service is healthy while its health URL answers 2xx
//! (docs/ARCHITECTURE.md, "Observation").

use std::future::Future;
use std::time::Duration;

use reqwest::StatusCode;
use tokio::time::Instant;

use crate::config::HealthCheck;
use crate::process_exit::ExitInfo;

/// The first pause between readiness probes: most services answer within tens of ms
/// of binding their port, and a start should not wait longer than it must.
const FIRST_POLL: Duration = Duration::from_millis(20);
/// Probes stay at [`FIRST_POLL`] this long: every pause adds up to its length to a
/// start's latency, and a probe of a local port costs well under a millisecond.
const FAST_PHASE: Duration = Duration::from_secs(10);
/// Each pause after that is this much longer than the last, up to [`MAX_POLL`].
const POLL_BACKOFF: f64 = 1.5;
const MAX_POLL: Duration = Duration::from_millis(250);
/// With no health check configured, a service counts as ready once its process has
/// survived this long: a bad command line or a missing module fails within it.
pub const NO_CHECK_GRACE: Duration = Duration::from_millis(200);

/// Why one probe did not find the service healthy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HealthError {
    #[error("{url} answered {status}")]
    Status { url: String, status: StatusCode },
    #[error("{url} did not answer within {:.1}s", after.as_secs_f64())]
    NoAnswer { url: String, after: Duration },
    #[error("cannot reach {url}: {detail}")]
    Unreachable { url: String, detail: String },
}

/// Why a service did not become ready.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadyError {
    #[error("{0} before becoming ready")]
    Exited(ExitInfo),
    #[error("not ready after {:.1}s{}", after.as_secs_f64(), last_error.as_ref().map(|e| format!(": {e}")).unwrap_or_default())]
    TimedOut {
        after: Duration,
        /// What the last probe found, if one finished.
        last_error: Option<HealthError>,
    },
}

/// Probes health URLs with one shared HTTP client.
#[derive(Debug, Clone)]
pub struct HealthProber {
    client: reqwest::Client,
}

impl HealthProber {
    /// A client that ignores proxy variables (health URLs are local, and a proxy would
    /// answer for a dead service) and keeps no idle connections (a restarted service
    /// would otherwise first see a stale one and fail a probe).
    pub fn new() -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            .no_proxy()
            .pool_max_idle_per_host(0)
            .build()?;
        Ok(Self { client })
    }

    /// The HTTP client, for other calls to the services' local APIs (Ollama's unload).
    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    /// One GET of the health URL within `check.timeout`: Ok on 2xx.
    pub async fn probe(&self, check: &HealthCheck) -> Result<(), HealthError> {
        let response = self
            .client
            .get(&check.url)
            .timeout(check.timeout)
            .send()
            .await
            .map_err(|error| request_error(check, &error))?;
        let status = response.status();
        if status.is_success() {
            Ok(())
        } else {
            Err(HealthError::Status {
                url: check.url.clone(),
                status,
            })
        }
    }
}

fn request_error(check: &HealthCheck, error: &reqwest::Error) -> HealthError {
    let url = check.url.clone();
    if error.is_timeout() {
        return HealthError::NoAnswer {
            url,
            after: check.timeout,
        };
    }
    // reqwest's own message repeats the URL; its causes say what went wrong.
    let mut causes = Vec::new();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        causes.push(cause.to_string());
        source = cause.source();
    }
    let detail = if causes.is_empty() {
        error.to_string()
    } else {
        causes.join(": ")
    };
    HealthError::Unreachable { url, detail }
}

/// Waits until a starting service is ready, and returns how long that took.
///
/// With a health check: probes it every 20 ms for 10 s, then 1.5 times slower each
/// time up to every 250 ms, until it answers 2xx or `timeout` passes. Without one: ready
/// once the process is still running after [`NO_CHECK_GRACE`] (or `timeout`, if
/// shorter). Either way, `exited` completing (the process or container ended) fails the
/// wait at once with [`ReadyError::Exited`], even if a probe succeeded at the same time.
pub async fn wait_ready(
    prober: &HealthProber,
    check: Option<&HealthCheck>,
    timeout: Duration,
    exited: impl Future<Output = ExitInfo>,
) -> Result<Duration, ReadyError> {
    let started = Instant::now();
    let deadline = started + timeout;
    let ready = async {
        match check {
            Some(check) => poll_until_healthy(prober, check, deadline).await,
            None => {
                tokio::time::sleep_until(deadline.min(started + NO_CHECK_GRACE)).await;
                Ok(())
            }
        }
    };
    tokio::select! {
        biased;
        info = exited => Err(ReadyError::Exited(info)),
        outcome = ready => outcome
            .map(|()| started.elapsed())
            .map_err(|last_error| ReadyError::TimedOut { after: started.elapsed(), last_error }),
    }
}

/// Probes until 2xx (Ok) or the deadline (Err with the last finished probe's error, or
/// with `NoAnswer` when the deadline cut the only probe short).
async fn poll_until_healthy(
    prober: &HealthProber,
    check: &HealthCheck,
    deadline: Instant,
) -> Result<(), Option<HealthError>> {
    let mut pause = FIRST_POLL;
    let mut last_error = None;
    let slow_from = Instant::now() + FAST_PHASE;
    loop {
        let probe_started = Instant::now();
        match tokio::time::timeout_at(deadline, prober.probe(check)).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(error)) => last_error = Some(error),
            Err(_) => {
                return Err(last_error.or(Some(HealthError::NoAnswer {
                    url: check.url.clone(),
                    after: probe_started.elapsed(),
                })))
            }
        }
        tokio::time::sleep_until(deadline.min(Instant::now() + pause)).await;
        if Instant::now() >= deadline {
            return Err(last_error);
        }
        if Instant::now() >= slow_from {
            pause = pause.mul_f64(POLL_BACKOFF).min(MAX_POLL);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// A tiny HTTP server answering request n with `statuses[n]` (the last one repeats);
    /// returns its URL and a count of requests answered.
    async fn serve(statuses: Vec<u16>) -> (String, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/health", listener.local_addr().unwrap());
        let count = Arc::new(AtomicUsize::new(0));
        let counter = count.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let n = counter.fetch_add(1, Ordering::SeqCst);
                let status = statuses[n.min(statuses.len() - 1)];
                tokio::spawn(answer(stream, status));
            }
        });
        (url, count)
    }

    async fn answer(mut stream: TcpStream, status: u16) {
        let mut request = Vec::new();
        let mut buf = [0u8; 1024];
        while !request.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => request.extend_from_slice(&buf[..n]),
            }
        }
        let response =
            format!("HTTP/1.1 {status} Whatever\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        let _ = stream.write_all(response.as_bytes()).await;
    }

    /// Accepts connections and never answers.
    async fn silent_server() -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/health", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let mut held = Vec::new();
            loop {
                held.push(listener.accept().await.unwrap());
            }
        });
        url
    }

    /// A URL nothing listens on.
    async fn refused_url() -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        format!("http://{}/health", listener.local_addr().unwrap())
    }

    fn check(url: &str, timeout: Duration) -> HealthCheck {
        HealthCheck {
            url: url.to_owned(),
            timeout,
        }
    }

    const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

    #[tokio::test]
    async fn probe_accepts_2xx_and_reports_other_statuses() {
        let (url, _) = serve(vec![503, 204]).await;
        let prober = HealthProber::new().unwrap();
        let check = check(&url, PROBE_TIMEOUT);
        let error = prober.probe(&check).await.unwrap_err();
        assert_eq!(
            error,
            HealthError::Status {
                url: url.clone(),
                status: StatusCode::SERVICE_UNAVAILABLE
            }
        );
        assert!(error.to_string().contains("answered 503"), "{error}");
        prober.probe(&check).await.unwrap();
    }

    #[tokio::test]
    async fn probe_reports_a_refused_connection() {
        let url = refused_url().await;
        let prober = HealthProber::new().unwrap();
        match prober.probe(&check(&url, PROBE_TIMEOUT)).await {
            Err(HealthError::Unreachable { detail, .. }) => {
                assert!(detail.to_lowercase().contains("refused"), "{detail}")
            }
            other => panic!("expected Unreachable, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn probe_gives_up_on_a_silent_server() {
        let url = silent_server().await;
        let prober = HealthProber::new().unwrap();
        let timeout = Duration::from_millis(300);
        let error = prober.probe(&check(&url, timeout)).await.unwrap_err();
        assert_eq!(
            error,
            HealthError::NoAnswer {
                url,
                after: timeout
            }
        );
    }

    #[tokio::test]
    async fn wait_ready_polls_until_healthy() {
        let (url, count) = serve(vec![503, 503, 503, 200]).await;
        let prober = HealthProber::new().unwrap();
        let check = check(&url, PROBE_TIMEOUT);
        let waited = wait_ready(
            &prober,
            Some(&check),
            Duration::from_secs(60),
            std::future::pending(),
        )
        .await
        .unwrap();
        assert_eq!(count.load(Ordering::SeqCst), 4);
        assert!(waited < Duration::from_secs(60));
    }

    #[tokio::test]
    async fn wait_ready_times_out_with_the_last_error() {
        let (url, count) = serve(vec![503]).await;
        let prober = HealthProber::new().unwrap();
        let timeout = Duration::from_millis(500);
        let check = check(&url, PROBE_TIMEOUT);
        let result = wait_ready(&prober, Some(&check), timeout, std::future::pending()).await;
        match result {
            Err(ReadyError::TimedOut {
                after,
                last_error: Some(HealthError::Status { status, .. }),
            }) => {
                assert!(after >= timeout, "gave up early: {after:?}");
                assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
            }
            other => panic!("expected TimedOut after a 503, got {other:?}"),
        }
        assert!(count.load(Ordering::SeqCst) >= 2, "polled more than once");
    }

    #[tokio::test]
    async fn wait_ready_fails_at_once_when_the_process_exits() {
        let url = refused_url().await;
        let prober = HealthProber::new().unwrap();
        let check = check(&url, PROBE_TIMEOUT);
        let mut child = tokio::process::Command::new("sh")
            .args(["-c", "sleep 0.1; exit 3"])
            .spawn()
            .unwrap();
        let exited = async move { ExitInfo::from(child.wait().await.unwrap()) };
        let timeout = Duration::from_secs(120);
        let started = std::time::Instant::now();
        let result = wait_ready(&prober, Some(&check), timeout, exited).await;
        assert_eq!(result, Err(ReadyError::Exited(ExitInfo::Code(3))));
        assert!(started.elapsed() < timeout / 2, "waited for the timeout");
        assert_eq!(
            result.unwrap_err().to_string(),
            "exited with code 3 before becoming ready"
        );
    }

    #[tokio::test]
    async fn without_a_check_ready_after_the_grace() {
        let prober = HealthProber::new().unwrap();
        let waited = wait_ready(
            &prober,
            None,
            Duration::from_secs(60),
            std::future::pending(),
        )
        .await
        .unwrap();
        assert!(waited >= NO_CHECK_GRACE, "{waited:?}");
    }

    #[tokio::test]
    async fn without_a_check_an_exit_during_the_grace_fails() {
        let prober = HealthProber::new().unwrap();
        let exited = async { ExitInfo::Signal(libc::SIGSEGV) };
        let result = wait_ready(&prober, None, Duration::from_secs(60), exited).await;
        assert_eq!(
            result,
            Err(ReadyError::Exited(ExitInfo::Signal(libc::SIGSEGV)))
        );
    }
}
