//! Host memory, for the fake CUDA checkpoint API (`tests/fake-cuda`): a checkpoint moves
//! a process's device memory into `host/<pid>`, and a restore moves it back through the
//! same fit check as an allocation. `host/<pid>.locked` marks a process whose CUDA calls
//! the checkpoint API has locked; like the driver's LOCKED state it stays through the
//! checkpoint and the restore, until the unlock.
//!
//! Checkpointed memory lives in the process's own host memory, so it dies with the
//! process: every operation here first forgets what a dead pid left, which also keeps a
//! later process given the same pid from inheriting it.

use std::fs;
use std::io;
use std::path::PathBuf;

use crate::files::{read_number, remove_if_present, write_atomic};
use crate::liveness::is_alive;
use crate::{AllocError, SimGpuDir};

const HOST_DIR: &str = "host";
const LOCKED_SUFFIX: &str = ".locked";

/// Where one process's memory is, read under the folder's lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckpointView {
    pub alive: bool,
    /// What `alloc/<pid>` holds on the device.
    pub device_mb: Option<u64>,
    /// What a checkpoint moved to `host/<pid>`.
    pub host_mb: Option<u64>,
    pub locked: bool,
}

impl SimGpuDir {
    /// Where `pid`'s memory is and whether it is locked, all read at one instant.
    pub fn checkpoint_view(&self, pid: u32) -> io::Result<CheckpointView> {
        let locked = self.lock_and_reclaim()?;
        let alive = self.forget_if_dead(pid)?;
        let device_mb = if locked.pids.contains(&pid) {
            read_number(&self.alloc_path(pid))?
        } else {
            None
        };
        Ok(CheckpointView {
            alive,
            device_mb,
            host_mb: read_number(&self.host_path(pid))?,
            locked: self.locked_path(pid).exists(),
        })
    }

    /// What a checkpoint moved to host memory for `pid`, if anything.
    pub fn host_mb(&self, pid: u32) -> io::Result<Option<u64>> {
        Ok(self.checkpoint_view(pid)?.host_mb)
    }

    /// Marks `pid` locked (the checkpoint API's lock) or clears the mark (its unlock).
    pub fn set_locked(&self, pid: u32, locked: bool) -> io::Result<()> {
        let _locked = self.lock_and_reclaim()?;
        if !self.forget_if_dead(pid)? {
            return Err(not_running(pid));
        }
        if locked {
            fs::create_dir_all(self.host_dir())?;
            write_atomic(&self.locked_path(pid), b"")
        } else {
            remove_if_present(&self.locked_path(pid))
        }
    }

    /// Moves everything `pid` holds on the device to host memory, so the device lists
    /// nothing for it; returns the MB moved. `NotFound` when it holds nothing there.
    pub fn checkpoint_to_host(&self, pid: u32) -> io::Result<u64> {
        let locked = self.lock_and_reclaim()?;
        if !self.forget_if_dead(pid)? {
            return Err(not_running(pid));
        }
        let held = if locked.pids.contains(&pid) {
            read_number(&self.alloc_path(pid))?
        } else {
            None
        };
        let mb = held.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("pid {pid} holds no device memory to checkpoint"),
            )
        })?;
        fs::create_dir_all(self.host_dir())?;
        let moved = read_number(&self.host_path(pid))?.unwrap_or(0) + mb;
        write_atomic(&self.host_path(pid), moved.to_string().as_bytes())?;
        remove_if_present(&self.alloc_path(pid))?;
        Ok(moved)
    }

    /// Moves `pid`'s host memory back onto the device; returns the MB moved. Refused, with
    /// a line in `oom.log` and the memory left on the host, when it does not fit, as an
    /// allocation would be.
    pub fn restore_from_host(&self, pid: u32) -> Result<u64, AllocError> {
        let locked = self.lock_and_reclaim()?;
        if !self.forget_if_dead(pid)? {
            return Err(not_running(pid).into());
        }
        let mb = read_number(&self.host_path(pid))?.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("pid {pid} has no checkpointed memory to restore"),
            )
        })?;
        self.allocate_locked(&locked, pid, mb)?;
        remove_if_present(&self.host_path(pid))?;
        Ok(mb)
    }

    /// Drops the host memory and lock mark of a dead `pid`; returns whether it is alive.
    fn forget_if_dead(&self, pid: u32) -> io::Result<bool> {
        if is_alive(pid) {
            return Ok(true);
        }
        remove_if_present(&self.host_path(pid))?;
        remove_if_present(&self.locked_path(pid))?;
        Ok(false)
    }

    fn host_dir(&self) -> PathBuf {
        self.path().join(HOST_DIR)
    }

    fn host_path(&self, pid: u32) -> PathBuf {
        self.host_dir().join(pid.to_string())
    }

    fn locked_path(&self, pid: u32) -> PathBuf {
        self.host_dir().join(format!("{pid}{LOCKED_SUFFIX}"))
    }
}

fn not_running(pid: u32) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, format!("pid {pid} is not running"))
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::test_support::Sleeper;
    use crate::{Allocation, DeviceSpec};

    fn folder(total_mb: u64) -> (tempfile::TempDir, SimGpuDir) {
        let temp = tempfile::tempdir().unwrap();
        let device = DeviceSpec {
            name: "Simulated GPU".into(),
            total_mb,
            baseline_mb: 100,
            reclaim_ms: 60_000,
            temperature_c: 40,
            utilization_pct: 0,
        };
        let dir = SimGpuDir::create(temp.path(), &device).unwrap();
        (temp, dir)
    }

    #[test]
    fn a_checkpoint_empties_the_device_and_a_restore_fills_it_again() {
        let (_temp, dir) = folder(1000);
        let process = Sleeper::spawn();
        dir.allocate(process.pid(), 600).unwrap();
        assert_eq!(dir.checkpoint_to_host(process.pid()).unwrap(), 600);
        let parked = dir.snapshot().unwrap();
        assert!(parked.processes.is_empty());
        assert_eq!(parked.used_mb, 100);
        assert_eq!(dir.host_mb(process.pid()).unwrap(), Some(600));

        assert_eq!(dir.restore_from_host(process.pid()).unwrap(), 600);
        assert_eq!(
            dir.snapshot().unwrap().processes,
            [Allocation {
                pid: process.pid(),
                mb: 600
            }]
        );
        assert_eq!(dir.host_mb(process.pid()).unwrap(), None);
    }

    #[test]
    fn a_restore_without_room_is_refused_logged_and_keeps_the_host_copy() {
        let (_temp, dir) = folder(1000);
        let (parked, newcomer) = (Sleeper::spawn(), Sleeper::spawn());
        dir.allocate(parked.pid(), 600).unwrap();
        dir.checkpoint_to_host(parked.pid()).unwrap();
        dir.allocate(newcomer.pid(), 500).unwrap();
        let error = dir.restore_from_host(parked.pid()).unwrap_err();
        assert!(
            matches!(
                error,
                AllocError::OutOfMemory {
                    requested_mb: 600,
                    free_mb: 400
                }
            ),
            "{error}"
        );
        assert_eq!(dir.oom_log().unwrap().len(), 1);
        assert_eq!(dir.host_mb(parked.pid()).unwrap(), Some(600));
        assert_eq!(dir.snapshot().unwrap().used_mb, 100 + 500);
    }

    #[test]
    fn nothing_on_the_device_is_nothing_to_checkpoint() {
        let (_temp, dir) = folder(1000);
        let process = Sleeper::spawn();
        let error = dir.checkpoint_to_host(process.pid()).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::NotFound);
        let error = dir.restore_from_host(process.pid()).unwrap_err();
        assert!(
            error.to_string().contains("no checkpointed memory"),
            "{error}"
        );
    }

    #[test]
    fn the_lock_mark_stays_until_cleared() {
        let (_temp, dir) = folder(1000);
        let process = Sleeper::spawn();
        dir.allocate(process.pid(), 10).unwrap();
        dir.set_locked(process.pid(), true).unwrap();
        dir.checkpoint_to_host(process.pid()).unwrap();
        dir.restore_from_host(process.pid()).unwrap();
        let view = dir.checkpoint_view(process.pid()).unwrap();
        assert_eq!(
            view,
            CheckpointView {
                alive: true,
                device_mb: Some(10),
                host_mb: None,
                locked: true
            }
        );
        dir.set_locked(process.pid(), false).unwrap();
        assert!(!dir.checkpoint_view(process.pid()).unwrap().locked);
    }

    #[test]
    fn a_dead_process_loses_its_host_memory_and_its_lock() {
        let (_temp, dir) = folder(1000);
        let mut process = Sleeper::spawn();
        let pid = process.pid();
        dir.allocate(pid, 300).unwrap();
        dir.set_locked(pid, true).unwrap();
        dir.checkpoint_to_host(pid).unwrap();
        process.end();
        let view = dir.checkpoint_view(pid).unwrap();
        assert_eq!(
            view,
            CheckpointView {
                alive: false,
                device_mb: None,
                host_mb: None,
                locked: false
            }
        );
        assert!(!dir.path().join("host").join(pid.to_string()).exists());
        assert!(
            dir.set_locked(pid, true).is_err(),
            "a dead pid cannot be locked"
        );
    }
}
