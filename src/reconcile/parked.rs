//! Parked services survive a daemon restart (docs/ARCHITECTURE.md, "Parking and
//! draining"): a parked instance looks alive and healthy, so without a record the next
//! daemon would adopt it as running, and never resume it (a vLLM asleep, a process
//! checkpointed to host memory). One small file per parked service in
//! `state_dir/parked/`: the root pid it was parked under and the pids its resume acts on.
//! It is written durably (a torn file would make the next daemon adopt a parked service
//! as running), off the loop and in the order the loop asked.

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::config::ServiceName;
use crate::durable;

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

/// A change to the notes, in the order the loop made it.
enum Note {
    Remember(ServiceName, ParkedMarker),
    Forget(ServiceName),
}

/// The loop's writer of parked notes: each is written on the blocking pool (a durable
/// write syncs the disk), one after the other, so a resume's `forget` never overtakes
/// its park's `remember`.
pub(super) struct ParkedNotes {
    state_dir: PathBuf,
    writer: Option<(mpsc::UnboundedSender<Note>, JoinHandle<()>)>,
}

impl ParkedNotes {
    pub fn new(state_dir: PathBuf) -> Self {
        Self {
            state_dir,
            writer: None,
        }
    }

    pub fn remember(&mut self, service: &ServiceName, marker: ParkedMarker) {
        self.send(Note::Remember(service.clone(), marker));
    }

    pub fn forget(&mut self, service: &ServiceName) {
        self.send(Note::Forget(service.clone()));
    }

    /// Waits until every note taken so far is written (at shutdown).
    pub async fn flush(&mut self) {
        if let Some((notes, writer)) = self.writer.take() {
            drop(notes);
            if let Err(error) = writer.await {
                tracing::warn!(%error, "the writer of parked notes ended early");
            }
        }
    }

    fn send(&mut self, note: Note) {
        let (notes, _) = self.writer.get_or_insert_with(|| {
            let (notes, mut incoming) = mpsc::unbounded_channel::<Note>();
            let state_dir = self.state_dir.clone();
            let writer = tokio::spawn(async move {
                while let Some(note) = incoming.recv().await {
                    let state_dir = state_dir.clone();
                    let _ = tokio::task::spawn_blocking(move || match note {
                        Note::Remember(service, marker) => remember(&state_dir, &service, &marker),
                        Note::Forget(service) => forget(&state_dir, &service),
                    })
                    .await;
                }
            });
            (notes, writer)
        });
        // The writer ends only when this sender is dropped (in `flush`).
        let _ = notes.send(note);
    }
}

/// Records that `service` is parked. A failure is logged: the service is parked all the
/// same; only a restart of the daemon would miss it.
pub(super) fn remember(state_dir: &Path, service: &ServiceName, marker: &ParkedMarker) {
    let file = path(state_dir, service);
    let bytes = serde_json::to_vec(marker).unwrap_or_default();
    if let Err(error) = durable::write_atomic(&file, &bytes) {
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

    /// A reader (a daemon starting while this one parks) sees the old marker or the
    /// new one, never a torn file that it would take for no marker at all.
    #[test]
    fn a_marker_being_rewritten_is_never_read_torn() {
        let dir = tempfile::tempdir().unwrap();
        let vidi = ServiceName::parse("vidi").unwrap();
        let marker = |n: u32| ParkedMarker {
            root_pid: Some(42),
            pids: (0..200).map(|i| n * 1000 + i).collect(),
        };
        remember(dir.path(), &vidi, &marker(0));
        let done = std::sync::atomic::AtomicBool::new(false);
        let torn = std::thread::scope(|scope| {
            let reader = scope.spawn(|| {
                let mut torn = 0;
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    if recall(dir.path(), &vidi, Some(42)).is_none() {
                        torn += 1;
                    }
                }
                torn
            });
            for n in 1..300 {
                remember(dir.path(), &vidi, &marker(n));
            }
            done.store(true, std::sync::atomic::Ordering::Relaxed);
            reader.join().unwrap()
        });
        assert_eq!(torn, 0, "reads that found no marker while it was rewritten");
    }

    #[tokio::test]
    async fn notes_are_written_in_the_order_taken() {
        let dir = tempfile::tempdir().unwrap();
        let vidi = ServiceName::parse("vidi").unwrap();
        let marker = ParkedMarker {
            root_pid: Some(42),
            pids: vec![42],
        };
        let mut notes = ParkedNotes::new(dir.path().to_owned());
        notes.remember(&vidi, marker.clone());
        notes.forget(&vidi);
        notes.remember(&vidi, marker.clone());
        notes.flush().await;
        assert_eq!(recall(dir.path(), &vidi, Some(42)), Some(marker));
        notes.forget(&vidi);
        notes.flush().await;
        assert_eq!(recall(dir.path(), &vidi, Some(42)), None);
    }
}
