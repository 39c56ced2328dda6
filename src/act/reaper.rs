//! Reaps the orphans the daemon inherits as a child subreaper, as soon as they exit,
//! without ever taking an exit status that someone else in the daemon waits for
//! (docs/ARCHITECTURE.md, "Reaping orphans").
//!
//! The daemon is a child subreaper (see `act::native`), so when a process inside a
//! service exits before its own children (a shell backgrounding a helper, a ComfyUI node
//! shelling out to ffmpeg), those children become the daemon's. Nobody waits for them:
//! left alone, each one that exits stays a zombie, and enough of them exhaust `pid_max`.
//!
//! Reaping with `waitpid(-1)` would be wrong: it also takes the status of the children
//! the daemon spawned itself, which tokio's `Child::wait` reaps by pid; that wait would
//! then fail with ECHILD and the service's exit code would be lost. So:
//!
//! - Every child the daemon spawns goes through [`spawn_owned`], which records its pid
//!   in [`OWNED`] *while holding the same lock the reaper holds while it looks*, so the
//!   reaper never sees a child of ours that is not recorded yet. The pid is forgotten
//!   when its [`OwnedChild`] is dropped, after its owner has reaped it.
//! - On every SIGCHLD (and when a pid is forgotten) the reaper looks with
//!   `waitid(P_ALL, WEXITED | WNOHANG | WNOWAIT)`, which names one exited child without
//!   reaping it. Not recorded: an orphan, reaped by pid. Recorded: its owner will reap it;
//!   since `waitid` keeps naming that same child until then, the reaper instead lists
//!   the daemon's zombie children in /proc and reaps the unrecorded ones.
//!
//! This holds as long as nothing in the process spawns children by other means, which
//! is why only the daemon binary starts the reaper ([`start`]): a library user (a test
//! process running `std::process::Command`) does not.

use std::collections::BTreeSet;
use std::io;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};

use nix::errno::Errno;
use nix::sys::wait::{waitid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::process::{Child, Command};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::Notify;

use crate::observe::process::{self, ProcessTable};

/// Pids of the children the daemon spawned and whose owners wait for them.
static OWNED: Mutex<BTreeSet<u32>> = Mutex::new(BTreeSet::new());
/// Orphans reaped since the daemon started (the `gpu_manager_orphans_reaped_total` metric).
static REAPED: AtomicU64 = AtomicU64::new(0);

/// Wakes the reaper when a pid is forgotten: an orphan that got that pid in the meantime
/// was skipped as owned and sends no further SIGCHLD.
fn nudge() -> &'static Notify {
    static NUDGE: OnceLock<Notify> = OnceLock::new();
    NUDGE.get_or_init(Notify::new)
}

fn owned() -> MutexGuard<'static, BTreeSet<u32>> {
    // The set stays consistent even if a holder panicked: every update is one insert or
    // one remove.
    OWNED
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A child the daemon spawned, whose exit status is its owner's alone. Dropping it (after
/// waiting for it, or when giving up on it) hands its pid back to the reaper.
#[derive(Debug)]
pub struct OwnedChild {
    child: Child,
    pid: u32,
}

impl OwnedChild {
    pub fn id(&self) -> u32 {
        self.pid
    }

    /// Waits for the child to exit and reaps it.
    pub async fn wait(&mut self) -> io::Result<ExitStatus> {
        self.child.wait().await
    }
}

impl Drop for OwnedChild {
    fn drop(&mut self) {
        owned().remove(&self.pid);
        nudge().notify_one();
    }
}

/// Spawns `command` as a child whose exit status the reaper leaves to the returned
/// handle. The only way the daemon starts processes.
pub fn spawn_owned(command: &mut Command) -> io::Result<OwnedChild> {
    let mut owned = owned();
    let child = command.spawn()?;
    // A spawned child has an id until it is reaped, and nothing reaps it before this.
    let pid = child.id().unwrap_or_default();
    owned.insert(pid);
    Ok(OwnedChild { child, pid })
}

/// How many orphans the reaper has reaped since the daemon started.
pub fn orphans_reaped() -> u64 {
    REAPED.load(Ordering::Relaxed)
}

/// Starts reaping orphans on every SIGCHLD, for the rest of the process's life. Call it
/// once, from the daemon binary, inside the Tokio runtime (see the module comment for
/// why a library user must not).
pub fn start() -> io::Result<()> {
    let mut sigchld = signal(SignalKind::child())?;
    tokio::spawn(async move {
        loop {
            // Off the async workers: the fallback reads /proc.
            if let Err(error) = tokio::task::spawn_blocking(reap_orphans).await {
                tracing::warn!(%error, "the orphan reaper failed; retrying at the next SIGCHLD");
            }
            tokio::select! {
                _ = sigchld.recv() => {}
                () = nudge().notified() => {}
            }
        }
    });
    Ok(())
}

/// Reaps every exited child of this process that nobody in it waits for, without
/// blocking; returns how many.
pub fn reap_orphans() -> usize {
    let owned = owned();
    let peek = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
    let mut reaped = 0;
    loop {
        let pid = match waitid(Id::All, peek) {
            Ok(status) => match status.pid() {
                Some(pid) => pid.as_raw() as u32,
                // No child has exited.
                None => return reaped,
            },
            Err(Errno::EINTR) => continue,
            // No children at all.
            Err(Errno::ECHILD) => return reaped,
            Err(error) => {
                tracing::warn!(%error, "cannot look for exited children");
                return reaped;
            }
        };
        if owned.contains(&pid) {
            return reaped + reap_unowned_zombies(&owned);
        }
        if !reap(pid) {
            // Taken by someone else meanwhile; the next SIGCHLD starts a new round.
            return reaped;
        }
        reaped += 1;
    }
}

/// Reaps `pid` if it is an exited child that nobody in the daemon waits for; returns
/// whether it did.
pub fn reap_if_orphan(pid: u32) -> bool {
    let owned = owned();
    !owned.contains(&pid) && reap(pid)
}

/// The slower path, taken while an owned child is a zombie that its owner has not reaped
/// yet: the daemon's zombie children from /proc, less the owned ones.
fn reap_unowned_zombies(owned: &BTreeSet<u32>) -> usize {
    let me = std::process::id();
    let table = match ProcessTable::read() {
        Ok(table) => table,
        Err(error) => {
            tracing::warn!(%error, "cannot read /proc to find exited orphans");
            return 0;
        }
    };
    table
        .descendants(me)
        .into_iter()
        .filter(|pid| !owned.contains(pid))
        .filter(|pid| table.get(*pid).is_some_and(|p| p.ppid == me && p.zombie))
        .filter(|pid| reap(*pid))
        .count()
}

/// Reaps one exited orphan; false when it was not there to reap.
fn reap(pid: u32) -> bool {
    // Read before reaping: a zombie keeps its name until then.
    let comm = process::command_name(pid).unwrap_or_default();
    let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG;
    match waitid(Id::Pid(Pid::from_raw(pid as i32)), flags) {
        Ok(status @ (WaitStatus::Exited(..) | WaitStatus::Signaled(..))) => {
            REAPED.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(pid, command = comm, status = ?status, "reaped an orphan");
            true
        }
        Ok(_) | Err(_) => false,
    }
}
