//! `GET /gpu/status` under load, against the real daemon (`gpu-manager serve`) with its
//! reconcile loop running: the test harness's simulated 24 GB GPU read through the fake
//! libnvidia-ml, the four stand-in services, phase 3 converged after enough phase changes
//! to fill the status's action history (its largest answer), a resync every 500 ms.
//!
//! (a) a fixed 1,000 requests/s for 10 s over 10 keep-alive connections, latency measured
//!     from each request's scheduled time whenever the server made it late (no
//!     coordinated omission), target p99 < 2 ms;
//! (b) peak throughput: 64 keep-alive connections as fast as they are answered for 10 s,
//!     target at least 20,000 requests/s; and the same with wrk when it is installed.
//!
//! Run: `benches/status_load.sh` (builds the release workspace first). Everything it
//! starts (daemon, stand-ins) is stopped when it ends; it only talks to 127.0.0.1.

#[path = "../tests/common/mod.rs"]
mod common;

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::time::{sleep_until, timeout, Instant};

use common::{mcn_inventory, Harness};

const PATH: &str = "/gpu/status";
/// Each phase 2 <-> 3 change is a stop and a start; status keeps the last 50 actions.
const HISTORY_TRANSITIONS: usize = 13;
const PACED_RATE: u32 = 1000;
const PACED_CONNECTIONS: u32 = 10;
const WARMUP: Duration = Duration::from_secs(1);
const MEASURE: Duration = Duration::from_secs(10);
const PEAK_CONNECTIONS: usize = 64;
const TARGET_P99: Duration = Duration::from_millis(2);
const TARGET_PEAK_RPS: f64 = 20_000.0;
/// A request not answered in this long fails the run rather than hanging it.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

fn main() {
    let mut harness = Harness::new(mcn_inventory());
    let api = harness.serve("");
    // Phases 2 and 3 in turn until the status carries a full action history (its
    // largest size), ending on phase 3.
    for phase in [2, 3].repeat(HISTORY_TRANSITIONS) {
        let report = api.post(&format!("/gpu/prepare-phase/{phase}"));
        assert_eq!(report.code, 200, "phase {phase}: {}", report.body);
    }
    let body_bytes = api.get(PATH).body.len();
    println!(
        "daemon on 127.0.0.1:{} (phase 3 converged, resync every 500 ms); {PATH} answers {body_bytes} bytes of JSON\n",
        api.port
    );

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let port = api.port;
    let paced = runtime.block_on(paced(port));
    paced.print(&format!(
        "(a) paced {PACED_RATE} req/s over {PACED_CONNECTIONS} connections for {MEASURE:?}"
    ));
    let peak = runtime.block_on(peak(port));
    peak.print(&format!(
        "(b) peak, {PEAK_CONNECTIONS} connections for {MEASURE:?} (built-in generator)"
    ));
    let wrk = run_wrk(port);

    let p99 = paced.percentile(99.0);
    let best_peak = wrk.unwrap_or(0.0).max(peak.rate());
    println!(
        "p99 at {PACED_RATE} req/s: {p99:?} (target < {TARGET_P99:?}): {}",
        verdict(p99 < TARGET_P99)
    );
    println!(
        "peak: {best_peak:.0} req/s (target >= {TARGET_PEAK_RPS:.0}): {}",
        verdict(best_peak >= TARGET_PEAK_RPS)
    );
    assert!(
        harness.oom_log().is_empty(),
        "OOM during the benchmark: {:?}",
        harness.oom_log()
    );
}

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "MISSED"
    }
}

/// Latencies of one run.
struct Run {
    latencies: Vec<Duration>,
    errors: u64,
    elapsed: Duration,
}

impl Run {
    fn percentile(&self, p: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let rank = ((p / 100.0) * self.latencies.len() as f64).ceil() as usize;
        self.latencies[rank.clamp(1, self.latencies.len()) - 1]
    }

    fn rate(&self) -> f64 {
        self.latencies.len() as f64 / self.elapsed.as_secs_f64()
    }

    fn print(&self, title: &str) {
        println!("{title}");
        println!(
            "  {} requests, {} errors, {:.0} req/s",
            self.latencies.len(),
            self.errors,
            self.rate()
        );
        println!(
            "  latency p50 {:?}  p90 {:?}  p99 {:?}  p99.9 {:?}  max {:?}\n",
            self.percentile(50.0),
            self.percentile(90.0),
            self.percentile(99.0),
            self.percentile(99.9),
            self.latencies.last().copied().unwrap_or_default()
        );
    }

    fn merge(parts: Vec<(Vec<Duration>, u64)>, elapsed: Duration) -> Self {
        let errors = parts.iter().map(|(_, e)| e).sum();
        let mut latencies: Vec<Duration> = parts.into_iter().flat_map(|(l, _)| l).collect();
        latencies.sort_unstable();
        Self {
            latencies,
            errors,
            elapsed,
        }
    }
}

/// One keep-alive HTTP/1.1 connection sending `GET PATH`.
struct Connection {
    stream: BufReader<TcpStream>,
    request: String,
    line: String,
    body: Vec<u8>,
}

impl Connection {
    async fn open(port: u16) -> std::io::Result<Self> {
        let stream = TcpStream::connect(("127.0.0.1", port)).await?;
        stream.set_nodelay(true)?;
        Ok(Self {
            stream: BufReader::new(stream),
            request: format!("GET {PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"),
            line: String::new(),
            body: Vec::new(),
        })
    }

    /// One request and its whole answer; an error for anything but a 200.
    async fn get(&mut self) -> std::io::Result<()> {
        timeout(ANSWER_TIMEOUT, async {
            let request = self.request.as_bytes();
            self.stream.get_mut().write_all(request).await?;
            let mut length = None;
            let mut status_line = true;
            loop {
                self.line.clear();
                if self.stream.read_line(&mut self.line).await? == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                let line = self.line.trim_end();
                if status_line {
                    if !line.starts_with("HTTP/1.1 200 ") {
                        return Err(std::io::Error::other(format!("answered {line:?}")));
                    }
                    status_line = false;
                } else if line.is_empty() {
                    break;
                } else if let Some((name, value)) = line.split_once(':') {
                    if name.eq_ignore_ascii_case("content-length") {
                        length = value.trim().parse::<usize>().ok();
                    }
                }
            }
            let length = length.ok_or_else(|| std::io::Error::other("no content-length"))?;
            self.body.resize(length, 0);
            self.stream.read_exact(&mut self.body).await?;
            Ok(())
        })
        .await
        .map_err(|_| std::io::Error::other("no answer in time"))?
    }
}

/// (a): every connection sends its share of a fixed schedule. A request sent late
/// because the server still had the connection busy is timed from its scheduled
/// instant; one the timer woke late is timed from when it was sent.
async fn paced(port: u16) -> Run {
    let period = Duration::from_secs(1) / PACED_RATE;
    let warmup = WARMUP.as_millis() as u32 * PACED_RATE / 1000;
    let total = warmup + MEASURE.as_millis() as u32 * PACED_RATE / 1000;
    let start = Instant::now() + Duration::from_millis(50);
    let tasks: Vec<_> = (0..PACED_CONNECTIONS)
        .map(|first| {
            tokio::spawn(async move {
                let mut connection = Connection::open(port).await.expect("connect");
                let (mut latencies, mut errors) = (Vec::new(), 0);
                let mut free_at = start;
                for i in (first..total).step_by(PACED_CONNECTIONS as usize) {
                    let scheduled = start + period * i;
                    sleep_until(scheduled).await;
                    let sent = Instant::now();
                    let from = if free_at > scheduled { scheduled } else { sent };
                    let ok = connection.get().await.is_ok();
                    free_at = Instant::now();
                    if i < warmup {
                        continue;
                    }
                    if ok {
                        latencies.push(free_at - from);
                    } else {
                        errors += 1;
                        connection = Connection::open(port).await.expect("reconnect");
                    }
                }
                (latencies, errors)
            })
        })
        .collect();
    let parts = join(tasks).await;
    Run::merge(parts, MEASURE)
}

/// (b): closed loop, each connection sends its next request as soon as it is answered.
async fn peak(port: u16) -> Run {
    let deadline = Arc::new(Instant::now() + MEASURE);
    let started = Instant::now();
    let tasks: Vec<_> = (0..PEAK_CONNECTIONS)
        .map(|_| {
            let deadline = deadline.clone();
            tokio::spawn(async move {
                let mut connection = Connection::open(port).await.expect("connect");
                let (mut latencies, mut errors) = (Vec::new(), 0);
                while Instant::now() < *deadline {
                    let sent = Instant::now();
                    match connection.get().await {
                        Ok(()) => latencies.push(sent.elapsed()),
                        Err(_) => {
                            errors += 1;
                            connection = Connection::open(port).await.expect("reconnect");
                        }
                    }
                }
                (latencies, errors)
            })
        })
        .collect();
    let parts = join(tasks).await;
    Run::merge(parts, started.elapsed())
}

async fn join(
    tasks: Vec<tokio::task::JoinHandle<(Vec<Duration>, u64)>>,
) -> Vec<(Vec<Duration>, u64)> {
    let mut parts = Vec::new();
    for task in tasks {
        parts.push(task.await.expect("a load task"));
    }
    parts
}

/// wrk's own measurement of the peak, when it is installed: its requests/s.
fn run_wrk(port: u16) -> Option<f64> {
    let seconds = format!("{}s", MEASURE.as_secs());
    let url = format!("http://127.0.0.1:{port}{PATH}");
    let args = [
        "-t2",
        "-c64",
        "-d",
        seconds.as_str(),
        "--latency",
        url.as_str(),
    ];
    let output = match Command::new("wrk").args(args).output() {
        Ok(output) if output.status.success() => output,
        Ok(output) => {
            println!("wrk failed: {}", String::from_utf8_lossy(&output.stderr));
            return None;
        }
        Err(_) => {
            println!("(wrk is not installed: `apt-get install -y wrk` for its measurement too)\n");
            return None;
        }
    };
    let text = String::from_utf8_lossy(&output.stdout);
    println!("(b) peak with wrk {}\n{text}", args.join(" "));
    text.lines()
        .find_map(|line| line.strip_prefix("Requests/sec:"))
        .and_then(|rate| rate.trim().parse().ok())
}
