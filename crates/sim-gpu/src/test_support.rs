//! What the folder's unit tests share: real processes whose pids they allocate for.

use std::fs;
use std::process::{Child, Command};
use std::thread;
use std::time::Duration;

/// A live process that is killed and reaped when dropped.
pub(crate) struct Sleeper(Child);

impl Sleeper {
    pub(crate) fn spawn() -> Self {
        Self(Command::new("sleep").arg("60").spawn().unwrap())
    }

    pub(crate) fn pid(&self) -> u32 {
        self.0.id()
    }

    /// Kills and reaps it: its pid names no process any more.
    pub(crate) fn end(&mut self) {
        self.0.kill().unwrap();
        self.0.wait().unwrap();
    }

    /// Kills it without reaping: it stays a zombie until dropped.
    pub(crate) fn make_zombie(&mut self) {
        self.0.kill().unwrap();
        let stat = format!("/proc/{}/stat", self.pid());
        while !fs::read_to_string(&stat).unwrap().contains(") Z") {
            thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Sleeper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
