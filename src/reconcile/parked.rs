//! Parked services survive a daemon restart (docs/ARCHITECTURE.md, "Parking and
//! draining"): a parked instance looks alive and healthy, so without a record the next
//! daemon would adopt it as running, and never resume it (a vLLM asleep, a process
//! checkpointed to host memory). One small file per parked service in
//! `state_dir/parked/`: the root pid it was parked under and the pids its resume acts on.

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::ServiceName;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct ParkedMarker {
    /// The instance's root pid when it was parked: a marker for another instance (the
    /// pid reused after a reboot, a restart by hand) is stale.
    pub root_pid: Option<u32>,
    pub pids: Vec<u32>,
}

fn path(state_dir: &Path, service: &ServiceName) -> PathBuf {
    state_dir.join("parked").join(format!("{service}.json"))
}

/// Records that `service` is parked. A failure is logged: the service is parked all the
/// same; only a restart of the daemon would miss it.
pub(super) fn remember(state_dir: &Path, service: &ServiceName, marker: &ParkedMarker) {
    let file = path(state_dir, service);
    let written = file
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|()| std::fs::write(&file, serde_json::to_vec(marker).unwrap_or_default()));
    if let Err(error) = written {
        tracing::warn!(%service, file = %file.display(), %error, "cannot record that it is parked: a restarted daemon would take it as running");
    }
}

/// Forgets that `service` is parked (it was resumed or stopped).
pub(super) fn forget(state_dir: &Path, service: &ServiceName) {
    match std::fs::remove_file(path(state_dir, service)) {
        Ok(()) => {}
        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
        Err(error) => tracing::warn!(%service, %error, "cannot remove its parked record"),
    }
}

/// The marker of `service` if it was parked under `root_pid`.
pub(super) fn recall(
    state_dir: &Path,
    service: &ServiceName,
    root_pid: Option<u32>,
) -> Option<ParkedMarker> {
    let text = std::fs::read(path(state_dir, service)).ok()?;
    let marker: ParkedMarker = serde_json::from_slice(&text).ok()?;
    (marker.root_pid == root_pid).then_some(marker)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_marker_is_recalled_only_for_the_instance_it_was_written_for() {
        let dir = tempfile::tempdir().unwrap();
        let vidi = ServiceName::parse("vidi").unwrap();
        let marker = ParkedMarker {
            root_pid: Some(42),
            pids: vec![42, 43],
        };
        remember(dir.path(), &vidi, &marker);
        assert_eq!(recall(dir.path(), &vidi, Some(42)), Some(marker));
        assert_eq!(recall(dir.path(), &vidi, Some(7)), None, "another instance");
        forget(dir.path(), &vidi);
        assert_eq!(recall(dir.path(), &vidi, Some(42)), None);
        forget(dir.path(), &vidi);
    }
}
