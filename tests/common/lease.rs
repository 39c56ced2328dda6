//! Helpers for the Redis lease tests: a throwaway redis-server, redis-py (the real
//! Python client the pipeline's consumers use), reading keys, and extra daemons.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

pub use super::redis_server::{require, TestRedis};
use super::{send_signal, Harness, CONVERGE};

pub fn python_redis_installed() -> bool {
    Command::new("python3")
        .args(["-c", "import redis"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A redis-server for a test that also needs redis-py; None when the test is skipped.
pub fn redis_with_python() -> Option<TestRedis> {
    if !require(
        python_redis_installed(),
        "the Python redis module (redis-py)",
        "python3 -m pip install redis",
    ) {
        return None;
    }
    TestRedis::start()
}

/// The lease config block for the harness: `lease: {...}` on this server.
pub fn lease_block(server: &TestRedis, ttl_ms: u64, wait_ms: u64) -> String {
    format!(
        "lease: {{ redis_url: {:?}, key: gpu_lock, ttl_ms: {ttl_ms}, wait_ms: {wait_ms} }}",
        server.url()
    )
}

fn connection(server: &TestRedis) -> redis::Connection {
    redis::Client::open(server.url())
        .and_then(|c| c.get_connection())
        .expect("connect to the test redis-server")
}

pub fn get(server: &TestRedis, key: &str) -> Option<String> {
    redis::cmd("GET")
        .arg(key)
        .query(&mut connection(server))
        .expect("GET")
}

/// Sets `key` to `value` for `ttl_ms`, overwriting whoever held it.
pub fn set(server: &TestRedis, key: &str, value: &str, ttl_ms: u64) {
    let _: () = redis::cmd("SET")
        .arg(key)
        .arg(value)
        .arg("PX")
        .arg(ttl_ms)
        .query(&mut connection(server))
        .expect("SET");
}

pub fn del(server: &TestRedis, key: &str) {
    let _: () = redis::cmd("DEL")
        .arg(key)
        .query(&mut connection(server))
        .expect("DEL");
}

/// The token a gpu-manager holds `key` with, if one does.
pub fn gpu_manager_holder(server: &TestRedis, key: &str) -> Option<String> {
    get(server, key).filter(|token| token.starts_with("gpu-manager:"))
}

const HOLD: &str = r#"
import sys, redis
lock = redis.Redis.from_url(sys.argv[1]).lock(sys.argv[2], timeout=float(sys.argv[3]))
if not lock.acquire(blocking=True, blocking_timeout=60):
    sys.exit("could not acquire " + sys.argv[2])
print(lock.local.token.decode(), flush=True)
sys.stdin.readline()
lock.release()
print("released", flush=True)
"#;

const TRY: &str = r#"
import sys, redis
lock = redis.Redis.from_url(sys.argv[1]).lock(sys.argv[2], timeout=5)
got = lock.acquire(blocking=False)
if got:
    lock.release()
print(got)
"#;

/// A Python process holding a redis-py `Lock`, as a `gpu_manager.py` consumer does.
pub struct PythonLock {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    /// redis-py's token: what the daemon should name as the holder.
    pub token: String,
}

impl PythonLock {
    pub fn hold(server: &TestRedis, key: &str, timeout_s: u32) -> Self {
        let mut child = Command::new("python3")
            .args(["-c", HOLD, &server.url(), key, &timeout_s.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start python3");
        let stdin = child.stdin.take().expect("stdin");
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut token = String::new();
        stdout.read_line(&mut token).expect("read the token");
        assert!(!token.trim().is_empty(), "redis-py did not acquire {key}");
        Self {
            child,
            stdin,
            stdout,
            token: token.trim().to_owned(),
        }
    }

    /// `lock.release()`; panics unless redis-py released it (it still held it).
    pub fn release(mut self) {
        writeln!(self.stdin).expect("tell python to release");
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("read the answer");
        assert_eq!(line.trim(), "released");
        let _ = self.child.wait();
    }
}

impl Drop for PythonLock {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// redis-py's `lock.acquire(blocking=False)` on `key` (released at once if it got it).
pub fn python_try_lock(server: &TestRedis, key: &str) -> bool {
    let output = Command::new("python3")
        .args(["-c", TRY, &server.url(), key])
        .output()
        .expect("run python3");
    let answer = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    match answer.as_str() {
        "True" => true,
        "False" => false,
        _ => panic!(
            "redis-py answered {answer:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        ),
    }
}

/// Another gpu-manager daemon on the harness's config, with its own log; killed
/// (SIGKILL) on drop.
pub struct Daemon {
    child: Option<Child>,
    pub log: PathBuf,
    pub pid: u32,
}

impl Daemon {
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, as systemd or `docker stop` sends it; waits for the daemon to exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        send_signal(self.pid, "TERM");
        child.wait().expect("wait for gpu-manager")
    }

    /// `kill -9`, as a crash.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Harness {
    /// Starts a `gpu-manager watch` on the harness's config, logging to `log_name`.
    pub fn spawn_daemon(&self, log_name: &str) -> Daemon {
        let log_path = self.path(log_name);
        let log = std::fs::File::create(&log_path).expect("daemon log");
        let child = Command::new(env!("CARGO_BIN_EXE_gpu-manager"))
            .arg("watch")
            .arg("--config")
            .arg(self.config_path())
            .env("FAKE_NVML_DIR", self.gpu.path())
            .env("RUST_LOG", "info,gpu_manager=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("daemon log"))
            .stderr(log)
            .spawn()
            .expect("start gpu-manager");
        Daemon {
            pid: child.id(),
            child: Some(child),
            log: log_path,
        }
    }
}

/// Whether the daemon with this pid holds `<key>:leader`.
pub fn leads(server: &TestRedis, pid: u32) -> bool {
    get(server, "gpu_lock:leader").is_some_and(|l| l.contains(&format!(":{pid}:")))
}

impl Harness {
    /// Two daemons on the harness's config: a leader (returned) and the harness's own
    /// daemon, once it reports standby (its pid returned).
    pub fn leader_and_standby(&mut self, server: &TestRedis) -> (Daemon, u32) {
        let leader = self.spawn_daemon("leader.log");
        eventually(
            "the first daemon leads",
            || leads(server, leader.pid),
            || leader.log(),
        );
        self.start_daemon();
        let standby = self.daemon.as_ref().expect("started").id();
        self.wait_until("the second daemon reports standby", |h| {
            h.daemon_log().contains("standby: another daemon leads")
        });
        (leader, standby)
    }
}

/// Waits for `what`, failing with `context` (logs, keys) if it does not happen.
pub fn eventually(description: &str, what: impl Fn() -> bool, context: impl Fn() -> String) {
    let deadline = Instant::now() + CONVERGE;
    while Instant::now() < deadline {
        if what() {
            return;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("timed out waiting for: {description}\n{}", context());
}
