//! The read-only lookup `plan` uses: it names the process adoption would take over, but
//! writes and removes no pid file, and creates no state folder.

use std::collections::BTreeMap;
use std::time::Duration;

use gpu_manager::act::native::NativeDriver;
use gpu_manager::config::{CommandLine, NativeSpec, ServiceName};

fn sleeper() -> NativeSpec {
    NativeSpec {
        command: CommandLine::Argv(vec!["sleep".into(), "30".into()]),
        workdir: None,
        env: BTreeMap::new(),
        match_pattern: None,
    }
}

#[tokio::test]
async fn find_names_what_adopt_would_without_touching_pid_files() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let svc = ServiceName::parse("svc").unwrap();
    let pid_file = state.join("pids/svc.pid");

    let looker = NativeDriver::read_only(&dir.path().join("absent"));
    assert!(looker.find(&svc, &sleeper()).is_none());
    assert!(
        !dir.path().join("absent").exists(),
        "read_only created its folder"
    );

    let daemon = NativeDriver::new(&state).unwrap();
    let handle = daemon.spawn(&svc, &sleeper()).unwrap();
    let recorded = std::fs::read_to_string(&pid_file).unwrap();
    let modified = std::fs::metadata(&pid_file).unwrap().modified().unwrap();
    let looker = NativeDriver::read_only(&state);
    let found = looker.find(&svc, &sleeper()).expect("the running process");
    assert_eq!(found.identity(), handle.identity());
    assert_eq!(
        std::fs::metadata(&pid_file).unwrap().modified().unwrap(),
        modified
    );

    daemon
        .stop(&svc, &handle, Duration::from_secs(5))
        .await
        .unwrap();
    // The pid file now names a process that is gone: find leaves it, adopt removes it.
    std::fs::write(&pid_file, &recorded).unwrap();
    assert!(looker.find(&svc, &sleeper()).is_none());
    assert!(pid_file.exists(), "find removed a stale pid file");
    assert!(daemon.adopt(&svc, &sleeper()).is_none());
    assert!(!pid_file.exists(), "adopt cleans up a stale pid file");
}
