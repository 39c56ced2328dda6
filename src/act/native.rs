//! Native services: processes the daemon starts, adopts and stops.
//!
//! Each spawned service leads its own process group, so a stop reaches every process it
//! started, and the daemon is their child subreaper, so none escapes by losing its
//! parent (docs/ARCHITECTURE.md, "Reaping orphans"). Its pid and start time go to a pid
//! file under the state folder, so a restarted daemon adopts it instead of starting it
//! twice (docs/ARCHITECTURE.md, "Restart safety"). Its stdout and stderr go to a
//! size-rotated log file or to the journal (docs/ARCHITECTURE.md, "Service logs"); the
//! log's tail explains a failed start.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::errno::Errno;
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::{getpgrp, Pid};
use tokio::process::Command;
use tokio::sync::watch;

use crate::act::common::{blocking, StopReport};
use crate::act::reaper::{self, OwnedChild};
use crate::act::service_log::{self, WriterDone};
use crate::config::{LogTarget, NativeSpec, ServiceName};
use crate::observe::process::{process_identity, ProcInfo, ProcessIdentity, ProcessTable};
use crate::process_exit::ExitInfo;

/// How often an adopted process, which is not our child, is checked for exit.
const ADOPTED_POLL: Duration = Duration::from_millis(100);
/// How often a stop checks whether the group is gone.
const STOP_POLL: Duration = Duration::from_millis(50);
/// How long SIGKILL may take before a stop gives up: only a process stuck in the kernel
/// (an uninterruptible driver call) survives that long.
const KILL_WAIT: Duration = Duration::from_secs(5);
/// How much of a log's end is read for its last lines.
const LOG_TAIL_BYTES: u64 = 64 * 1024;
/// How long the exit of a service waits for its log writer to write the service's last
/// words, so that an error quoting them finds them in the file. The writer is done at
/// once unless processes the service left behind still share its output.
const LOG_FLUSH_WAIT: Duration = Duration::from_millis(200);
/// Starts the line written to the log before each start, so the lines of the latest run
/// can be told from older ones.
const START_MARKER: &str = "--- gpu-manager: starting ";

/// Why a native service could not be started or stopped, phrased for the operator.
#[derive(Debug, thiserror::Error)]
pub enum NativeError {
    #[error("cannot start {service}: services.{service}.command is empty")]
    EmptyCommand { service: ServiceName },
    #[error("cannot start {service}: program {program:?} not found (check services.{service}.command; a name without '/' is looked up in PATH)")]
    ProgramNotFound {
        service: ServiceName,
        program: String,
    },
    #[error("cannot start {service}: permission denied running {program:?} (is it executable? check services.{service}.command)")]
    PermissionDenied {
        service: ServiceName,
        program: String,
    },
    #[error("cannot start {service}: workdir {} does not exist or is not a folder (check services.{service}.workdir)", workdir.display())]
    WorkdirMissing {
        service: ServiceName,
        workdir: PathBuf,
    },
    #[error("cannot start {service}: running {program:?} failed: {source}")]
    Spawn {
        service: ServiceName,
        program: String,
        source: io::Error,
    },
    #[error(
        "cannot start {service}: its process {pid} could not be read in /proc (is /proc mounted?)"
    )]
    Inspect { service: ServiceName, pid: u32 },
    #[error("cannot set up the log of {service} at {}: {source} (is state_dir writable? with log: journald, is systemd-journald running?)", path.display())]
    Log {
        service: ServiceName,
        path: PathBuf,
        source: io::Error,
    },
    #[error("cannot record the pid of {service} in {}: {source} (is state_dir writable?); the process was killed so that no untracked copy keeps running", path.display())]
    PidFile {
        service: ServiceName,
        path: PathBuf,
        source: io::Error,
    },
    #[error("cannot signal {service} (pid {pid}): {source}")]
    Signal {
        service: ServiceName,
        pid: u32,
        source: io::Error,
    },
    #[error("cannot stop {service}: pids {pids:?} still run {:.1}s after SIGKILL (stuck in the kernel, e.g. in the GPU driver? see /proc/<pid>/stack)", waited.as_secs_f64())]
    StillRunning {
        service: ServiceName,
        pids: Vec<u32>,
        waited: Duration,
    },
}

/// Whether the daemon started the process or found it running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Started by this daemon: its child, whose exit status it reads.
    Spawned,
    /// Found through its pid file or its command line: not its child, so its exit is
    /// seen by polling and its status is unknown.
    Adopted,
}

/// A running (or finished) native service process. Clones share the exit state.
#[derive(Debug, Clone)]
pub struct ProcessHandle {
    identity: ProcessIdentity,
    pgid: u32,
    origin: Origin,
    exit: watch::Receiver<Option<ExitInfo>>,
}

impl ProcessHandle {
    pub fn pid(&self) -> u32 {
        self.identity.pid
    }

    /// Its process group; a spawned service leads its own, so this is its pid.
    pub fn pgid(&self) -> u32 {
        self.pgid
    }

    /// Pid and start time: names this process even after its pid is reused.
    pub fn identity(&self) -> ProcessIdentity {
        self.identity
    }

    pub fn origin(&self) -> Origin {
        self.origin
    }

    /// How it ended, if it has; never blocks.
    pub fn exit_status(&self) -> Option<ExitInfo> {
        *self.exit.borrow()
    }

    /// Waits until it has ended. Cancel-safe: dropping the future loses nothing.
    pub async fn wait_exit(&self) -> ExitInfo {
        let mut exit = self.exit.clone();
        // The publisher lives as long as the process is watched; it is dropped without a
        // value only when the runtime shuts down, and then nothing is known.
        let seen = exit.wait_for(Option::is_some).await.map(|info| *info);
        seen.ok().flatten().unwrap_or(ExitInfo::Unknown)
    }
}

/// Where a service about to start writes, and how to tell its log writer is done.
struct ServiceOutput {
    stdout: Stdio,
    stderr: Stdio,
    writer: Option<WriterDone>,
}

/// Starts, adopts and stops native services, keeping their logs and pid files in the
/// state folder.
#[derive(Debug, Clone)]
pub struct NativeDriver {
    logs: PathBuf,
    pids: PathBuf,
}

impl NativeDriver {
    /// Creates `<state_dir>/logs` and `<state_dir>/pids`, and makes this process a child
    /// subreaper: when a service's leader dies before the rest of its group, the orphans
    /// become the daemon's children, so a stop can reap them instead of leaving zombies
    /// under an init that does not reap (containers, minimal inits).
    pub fn new(state_dir: &Path) -> io::Result<Self> {
        let driver = Self {
            logs: state_dir.join("logs"),
            pids: state_dir.join("pids"),
        };
        fs::create_dir_all(&driver.logs)?;
        fs::create_dir_all(&driver.pids)?;
        become_subreaper();
        Ok(driver)
    }

    /// A driver that only looks ([`Self::find`]), for `plan`: it creates nothing, not
    /// even the state folder, and changes nothing about this process.
    pub fn read_only(state_dir: &Path) -> Self {
        Self {
            logs: state_dir.join("logs"),
            pids: state_dir.join("pids"),
        }
    }

    /// Where a service's stdout and stderr go.
    pub fn log_path(&self, name: &ServiceName) -> PathBuf {
        self.logs.join(format!("{name}.log"))
    }

    fn pid_path(&self, name: &ServiceName) -> PathBuf {
        self.pids.join(format!("{name}.pid"))
    }

    /// Starts a service in its own process group, logging to [`Self::log_path`] and
    /// recording it in its pid file. Must run inside a Tokio runtime: a task owns the
    /// child, reaps it whenever it exits and publishes the exit to the handle.
    pub fn spawn(
        &self,
        name: &ServiceName,
        spec: &NativeSpec,
    ) -> Result<ProcessHandle, NativeError> {
        let argv = spec.command.argv();
        let (program, args) = argv
            .split_first()
            .ok_or_else(|| NativeError::EmptyCommand {
                service: name.clone(),
            })?;
        if let Some(workdir) = spec.workdir.as_ref().filter(|dir| !dir.is_dir()) {
            return Err(NativeError::WorkdirMissing {
                service: name.clone(),
                workdir: workdir.clone(),
            });
        }
        let output = self.open_output(name, spec, &argv)?;
        let mut command = Command::new(program);
        command
            .args(args)
            .envs(&spec.env)
            .stdin(Stdio::null())
            .stdout(output.stdout)
            .stderr(output.stderr)
            .process_group(0)
            .kill_on_drop(false);
        if let Some(workdir) = &spec.workdir {
            command.current_dir(workdir);
        }
        let child = reaper::spawn_owned(&mut command)
            .map_err(|source| spawn_error(name, program, source))?;
        let handle = self.watch_child(name, child, output.writer)?;
        tracing::info!(service = %name, pid = handle.pid(), log = %self.log_path(name).display(), "started");
        Ok(handle)
    }

    /// Hands the child to its reaper task and records its pid file; a child that cannot
    /// be recorded is killed, since a restarted daemon could not find it.
    fn watch_child(
        &self,
        name: &ServiceName,
        child: OwnedChild,
        writer: Option<WriterDone>,
    ) -> Result<ProcessHandle, NativeError> {
        // Read before the reaper task owns the child: until it is reaped, its /proc
        // entry stays, even if it has already exited.
        let pid = child.id();
        let identity = process_identity(pid);
        let (exit_tx, exit_rx) = watch::channel(None);
        tokio::spawn(reap(name.clone(), child, writer, exit_tx));
        let Some(identity) = identity else {
            // Best effort: the error returned below is what matters.
            let _ = signal_group(pid, Signal::SIGKILL);
            return Err(NativeError::Inspect {
                service: name.clone(),
                pid,
            });
        };
        if let Err(source) = self.write_pid_file(name, identity) {
            // Best effort: the error returned below is what matters.
            let _ = signal_group(identity.pid, Signal::SIGKILL);
            return Err(NativeError::PidFile {
                service: name.clone(),
                path: self.pid_path(name),
                source,
            });
        }
        Ok(ProcessHandle {
            identity,
            pgid: identity.pid,
            origin: Origin::Spawned,
            exit: exit_rx,
        })
    }

    /// Connects the service's stdout and stderr to where `spec.log` sends them, after
    /// writing a marker line that starts this run's part of the log file (see
    /// `act::service_log`). With journald the file keeps only the marker and where the
    /// output went, so an error quoting the last lines says where to look.
    fn open_output(
        &self,
        name: &ServiceName,
        spec: &NativeSpec,
        argv: &[String],
    ) -> Result<ServiceOutput, NativeError> {
        let path = self.log_path(name);
        let open = || -> io::Result<ServiceOutput> {
            let mut file = OpenOptions::new().create(true).append(true).open(&path)?;
            let unix_time = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            writeln!(
                file,
                "{START_MARKER}{name} at unix time {unix_time}: {}",
                argv.join(" ")
            )?;
            match spec.log {
                LogTarget::Files { max_bytes, keep } => {
                    let program = service_log::writer_program()?;
                    let (pipe, writer) =
                        service_log::start_writer(&program, &path, max_bytes, keep)?;
                    Ok(ServiceOutput {
                        stdout: Stdio::from(pipe.try_clone()?),
                        stderr: Stdio::from(pipe),
                        writer: Some(writer),
                    })
                }
                LogTarget::Journald => {
                    let socket = Path::new(service_log::JOURNAL_STREAM_SOCKET);
                    let stdout = service_log::journal_stream(socket, name.as_str(), 6)?;
                    let stderr = service_log::journal_stream(socket, name.as_str(), 3)?;
                    writeln!(file, "(output in the journal: journalctl -t {name})")?;
                    Ok(ServiceOutput {
                        stdout: Stdio::from(stdout),
                        stderr: Stdio::from(stderr),
                        writer: None,
                    })
                }
            }
        };
        open().map_err(|source| NativeError::Log {
            service: name.clone(),
            path: path.clone(),
            source,
        })
    }

    /// Finds a running instance of the service: the process in its pid file if that is
    /// still the same process, else the oldest process whose command line contains
    /// `spec.match_pattern`. Records a pid file for what it adopts. Must run inside a
    /// Tokio runtime: a task polls the adopted process for its exit.
    pub fn adopt(&self, name: &ServiceName, spec: &NativeSpec) -> Option<ProcessHandle> {
        let table = read_table(name)?;
        let identity = self
            .adopt_from_pid_file(name, &table)
            .or_else(|| adopt_by_pattern(name, spec, &table))?;
        let pgid = table.get(identity.pid)?.pgid;
        if let Err(error) = self.write_pid_file(name, identity) {
            tracing::warn!(service = %name, %error, "cannot record the pid of the adopted process");
        }
        let (exit_tx, exit_rx) = watch::channel(None);
        tokio::spawn(watch_adopted(identity, exit_tx));
        tracing::info!(service = %name, pid = identity.pid, pgid, "adopted");
        Some(ProcessHandle {
            identity,
            pgid,
            origin: Origin::Adopted,
            exit: exit_rx,
        })
    }

    /// Finds the running instance [`Self::adopt`] would adopt, changing nothing: no pid
    /// file is written or removed, and nothing watches the process, so the handle's
    /// `wait_exit` answers at once. For `plan`, which only looks.
    pub fn find(&self, name: &ServiceName, spec: &NativeSpec) -> Option<ProcessHandle> {
        let table = read_table(name)?;
        let identity = match self.pid_file_process(name, &table) {
            PidFileProcess::Running(identity) => identity,
            PidFileProcess::None | PidFileProcess::Stale => adopt_by_pattern(name, spec, &table)?,
        };
        Some(ProcessHandle {
            identity,
            pgid: table.get(identity.pid)?.pgid,
            origin: Origin::Adopted,
            exit: watch::channel(None).1,
        })
    }

    /// The process the pid file names, if it is still that process; a stale or broken
    /// pid file is removed.
    fn adopt_from_pid_file(
        &self,
        name: &ServiceName,
        table: &ProcessTable,
    ) -> Option<ProcessIdentity> {
        match self.pid_file_process(name, table) {
            PidFileProcess::Running(identity) => Some(identity),
            PidFileProcess::None => None,
            PidFileProcess::Stale => {
                remove_quietly(&self.pid_path(name));
                None
            }
        }
    }

    /// What the service's pid file says, checked against `table`; reads only.
    fn pid_file_process(&self, name: &ServiceName, table: &ProcessTable) -> PidFileProcess {
        let path = self.pid_path(name);
        let recorded = match read_pid_file(&path) {
            Ok(Some(recorded)) => recorded,
            Ok(None) => return PidFileProcess::None,
            Err(error) => {
                tracing::warn!(service = %name, %error, path = %path.display(), "ignoring an unreadable pid file");
                return PidFileProcess::Stale;
            }
        };
        let alive = table
            .get(recorded.pid)
            .is_some_and(|p| p.start_ticks == recorded.start_ticks && !p.zombie);
        if !alive {
            tracing::info!(service = %name, pid = recorded.pid, "the process in the pid file is gone");
            return PidFileProcess::Stale;
        }
        PidFileProcess::Running(recorded)
    }

    /// Stops a service: SIGTERM to its process group, up to `timeout` for the whole group
    /// to end, then SIGKILL and up to 5 s more. Succeeds at once for a process that has
    /// already ended with nothing left in its group. Removes the pid file once the stop
    /// is confirmed. An adopted process that does not lead its own group (started from a
    /// shell, say) is stopped with its descendants one by one instead: its group holds
    /// processes that are not the service's, perhaps the daemon itself.
    pub async fn stop(
        &self,
        name: &ServiceName,
        handle: &ProcessHandle,
        timeout: Duration,
    ) -> Result<StopReport, NativeError> {
        let started = Instant::now();
        let mut target = KillTarget::of(handle).await;
        let forced = terminate(name, handle, &mut target, timeout).await?;
        self.remove_pid_file(name, handle.identity());
        let report = StopReport {
            forced,
            elapsed: started.elapsed(),
        };
        tracing::info!(service = %name, pid = handle.pid(), forced, elapsed_ms = report.elapsed.as_millis() as u64, "stopped");
        Ok(report)
    }

    /// The last `n` lines the service wrote in its latest run (since the last start
    /// marker), oldest first; empty when there is no log. They come from the current
    /// log file, and from the one rotated just before it when that file alone is short.
    pub fn last_log_lines(&self, name: &ServiceName, n: usize) -> Vec<String> {
        let current = self.log_path(name);
        let Ok(mut tail) = read_tail(&current, LOG_TAIL_BYTES) else {
            return Vec::new();
        };
        if !tail.contains(START_MARKER) && tail.lines().count() < n {
            if let Ok(previous) = read_tail(&service_log::numbered(&current, 1), LOG_TAIL_BYTES) {
                tail.insert_str(0, &previous);
            }
        }
        let lines: Vec<&str> = tail.lines().collect();
        let run_start = lines
            .iter()
            .rposition(|line| line.starts_with(START_MARKER))
            .map_or(0, |marker| marker + 1);
        let run = &lines[run_start..];
        run[run.len().saturating_sub(n)..]
            .iter()
            .map(|line| line.to_string())
            .collect()
    }

    /// Writes `pid start_ticks` to a temporary file and renames it over the pid file, so
    /// a daemon killed mid-write leaves the old file or the new one, never half of one.
    fn write_pid_file(&self, name: &ServiceName, identity: ProcessIdentity) -> io::Result<()> {
        let path = self.pid_path(name);
        let temp = self.pids.join(format!(".{name}.pid.tmp"));
        let mut file = File::create(&temp)?;
        writeln!(file, "{} {}", identity.pid, identity.start_ticks)?;
        file.sync_all()?;
        fs::rename(&temp, &path)
    }

    /// Removes the pid file if it still names this process, not a newer one.
    fn remove_pid_file(&self, name: &ServiceName, identity: ProcessIdentity) {
        let path = self.pid_path(name);
        if matches!(read_pid_file(&path), Ok(Some(recorded)) if recorded == identity) {
            remove_quietly(&path);
        }
    }
}

/// What a service's pid file says about a running instance.
enum PidFileProcess {
    /// No pid file.
    None,
    /// It names a process that is gone, or cannot be read.
    Stale,
    Running(ProcessIdentity),
}

/// /proc as it is now, or None (with a warning) when it cannot be read.
fn read_table(name: &ServiceName) -> Option<ProcessTable> {
    ProcessTable::read()
        .inspect_err(|error| tracing::warn!(service = %name, %error, "cannot read /proc to find a running instance"))
        .ok()
}

/// The oldest process matching the service's pattern: the one that started the rest, as
/// a shell wrapper starts the interpreter that also matches.
fn adopt_by_pattern(
    name: &ServiceName,
    spec: &NativeSpec,
    table: &ProcessTable,
) -> Option<ProcessIdentity> {
    let pattern = spec.match_pattern.as_deref()?;
    let matches = table.matching(pattern);
    let oldest = *matches.first()?;
    let tree = table.descendants(oldest);
    let unrelated: Vec<u32> = matches
        .iter()
        .copied()
        .filter(|pid| !tree.contains(pid))
        .collect();
    if !unrelated.is_empty() {
        tracing::warn!(service = %name, pattern, adopted = oldest, others = ?unrelated, "several unrelated processes match services.{name}.match; adopting the oldest");
    }
    table.get(oldest).map(ProcInfo::identity)
}

/// Owns the child until it exits: always reaps it, then publishes how it ended once its
/// log writer has its last lines (or [`LOG_FLUSH_WAIT`] has passed).
async fn reap(
    name: ServiceName,
    mut child: OwnedChild,
    writer: Option<WriterDone>,
    exit: watch::Sender<Option<ExitInfo>>,
) {
    let info = match child.wait().await {
        Ok(status) => ExitInfo::from(status),
        Err(error) => {
            tracing::warn!(service = %name, %error, "cannot read the exit status");
            ExitInfo::Unknown
        }
    };
    if let Some(writer) = writer {
        writer.wait(LOG_FLUSH_WAIT).await;
    }
    tracing::info!(service = %name, "process {info}");
    exit.send_replace(Some(info));
}

/// Polls an adopted process until it is gone, or until no handle watches it any more.
async fn watch_adopted(identity: ProcessIdentity, exit: watch::Sender<Option<ExitInfo>>) {
    loop {
        tokio::select! {
            () = exit.closed() => return,
            () = tokio::time::sleep(ADOPTED_POLL) => {}
        }
        if !identity.is_alive() {
            exit.send_replace(Some(ExitInfo::Unknown));
            return;
        }
    }
}

/// SIGTERM, a wait up to `timeout`, then SIGKILL; returns whether SIGKILL was needed.
async fn terminate(
    name: &ServiceName,
    handle: &ProcessHandle,
    target: &mut KillTarget,
    timeout: Duration,
) -> Result<bool, NativeError> {
    if target.finished(handle).await {
        return Ok(false);
    }
    let signal_error = |source| NativeError::Signal {
        service: name.clone(),
        pid: handle.pid(),
        source,
    };
    target.signal(Signal::SIGTERM).map_err(signal_error)?;
    if target.wait_finished(handle, timeout).await {
        return Ok(false);
    }
    tracing::warn!(service = %name, pid = handle.pid(), timeout_ms = timeout.as_millis() as u64, "still running after SIGTERM; sending SIGKILL");
    target.widen().await;
    target.signal(Signal::SIGKILL).map_err(signal_error)?;
    if target.wait_finished(handle, KILL_WAIT).await {
        return Ok(true);
    }
    Err(NativeError::StillRunning {
        service: name.clone(),
        pids: target.survivors().await,
        waited: KILL_WAIT,
    })
}

/// What a stop signals. Whatever reads /proc (a scan of all of it for a group's members
/// or a leader's descendants, each member's stat) runs on the blocking pool: a stop
/// polls for up to its timeout, and must not hold up an async worker meanwhile.
enum KillTarget {
    /// The service leads its own process group: signal the group, and count every live
    /// member as part of the service.
    Group { pgid: u32 },
    /// An adopted process inside a group it does not lead: signal it and its descendants
    /// one by one, as seen when the stop began (and again before SIGKILL).
    Tree {
        leader: u32,
        members: Vec<ProcessIdentity>,
    },
}

impl KillTarget {
    async fn of(handle: &ProcessHandle) -> Self {
        let own_group = getpgrp().as_raw() as u32;
        if handle.pgid == handle.pid() && handle.pgid != own_group {
            return KillTarget::Group { pgid: handle.pgid };
        }
        let mut target = KillTarget::Tree {
            leader: handle.pid(),
            members: vec![handle.identity()],
        };
        target.widen().await;
        target
    }

    /// Adds the leader's current descendants, which may have appeared since the stop
    /// began; a group needs nothing, as new members join it by themselves.
    async fn widen(&mut self) {
        let KillTarget::Tree { leader, members } = self else {
            return;
        };
        let leader = *leader;
        let Ok(descendants) = blocking(move || live_descendants(leader)).await else {
            return;
        };
        for identity in descendants {
            if !members.contains(&identity) {
                members.push(identity);
            }
        }
    }

    fn signal(&self, signal: Signal) -> io::Result<()> {
        match self {
            KillTarget::Group { pgid } => signal_group(*pgid, signal),
            KillTarget::Tree { members, .. } => members
                .iter()
                .filter(|member| member.is_alive())
                .try_for_each(|member| signal_process(member.pid, signal)),
        }
    }

    /// The service's processes still running. For a group, it also reaps members that
    /// became this daemon's orphans when their parent died (it is a subreaper), so that
    /// a stop leaves no zombies behind even where the continuous reaper is not running.
    async fn survivors(&self) -> Vec<u32> {
        match self {
            KillTarget::Group { pgid } => {
                let pgid = *pgid;
                blocking(move || group_survivors(pgid)).await
            }
            KillTarget::Tree { members, .. } => {
                let members = members.clone();
                blocking(move || {
                    members
                        .iter()
                        .filter(|member| member.is_alive())
                        .map(|member| member.pid)
                        .collect()
                })
                .await
            }
        }
    }

    async fn finished(&self, handle: &ProcessHandle) -> bool {
        handle.exit_status().is_some() && self.survivors().await.is_empty()
    }

    /// Polls until [`Self::finished`] or `limit` has passed; returns whether it finished.
    async fn wait_finished(&self, handle: &ProcessHandle, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if self.finished(handle).await {
                return true;
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return false;
            }
            // Wake as soon as the leader exits (the usual end of a stop); poll only
            // for members that outlive it.
            let poll = tokio::time::sleep_until(deadline.min(now + STOP_POLL));
            if handle.exit_status().is_some() {
                poll.await;
            } else {
                tokio::select! {
                    _ = handle.wait_exit() => {}
                    () = poll => {}
                }
            }
        }
    }
}

/// The leader's descendants that have not exited, from a scan of /proc.
fn live_descendants(leader: u32) -> io::Result<Vec<ProcessIdentity>> {
    let table = ProcessTable::read()?;
    Ok(table
        .descendants(leader)
        .into_iter()
        .filter_map(|pid| table.get(pid))
        .filter(|p| !p.zombie)
        .map(ProcInfo::identity)
        .collect())
}

/// Live members of a group. Zombie members that are this daemon's orphans (never the
/// leader, which its owner reaps) are reaped on the way, so that a stop leaves none
/// behind even where the continuous reaper does not run.
fn group_survivors(pgid: u32) -> Vec<u32> {
    let table = match ProcessTable::read() {
        Ok(table) => table,
        Err(error) => {
            tracing::warn!(%error, "cannot read /proc; judging the stop by the leader alone");
            return Vec::new();
        }
    };
    let me = std::process::id();
    let mut alive = Vec::new();
    for member in table.in_group(pgid) {
        if !member.zombie {
            alive.push(member.pid);
        } else if member.ppid == me && member.pid != pgid {
            reaper::reap_if_orphan(member.pid);
        }
    }
    alive
}

/// Makes this process inherit the orphans of its descendants, as init would (see
/// `NativeDriver::new`); `act::reaper` reaps them as they exit.
fn become_subreaper() {
    if let Err(error) = nix::sys::prctl::set_child_subreaper(true) {
        tracing::warn!(%error, "cannot become a child subreaper; orphans of stopped services are left to init");
    }
}

/// kill(2) to one process; one already gone is not an error. Pids 0 and 1 are refused:
/// kill(0) would signal the daemon's own group, and init is never a service.
fn signal_process(pid: u32, signal: Signal) -> io::Result<()> {
    checked_kill(pid, |id| kill(id, signal))
}

/// killpg(2); a group already empty is not an error. Groups 0 and 1 are refused: kill
/// with -1 would signal every process the daemon may signal.
fn signal_group(pgid: u32, signal: Signal) -> io::Result<()> {
    checked_kill(pgid, |id| killpg(id, signal))
}

fn checked_kill(id: u32, send: impl FnOnce(Pid) -> nix::Result<()>) -> io::Result<()> {
    let pid = i32::try_from(id).ok().filter(|&id| id > 1).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("refusing to signal process (group) {id}"),
        )
    })?;
    match send(Pid::from_raw(pid)) {
        Ok(()) | Err(Errno::ESRCH) => Ok(()),
        Err(errno) => Err(errno.into()),
    }
}

fn spawn_error(name: &ServiceName, program: &str, source: io::Error) -> NativeError {
    let service = name.clone();
    let program = program.to_owned();
    match source.kind() {
        io::ErrorKind::NotFound => NativeError::ProgramNotFound { service, program },
        io::ErrorKind::PermissionDenied => NativeError::PermissionDenied { service, program },
        _ => NativeError::Spawn {
            service,
            program,
            source,
        },
    }
}

/// Ok(None) when there is no pid file; an error when it exists but cannot be used.
/// The pid a service's pid file under `state_dir` records, if any: `gpu-manager doctor`
/// tells the processes the daemon would adopt from the ones it would not.
pub fn recorded_pid(state_dir: &Path, name: &ServiceName) -> Option<u32> {
    let path = state_dir.join("pids").join(format!("{name}.pid"));
    read_pid_file(&path)
        .ok()
        .flatten()
        .map(|identity| identity.pid)
}

fn read_pid_file(path: &Path) -> io::Result<Option<ProcessIdentity>> {
    let text = match fs::read_to_string(path) {
        Ok(text) => text,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(error),
    };
    parse_pid_file(&text).map(Some).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("expected \"PID START_TICKS\", found {text:?}"),
        )
    })
}

fn parse_pid_file(text: &str) -> Option<ProcessIdentity> {
    let mut fields = text.split_whitespace();
    let identity = ProcessIdentity {
        pid: fields.next()?.parse().ok()?,
        start_ticks: fields.next()?.parse().ok()?,
    };
    fields.next().is_none().then_some(identity)
}

fn remove_quietly(path: &Path) {
    if let Err(error) = fs::remove_file(path) {
        if error.kind() != io::ErrorKind::NotFound {
            tracing::warn!(%error, path = %path.display(), "cannot remove the pid file");
        }
    }
}

/// The last `max` bytes of a file, without the partial line they may start with.
fn read_tail(path: &Path, max: u64) -> io::Result<String> {
    let mut file = File::open(path)?;
    let start = file.metadata()?.len().saturating_sub(max);
    file.seek(SeekFrom::Start(start))?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    let text = String::from_utf8_lossy(&bytes);
    if start == 0 {
        return Ok(text.into_owned());
    }
    Ok(text
        .split_once('\n')
        .map_or("", |(_, rest)| rest)
        .to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(raw: &str) -> ServiceName {
        ServiceName::parse(raw).unwrap()
    }

    #[test]
    fn pid_files_round_trip_and_reject_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let driver = NativeDriver::new(dir.path()).unwrap();
        let svc = name("svc");
        let identity = ProcessIdentity {
            pid: 4242,
            start_ticks: 987_654,
        };
        driver.write_pid_file(&svc, identity).unwrap();
        let path = driver.pid_path(&svc);
        assert_eq!(fs::read_to_string(&path).unwrap(), "4242 987654\n");
        assert_eq!(read_pid_file(&path).unwrap(), Some(identity));

        driver.remove_pid_file(
            &svc,
            ProcessIdentity {
                start_ticks: 1,
                ..identity
            },
        );
        assert!(path.exists(), "a pid file naming another process stays");
        driver.remove_pid_file(&svc, identity);
        assert!(!path.exists());
        assert_eq!(read_pid_file(&path).unwrap(), None);

        assert_eq!(parse_pid_file("12"), None);
        assert_eq!(parse_pid_file("12 34 56"), None);
        assert_eq!(parse_pid_file("x 34"), None);
    }

    #[test]
    fn last_log_lines_keep_to_the_latest_run() {
        let dir = tempfile::tempdir().unwrap();
        let driver = NativeDriver::new(dir.path()).unwrap();
        let svc = name("svc");
        assert!(driver.last_log_lines(&svc, 5).is_empty(), "no log yet");
        let log = format!(
            "{START_MARKER}svc: old\nold output\n{START_MARKER}svc: new\none\ntwo\nthree\n"
        );
        fs::write(driver.log_path(&svc), log).unwrap();
        assert_eq!(driver.last_log_lines(&svc, 2), ["two", "three"]);
        assert_eq!(driver.last_log_lines(&svc, 10), ["one", "two", "three"]);
        assert!(driver.last_log_lines(&svc, 0).is_empty());

        // Rotated mid-run: the lines before the rotation are in svc.log.1.
        let rotated = service_log::numbered(&driver.log_path(&svc), 1);
        fs::write(&rotated, format!("old\n{START_MARKER}svc: new\none\ntwo\n")).unwrap();
        fs::write(driver.log_path(&svc), "three\nfour\n").unwrap();
        assert_eq!(driver.last_log_lines(&svc, 3), ["two", "three", "four"]);
        assert_eq!(
            driver.last_log_lines(&svc, 9),
            ["one", "two", "three", "four"]
        );
    }

    #[test]
    fn tail_drops_the_partial_first_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        fs::write(&path, "aaaa\nbbbb\ncccc\n").unwrap();
        assert_eq!(read_tail(&path, 7).unwrap(), "cccc\n");
        assert_eq!(read_tail(&path, 100).unwrap(), "aaaa\nbbbb\ncccc\n");
    }

    #[test]
    fn init_and_the_own_group_are_never_signalled() {
        for id in [0, 1] {
            let error = signal_group(id, Signal::SIGCONT).unwrap_err();
            assert_eq!(error.kind(), io::ErrorKind::InvalidInput);
            assert_eq!(
                signal_process(id, Signal::SIGCONT).unwrap_err().kind(),
                io::ErrorKind::InvalidInput
            );
        }
        assert!(signal_process(std::process::id(), Signal::SIGCONT).is_ok());
    }
}
