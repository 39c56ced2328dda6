//! [`SimGpuDir`]: every operation on the folder takes its lock and reclaims first, so
//! each one sees (and leaves) the folder as the driver would.

use std::collections::BTreeSet;
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::files::{epoch_ms, read_number, remove_if_present, write_atomic};
use crate::liveness::is_alive;
use crate::lock::FolderLock;
use crate::{AllocError, Allocation, DeviceSpec, Snapshot, ENV_VAR};

const DEVICE_FILE: &str = "device.json";
const ALLOC_DIR: &str = "alloc";
const OOM_LOG: &str = "oom.log";
const LOST_LOG: &str = "lost.log";
const LOCK_FILE: &str = ".lock";
const EXITED_SUFFIX: &str = ".exited";

/// A simulated GPU folder. Cheap to clone: it is only the path; all state is on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimGpuDir {
    path: PathBuf,
}

/// The lock, held for one operation, and what was read under it.
pub(crate) struct Locked {
    _lock: FolderLock,
    device: DeviceSpec,
    /// The pids whose `alloc/<pid>` file survived reclaiming.
    pub(crate) pids: BTreeSet<u32>,
}

/// The pids named by the files in `alloc/`.
#[derive(Default)]
struct Listing {
    allocs: BTreeSet<u32>,
    stamps: BTreeSet<u32>,
}

impl SimGpuDir {
    /// Makes a folder for `device`: `device.json`, `alloc/`, an empty `oom.log` and an
    /// empty `lost.log`. On an existing folder the allocations are kept, as the processes
    /// holding them may still run; the device and both logs are replaced.
    pub fn create(path: impl AsRef<Path>, device: &DeviceSpec) -> io::Result<Self> {
        let dir = Self {
            path: path.as_ref().to_path_buf(),
        };
        fs::create_dir_all(dir.alloc_dir()).map_err(|e| annotate(e, &dir.alloc_dir()))?;
        let _lock = dir.acquire()?;
        write_atomic(&dir.device_path(), &serde_json::to_vec_pretty(device)?)?;
        write_atomic(&dir.path.join(OOM_LOG), b"")?;
        write_atomic(&dir.path.join(LOST_LOG), b"")?;
        Ok(dir)
    }

    /// Opens an existing folder. Its `device.json` is read once, so that a wrong path
    /// fails here rather than at the first observation; it is looked for before the
    /// lock is taken, so that a wrong path is left without a stray `.lock`.
    pub fn open(path: impl AsRef<Path>) -> io::Result<Self> {
        let dir = Self {
            path: path.as_ref().to_path_buf(),
        };
        if !dir.device_path().is_file() {
            let message = format!(
                "{} is not a simulated GPU folder: it has no {DEVICE_FILE}",
                dir.path.display()
            );
            return Err(io::Error::new(io::ErrorKind::NotFound, message));
        }
        dir.device()?;
        Ok(dir)
    }

    /// Opens the folder named by `FAKE_NVML_DIR`.
    pub fn from_env() -> io::Result<Self> {
        let path = std::env::var_os(ENV_VAR).ok_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, format!("{ENV_VAR} is not set"))
        })?;
        Self::open(path)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads `device.json` under the lock. It says nothing about allocations, so there
    /// is nothing to reclaim first; name, temperature and utilization come from here
    /// without the cost of a full snapshot.
    pub fn device(&self) -> io::Result<DeviceSpec> {
        let _lock = self.acquire()?;
        self.read_device()
    }

    pub fn snapshot(&self) -> io::Result<Snapshot> {
        let locked = self.lock_and_reclaim()?;
        self.tally(locked.device, &locked.pids)
    }

    /// Gives `pid` `mb` more memory, as a CUDA allocation would: refused, with a line in
    /// `oom.log`, when it exceeds what is free. Allocations of one pid add up.
    pub fn allocate(&self, pid: u32, mb: u64) -> Result<(), AllocError> {
        let locked = self.lock_and_reclaim()?;
        self.allocate_locked(&locked, pid, mb)
    }

    /// [`allocate`](Self::allocate) under a lock already taken, for operations that read
    /// the folder before they allocate and change it after, all under one lock.
    pub(crate) fn allocate_locked(
        &self,
        locked: &Locked,
        pid: u32,
        mb: u64,
    ) -> Result<(), AllocError> {
        let snapshot = self.tally(locked.device.clone(), &locked.pids)?;
        self.refuse_beyond_free(pid, mb, &snapshot)?;
        // Merging memory a dead earlier holder of this pid left into the new holder's can
        // only over-report use, never under-report it.
        self.write_allocation(pid, held_by(&snapshot, pid) + mb)
    }

    /// Sets what `pid` holds to `mb`: a living process that frees its weights when it
    /// parks and takes them back when it resumes. Lowering always succeeds; the increase
    /// of a raise is checked as [`Self::allocate`] checks it, and a refused one leaves the
    /// allocation as it was.
    pub fn resize(&self, pid: u32, mb: u64) -> Result<(), AllocError> {
        let locked = self.lock_and_reclaim()?;
        let snapshot = self.tally(locked.device, &locked.pids)?;
        let held = held_by(&snapshot, pid);
        self.refuse_beyond_free(pid, mb.saturating_sub(held), &snapshot)?;
        self.write_allocation(pid, mb)
    }

    /// Appends one line to `lost.log`: a service was stopped while it still had work.
    /// Line breaks inside `line` become spaces, so that each record stays one line.
    pub fn record_lost(&self, line: &str) -> io::Result<()> {
        let _lock = self.acquire()?;
        let line = line.replace(['\n', '\r'], " ");
        self.append(LOST_LOG, &format!("{} {line}\n", epoch_ms()))
    }

    /// Frees everything `pid` holds at once: a process that frees its memory before it
    /// exits, rather than leaving it to the driver's teardown.
    pub fn release(&self, pid: u32) -> io::Result<()> {
        let _locked = self.lock_and_reclaim()?;
        remove_if_present(&self.alloc_path(pid))?;
        remove_if_present(&self.stamp_path(pid))
    }

    /// The refused allocations, oldest first.
    pub fn oom_log(&self) -> io::Result<Vec<String>> {
        self.read_log(OOM_LOG)
    }

    /// The work lost to stops, oldest first: each line is the epoch ms of the record
    /// and what [`Self::record_lost`] was given.
    pub fn lost_log(&self) -> io::Result<Vec<String>> {
        self.read_log(LOST_LOG)
    }

    fn read_log(&self, name: &str) -> io::Result<Vec<String>> {
        let _locked = self.lock_and_reclaim()?;
        let path = self.path.join(name);
        match fs::read_to_string(&path) {
            Ok(text) => Ok(text.lines().map(str::to_owned).collect()),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(error) => Err(annotate(error, &path)),
        }
    }

    /// Refuses `increase_mb` more for `pid` when it exceeds what is free, with a line in
    /// `oom.log`, as a CUDA allocation is refused.
    fn refuse_beyond_free(
        &self,
        pid: u32,
        increase_mb: u64,
        snapshot: &Snapshot,
    ) -> Result<(), AllocError> {
        if increase_mb <= snapshot.free_mb {
            return Ok(());
        }
        let line = format!(
            "{} pid={pid} requested_mb={increase_mb} free_mb={}: CUDA out of memory\n",
            epoch_ms(),
            snapshot.free_mb
        );
        self.append(OOM_LOG, &line)?;
        Err(AllocError::OutOfMemory {
            requested_mb: increase_mb,
            free_mb: snapshot.free_mb,
        })
    }

    /// Writes what `pid` holds, under the lock the caller took.
    fn write_allocation(&self, pid: u32, mb: u64) -> Result<(), AllocError> {
        // A stamp left by an earlier process with this pid would free the living
        // holder's memory early.
        remove_if_present(&self.stamp_path(pid))?;
        fs::create_dir_all(self.alloc_dir())?;
        write_atomic(&self.alloc_path(pid), mb.to_string().as_bytes())?;
        Ok(())
    }

    fn acquire(&self) -> io::Result<FolderLock> {
        let path = self.path.join(LOCK_FILE);
        FolderLock::acquire(&path).map_err(|e| annotate(e, &path))
    }

    /// The start of every operation: take the lock, then apply the reclaim rule.
    pub(crate) fn lock_and_reclaim(&self) -> io::Result<Locked> {
        let lock = self.acquire()?;
        let device = self.read_device()?;
        let pids = self.reclaim(device.reclaim_ms)?;
        Ok(Locked {
            _lock: lock,
            device,
            pids,
        })
    }

    fn read_device(&self) -> io::Result<DeviceSpec> {
        let path = self.device_path();
        let bytes = fs::read(&path).map_err(|e| annotate(e, &path))?;
        serde_json::from_slice(&bytes).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {e}", path.display()),
            )
        })
    }

    /// Applies the reclaim rule to every allocation; returns the pids still holding
    /// memory (exited ones included, until their `reclaim_ms` has passed).
    fn reclaim(&self, reclaim_ms: u64) -> io::Result<BTreeSet<u32>> {
        let listing = self.list()?;
        let now = epoch_ms();
        // A stamp without its allocation is what a reclaim cut short leaves behind.
        for &pid in listing.stamps.difference(&listing.allocs) {
            remove_if_present(&self.stamp_path(pid))?;
        }
        let mut kept = BTreeSet::new();
        for &pid in &listing.allocs {
            let stamped = listing.stamps.contains(&pid);
            if !self.reclaim_one(pid, stamped, now, reclaim_ms)? {
                kept.insert(pid);
            }
        }
        Ok(kept)
    }

    /// Stamps `pid` when first seen dead and frees its memory `reclaim_ms` after the
    /// stamp; returns whether it was freed. A stamp records a death: a pid reused in the
    /// meantime does not bring the dead process's memory back to life.
    fn reclaim_one(&self, pid: u32, stamped: bool, now: u64, reclaim_ms: u64) -> io::Result<bool> {
        let stamp = if stamped {
            read_number(&self.stamp_path(pid))?
        } else {
            None
        };
        let exited_at = match stamp {
            Some(exited_at) => exited_at,
            None if is_alive(pid) => return Ok(false),
            None => {
                write_atomic(&self.stamp_path(pid), now.to_string().as_bytes())?;
                now
            }
        };
        if now.saturating_sub(exited_at) < reclaim_ms {
            return Ok(false);
        }
        remove_if_present(&self.alloc_path(pid))?;
        remove_if_present(&self.stamp_path(pid))?;
        Ok(true)
    }

    fn list(&self) -> io::Result<Listing> {
        let mut listing = Listing::default();
        let entries = match fs::read_dir(self.alloc_dir()) {
            Ok(entries) => entries,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(listing),
            Err(error) => return Err(annotate(error, &self.alloc_dir())),
        };
        for entry in entries {
            let name = entry?.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some(pid) = name.strip_suffix(EXITED_SUFFIX).and_then(parse_pid) {
                listing.stamps.insert(pid);
            } else if let Some(pid) = parse_pid(name) {
                listing.allocs.insert(pid);
            }
        }
        Ok(listing)
    }

    /// Sums what the surviving allocations hold; an unparsable one (half-written by a
    /// tool that ignores the lock) counts as nothing rather than failing the reading.
    fn tally(&self, device: DeviceSpec, pids: &BTreeSet<u32>) -> io::Result<Snapshot> {
        let mut processes = Vec::with_capacity(pids.len());
        for &pid in pids {
            if let Some(mb) = read_number(&self.alloc_path(pid))? {
                processes.push(Allocation { pid, mb });
            }
        }
        let used_mb = processes
            .iter()
            .fold(device.baseline_mb, |sum, allocation| {
                sum.saturating_add(allocation.mb)
            });
        let free_mb = device.total_mb.saturating_sub(used_mb);
        Ok(Snapshot {
            device,
            used_mb,
            free_mb,
            processes,
        })
    }

    fn append(&self, name: &str, line: &str) -> io::Result<()> {
        let path = self.path.join(name);
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut log| log.write_all(line.as_bytes()))
            .map_err(|e| annotate(e, &path))
    }

    fn device_path(&self) -> PathBuf {
        self.path.join(DEVICE_FILE)
    }

    fn alloc_dir(&self) -> PathBuf {
        self.path.join(ALLOC_DIR)
    }

    pub(crate) fn alloc_path(&self, pid: u32) -> PathBuf {
        self.alloc_dir().join(pid.to_string())
    }

    fn stamp_path(&self, pid: u32) -> PathBuf {
        self.alloc_dir().join(format!("{pid}{EXITED_SUFFIX}"))
    }
}

/// What `pid` holds in `snapshot`; nothing when it has no allocation.
fn held_by(snapshot: &Snapshot, pid: u32) -> u64 {
    snapshot
        .processes
        .iter()
        .find(|allocation| allocation.pid == pid)
        .map_or(0, |allocation| allocation.mb)
}

/// A pid written as `alloc_path` writes it; anything else in `alloc/` is not ours.
fn parse_pid(name: &str) -> Option<u32> {
    let pid: u32 = name.parse().ok()?;
    (pid.to_string() == name).then_some(pid)
}

/// io::Error carries no path; an operator needs to know which file failed.
fn annotate(error: io::Error, path: &Path) -> io::Error {
    io::Error::new(error.kind(), format!("{}: {error}", path.display()))
}

#[cfg(test)]
mod tests {
    use std::process::Command;
    use std::sync::Arc;
    use std::thread;
    use std::time::Duration;

    use super::*;
    use crate::test_support::Sleeper;

    fn device(reclaim_ms: u64) -> DeviceSpec {
        DeviceSpec {
            name: "Simulated RTX 4090".into(),
            total_mb: 24_576,
            baseline_mb: 512,
            reclaim_ms,
            temperature_c: 45,
            utilization_pct: 7,
        }
    }

    fn folder(device: &DeviceSpec) -> (tempfile::TempDir, SimGpuDir) {
        let temp = tempfile::tempdir().unwrap();
        let dir = SimGpuDir::create(temp.path().join("gpu"), device).unwrap();
        (temp, dir)
    }

    /// The pid of a process that has exited and been reaped.
    fn dead_pid() -> u32 {
        let mut child = Command::new("true").spawn().unwrap();
        child.wait().unwrap();
        child.id()
    }

    fn pids(snapshot: &Snapshot) -> Vec<u32> {
        snapshot.processes.iter().map(|a| a.pid).collect()
    }

    #[test]
    fn create_lays_out_the_folder_and_open_reads_it() {
        let spec = device(1000);
        let (_temp, dir) = folder(&spec);
        assert!(dir.path().join("alloc").is_dir());
        assert_eq!(fs::read_to_string(dir.path().join("oom.log")).unwrap(), "");
        let opened = SimGpuDir::open(dir.path()).unwrap();
        assert_eq!(opened.device().unwrap(), spec);
        let snapshot = opened.snapshot().unwrap();
        assert_eq!(snapshot.used_mb, 512);
        assert_eq!(snapshot.free_mb, 24_576 - 512);
        assert!(snapshot.processes.is_empty());
    }

    #[test]
    fn from_env_opens_the_folder_named_by_fake_nvml_dir() {
        let (_temp, dir) = folder(&device(0));
        std::env::set_var(ENV_VAR, dir.path());
        let opened = SimGpuDir::from_env();
        std::env::remove_var(ENV_VAR);
        assert_eq!(opened.unwrap(), dir);
    }

    #[test]
    fn open_names_a_missing_folder() {
        let temp = tempfile::tempdir().unwrap();
        let missing = temp.path().join("nowhere");
        let error = SimGpuDir::open(&missing).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::NotFound);
        assert!(
            error.to_string().contains("not a simulated GPU folder"),
            "{error}"
        );
        assert!(!missing.exists(), "open creates nothing");
    }

    #[test]
    fn open_names_the_missing_or_broken_device_json() {
        let temp = tempfile::tempdir().unwrap();
        let error = SimGpuDir::open(temp.path()).unwrap_err();
        assert!(error.to_string().contains("device.json"), "{error}");
        assert!(!temp.path().join(".lock").exists(), "nothing left behind");
        fs::write(temp.path().join("device.json"), "{\"name\": \"half").unwrap();
        let error = SimGpuDir::open(temp.path()).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
        assert!(error.to_string().contains("device.json"), "{error}");
    }

    #[test]
    fn used_is_baseline_plus_allocations_which_add_up_per_pid() {
        let (_temp, dir) = folder(&device(1000));
        let other = Sleeper::spawn();
        let me = std::process::id();
        dir.allocate(other.pid(), 4096).unwrap();
        dir.allocate(me, 1000).unwrap();
        dir.allocate(me, 24).unwrap();
        let snapshot = dir.snapshot().unwrap();
        assert_eq!(snapshot.used_mb, 512 + 4096 + 1024);
        assert_eq!(snapshot.free_mb, 24_576 - 512 - 4096 - 1024);
        let mut expected = vec![
            Allocation { pid: me, mb: 1024 },
            Allocation {
                pid: other.pid(),
                mb: 4096,
            },
        ];
        expected.sort_by_key(|a| a.pid);
        assert_eq!(snapshot.processes, expected, "sorted by pid");
    }

    #[test]
    fn allocation_beyond_free_is_refused_and_logged() {
        let (_temp, dir) = folder(&device(1000));
        let me = std::process::id();
        dir.allocate(me, 20_000).unwrap();
        let error = dir.allocate(me, 5_000).unwrap_err();
        assert!(matches!(
            error,
            AllocError::OutOfMemory {
                requested_mb: 5_000,
                free_mb: 4_064
            }
        ));
        let log = dir.oom_log().unwrap();
        assert_eq!(log.len(), 1);
        assert!(log[0].contains(&format!("pid={me}")), "{}", log[0]);
        assert!(log[0].contains("out of memory"), "{}", log[0]);
        assert_eq!(dir.snapshot().unwrap().used_mb, 512 + 20_000, "unchanged");
    }

    #[test]
    fn a_live_process_keeps_its_memory() {
        let (_temp, dir) = folder(&device(0));
        let me = std::process::id();
        dir.allocate(me, 100).unwrap();
        dir.snapshot().unwrap();
        assert_eq!(pids(&dir.snapshot().unwrap()), [me]);
        assert!(!dir.stamp_path(me).exists());
    }

    #[test]
    fn a_dead_process_holds_memory_until_reclaim_ms_after_it_was_seen_dead() {
        let (_temp, dir) = folder(&device(300));
        let pid = dead_pid();
        dir.allocate(pid, 2048).unwrap();
        let during = dir.snapshot().unwrap();
        assert_eq!(pids(&during), [pid]);
        assert_eq!(during.used_mb, 512 + 2048, "still held while torn down");
        let stamp = read_number(&dir.stamp_path(pid)).unwrap().unwrap();
        assert!(epoch_ms() - stamp < 300);
        thread::sleep(Duration::from_millis(350));
        let after = dir.snapshot().unwrap();
        assert!(after.processes.is_empty());
        assert_eq!(after.used_mb, 512);
        assert!(!dir.alloc_path(pid).exists() && !dir.stamp_path(pid).exists());
    }

    #[test]
    fn a_zombie_counts_as_dead() {
        let (_temp, dir) = folder(&device(60_000));
        let mut zombie = Sleeper::spawn();
        dir.allocate(zombie.pid(), 100).unwrap();
        zombie.make_zombie();
        assert_eq!(pids(&dir.snapshot().unwrap()), [zombie.pid()]);
        assert!(dir.stamp_path(zombie.pid()).exists());
    }

    #[test]
    fn reclaim_ms_zero_frees_a_dead_process_at_first_sight() {
        let (_temp, dir) = folder(&device(0));
        let pid = dead_pid();
        fs::write(dir.alloc_path(pid), "700").unwrap();
        assert!(dir.snapshot().unwrap().processes.is_empty());
        assert!(!dir.stamp_path(pid).exists());
    }

    #[test]
    fn an_existing_stamp_is_honoured() {
        let (_temp, dir) = folder(&device(500));
        let pid = dead_pid();
        fs::write(dir.alloc_path(pid), "700").unwrap();
        let stamp = epoch_ms() - 1000;
        fs::write(dir.stamp_path(pid), stamp.to_string()).unwrap();
        assert!(dir.snapshot().unwrap().processes.is_empty());
    }

    #[test]
    fn a_stamp_without_its_allocation_is_removed() {
        let (_temp, dir) = folder(&device(500));
        fs::write(dir.stamp_path(4242), "1").unwrap();
        dir.snapshot().unwrap();
        assert!(!dir.stamp_path(4242).exists());
    }

    #[test]
    fn allocating_clears_a_stamp_left_by_an_earlier_holder_of_the_pid() {
        let (_temp, dir) = folder(&device(60_000));
        let me = std::process::id();
        fs::write(dir.alloc_path(me), "300").unwrap();
        fs::write(dir.stamp_path(me), epoch_ms().to_string()).unwrap();
        dir.allocate(me, 200).unwrap();
        assert!(!dir.stamp_path(me).exists());
        assert_eq!(
            dir.snapshot().unwrap().processes,
            [Allocation { pid: me, mb: 500 }]
        );
    }

    #[test]
    fn unparsable_entries_are_ignored() {
        let (_temp, dir) = folder(&device(60_000));
        let live = Sleeper::spawn();
        let me = std::process::id();
        fs::write(dir.alloc_path(me), "").unwrap();
        fs::write(dir.alloc_path(live.pid()), "50\n").unwrap();
        fs::write(dir.alloc_dir().join("not-a-pid"), "100").unwrap();
        fs::write(dir.alloc_dir().join("007"), "100").unwrap();
        fs::write(dir.alloc_dir().join(format!(".{me}.tmp")), "100").unwrap();
        fs::write(dir.stamp_path(live.pid()), "garbage").unwrap();
        let snapshot = dir.snapshot().unwrap();
        assert_eq!(snapshot.used_mb, 512 + 50);
        assert_eq!(
            snapshot.processes,
            [Allocation {
                pid: live.pid(),
                mb: 50
            }]
        );
    }

    #[test]
    fn free_saturates_at_zero_when_over_committed() {
        let mut spec = device(0);
        spec.baseline_mb = spec.total_mb + 10;
        let (_temp, dir) = folder(&spec);
        let snapshot = dir.snapshot().unwrap();
        assert_eq!(snapshot.free_mb, 0);
        assert!(matches!(
            dir.allocate(std::process::id(), 1),
            Err(AllocError::OutOfMemory { free_mb: 0, .. })
        ));
    }

    #[test]
    fn release_frees_at_once() {
        let (_temp, dir) = folder(&device(60_000));
        let me = std::process::id();
        dir.allocate(me, 100).unwrap();
        dir.release(me).unwrap();
        dir.release(me).unwrap();
        assert_eq!(dir.snapshot().unwrap().used_mb, 512);
    }

    #[test]
    fn resize_lowers_at_once_and_raises_within_what_is_free() {
        let (_temp, dir) = folder(&device(60_000));
        let me = std::process::id();
        dir.allocate(me, 16_000).unwrap();
        dir.resize(me, 1_024).unwrap();
        assert_eq!(
            dir.snapshot().unwrap().processes,
            [Allocation { pid: me, mb: 1_024 }]
        );
        dir.resize(me, 20_000).unwrap();
        let snapshot = dir.snapshot().unwrap();
        assert_eq!(
            snapshot.processes,
            [Allocation {
                pid: me,
                mb: 20_000
            }]
        );
        assert_eq!(snapshot.free_mb, 24_576 - 512 - 20_000);
        assert!(dir.oom_log().unwrap().is_empty());
    }

    #[test]
    fn a_raise_beyond_free_is_refused_logged_and_changes_nothing() {
        let (_temp, dir) = folder(&device(60_000));
        let other = Sleeper::spawn();
        let me = std::process::id();
        dir.allocate(other.pid(), 20_000).unwrap();
        dir.allocate(me, 1_000).unwrap();
        let error = dir.resize(me, 5_000).unwrap_err();
        assert!(
            matches!(
                error,
                AllocError::OutOfMemory {
                    requested_mb: 4_000,
                    free_mb: 3_064
                }
            ),
            "only the increase is requested: {error}"
        );
        let log = dir.oom_log().unwrap();
        assert_eq!(log.len(), 1);
        assert!(
            log[0].contains(&format!("pid={me} requested_mb=4000")),
            "{}",
            log[0]
        );
        assert_eq!(
            fs::read_to_string(dir.alloc_path(me)).unwrap(),
            "1000",
            "unchanged"
        );
        dir.resize(me, 4_064).unwrap();
        assert_eq!(dir.snapshot().unwrap().free_mb, 0, "exactly what was free");
    }

    #[test]
    fn resize_of_a_pid_without_memory_allocates_it() {
        let (_temp, dir) = folder(&device(60_000));
        let me = std::process::id();
        dir.resize(me, 300).unwrap();
        assert_eq!(
            dir.snapshot().unwrap().processes,
            [Allocation { pid: me, mb: 300 }]
        );
    }

    #[test]
    fn lost_work_is_logged_one_line_per_record() {
        let (_temp, dir) = folder(&device(0));
        assert!(dir.lost_log().unwrap().is_empty());
        dir.record_lost("vidi pid 123: job 2 lost after 850 of 3000 ms")
            .unwrap();
        dir.record_lost("cosy pid 7: two\nlines").unwrap();
        let log = dir.lost_log().unwrap();
        assert_eq!(log.len(), 2);
        let (stamp, text) = log[0].split_once(' ').unwrap();
        assert!(epoch_ms() - stamp.parse::<u64>().unwrap() < 60_000);
        assert_eq!(text, "vidi pid 123: job 2 lost after 850 of 3000 ms");
        assert!(log[1].ends_with("cosy pid 7: two lines"), "{}", log[1]);
        assert!(dir.oom_log().unwrap().is_empty(), "the logs are apart");
        SimGpuDir::create(dir.path(), &device(0)).unwrap();
        assert!(dir.lost_log().unwrap().is_empty(), "create starts it anew");
    }

    #[test]
    fn concurrent_allocations_never_over_commit() {
        let mut spec = device(0);
        spec.total_mb = 1000;
        spec.baseline_mb = 0;
        let (_temp, dir) = folder(&spec);
        let dir = Arc::new(dir);
        let threads: Vec<_> = (0..16)
            .map(|_| {
                let dir = Arc::clone(&dir);
                thread::spawn(move || dir.allocate(std::process::id(), 100).is_ok())
            })
            .collect();
        let granted = threads
            .into_iter()
            .map(|t| t.join().unwrap())
            .filter(|ok| *ok)
            .count();
        assert_eq!(granted, 10);
        assert_eq!(dir.snapshot().unwrap().used_mb, 1000);
        assert_eq!(dir.oom_log().unwrap().len(), 6);
    }
}
