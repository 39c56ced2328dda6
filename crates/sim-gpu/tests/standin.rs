//! Runs the gpu-standin binary against a temporary simulated GPU folder.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sim_gpu::{Allocation, DeviceSpec, SimGpuDir};

const PATIENCE: Duration = Duration::from_secs(10);

fn folder(total_mb: u64) -> (tempfile::TempDir, SimGpuDir) {
    let temp = tempfile::tempdir().unwrap();
    let device = DeviceSpec {
        name: "Simulated GPU".into(),
        total_mb,
        baseline_mb: 0,
        reclaim_ms: 60_000,
        temperature_c: 40,
        utilization_pct: 0,
    };
    let dir = SimGpuDir::create(temp.path(), &device).unwrap();
    (temp, dir)
}

/// A running stand-in whose stderr lines arrive on a channel; killed when dropped.
struct Standin {
    child: Child,
    lines: Receiver<String>,
    started: Instant,
}

impl Standin {
    fn spawn(dir: &Path, args: &[&str]) -> Self {
        let started = Instant::now();
        let mut child = Command::new(env!("CARGO_BIN_EXE_gpu-standin"))
            .arg("--sim-dir")
            .arg(dir)
            .args(args)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (sender, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("{line}");
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            lines,
            started,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn wait_for_line(&self, needle: &str) -> String {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no stderr line with {needle:?}"));
            if line.contains(needle) {
                return line;
            }
        }
    }

    fn listening_on(&self) -> SocketAddr {
        let line = self.wait_for_line("listening on ");
        line.rsplit(' ').next().unwrap().parse().unwrap()
    }

    fn wait(&mut self) -> ExitStatus {
        let deadline = Instant::now() + PATIENCE;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            thread::sleep(Duration::from_millis(5));
        }
        panic!("gpu-standin did not exit");
    }

    fn signal(&self, signal: libc::c_int) {
        let pid = libc::pid_t::try_from(self.pid()).unwrap();
        // SAFETY: kill has no memory-safety preconditions; the child is ours.
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
    }
}

impl Drop for Standin {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP request: (status code, body).
fn http(address: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(address).unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let code = response.split(' ').nth(1).unwrap().parse().unwrap();
    let body = response.split_once("\r\n\r\n").unwrap().1.to_owned();
    (code, body)
}

fn http_status(address: SocketAddr) -> u16 {
    let mut stream = TcpStream::connect(address).unwrap();
    stream
        .write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(response.contains("Connection: close"), "{response}");
    response
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"))
}

#[test]
fn allocates_its_vram_and_turns_healthy_after_the_start_delay() {
    let (_temp, dir) = folder(24_576);
    let standin = Standin::spawn(
        dir.path(),
        &[
            "--vram-mb",
            "4096",
            "--port",
            "0",
            "--start-delay-ms",
            "2000",
        ],
    );
    let address = standin.listening_on();
    assert_eq!(
        dir.snapshot().unwrap().processes,
        [Allocation {
            pid: standin.pid(),
            mb: 4096
        }]
    );
    assert_eq!(http_status(address), 503, "still loading");
    while http_status(address) == 503 {
        assert!(standin.started.elapsed() < PATIENCE, "never became healthy");
        thread::sleep(Duration::from_millis(20));
    }
    assert!(standin.started.elapsed() >= Duration::from_millis(2000));
}

#[test]
fn sigterm_stops_it_after_the_stop_delay_leaving_the_memory_to_be_reclaimed() {
    let (_temp, dir) = folder(24_576);
    let mut standin = Standin::spawn(dir.path(), &["--vram-mb", "1024", "--stop-delay-ms", "500"]);
    standin.wait_for_line("allocated 1024 MB");
    let asked = Instant::now();
    standin.signal(libc::SIGTERM);
    let status = standin.wait();
    assert!(asked.elapsed() >= Duration::from_millis(500));
    assert_eq!(status.code(), Some(0));
    let snapshot = dir.snapshot().unwrap();
    assert_eq!(snapshot.used_mb, 1024, "held until reclaim_ms has passed");
}

#[test]
fn ignore_sigterm_keeps_it_running() {
    let (_temp, dir) = folder(24_576);
    let mut standin = Standin::spawn(dir.path(), &["--vram-mb", "10", "--ignore-sigterm"]);
    standin.wait_for_line("allocated");
    standin.signal(libc::SIGTERM);
    thread::sleep(Duration::from_millis(300));
    assert!(standin.child.try_wait().unwrap().is_none());
}

#[test]
fn exit_after_ms_crashes_it_with_code_3() {
    let (_temp, dir) = folder(24_576);
    let mut standin = Standin::spawn(dir.path(), &["--vram-mb", "10", "--exit-after-ms", "200"]);
    assert_eq!(standin.wait().code(), Some(3));
    assert!(standin.started.elapsed() >= Duration::from_millis(200));
}

#[test]
fn refuses_to_start_when_its_vram_does_not_fit() {
    let (_temp, dir) = folder(8_000);
    let first = Standin::spawn(dir.path(), &["--vram-mb", "6000", "--name", "first"]);
    first.wait_for_line("allocated");
    let mut second = Standin::spawn(dir.path(), &["--vram-mb", "4000", "--name", "second"]);
    let line = second.wait_for_line("out of memory");
    assert!(line.contains("CUDA out of memory"), "{line}");
    assert_eq!(second.wait().code(), Some(2));
    assert_eq!(dir.oom_log().unwrap().len(), 1);
    let pids: Vec<u32> = dir
        .snapshot()
        .unwrap()
        .processes
        .iter()
        .map(|a| a.pid)
        .collect();
    assert_eq!(pids, [first.pid()]);
}

#[test]
fn ollama_mode_unloads_and_reloads_its_model_through_the_api() {
    let (_temp, dir) = folder(24_576);
    let standin = Standin::spawn(
        dir.path(),
        &[
            "--vram-mb",
            "2048",
            "--port",
            "0",
            "--ollama",
            "llama3:8b",
            "--unload-delay-ms",
            "1000",
        ],
    );
    let address = standin.listening_on();
    let held = || dir.snapshot().unwrap().processes;
    assert_eq!(
        held(),
        [Allocation {
            pid: standin.pid(),
            mb: 2048
        }]
    );
    let (code, ps) = http(address, "GET", "/api/ps", "");
    assert_eq!(code, 200);
    assert!(ps.contains("\"model\":\"llama3:8b\""), "{ps}");

    let (code, _) = http(
        address,
        "POST",
        "/api/generate",
        r#"{"model": "mistral", "keep_alive": 0}"#,
    );
    assert_eq!(code, 404, "an unknown model is not unloaded");

    let asked = Instant::now();
    let (code, answer) = http(
        address,
        "POST",
        "/api/generate",
        r#"{"model": "llama3:8b", "keep_alive": 0}"#,
    );
    assert_eq!(code, 200);
    assert!(answer.contains("\"done_reason\":\"unload\""), "{answer}");
    assert_eq!(
        held().len(),
        1,
        "the memory is freed only after the unload delay"
    );
    standin.wait_for_line("unloaded: its memory is free");
    assert!(asked.elapsed() >= Duration::from_millis(1000));
    assert!(held().is_empty());
    assert_eq!(http(address, "GET", "/api/ps", "").1, r#"{"models":[]}"#);
    assert_eq!(http_status(address), 200, "still healthy while unloaded");

    let (code, _) = http(
        address,
        "POST",
        "/api/generate",
        r#"{"model": "llama3:8b"}"#,
    );
    assert_eq!(code, 200);
    assert_eq!(
        held(),
        [Allocation {
            pid: standin.pid(),
            mb: 2048
        }]
    );
}

/// One HTTP request whose answer is JSON: (status code, parsed body).
fn http_json(address: SocketAddr, method: &str, path: &str, body: &str) -> (u16, Value) {
    let (code, text) = http(address, method, path, body);
    let value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
    (code, value)
}

fn state(address: SocketAddr) -> Value {
    let (code, state) = http_json(address, "GET", "/state", "");
    assert_eq!(code, 200, "{state}");
    state
}

/// What `pid` holds on the folder; `None` when it has no allocation.
fn held(dir: &SimGpuDir, pid: u32) -> Option<u64> {
    let snapshot = dir.snapshot().unwrap();
    let allocation = snapshot.processes.iter().find(|a| a.pid == pid)?;
    Some(allocation.mb)
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !done() {
        assert!(Instant::now() < deadline, "never: {what}");
        thread::sleep(Duration::from_millis(10));
    }
}

fn parking_standin(dir: &SimGpuDir, vram_mb: &str, extra: &[&str]) -> (Standin, SocketAddr) {
    let mut args = vec!["--vram-mb", vram_mb, "--port", "0", "--name", "vidi"];
    args.extend_from_slice(extra);
    let standin = Standin::spawn(dir.path(), &args);
    let address = standin.listening_on();
    (standin, address)
}

const COMFYUI_FREE: &str = r#"{"unload_models": true, "free_memory": true}"#;

#[test]
fn park_lowers_to_the_residual_and_resume_brings_it_back_after_the_wake() {
    let (_temp, dir) = folder(24_576);
    let (standin, address) = parking_standin(
        &dir,
        "8000",
        &[
            "--residual-mb",
            "1024",
            "--wake-ms",
            "500",
            "--park-delay-ms",
            "300",
        ],
    );
    let pid = standin.pid();
    let asked = Instant::now();
    let (code, answer) = http_json(address, "POST", "/free", COMFYUI_FREE);
    assert_eq!(code, 200);
    assert_eq!(answer, json!({"parked": true, "residual_mb": 1024}));
    wait_until("parked down to the residual", || {
        held(&dir, pid) == Some(1024)
    });
    assert!(asked.elapsed() >= Duration::from_millis(300), "park delay");
    let parked = state(address);
    assert_eq!(parked["parked"], true, "{parked}");
    assert_eq!(parked["vram_mb"], 1024, "{parked}");
    assert_eq!(http_status(address), 200, "alive while parked");

    let asked = Instant::now();
    let (code, answer) = http_json(address, "POST", "/resume", "");
    let took = asked.elapsed();
    assert_eq!(code, 200, "{answer}");
    assert_eq!(answer["parked"], false);
    assert!(answer["took_ms"].as_u64().unwrap() >= 500, "{answer}");
    assert!(
        took >= Duration::from_millis(500),
        "answered after the wake"
    );
    assert_eq!(
        held(&dir, pid),
        Some(8000),
        "the same pid holds it all again"
    );
    assert_eq!(state(address)["parked"], false);

    http_json(address, "POST", "/park", "");
    wait_until("parked again", || held(&dir, pid) == Some(1024));
    let (code, answer) = http_json(address, "POST", "/wake_up", "");
    assert_eq!((code, &answer["parked"]), (200, &json!(false)), "{answer}");
    assert_eq!(held(&dir, pid), Some(8000));
}

#[test]
fn a_free_that_asks_for_nothing_frees_nothing() {
    let (_temp, dir) = folder(24_576);
    let (standin, address) = parking_standin(&dir, "4000", &["--residual-mb", "500"]);
    let (code, answer) = http_json(address, "POST", "/free", r#"{"unload_models": false}"#);
    assert_eq!(code, 200);
    assert_eq!(answer["parked"], false, "{answer}");
    thread::sleep(Duration::from_millis(200));
    assert_eq!(held(&dir, standin.pid()), Some(4000));
    assert_eq!(state(address)["parking"], false);
    assert_eq!(http(address, "POST", "/free", "{not json").0, 400);
}

#[test]
fn a_resume_that_does_not_fit_answers_507_and_stays_parked() {
    let (_temp, dir) = folder(10_000);
    let (standin, address) = parking_standin(&dir, "8000", &["--residual-mb", "1000"]);
    http_json(address, "POST", "/park", "");
    wait_until("parked", || held(&dir, standin.pid()) == Some(1000));
    let other = Standin::spawn(dir.path(), &["--vram-mb", "8000", "--name", "other"]);
    other.wait_for_line("allocated 8000 MB");

    let (code, answer) = http_json(address, "POST", "/resume", "");
    assert_eq!(code, 507, "{answer}");
    let message = answer["error"].as_str().unwrap();
    assert!(message.starts_with("CUDA out of memory"), "{message}");
    let oom = dir.oom_log().unwrap();
    assert_eq!(oom.len(), 1, "{oom:?}");
    assert!(
        oom[0].contains(&format!("pid={} requested_mb=7000", standin.pid())),
        "{oom:?}"
    );
    assert_eq!(held(&dir, standin.pid()), Some(1000), "still parked");
    assert_eq!(state(address)["parked"], true);
}

#[test]
fn jobs_run_one_at_a_time_and_show_in_the_queue_until_done() {
    let (_temp, dir) = folder(24_576);
    let (_standin, address) = parking_standin(&dir, "2000", &[]);
    let idle = json!({"queue_running": [], "queue_pending": []});
    assert_eq!(http_json(address, "GET", "/queue", "").1, idle);

    let submitted = Instant::now();
    assert_eq!(
        http_json(address, "POST", "/job?ms=600", ""),
        (202, json!({"job": 1}))
    );
    assert_eq!(
        http_json(address, "POST", "/job?ms=300", ""),
        (202, json!({"job": 2}))
    );
    let mut queue = Value::Null;
    wait_until("the first job runs", || {
        queue = http_json(address, "GET", "/queue", "").1;
        queue["queue_running"] == json!([[1, 600]])
    });
    assert_eq!(queue["queue_pending"], json!([[2, 300]]), "{queue}");
    let busy = state(address);
    assert_eq!(
        (&busy["jobs_running"], &busy["jobs_pending"]),
        (&json!(1), &json!(1)),
        "{busy}"
    );

    wait_until("the queue empties", || {
        http_json(address, "GET", "/queue", "").1 == idle
    });
    assert!(submitted.elapsed() >= Duration::from_millis(900), "in turn");
    assert_eq!(http(address, "POST", "/job", "").0, 400, "ms is required");
    assert_eq!(http(address, "POST", "/job?ms=soon", "").0, 400);
}

#[test]
fn a_park_waits_for_the_running_job_and_a_job_while_parked_reloads_first() {
    let (_temp, dir) = folder(24_576);
    let (standin, address) =
        parking_standin(&dir, "6000", &["--residual-mb", "700", "--wake-ms", "300"]);
    let pid = standin.pid();
    let started = Instant::now();
    http_json(address, "POST", "/job?ms=800", "");
    wait_until("the job runs", || state(address)["jobs_running"] == 1);
    http_json(address, "POST", "/park", "");
    assert_eq!(state(address)["parking"], true);
    thread::sleep(Duration::from_millis(200));
    assert_eq!(held(&dir, pid), Some(6000), "not during the job");
    wait_until("parked after the job", || held(&dir, pid) == Some(700));
    assert!(started.elapsed() >= Duration::from_millis(800));
    assert_eq!(
        state(address)["jobs_running"],
        0,
        "the job was not cut short"
    );

    let submitted = Instant::now();
    http_json(address, "POST", "/job?ms=100", "");
    wait_until("reloaded for the job", || held(&dir, pid) == Some(6000));
    standin.wait_for_line("job 2 done");
    assert!(
        submitted.elapsed() >= Duration::from_millis(400),
        "wake + job"
    );
    assert_eq!(state(address)["parked"], false);
}

#[test]
fn sigterm_during_a_job_records_the_lost_work() {
    let (_temp, dir) = folder(24_576);
    let (mut standin, address) = parking_standin(&dir, "3000", &["--stop-delay-ms", "100"]);
    http_json(address, "POST", "/job?ms=3000", "");
    http_json(address, "POST", "/job?ms=1000", "");
    standin.wait_for_line("job 1 started");
    thread::sleep(Duration::from_millis(300));
    standin.signal(libc::SIGTERM);
    assert_eq!(standin.wait().code(), Some(0));

    let lost = dir.lost_log().unwrap();
    assert_eq!(lost.len(), 1, "{lost:?}");
    let prefix = format!("vidi pid {}: job 1 lost after ", standin.pid());
    let (_stamp, line) = lost[0].split_once(' ').unwrap();
    let rest = line
        .strip_prefix(&prefix)
        .unwrap_or_else(|| panic!("{line}"));
    let (done, rest) = rest.split_once(" of ").unwrap();
    let done: u64 = done.parse().unwrap();
    assert!((300..3000).contains(&done), "{line}");
    assert_eq!(rest, "3000 ms; job 2 lost after 0 of 1000 ms");
}

#[test]
fn a_stop_without_work_records_nothing() {
    let (_temp, dir) = folder(24_576);
    let (mut standin, address) = parking_standin(&dir, "3000", &[]);
    http_json(address, "POST", "/job?ms=50", "");
    standin.wait_for_line("job 1 done");
    standin.signal(libc::SIGINT);
    assert_eq!(standin.wait().code(), Some(0));
    assert!(dir.lost_log().unwrap().is_empty());
}

#[test]
fn alloc_takes_more_than_it_started_with_and_a_resume_brings_that_back() {
    let (_temp, dir) = folder(24_576);
    let (standin, address) = parking_standin(&dir, "4096", &["--residual-mb", "512"]);
    let pid = standin.pid();
    assert_eq!(
        http_json(address, "POST", "/alloc?mb=9000", ""),
        (200, json!({"vram_mb": 9000}))
    );
    assert_eq!(held(&dir, pid), Some(9000));
    assert_eq!(state(address)["vram_mb"], 9000);

    let (code, answer) = http_json(address, "POST", "/alloc?mb=30000", "");
    assert_eq!(code, 507, "{answer}");
    assert_eq!(dir.oom_log().unwrap().len(), 1);
    assert_eq!(held(&dir, pid), Some(9000), "unchanged");

    http_json(address, "POST", "/park", "");
    wait_until("parked", || held(&dir, pid) == Some(512));
    assert_eq!(http(address, "POST", "/alloc?mb=100", "").0, 409);
    http_json(address, "POST", "/resume", "");
    assert_eq!(
        held(&dir, pid),
        Some(9000),
        "what it held last, not --vram-mb"
    );
}

/// A streamed answer: its head, and each chunk of its chunked body with when it came.
struct Chunked {
    head: String,
    chunks: Vec<(Instant, String)>,
}

impl Chunked {
    fn text(&self) -> String {
        self.chunks
            .iter()
            .map(|(_, chunk)| chunk.as_str())
            .collect()
    }

    /// How long after the first chunk the last came.
    fn spread(&self) -> Duration {
        let (first, last) = (self.chunks[0].0, self.chunks.last().unwrap().0);
        last - first
    }
}

/// One request whose answer is in chunked transfer encoding, read a chunk at a time.
fn chunked(address: SocketAddr, method: &str, path: &str, body: &str) -> Chunked {
    let mut stream = TcpStream::connect(address).unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut reader = BufReader::new(stream);
    let mut head = String::new();
    while !head.ends_with("\r\n\r\n") {
        assert_ne!(reader.read_line(&mut head).unwrap(), 0, "{head}");
    }
    assert!(head.contains("Transfer-Encoding: chunked"), "{head}");
    let mut chunks = Vec::new();
    loop {
        let mut size = String::new();
        reader.read_line(&mut size).unwrap();
        let size = usize::from_str_radix(size.trim_end(), 16).unwrap();
        let mut chunk = vec![0; size + 2];
        reader.read_exact(&mut chunk).unwrap();
        assert!(chunk.ends_with(b"\r\n"));
        if size == 0 {
            return Chunked { head, chunks };
        }
        chunk.truncate(size);
        chunks.push((Instant::now(), String::from_utf8(chunk).unwrap()));
    }
}

fn chat_standin(dir: &SimGpuDir, extra: &[&str]) -> (Standin, SocketAddr) {
    let mut args = vec!["--vram-mb", "2048", "--port", "0", "--token-ms", "100"];
    args.extend_from_slice(extra);
    let standin = Standin::spawn(dir.path(), &args);
    let address = standin.listening_on();
    (standin, address)
}

#[test]
fn an_ollama_chat_streams_a_line_per_token_at_the_pace_then_the_done_line() {
    let (_temp, dir) = folder(24_576);
    let (_standin, address) = chat_standin(&dir, &["--ollama", "llama3", "--tokens", "4"]);
    let asked = r#"{"model": "llama3", "messages": [{"role": "user", "content": "hi"}]}"#;
    let answer = chunked(address, "POST", "/api/chat", asked);
    assert!(
        answer.head.starts_with("HTTP/1.1 200 OK"),
        "{}",
        answer.head
    );
    assert!(
        answer.head.contains("application/x-ndjson"),
        "{}",
        answer.head
    );
    assert_eq!(answer.chunks.len(), 5, "a chunk per line");
    let lines: Vec<Value> = answer
        .chunks
        .iter()
        .map(|(_, line)| serde_json::from_str(line.strip_suffix('\n').unwrap()).unwrap())
        .collect();
    let content: String = lines
        .iter()
        .map(|line| line["message"]["content"].as_str().unwrap())
        .collect();
    assert_eq!(content, "tok1 tok2 tok3 tok4 ");
    assert_eq!(lines[0]["model"], "llama3:latest");
    assert_eq!(lines[3]["done"], false);
    assert_eq!(lines[4]["done"], true);
    assert_eq!(lines[4]["done_reason"], "stop");
    assert!(
        lines[4]["total_duration"].as_u64().unwrap() >= 400_000_000,
        "{}",
        lines[4]
    );
    let spread = answer.spread();
    assert!(
        spread >= Duration::from_millis(250),
        "{spread:?}: not paced"
    );

    let (code, whole) = http_json(
        address,
        "POST",
        "/api/chat",
        r#"{"model": "llama3:latest", "stream": false}"#,
    );
    assert_eq!(code, 200, "{whole}");
    assert_eq!(whole["message"]["content"], "tok1 tok2 tok3 tok4 ");
    assert_eq!(whole["done"], true);
    let (code, _) = http(address, "POST", "/api/chat", r#"{"model": "mistral"}"#);
    assert_eq!(code, 404, "another model");
}

#[test]
fn a_chat_loads_an_unloaded_model_first() {
    let (_temp, dir) = folder(24_576);
    let (standin, address) = chat_standin(&dir, &["--ollama", "llama3:8b", "--tokens", "2"]);
    let unload = r#"{"model": "llama3:8b", "keep_alive": 0}"#;
    assert_eq!(http(address, "POST", "/api/generate", unload).0, 200);
    standin.wait_for_line("unloaded");
    assert_eq!(held(&dir, standin.pid()), None);
    let asked = r#"{"model": "llama3:8b", "stream": true}"#;
    let answer = chunked(address, "POST", "/v1/chat/completions", asked);
    assert!(
        answer.text().ends_with("data: [DONE]\n\n"),
        "{}",
        answer.text()
    );
    assert_eq!(held(&dir, standin.pid()), Some(2048));
}

#[test]
fn an_openai_chat_streams_an_event_per_token_then_done() {
    let (_temp, dir) = folder(24_576);
    let (_standin, address) = chat_standin(&dir, &["--tokens", "3", "--name", "vllm"]);
    let asked = r#"{"model": "qwen", "stream": true, "messages": []}"#;
    let answer = chunked(address, "POST", "/v1/chat/completions", asked);
    assert!(answer.head.contains("text/event-stream"), "{}", answer.head);
    let events: Vec<&str> = answer.chunks.iter().map(|(_, e)| e.as_str()).collect();
    assert_eq!(events.len(), 5, "3 tokens, the stop, [DONE]: {events:?}");
    assert_eq!(events[4], "data: [DONE]\n\n");
    let chunks: Vec<Value> = events[..4]
        .iter()
        .map(|event| {
            let data = event.strip_prefix("data: ").unwrap();
            serde_json::from_str(data.strip_suffix("\n\n").unwrap()).unwrap()
        })
        .collect();
    assert_eq!(chunks[0]["model"], "qwen");
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(chunks[2]["choices"][0]["delta"]["content"], "tok3 ");
    assert_eq!(chunks[3]["choices"][0]["finish_reason"], "stop");
    let spread = answer.spread();
    assert!(
        spread >= Duration::from_millis(150),
        "{spread:?}: not paced"
    );

    let asked = Instant::now();
    let (code, whole) = http_json(address, "POST", "/v1/chat/completions", "{}");
    assert_eq!(code, 200, "{whole}");
    assert!(
        asked.elapsed() >= Duration::from_millis(300),
        "it takes the tokens' time"
    );
    assert_eq!(whole["object"], "chat.completion");
    assert_eq!(
        whole["model"], "vllm",
        "the stand-in's name without a model asked"
    );
    assert_eq!(whole["choices"][0]["message"]["content"], "tok1 tok2 tok3 ");
}

#[test]
fn stream_sends_a_line_every_ms() {
    let (_temp, dir) = folder(24_576);
    let (_standin, address) = chat_standin(&dir, &[]);
    let answer = chunked(address, "GET", "/stream?chunks=3&ms=150", "");
    assert!(answer.head.contains("text/plain"), "{}", answer.head);
    assert_eq!(answer.text(), "chunk 1 of 3\nchunk 2 of 3\nchunk 3 of 3\n");
    let spread = answer.spread();
    assert!(spread >= Duration::from_millis(250), "{spread:?}");
    assert_eq!(http(address, "GET", "/stream?chunks=3", "").0, 400);
}

#[test]
fn ws_echoes_text_and_binary_until_the_client_closes() {
    use tungstenite::Message;

    let (_temp, dir) = folder(24_576);
    let (_standin, address) = chat_standin(&dir, &[]);
    let stream = TcpStream::connect(address).unwrap();
    let (mut socket, response) = tungstenite::client(format!("ws://{address}/ws"), stream).unwrap();
    assert_eq!(response.status(), 101);
    let sent = [
        Message::text("hello"),
        Message::binary(vec![0, 1, 255]),
        Message::text("again"),
    ];
    for message in sent {
        socket.send(message.clone()).unwrap();
        assert_eq!(socket.read().unwrap(), message);
    }
    socket.close(None).unwrap();
    while socket.read().is_ok() {}
    assert_eq!(http(address, "GET", "/ws", "").0, 426, "not an upgrade");
}

#[test]
fn a_request_body_in_chunks_is_read_whole() {
    let (_temp, dir) = folder(24_576);
    let (_standin, address) = chat_standin(&dir, &["--tokens", "2", "--token-ms", "0"]);
    let mut stream = TcpStream::connect(address).unwrap();
    let (first, second) = (r#"{"model": "#, r#""qwen", "stream": false}"#);
    write!(
        stream,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n{:x};ext=1\r\n{first}\r\n",
        first.len()
    )
    .unwrap();
    thread::sleep(Duration::from_millis(50));
    write!(stream, "{:x}\r\n{second}\r\n0\r\n\r\n", second.len()).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
    let body: Value = serde_json::from_str(response.split_once("\r\n\r\n").unwrap().1).unwrap();
    assert_eq!(body["model"], "qwen");
}
