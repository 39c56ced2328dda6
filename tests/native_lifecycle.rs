//! Native services end to end, with real processes: start, readiness failure, stop
//! (graceful and forced, always the whole group, always reaped), and adoption after a
//! daemon restart.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use gpu_manager::act::native::{NativeDriver, NativeError, Origin, ProcessHandle};
use gpu_manager::act::ExitInfo;
use gpu_manager::config::{CommandLine, HealthCheck, NativeSpec, ServiceName};
use gpu_manager::observe::health::{wait_ready, HealthProber, ReadyError};
use gpu_manager::observe::process::{process_identity, ProcInfo, ProcessIdentity, ProcessTable};

/// Generous: the test box has two shared cores.
const PATIENCE: Duration = Duration::from_secs(30);

fn name(raw: &str) -> ServiceName {
    ServiceName::parse(raw).unwrap()
}

fn spec(command: CommandLine) -> NativeSpec {
    NativeSpec {
        command,
        workdir: None,
        env: BTreeMap::new(),
        match_pattern: None,
        log: Default::default(),
    }
}

fn shell(script: &str) -> NativeSpec {
    spec(CommandLine::Shell(script.to_owned()))
}

fn argv<S: ToString>(args: &[S]) -> NativeSpec {
    spec(CommandLine::Argv(args.iter().map(S::to_string).collect()))
}

fn driver(state: &Path) -> NativeDriver {
    NativeDriver::new(state).unwrap()
}

fn pid_file(state: &Path, service: &str) -> PathBuf {
    state.join("pids").join(format!("{service}.pid"))
}

/// Polls until `found` returns something, or fails the test after [`PATIENCE`].
async fn eventually<T>(what: &str, mut found: impl FnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if let Some(value) = found() {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Live (non-zombie) members of a process group.
fn live_members(pgid: u32) -> Vec<ProcessIdentity> {
    let table = ProcessTable::read().unwrap();
    table
        .in_group(pgid)
        .filter(|p| !p.zombie)
        .map(ProcInfo::identity)
        .collect()
}

/// Asserts the process is neither running nor a zombie: reaped.
fn assert_reaped(member: ProcessIdentity) {
    assert_ne!(
        process_identity(member.pid),
        Some(member),
        "pid {} is still in /proc (running or an unreaped zombie)",
        member.pid
    );
}

/// Kills a service's group if the test fails before stopping it.
struct KillOnPanic(u32);

impl Drop for KillOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // SAFETY: kill(2) takes no pointers; the group is the test's own service.
            unsafe { libc::kill(-(self.0 as i32), libc::SIGKILL) };
        }
    }
}

/// A `sleep` command line that no other test, and no concurrent run of this test binary,
/// uses: `tag` tells tests apart, this process's pid tells runs apart, and the fixed
/// words around the pid keep one pattern from being a substring of another.
fn distinctive_sleep(tag: &str) -> Vec<String> {
    ["sleep", tag, &format!("0.{}", std::process::id()), "0.5"]
        .map(String::from)
        .to_vec()
}

/// A process started outside the driver, killed and reaped whatever happens.
struct Outsider(Child);

impl Outsider {
    fn start<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Self {
        Outsider(Command::new(&args[0]).args(&args[1..]).spawn().unwrap())
    }
}

impl Drop for Outsider {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawned(
    driver: &NativeDriver,
    service: &str,
    spec: &NativeSpec,
) -> (ProcessHandle, KillOnPanic) {
    let handle = driver.spawn(&name(service), spec).unwrap();
    let guard = KillOnPanic(handle.pgid());
    (handle, guard)
}

#[tokio::test]
async fn stop_ends_the_whole_group_and_reaps_it() {
    let state = tempfile::tempdir().unwrap();
    let driver = driver(state.path());
    let (handle, _guard) = spawned(&driver, "tree", &shell("sleep 300 & sleep 300"));
    assert_eq!(handle.origin(), Origin::Spawned);
    assert_eq!(handle.pgid(), handle.pid(), "leads its own group");
    assert!(pid_file(state.path(), "tree").exists());

    let members = eventually("both sleeps", || {
        let members = live_members(handle.pgid());
        (members.len() >= 2).then_some(members)
    })
    .await;

    let report = driver.stop(&name("tree"), &handle, PATIENCE).await.unwrap();
    assert!(!report.forced, "SIGTERM was enough");
    assert_eq!(handle.exit_status(), Some(ExitInfo::Signal(libc::SIGTERM)));
    for member in members {
        assert_reaped(member);
    }
    let table = ProcessTable::read().unwrap();
    assert_eq!(table.in_group(handle.pgid()).count(), 0, "group is empty");
    assert!(!pid_file(state.path(), "tree").exists(), "pid file removed");
}

#[tokio::test]
async fn a_process_ignoring_sigterm_is_killed_after_the_stop_timeout() {
    let state = tempfile::tempdir().unwrap();
    let driver = driver(state.path());
    let svc = name("stubborn");
    let script = r#"trap "" TERM; echo armed; while :; do sleep 0.1; done"#;
    let (handle, _guard) = spawned(&driver, "stubborn", &shell(script));
    // SIGTERM before the trap is set would end it gracefully: wait for the trap.
    eventually("the trap", || {
        driver
            .last_log_lines(&svc, 5)
            .contains(&"armed".to_owned())
            .then_some(())
    })
    .await;
    let members = live_members(handle.pgid());

    let timeout = Duration::from_secs(1);
    let report = driver.stop(&svc, &handle, timeout).await.unwrap();
    assert!(report.forced, "needed SIGKILL");
    assert!(report.elapsed >= timeout, "waited the stop timeout first");
    assert_eq!(handle.exit_status(), Some(ExitInfo::Signal(libc::SIGKILL)));
    for member in members {
        assert_reaped(member);
    }
}

#[tokio::test]
async fn members_left_behind_by_a_finished_leader_are_stopped_too() {
    let state = tempfile::tempdir().unwrap();
    let driver = driver(state.path());
    let svc = name("leaver");
    let (handle, _guard) = spawned(&driver, "leaver", &shell("sleep 300 & echo $!"));
    assert_eq!(handle.wait_exit().await, ExitInfo::Code(0));
    let orphan: u32 = driver.last_log_lines(&svc, 1)[0].parse().unwrap();
    let orphan = process_identity(orphan).unwrap();
    assert!(orphan.is_alive(), "the sleep outlived its shell");

    let report = driver.stop(&svc, &handle, PATIENCE).await.unwrap();
    assert!(!report.forced);
    assert_reaped(orphan);
}

#[tokio::test]
async fn a_process_exiting_at_once_reports_its_code_and_output() {
    let state = tempfile::tempdir().unwrap();
    let driver = driver(state.path());
    let svc = name("crasher");
    let script = "echo loading; echo 'ModuleNotFoundError: torch' >&2; exit 3";
    let (handle, _guard) = spawned(&driver, "crasher", &shell(script));

    // Nothing listens on the health port: only the exit can end the wait early.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let check = HealthCheck {
        url: format!("http://127.0.0.1:{port}/health"),
        timeout: Duration::from_secs(5),
    };
    let start_timeout = Duration::from_secs(120);
    let prober = HealthProber::new().unwrap();
    let result = wait_ready(&prober, Some(&check), start_timeout, handle.wait_exit()).await;
    assert_eq!(result, Err(ReadyError::Exited(ExitInfo::Code(3))));
    assert_eq!(handle.exit_status(), Some(ExitInfo::Code(3)));
    assert_eq!(
        driver.last_log_lines(&svc, 5),
        ["loading", "ModuleNotFoundError: torch"]
    );

    let report = driver.stop(&svc, &handle, PATIENCE).await.unwrap();
    assert!(!report.forced);
    assert!(report.elapsed < PATIENCE, "nothing to wait for");
    assert!(!pid_file(state.path(), "crasher").exists());
}

#[tokio::test]
async fn workdir_and_env_reach_the_process() {
    let state = tempfile::tempdir().unwrap();
    let workdir = tempfile::tempdir().unwrap();
    let driver = driver(state.path());
    let svc = name("env");
    let mut spec = shell(r#"echo "$GPU_MANAGER_TEST_VAR $(pwd -P)""#);
    spec.workdir = Some(workdir.path().to_owned());
    spec.env
        .insert("GPU_MANAGER_TEST_VAR".into(), "hello".into());
    let (handle, _guard) = spawned(&driver, "env", &spec);
    assert_eq!(handle.wait_exit().await, ExitInfo::Code(0));
    let expected = format!("hello {}", workdir.path().canonicalize().unwrap().display());
    assert_eq!(driver.last_log_lines(&svc, 1), [expected]);
}

#[tokio::test]
async fn spawn_errors_say_what_to_fix() {
    let state = tempfile::tempdir().unwrap();
    let driver = driver(state.path());
    let svc = name("broken");

    let missing = driver
        .spawn(&svc, &argv(&["gpu-manager-no-such-program", "--listen"]))
        .unwrap_err();
    assert!(
        matches!(missing, NativeError::ProgramNotFound { .. }),
        "{missing:?}"
    );
    let message = missing.to_string();
    assert!(
        message.contains(r#"program "gpu-manager-no-such-program" not found"#)
            && message.contains("services.broken.command"),
        "{message}"
    );

    let mut in_nowhere = argv(&["true"]);
    in_nowhere.workdir = Some(state.path().join("no-such-folder"));
    let no_workdir = driver.spawn(&svc, &in_nowhere).unwrap_err();
    assert!(
        matches!(no_workdir, NativeError::WorkdirMissing { .. }),
        "{no_workdir:?}"
    );
    assert!(no_workdir.to_string().contains("services.broken.workdir"));

    let script = state.path().join("not-executable.sh");
    std::fs::write(&script, "#!/bin/sh\n").unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o644)).unwrap();
    let denied = driver
        .spawn(&svc, &argv(&[script.to_str().unwrap()]))
        .unwrap_err();
    assert!(
        matches!(denied, NativeError::PermissionDenied { .. }),
        "{denied:?}"
    );
    assert!(!pid_file(state.path(), "broken").exists());
}

#[tokio::test]
async fn a_restarted_daemon_adopts_through_the_pid_file() {
    let state = tempfile::tempdir().unwrap();
    let svc = name("restartable");
    let sleeper = argv(&["sleep", "300.25"]);
    let (original, _guard) = spawned(&driver(state.path()), "restartable", &sleeper);

    // A new driver on the same state folder, as after a daemon restart. No match pattern
    // is configured, so only the pid file can lead to the process.
    let restarted = driver(state.path());
    let adopted = restarted.adopt(&svc, &sleeper).expect("adopted");
    assert_eq!(adopted.origin(), Origin::Adopted);
    assert_eq!(adopted.identity(), original.identity());
    assert_eq!(adopted.pgid(), original.pid());
    assert_eq!(adopted.exit_status(), None);

    let report = restarted.stop(&svc, &adopted, PATIENCE).await.unwrap();
    assert!(!report.forced);
    assert_eq!(adopted.exit_status(), Some(ExitInfo::Unknown));
    assert_eq!(original.wait_exit().await, ExitInfo::Signal(libc::SIGTERM));
    assert_reaped(original.identity());
    assert!(!pid_file(state.path(), "restartable").exists());
    assert!(
        restarted.adopt(&svc, &sleeper).is_none(),
        "nothing left to adopt"
    );
}

#[tokio::test]
async fn adopts_by_match_pattern_and_stops_only_that_process() {
    let state = tempfile::tempdir().unwrap();
    let driver = driver(state.path());
    let svc = name("outsider");
    let command = distinctive_sleep("301.5");
    let mut outsider = Outsider::start(&command);
    let mut spec = argv(&command);
    spec.match_pattern = Some(command.join(" "));

    let adopted = eventually("the outsider", || driver.adopt(&svc, &spec)).await;
    assert_eq!(adopted.pid(), outsider.0.id());
    assert_eq!(adopted.origin(), Origin::Adopted);
    assert!(pid_file(state.path(), "outsider").exists());
    // It shares this test's process group: a group kill would end the test itself.
    assert_ne!(adopted.pgid(), adopted.pid());

    let report = driver.stop(&svc, &adopted, PATIENCE).await.unwrap();
    assert!(!report.forced);
    assert_eq!(outsider.0.wait().unwrap().signal(), Some(libc::SIGTERM));
    assert!(!pid_file(state.path(), "outsider").exists());
}

#[tokio::test]
async fn adoption_by_pattern_takes_the_oldest_match() {
    let state = tempfile::tempdir().unwrap();
    let driver = driver(state.path());
    let svc = name("twins");
    let command = distinctive_sleep("301.75");
    let pattern = command.join(" ");
    let older = Outsider::start(&command);
    // Start times tick every 10 ms; make sure the two differ.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let _younger = Outsider::start(&command);
    let mut spec = argv(&command);
    spec.match_pattern = Some(pattern.clone());

    eventually("both twins", || {
        let table = ProcessTable::read().unwrap();
        (table.matching(&pattern).len() == 2).then_some(())
    })
    .await;
    let adopted = driver.adopt(&svc, &spec).expect("adopted");
    assert_eq!(adopted.pid(), older.0.id());
}

#[tokio::test]
async fn a_stale_or_broken_pid_file_is_not_trusted() {
    let state = tempfile::tempdir().unwrap();
    let driver = driver(state.path());
    let svc = name("stale");
    let spec = argv(&["sleep", "300.75"]);
    let path = pid_file(state.path(), "stale");

    // A live process under the recorded pid, but started at another time: a reused pid.
    let bystander = Outsider::start(&["sleep", "300.75"]);
    let identity = eventually("the bystander", || process_identity(bystander.0.id())).await;
    std::fs::write(
        &path,
        format!("{} {}\n", identity.pid, identity.start_ticks + 1),
    )
    .unwrap();
    assert!(driver.adopt(&svc, &spec).is_none());
    assert!(!path.exists(), "stale pid file removed");

    std::fs::write(&path, "not a pid\n").unwrap();
    assert!(driver.adopt(&svc, &spec).is_none());
    assert!(!path.exists(), "broken pid file removed");
    assert!(identity.is_alive(), "the bystander was left alone");
}
