//! The orphan reaper in a process of its own: it makes this test process a subreaper,
//! and it must not share a process with tests that spawn children by other means (see
//! `act::reaper`).

use std::path::Path;
use std::time::{Duration, Instant};

use gpu_manager::act::reaper::{orphans_reaped, reap_orphans, spawn_owned};
use tokio::process::Command;

#[tokio::test]
async fn reaps_orphans_but_never_an_owned_child() {
    // The shell exits at once, leaving `sleep` to its parent: this test process, made a
    // subreaper so that the orphan comes here rather than to init.
    nix::sys::prctl::set_child_subreaper(true).unwrap();
    let mut owned_exit = spawn_owned(Command::new("sh").args(["-c", "exit 7"])).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("orphan.pid");
    let script = format!("sleep 0.05 & echo $! > {}", pid_file.display());
    let mut shell = spawn_owned(Command::new("sh").args(["-c", &script])).unwrap();
    assert!(shell.wait().await.unwrap().success());
    let orphan: u32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();

    let before = orphans_reaped();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{orphan}")).exists() {
        reap_orphans();
        assert!(Instant::now() < deadline, "orphan {orphan} never reaped");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(orphans_reaped() > before, "the reap is counted");
    // The owned child exited long before, yet its status is still there for its owner.
    assert_eq!(owned_exit.wait().await.unwrap().code(), Some(7));
}
