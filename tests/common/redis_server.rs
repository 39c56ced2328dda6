//! A throwaway `redis-server` for tests: a free port on 127.0.0.1, a temp folder, no
//! persistence (a restart starts empty, as a crashed cache would), killed on drop. The
//! system's Redis on 6379 is never touched.
//!
//! Shared by the integration tests (`tests/common`) and the lease's unit tests
//! (`src/lease`, through `#[path]`), so it depends on std and tempfile only.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// When a test cannot run for lack of a tool: under `CI=true` that fails the test;
/// elsewhere it is skipped with a loud message. Returns whether the test may go on.
pub fn require(available: bool, what: &str, install: &str) -> bool {
    if available {
        return true;
    }
    let message = format!("{what} is missing: {install} (tests/run.sh installs it)");
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("CI=true: {message}");
    }
    // Straight to stderr: the test harness captures eprintln! of passing tests.
    let _ = writeln!(
        std::io::stderr(),
        "\n!!!!!!!!!! SKIPPED: {message} !!!!!!!!!!\n"
    );
    false
}

pub fn redis_server_installed() -> bool {
    Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

pub struct TestRedis {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl TestRedis {
    /// Starts a server, or returns None (see `require`) when redis-server is missing.
    pub fn start() -> Option<Self> {
        let mut server = Self::not_started()?;
        server.restart();
        Some(server)
    }

    /// A server with its port chosen but not started yet (`restart` starts it), as on a
    /// host where Redis comes up after gpu-manager.
    pub fn not_started() -> Option<Self> {
        if !require(
            redis_server_installed(),
            "redis-server",
            "apt-get install -y redis-server",
        ) {
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        Some(Self {
            port,
            dir: tempfile::tempdir().expect("temp dir"),
            child: None,
        })
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server (SIGKILL, as a crash or a pulled cable): every key is gone.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server (again) on the same port and waits until it answers PING.
    pub fn restart(&mut self) {
        self.stop();
        let log = std::fs::File::create(self.dir.path().join("redis.log")).expect("redis log");
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--protected-mode", "no"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("redis log"))
            .stderr(log)
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.answers_ping() {
            assert!(
                Instant::now() < deadline,
                "redis-server on port {} did not answer PING; its log:\n{}",
                self.port,
                std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn answers_ping(&self) -> bool {
        let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        let mut reply = [0u8; 7];
        stream.write_all(b"PING\r\n").is_ok()
            && stream.read_exact(&mut reply).is_ok()
            && &reply == b"+PONG\r\n"
    }
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        self.stop();
    }
}
