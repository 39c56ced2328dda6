//! Learned footprints in the loop (docs/ARCHITECTURE.md, "Learned footprints"): after
//! each observation the peak of every ready service is recorded; the file is written
//! only when a figure moved, on the blocking pool, one write at a time, so that the loop
//! never waits on fsync and thousands of transitions do not mean thousands of writes.

use futures_util::FutureExt;
use tokio::task::JoinHandle;

use crate::config::ServiceName;
use crate::footprints::{FootprintError, FootprintWarning, Forgotten};
use crate::lease::LeaseBackend;
use crate::status::ServiceState;
use crate::transition::{unknown_service, TransitionError};

use super::effects::ServiceEffects;
use super::Reconciler;

/// The write of the footprints file under way.
pub(super) type FootprintsWrite = JoinHandle<Result<(), FootprintError>>;

impl<E: ServiceEffects, L: LeaseBackend> Reconciler<E, L> {
    /// Records the VRAM each ready service holds now as its peak when it is a new one.
    /// A start is left out (its memory is still coming), and so is a stop (its memory
    /// is going); a ready service that grows later does count.
    pub(super) fn learn_peaks(&mut self) {
        for record in self.records.iter() {
            if record.state() != ServiceState::Ready || record.in_flight().is_some() {
                continue;
            }
            let Some(mb) = record.observed_mb else {
                continue;
            };
            let name = record.name();
            if !self.footprints.observe_peak(name, mb) {
                continue;
            }
            match FootprintWarning::check(name, record.spec.vram_mb, mb) {
                Some(warning) => {
                    tracing::warn!(service = %name, declared_mb = record.spec.vram_mb, peak_mb = mb, "{warning}")
                }
                None => {
                    tracing::info!(service = %name, declared_mb = record.spec.vram_mb, peak_mb = mb, "learned a new peak")
                }
            }
        }
    }

    /// Hands what changed to a writer on the blocking pool, unless a write is still
    /// under way: what changes meanwhile is written by a later round (a resync tick
    /// comes at the latest).
    pub(super) fn save_footprints(&mut self) {
        if let Some(write) = self.footprints_write.take() {
            if !write.is_finished() {
                self.footprints_write = Some(write);
                return;
            }
            report_write(write.now_or_never());
        }
        if let Some(pending) = self.footprints.take_unsaved() {
            self.footprints_write = Some(tokio::spawn(pending.write_off_loop()));
        }
    }

    /// Waits for the write under way, then writes what is left (at shutdown, and before
    /// answering a `forget`).
    pub(super) async fn flush_footprints(&mut self) -> Result<(), FootprintError> {
        if let Some(write) = self.footprints_write.take() {
            report_write(Some(write.await));
        }
        match self.footprints.take_unsaved() {
            Some(pending) => pending.write_off_loop().await,
            None => Ok(()),
        }
    }

    /// `POST /gpu/service/{name}/forget`: resets what was learned of `service`, saves
    /// the file, and plans again (what was refused at the learned figure may fit now).
    pub(super) async fn forget_footprint(
        &mut self,
        service: &ServiceName,
    ) -> Result<Forgotten, TransitionError> {
        if self.config.inventory.get(service).is_none() {
            return Err(unknown_service(service.as_str(), &self.config.inventory));
        }
        let forgotten = self.footprints.forget(service);
        self.dirty = true;
        self.publish();
        self.flush_footprints()
            .await
            .map_err(|error| TransitionError::NotWritten {
                detail: error.to_string(),
            })?;
        tracing::info!(%service, ?forgotten, "what was learned of its footprint is forgotten");
        Ok(Forgotten {
            service: service.to_string(),
            forgotten,
        })
    }
}

/// Logs a finished write that failed; the next change writes everything again.
fn report_write(joined: Option<Result<Result<(), FootprintError>, tokio::task::JoinError>>) {
    match joined {
        Some(Ok(Err(error))) => tracing::warn!(%error, "learned footprints not saved"),
        Some(Err(error)) => {
            tracing::warn!(%error, "the write of the learned footprints ended early")
        }
        Some(Ok(Ok(()))) | None => {}
    }
}
