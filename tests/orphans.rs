//! Orphans are reaped as they exit: the real daemon (`gpu-manager serve`) runs a native
//! service whose shell keeps backgrounding short-lived helpers, which become the
//! daemon's children (it is a child subreaper) when their parent subshell exits.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::process_stats::{metric, zombie_children};
use common::{Harness, Standin};

/// Backgrounds a 50 ms `sleep` in a subshell that exits at once, ten times a second,
/// beside the stand-in: each `sleep` is orphaned, then exits.
const ORPHAN_LOOP: &str = "(while true; do (sleep 0.05 &); sleep 0.1; done) & exec STANDIN";

#[test]
fn a_service_spawning_orphans_leaves_no_zombies_after_30_seconds() {
    let mut spawner = Standin::new("vidi", 4096, 40, "[2]");
    spawner.shell_script = Some(ORPHAN_LOOP.into());
    let mut h = Harness::new(vec![spawner]);
    let api = h.serve("");
    assert_eq!(api.post("/gpu/prepare-phase/2").code, 200);
    let daemon = h.daemon.as_ref().expect("daemon").id();

    std::thread::sleep(Duration::from_secs(30));
    // A zombie may be seen in the instant between its exit and its reaping; none may
    // stay. Without the reaper, about 300 would be here by now.
    let seen = zombie_children(daemon);
    std::thread::sleep(Duration::from_millis(500));
    let stayed: BTreeSet<u32> = zombie_children(daemon)
        .intersection(&seen)
        .copied()
        .collect();
    assert!(stayed.is_empty(), "zombies left unreaped: {stayed:?}");
    assert!(seen.len() <= 2, "zombies at one instant: {seen:?}");

    let reaped = metric(&api, "gpu_manager_orphans_reaped_total");
    assert!(
        reaped >= 100.0,
        "about 10 orphans a second for 30 s were reaped: {reaped}"
    );
    assert!(
        h.daemon_log().contains("reaped an orphan"),
        "each one is logged at debug level"
    );
    assert_eq!(
        api.state("vidi"),
        "ready",
        "the service itself is untouched"
    );

    // The service's own exit status is still its owner's: the stop reads how it ended.
    assert_eq!(api.post("/gpu/service/vidi/stop").code, 200);
    h.wait_until("vidi is down", |h| h.is_down("vidi"));
    let log = h.daemon_log();
    assert!(!log.contains("cannot read the exit status"), "{log}");
    assert!(
        log.contains("process exited with code") || log.contains("process killed by signal"),
        "the stop saw the exit status:\n{log}"
    );
    assert!(zombie_children(daemon).len() <= 1);
}
