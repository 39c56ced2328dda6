//! The demand proxy against a plain reverse proxy (issue 17, "Measured"): the same upstream,
//! in one run, reached directly, through Debian's nginx as a plain reverse proxy (the
//! anchor) and through `gpu-manager serve`'s proxy.
//!
//! The upstream is `examples/proxy_upstream.rs` (hyper 1, keep-alive, a chunked `/stream`),
//! run by the daemon as a native service on the test harness's simulated 24 GB GPU, so
//! that the proxy starts it on the first request. nginx: `worker_processes auto`,
//! `proxy_pass` to an `upstream` block with `keepalive`, `proxy_http_version 1.1` and
//! `proxy_set_header Connection ""`, no access log.
//!
//! Measured, with targets (a MISS is reported, not a failure):
//! - wrk, `GET /` (a 13-byte answer), 1 connection (`-t1`) and 64 (`-t2`), `ROUNDS`
//!   rounds of `RUN` each, the three targets in turn in each round (each round beginning
//!   with the next), medians over the rounds: throughput at 64 connections, proxy >= 0.9
//!   x nginx; the latency each proxy adds to direct at p50 and p99, at 1 and 64
//!   connections, proxy <= 1.2 x nginx; and,
//!   to explain them, the CPU time (user + system, all threads) each target's own
//!   processes spent per request at 64 connections (direct: the upstream; nginx: its
//!   workers; gpu-manager: the daemon): on a machine that wrk, the upstream and the
//!   proxy share, throughput follows the sum of those costs;
//! - time to the first streamed byte (`GET /stream?chunks=2&ms=20`, its first chunk sent
//!   with the head, the second 20 ms later), `TTFB_SAMPLES` requests on one keep-alive
//!   connection: proxy p50 <= direct p50 + 1 ms (p99 shown too);
//! - a request to the stopped service "cold" (its upstream answers `/health` 503 for
//!   `COLD_START_MS`, `idle_ms: 300` stops it after each request): answered within the
//!   start's own `duration_ms` (as the daemon reports it) + 50 ms, `COLD_SAMPLES` times;
//! - the daemon's RSS with `IDLE_CONNECTIONS` keep-alive connections open through the
//!   proxy, each having made one request: <= 40 MB.
//!
//! Run: `benches/proxy.sh` (installs wrk and nginx-light when missing and root, builds the
//! release workspace and the upstream, then `cargo bench --bench proxy`); about 3.5 minutes.
//! It only talks to 127.0.0.1 and stops what it starts. It fails only when it cannot
//! measure (wrk, nginx or the upstream missing, a request not answered).

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use common::api::Api;
use common::process_stats::{children, cpu_seconds, pids, usage};
use common::{free_port, http_get, target_dir, Harness, Standin};
use support::{load_average, Sorted};

const ROUNDS: usize = 5;
const RUN: Duration = Duration::from_secs(4);
const TTFB_SAMPLES: usize = 100;
const STREAM_PATH: &str = "/stream?chunks=2&ms=20";
const COLD_START_MS: u64 = 500;
const COLD_IDLE_MS: u64 = 300;
const COLD_SAMPLES: usize = 5;
const IDLE_CONNECTIONS: usize = 1000;

const TARGET_THROUGHPUT: f64 = 0.9;
const TARGET_ADDED_LATENCY: f64 = 1.2;
const TARGET_TTFB_OVER_DIRECT_MS: f64 = 1.0;
const TARGET_COLD_MARGIN_MS: u64 = 50;
const TARGET_RSS_MB: f64 = 40.0;

/// Prints one line per request with wrk's own numbers (latencies in microseconds).
const WRK_SCRIPT: &str = r#"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("BENCH %.0f %.0f %.1f %.1f %.0f\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect + e.read + e.write + e.status + e.timeout))
end
"#;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Target {
    Direct,
    Nginx,
    Proxy,
}

const TARGETS: [Target; 3] = [Target::Direct, Target::Nginx, Target::Proxy];

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Direct => "direct",
            Target::Nginx => "nginx",
            Target::Proxy => "gpu-manager",
        }
    }
}

/// Where a target listens, and the processes that serve it there.
struct Endpoint {
    port: u16,
    pids: Vec<u32>,
}

struct Endpoints {
    direct: Endpoint,
    nginx: Endpoint,
    proxy: Endpoint,
}

impl Endpoints {
    fn of(&self, target: Target) -> &Endpoint {
        match target {
            Target::Direct => &self.direct,
            Target::Nginx => &self.nginx,
            Target::Proxy => &self.proxy,
        }
    }
}

/// One wrk run.
#[derive(Clone, Copy)]
struct WrkRun {
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    errors: u64,
    /// The target's own processes' CPU time over the run, per request.
    cpu_us_per_request: f64,
}

fn main() {
    raise_fd_limit();
    require("wrk", "-v");
    require("nginx", "-v");
    let upstream = target_dir().join("examples/proxy_upstream");
    assert!(
        upstream.exists(),
        "{} is missing: run benches/proxy.sh (or `cargo build --release --example proxy_upstream`)",
        upstream.display()
    );
    println!("load average at the start: {}", load_average());

    let fast_port = free_port();
    let cold_port = free_port();
    // Declared before the harness, so dropped after it: the daemon is gone (it would
    // restart a service that died under it) before its upstreams are killed.
    let _upstreams = Upstreams {
        binary: upstream.clone(),
        ports: vec![fast_port, cold_port],
    };
    let proxy_port = free_port();
    let cold_proxy_port = free_port();
    let fast = upstream_service("fast", 50, &upstream, fast_port, 0, proxy_port, "null");
    let cold = upstream_service(
        "cold",
        40,
        &upstream,
        cold_port,
        COLD_START_MS,
        cold_proxy_port,
        &COLD_IDLE_MS.to_string(),
    );
    let mut harness = Harness::new(vec![fast, cold]);
    let api = harness.serve("");
    let daemon_pid = harness.daemon.as_ref().expect("the daemon").id();

    // The first request starts "fast" (its demand never ends: idle_ms null).
    let started = Instant::now();
    let (code, _) = http_get_patient(proxy_port).expect("an answer through the proxy");
    assert_eq!(code, 200, "the first request through the proxy");
    println!(
        "upstream started on demand through the proxy in {} ms",
        started.elapsed().as_millis()
    );
    let nginx = Nginx::start(harness.path("nginx"), fast_port);
    let endpoints = Endpoints {
        direct: Endpoint {
            port: fast_port,
            pids: upstream_pids(&upstream, fast_port),
        },
        nginx: Endpoint {
            port: nginx.port,
            pids: children(nginx.child.id())
                .into_iter()
                .map(|child| child.pid)
                .collect(),
        },
        proxy: Endpoint {
            port: proxy_port,
            pids: vec![daemon_pid],
        },
    };
    for target in TARGETS {
        let (code, body) = http_get(endpoints.of(target).port, "/").expect("an answer");
        assert_eq!(
            (code, body.as_str()),
            (200, "hello, world\n"),
            "{}",
            target.name()
        );
    }

    let script = harness.path("report.lua");
    std::fs::write(&script, WRK_SCRIPT).expect("write the wrk script");
    // Warm-up: every path's connections, pools and caches.
    for target in TARGETS {
        wrk(&script, endpoints.of(target), 64, Duration::from_secs(1));
    }
    let mut runs: Vec<[[WrkRun; 3]; 2]> = Vec::new();
    for round in 1..=ROUNDS {
        let mut round_runs = [[None; 3]; 2];
        for (c, connections) in [1, 64].into_iter().enumerate() {
            // Each round begins with another target, so that none always runs after
            // the same one (a machine's drift then lands on every target alike).
            for t in (0..TARGETS.len()).map(|i| (i + round) % TARGETS.len()) {
                let target = TARGETS[t];
                let run = wrk(&script, endpoints.of(target), connections, RUN);
                println!(
                    "round {round}, {connections:>2} conn, {:<11} {:>8.0} req/s  p50 {:>7.1} us  p99 {:>7.1} us  cpu {:>5.1} us/request  errors {}",
                    target.name(),
                    run.rps,
                    run.p50_us,
                    run.p99_us,
                    run.cpu_us_per_request,
                    run.errors
                );
                round_runs[c][t] = Some(run);
            }
        }
        runs.push(round_runs.map(|per_target| per_target.map(|run| run.expect("a run"))));
    }
    let median = |c: usize, t: usize, field: fn(&WrkRun) -> f64| {
        Sorted::new(runs.iter().map(|r| field(&r[c][t])).collect()).median()
    };
    let errors: u64 = runs
        .iter()
        .flat_map(|r| r.iter().flatten())
        .map(|run| run.errors)
        .sum();

    let ttfb: Vec<Sorted<f64>> = TARGETS
        .into_iter()
        .map(|target| first_byte_ms(endpoints.of(target).port))
        .collect();

    let cold = cold_starts(&api, cold_proxy_port);

    let before = usage(daemon_pid);
    let idle = open_idle_connections(proxy_port);
    std::thread::sleep(Duration::from_secs(1));
    let held = usage(daemon_pid);
    drop(idle);
    let load_end = load_average();

    // The table.
    println!();
    println!("| measure | direct | nginx | gpu-manager |");
    println!("|---|---|---|---|");
    let row = |label: &str, c: usize, field: fn(&WrkRun) -> f64, unit: &str, scale: f64| {
        let cells: Vec<String> = (0..3)
            .map(|t| format!("{:.1}{unit}", median(c, t, field) / scale))
            .collect();
        println!("| {label} | {} |", cells.join(" | "));
    };
    row("req/s, 64 connections", 1, |r| r.rps, "", 1.0);
    row("req/s, 1 connection", 0, |r| r.rps, "", 1.0);
    row("p50, 1 connection", 0, |r| r.p50_us, " us", 1.0);
    row("p99, 1 connection", 0, |r| r.p99_us, " us", 1.0);
    row("p50, 64 connections", 1, |r| r.p50_us, " us", 1.0);
    row("p99, 64 connections", 1, |r| r.p99_us, " us", 1.0);
    row(
        "CPU per request, 64 connections",
        1,
        |r| r.cpu_us_per_request,
        " us",
        1.0,
    );
    for (label, quantile) in [
        ("first streamed byte, p50", 0.5),
        ("first streamed byte, p99", 0.99),
    ] {
        let cells: Vec<String> = ttfb
            .iter()
            .map(|s| format!("{:.3} ms", s.at(quantile)))
            .collect();
        println!("| {label} | {} |", cells.join(" | "));
    }
    println!(
        "\n(medians of {ROUNDS} wrk rounds of {RUN:?}; {errors} wrk errors in all; first byte: {TTFB_SAMPLES} requests each)"
    );

    // The targets.
    println!();
    println!("| target | measured | verdict |");
    println!("|---|---|---|");
    let (nginx_rps, proxy_rps) = (median(1, 1, |r| r.rps), median(1, 2, |r| r.rps));
    let ratio = proxy_rps / nginx_rps;
    verdict(
        "throughput at 64 connections >= 0.9 x nginx's",
        format!("{proxy_rps:.0} / {nginx_rps:.0} req/s = {ratio:.2} x"),
        ratio >= TARGET_THROUGHPUT,
    );
    for (label, c, field) in [
        (
            "p50, 1 connection",
            0,
            (|r: &WrkRun| r.p50_us) as fn(&WrkRun) -> f64,
        ),
        ("p99, 1 connection", 0, |r: &WrkRun| r.p99_us),
        ("p50, 64 connections", 1, |r: &WrkRun| r.p50_us),
        ("p99, 64 connections", 1, |r: &WrkRun| r.p99_us),
    ] {
        let direct = median(c, 0, field);
        let nginx_added = median(c, 1, field) - direct;
        let proxy_added = median(c, 2, field) - direct;
        // Below direct is noise (a loaded machine's tail): then there is no ratio, and
        // the proxy meets it by adding nothing either.
        let (shown, met) = if nginx_added > 0.0 {
            let ratio = proxy_added / nginx_added;
            (format!("{ratio:.2} x"), ratio <= TARGET_ADDED_LATENCY)
        } else {
            ("no ratio, nginx adds none".to_owned(), proxy_added <= 0.0)
        };
        verdict(
            &format!("added latency, {label} <= 1.2 x nginx's"),
            format!("{proxy_added:+.1} us vs nginx {nginx_added:+.1} us: {shown}"),
            met,
        );
    }
    let over_direct = ttfb[2].median() - ttfb[0].median();
    verdict(
        "time to the first streamed byte <= direct + 1 ms (p50)",
        format!(
            "{over_direct:+.3} ms (p50), {:+.3} ms (p99)",
            ttfb[2].at(0.99) - ttfb[0].at(0.99)
        ),
        over_direct <= TARGET_TTFB_OVER_DIRECT_MS,
    );
    let worst = cold
        .iter()
        .map(ColdStart::over_start)
        .max()
        .unwrap_or(i64::MAX);
    let overs = Sorted::new(cold.iter().map(ColdStart::over_start).collect());
    let starts = Sorted::new(cold.iter().map(|c| c.start_ms).collect());
    verdict(
        "a request to a stopped service: answered <= its start + 50 ms",
        format!(
            "start (`duration_ms`) median {} ms; answer - start median {:+} ms, max {worst:+} ms",
            starts.median(),
            overs.median()
        ),
        worst <= TARGET_COLD_MARGIN_MS as i64,
    );
    let rss_mb = held.rss_kb as f64 / 1024.0;
    verdict(
        &format!("daemon RSS with {IDLE_CONNECTIONS} idle keep-alive connections <= 40 MB"),
        format!(
            "{rss_mb:.1} MB (anonymous {:.1} MB; {:.1} MB before them; {} fds)",
            held.rss_anon_kb as f64 / 1024.0,
            before.rss_kb as f64 / 1024.0,
            held.fds
        ),
        rss_mb <= TARGET_RSS_MB,
    );
    println!(
        "\ncold starts (request -> start began, start's duration_ms, ready -> answer, answer):"
    );
    for c in &cold {
        println!(
            "  {:+} ms, {} ms, {:+} ms: {} ms",
            c.began_after_ms, c.start_ms, c.answered_after_ready_ms, c.answer_ms
        );
    }
    println!("load average at the end: {load_end}");
    assert!(
        harness.oom_log().is_empty(),
        "OOM during the benchmark: {:?}",
        harness.oom_log()
    );
    harness.kill_daemon();
}

fn verdict(target: &str, measured: String, met: bool) {
    let verdict = if met { "PASS" } else { "MISS" };
    println!("| {target} | {measured} | **{verdict}** |");
}

/// A native service running the upstream on `port`, behind the proxy on `listen`.
fn upstream_service(
    name: &'static str,
    priority: i64,
    binary: &Path,
    port: u16,
    start_delay_ms: u64,
    listen: u16,
    idle_ms: &str,
) -> Standin {
    let mut service = Standin::new(name, 1024, priority, "[]");
    service.port = port;
    service.shell_script = Some(format!(
        "exec {} --port {port} --start-delay-ms {start_delay_ms}",
        binary.display()
    ));
    service.config_extra.push_str(&format!(
        "    proxy: {{ listen: \"127.0.0.1:{listen}\", idle_ms: {idle_ms} }}\n"
    ));
    service
}

/// Kills the upstreams the daemon started, when the bench ends however it ends.
struct Upstreams {
    binary: PathBuf,
    ports: Vec<u16>,
}

impl Drop for Upstreams {
    fn drop(&mut self) {
        for port in &self.ports {
            for pid in upstream_pids(&self.binary, *port) {
                // SAFETY: kill(2) on a pid read from /proc; no memory is involved.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        }
    }
}

/// The processes running `binary --port PORT`.
fn upstream_pids(binary: &Path, port: u16) -> Vec<u32> {
    let binary = binary.display().to_string();
    pids()
        .filter(|pid| {
            let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                return false;
            };
            let args: Vec<String> = cmdline
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            args.first() == Some(&binary)
                && args
                    .windows(2)
                    .any(|w| w[0] == "--port" && w[1] == port.to_string())
        })
        .collect()
}

/// The CPU time (user + system, all threads) `pids` have used, in microseconds.
fn cpu_time_us(pids: &[u32]) -> f64 {
    pids.iter().map(|pid| cpu_seconds(*pid)).sum::<f64>() * 1e6
}

/// nginx in the foreground as a plain reverse proxy to `upstream`; stopped on drop.
struct Nginx {
    child: Child,
    port: u16,
}

impl Nginx {
    fn start(prefix: PathBuf, upstream: u16) -> Self {
        std::fs::create_dir_all(prefix.join("logs")).expect("nginx prefix");
        let port = free_port();
        let dir = prefix.display();
        let config = format!(
            "daemon off;
worker_processes auto;
pid {dir}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    upstream backend {{
        server 127.0.0.1:{upstream};
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
        }}
    }}
}}
"
        );
        let conf = prefix.join("nginx.conf");
        std::fs::write(&conf, config).expect("write nginx.conf");
        let log = std::fs::File::create(prefix.join("logs/stderr.log")).expect("nginx log");
        let child = Command::new("nginx")
            .arg("-p")
            .arg(&prefix)
            .arg("-c")
            .arg(&conf)
            .arg("-e")
            .arg("stderr")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("nginx log"))
            .stderr(log)
            .spawn()
            .expect("start nginx");
        let nginx = Self { child, port };
        let deadline = Instant::now() + Duration::from_secs(10);
        while http_get(port, "/").map(|(code, _)| code) != Some(200) {
            assert!(
                Instant::now() < deadline,
                "nginx does not answer on {port}: {}",
                std::fs::read_to_string(prefix.join("logs/stderr.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        nginx
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM to the master: it stops its workers, then itself.
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

fn require(program: &str, flag: &str) {
    let found = Command::new(program)
        .arg(flag)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    assert!(
        found,
        "{program} is not installed: run benches/proxy.sh as root, or apt-get install -y wrk nginx-light"
    );
}

/// 1,000 connections and more need more than the usual 1,024 descriptors; the daemon
/// and nginx inherit the limit.
fn raise_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// wrk with the report script: its requests/s and latency percentiles.
fn wrk(script: &Path, endpoint: &Endpoint, connections: usize, duration: Duration) -> WrkRun {
    let threads = connections.min(2);
    let port = endpoint.port;
    let cpu_before = cpu_time_us(&endpoint.pids);
    let output = Command::new("wrk")
        .arg(format!("-t{threads}"))
        .arg(format!("-c{connections}"))
        .arg(format!("-d{}s", duration.as_secs()))
        .args(["--timeout", "5s", "-s"])
        .arg(script)
        .arg(format!("http://127.0.0.1:{port}/"))
        .output()
        .expect("run wrk");
    let cpu_us = cpu_time_us(&endpoint.pids) - cpu_before;
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "wrk failed: {text}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let numbers: Vec<f64> = text
        .lines()
        .find_map(|line| line.strip_prefix("BENCH "))
        .unwrap_or_else(|| panic!("no report from wrk's script: {text}"))
        .split_whitespace()
        .map(|n| n.parse().expect("a number"))
        .collect();
    let [requests, duration_us, p50_us, p99_us, errors] = numbers[..] else {
        panic!("wrk's report: {text}");
    };
    WrkRun {
        rps: requests / (duration_us / 1e6),
        p50_us,
        p99_us,
        errors: errors as u64,
        cpu_us_per_request: cpu_us / requests.max(1.0),
    }
}

/// Milliseconds from sending `GET STREAM_PATH` to the first chunk of its body, on one
/// keep-alive connection; each stream is read to its end before the next request.
fn first_byte_ms(port: u16) -> Sorted<f64> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let request = format!("GET {STREAM_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
    let mut samples = Vec::with_capacity(TTFB_SAMPLES);
    let mut buffer = Vec::with_capacity(4096);
    let mut piece = [0u8; 4096];
    for i in 0..TTFB_SAMPLES + 5 {
        buffer.clear();
        let sent = Instant::now();
        stream.write_all(request.as_bytes()).expect("send");
        let mut first = None;
        loop {
            let n = stream.read(&mut piece).expect("read the stream");
            assert!(n > 0, "the stream ended early: {buffer:?}");
            buffer.extend_from_slice(&piece[..n]);
            if first.is_none() && contains(&buffer, b"chunk 1 of") {
                first = Some(sent.elapsed());
            }
            if buffer.ends_with(b"\r\n0\r\n\r\n") {
                break;
            }
        }
        assert!(buffer.starts_with(b"HTTP/1.1 200"), "{buffer:?}");
        // The first few warm the connection up.
        if i >= 5 {
            samples.push(first.expect("a first chunk").as_secs_f64() * 1000.0);
        }
    }
    Sorted::new(samples)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// One request to the stopped "cold" service, and the start it caused.
struct ColdStart {
    answer_ms: u64,
    /// The start action's `duration_ms`: the service's own start to ready.
    start_ms: u64,
    /// From the request to the start action's beginning (the loop's reaction).
    began_after_ms: i64,
    /// From the start action's end (ready) to the answer.
    answered_after_ready_ms: i64,
}

impl ColdStart {
    fn over_start(&self) -> i64 {
        self.answer_ms as i64 - self.start_ms as i64
    }
}

fn cold_starts(api: &Api, port: u16) -> Vec<ColdStart> {
    let mut measured = Vec::new();
    for _ in 0..COLD_SAMPLES {
        api.wait_state("cold", "stopped");
        let starts = starts_of(api).len();
        let asked_ms = epoch_ms();
        let asked = Instant::now();
        let (code, _) = http_get_patient(port).expect("an answer from the cold service");
        let answer_ms = asked.elapsed().as_millis() as u64;
        let answered_ms = epoch_ms();
        assert_eq!(code, 200, "the cold service's answer");
        let status = api.wait_status("the cold start's record", |s| {
            starts_of_status(s).len() > starts
        });
        let start = starts_of_status(&status)
            .into_iter()
            .max_by_key(|a| a["finished_at_ms"].as_u64())
            .expect("a start");
        assert_eq!(start["cause"]["kind"], "demanded", "{start}");
        let field = |name: &str| start[name].as_u64().expect("a number") as i64;
        measured.push(ColdStart {
            answer_ms,
            start_ms: field("duration_ms") as u64,
            began_after_ms: field("started_at_ms") - asked_ms as i64,
            answered_after_ready_ms: answered_ms as i64 - field("finished_at_ms"),
        });
    }
    measured
}

fn starts_of(api: &Api) -> Vec<Value> {
    starts_of_status(&api.status())
}

fn starts_of_status(status: &Value) -> Vec<Value> {
    status["recent_actions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|a| a["op"] == "start" && a["service"] == "cold")
        .cloned()
        .collect()
}

/// `http_get` with a longer read timeout than its 2 s: the service starts first.
fn http_get_patient(port: u16) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_nodelay(true).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .ok()?;
    write!(
        stream,
        "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let code = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
    Some((code, body))
}

fn epoch_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_millis() as u64
}

/// `IDLE_CONNECTIONS` connections through the proxy, each after one keep-alive request
/// and its answer; open until dropped.
fn open_idle_connections(port: u16) -> Vec<TcpStream> {
    let mut open = Vec::with_capacity(IDLE_CONNECTIONS);
    let mut piece = [0u8; 1024];
    for _ in 0..IDLE_CONNECTIONS {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            .expect("send");
        let mut answer = Vec::new();
        while !answer.ends_with(b"hello, world\n") {
            let n = stream.read(&mut piece).expect("read the answer");
            assert!(n > 0, "closed before its answer: {answer:?}");
            answer.extend_from_slice(&piece[..n]);
        }
        assert!(answer.starts_with(b"HTTP/1.1 200"), "{answer:?}");
        open.push(stream);
    }
    open
}
