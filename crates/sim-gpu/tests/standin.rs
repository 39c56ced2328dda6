//! Runs the gpu-standin binary against a temporary simulated GPU folder.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::thread;
use std::time::{Duration, Instant};

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
