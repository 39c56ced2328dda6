//! Learned footprints (docs/ARCHITECTURE.md, "Learned footprints"): the VRAM each service
//! was really seen to take, kept in `state_dir/footprints.json` across restarts.
//!
//! A declared `vram_mb` is a guess; once a service has run, the GPU has said what it
//! takes. Its peak (while ready, never while starting: a start's memory is still coming)
//! and its residual (what it holds while parked) are learned, and starts are budgeted at
//! `max(declared, learned peak)`, so a service declared at 4 GB that takes 9 GB is never
//! started again where only 4 GB are free. `gpu-manager forget NAME` resets what was
//! learned (after a smaller model is configured, say).
//!
//! This module is the store: pure bookkeeping plus the file. It remembers whether
//! anything changed since the last save, so that the daemon writes the file only when a
//! figure moved, not at every round.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::clock::now_ms;
use crate::config::{Inventory, ServiceName, ServiceSpec};
use crate::durable::{self, WriteError};

/// The file's name in `state_dir`.
pub const FILE_NAME: &str = "footprints.json";
/// The file format this daemon reads and writes.
const VERSION: u32 = 1;
/// Observed above declared by more than this many percent is warned about.
const WARN_ABOVE_PCT: u64 = 10;

/// What was learned of one service.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Footprint {
    /// The most VRAM the GPU ever attributed to it while it ran (ready).
    #[serde(default)]
    pub peak_mb: Option<u64>,
    /// The most it held while parked.
    #[serde(default)]
    pub residual_mb: Option<u64>,
    /// When a figure last changed, milliseconds since the epoch.
    pub updated_at_ms: u64,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileContent {
    version: u32,
    services: BTreeMap<ServiceName, Footprint>,
}

#[derive(Debug, thiserror::Error)]
pub enum FootprintError {
    #[error("cannot read the learned footprints {}: {source}; give the daemon's user read access to it, or delete it to start with nothing learned", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the learned footprints {} are not valid ({detail}): starting with nothing learned, so services are budgeted at their declared vram_mb until they run again; the file is replaced at the next figure learned (delete it, or fix it and restart the daemon, to keep what it held)", path.display())]
    Corrupt { path: PathBuf, detail: String },
    #[error("cannot save the learned footprints {}: {source}; what was learned is used until the daemon stops but may be lost then: is state_dir writable?", path.display())]
    NotSaved { path: PathBuf, source: WriteError },
}

/// A figure observed more than 10 % above the declared `vram_mb`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FootprintWarning {
    pub service: ServiceName,
    pub declared_mb: u64,
    pub observed_mb: u64,
}

impl FootprintWarning {
    /// A warning when `observed_mb` exceeds `declared_mb` by more than 10 %.
    pub fn check(service: &ServiceName, declared_mb: u64, observed_mb: u64) -> Option<Self> {
        (observed_mb * 100 > declared_mb * (100 + WARN_ABOVE_PCT)).then(|| Self {
            service: service.clone(),
            declared_mb,
            observed_mb,
        })
    }
}

impl std::fmt::Display for FootprintWarning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let over_pct = (self.observed_mb - self.declared_mb) * 100 / self.declared_mb.max(1);
        write!(
            f,
            "{} was seen using {} MB, {over_pct}% more than its declared vram_mb of {} MB: it is budgeted at {} MB from now on; set vram_mb: {} in the config, or run `gpu-manager forget {}` once it needs less",
            self.service, self.observed_mb, self.declared_mb, self.observed_mb, self.observed_mb, self.service
        )
    }
}

/// The answer to a `forget`: what was learned before it was reset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Forgotten {
    pub service: String,
    /// None: nothing had been learned.
    pub forgotten: Option<Footprint>,
}

/// The store: what was learned of each service of the inventory, and its file.
#[derive(Debug, Clone)]
pub struct Footprints {
    path: PathBuf,
    entries: BTreeMap<ServiceName, Footprint>,
    /// A figure changed since the file was last written (or handed to a writer).
    unsaved: bool,
}

/// The file's content at one moment, to be written off the async workers.
#[derive(Debug)]
pub struct PendingWrite {
    path: PathBuf,
    bytes: Vec<u8>,
}

impl PendingWrite {
    /// Writes durably (temp file, fsync, rename); blocks on fsync.
    pub fn write(self) -> Result<(), FootprintError> {
        durable::write_atomic(&self.path, &self.bytes).map_err(|source| FootprintError::NotSaved {
            path: self.path,
            source,
        })
    }

    /// [`PendingWrite::write`] on the blocking pool.
    pub async fn write_off_loop(self) -> Result<(), FootprintError> {
        let path = self.path.clone();
        match tokio::task::spawn_blocking(move || self.write()).await {
            Ok(result) => result,
            Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
            // Only a runtime shutting down cancels a blocking task, and only before it ran.
            Err(error) => Err(FootprintError::NotSaved {
                path,
                source: WriteError::NotWritten(std::io::Error::other(error.to_string())),
            }),
        }
    }
}

impl Footprints {
    /// An empty store for the file in `state_dir`.
    pub fn empty(state_dir: &Path) -> Self {
        Self {
            path: state_dir.join(FILE_NAME),
            entries: BTreeMap::new(),
            unsaved: false,
        }
    }

    /// Reads `state_dir/footprints.json`; a missing file is nothing learned. Entries for
    /// services the inventory no longer names are dropped (and left out of the next
    /// write).
    pub fn load(state_dir: &Path, inventory: &Inventory) -> Result<Self, FootprintError> {
        let mut store = Self::empty(state_dir);
        let text = match std::fs::read_to_string(&store.path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(store),
            Err(source) => {
                return Err(FootprintError::Read {
                    path: store.path,
                    source,
                })
            }
        };
        let corrupt = |detail: String| FootprintError::Corrupt {
            path: store.path.clone(),
            detail,
        };
        let content: FileContent =
            serde_json::from_str(&text).map_err(|e| corrupt(e.to_string()))?;
        if content.version != VERSION {
            return Err(corrupt(format!(
                "version {} is not the version {VERSION} this daemon reads",
                content.version
            )));
        }
        for (name, footprint) in content.services {
            if inventory.get(&name).is_some() {
                store.entries.insert(name, footprint);
            } else {
                tracing::info!(service = %name, path = %store.path.display(), "dropped what was learned of a service the config no longer names");
            }
        }
        Ok(store)
    }

    /// [`Footprints::load`] for the daemon: a file that cannot be read is reported (with
    /// what to do) and the daemon starts with nothing learned.
    pub fn load_or_empty(state_dir: &Path, inventory: &Inventory) -> Self {
        Self::load(state_dir, inventory).unwrap_or_else(|error| {
            tracing::warn!(%error, "learned footprints not loaded");
            Self::empty(state_dir)
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn get(&self, name: &ServiceName) -> Option<&Footprint> {
        self.entries.get(name)
    }

    pub fn peak_mb(&self, name: &ServiceName) -> Option<u64> {
        self.get(name).and_then(|f| f.peak_mb)
    }

    /// What a start of `spec` is budgeted at: its declared `vram_mb`, or its learned peak
    /// when that is higher.
    pub fn budget_mb(&self, spec: &ServiceSpec) -> u64 {
        spec.vram_mb.max(self.peak_mb(&spec.name).unwrap_or(0))
    }

    /// Records `mb` seen while the service ran (ready). True when it is a new peak.
    pub fn observe_peak(&mut self, name: &ServiceName, mb: u64) -> bool {
        self.raise(name, mb, |f| &mut f.peak_mb)
    }

    /// Records `mb` seen while the service was parked. True when it is a new high.
    pub fn observe_residual(&mut self, name: &ServiceName, mb: u64) -> bool {
        self.raise(name, mb, |f| &mut f.residual_mb)
    }

    fn raise(
        &mut self,
        name: &ServiceName,
        mb: u64,
        figure: impl Fn(&mut Footprint) -> &mut Option<u64>,
    ) -> bool {
        let footprint = self.entries.entry(name.clone()).or_default();
        let slot = figure(footprint);
        if slot.is_some_and(|known| known >= mb) {
            return false;
        }
        *slot = Some(mb);
        footprint.updated_at_ms = now_ms();
        self.unsaved = true;
        true
    }

    /// Resets what was learned of `name`; returns it.
    pub fn forget(&mut self, name: &ServiceName) -> Option<Footprint> {
        let forgotten = self.entries.remove(name);
        self.unsaved |= forgotten.is_some();
        forgotten
    }

    /// The file's new content when a figure changed since the last call, else None.
    /// The store counts as saved from then on: a write that fails is reported by its
    /// writer, and the next change writes everything again.
    pub fn take_unsaved(&mut self) -> Option<PendingWrite> {
        if !std::mem::take(&mut self.unsaved) {
            return None;
        }
        let content = FileContent {
            version: VERSION,
            services: self.entries.clone(),
        };
        let mut bytes =
            serde_json::to_vec_pretty(&content).expect("footprints always serialize to JSON");
        bytes.push(b'\n');
        Some(PendingWrite {
            path: self.path.clone(),
            bytes,
        })
    }

    /// Writes the file now if a figure changed (for the CLI, with no daemon running).
    /// True when it wrote.
    pub fn save(&mut self) -> Result<bool, FootprintError> {
        match self.take_unsaved() {
            Some(write) => write.write().map(|()| true),
            None => Ok(false),
        }
    }

    /// The warning for a service whose learned peak (or `observed_mb` now) exceeds its
    /// declared `vram_mb` by more than 10 %.
    pub fn warning(
        &self,
        spec: &ServiceSpec,
        observed_mb: Option<u64>,
    ) -> Option<FootprintWarning> {
        let seen = observed_mb.max(self.peak_mb(&spec.name))?;
        FootprintWarning::check(&spec.name, spec.vram_mb, seen)
    }

    /// One line per service, declared and learned figures, for `gpu-manager plan`.
    pub fn render(&self, inventory: &Inventory) -> String {
        let mut out = String::from("footprints (declared vram_mb / learned):\n");
        for spec in inventory.iter() {
            let footprint = self.get(&spec.name).copied().unwrap_or_default();
            let figure = |mb: Option<u64>| mb.map_or("-".to_owned(), |mb| format!("{mb} MB"));
            out.push_str(&format!(
                "  {}: declared {} MB, learned peak {}, residual {}; budgeted at {} MB",
                spec.name,
                spec.vram_mb,
                figure(footprint.peak_mb),
                figure(footprint.residual_mb),
                self.budget_mb(spec)
            ));
            if let Some(warning) = self.warning(spec, None) {
                out.push_str(&format!(
                    " (warning: {} MB over declared)",
                    warning.observed_mb - warning.declared_mb
                ));
            }
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::tests::spec;

    fn name(s: &str) -> ServiceName {
        ServiceName::parse(s).unwrap()
    }

    fn inventory() -> Inventory {
        Inventory::new(vec![
            spec("vidi", 4096, 40, vec![2]),
            spec("comfyui", 8000, 100, vec![2]),
        ])
    }

    #[test]
    fn what_is_learned_survives_a_round_trip_through_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Footprints::load(dir.path(), &inventory()).unwrap();
        assert_eq!(store.get(&name("vidi")), None, "nothing learned yet");
        assert!(store.observe_peak(&name("vidi"), 9000));
        assert!(store.observe_residual(&name("vidi"), 1024));
        assert!(store.save().unwrap());

        let loaded = Footprints::load(dir.path(), &inventory()).unwrap();
        let vidi = loaded.get(&name("vidi")).unwrap();
        assert_eq!((vidi.peak_mb, vidi.residual_mb), (Some(9000), Some(1024)));
        assert!(vidi.updated_at_ms > 0);
        assert_eq!(loaded.get(&name("comfyui")), None);
        assert_eq!(loaded.budget_mb(&spec("vidi", 4096, 40, vec![2])), 9000);
        assert_eq!(
            loaded.budget_mb(&spec("comfyui", 8000, 100, vec![2])),
            8000,
            "declared when nothing is learned"
        );
    }

    #[test]
    fn only_a_new_peak_changes_anything_and_only_a_change_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Footprints::empty(dir.path());
        assert!(!store.save().unwrap(), "nothing to write");
        assert!(!store.path().exists());
        assert!(store.observe_peak(&name("vidi"), 5000));
        assert!(store.save().unwrap());
        std::fs::remove_file(store.path()).unwrap();
        for mb in [5000, 4000, 100] {
            assert!(
                !store.observe_peak(&name("vidi"), mb),
                "{mb} is no new peak"
            );
        }
        assert!(!store.save().unwrap());
        assert!(!store.path().exists(), "no write without a change");
        assert!(store.observe_peak(&name("vidi"), 5001));
        assert!(store.take_unsaved().is_some());
        assert!(store.take_unsaved().is_none(), "handed out once");
    }

    #[test]
    fn a_corrupt_file_is_reported_with_its_path_and_nothing_is_learned() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        for text in [
            "{not json",
            r#"{"version": 1, "services": {"vidi": {"peak_mb": "big", "updated_at_ms": 1}}}"#,
            r#"{"version": 7, "services": {}}"#,
        ] {
            std::fs::write(&path, text).unwrap();
            let error = Footprints::load(dir.path(), &inventory()).unwrap_err();
            assert!(matches!(error, FootprintError::Corrupt { .. }), "{error:?}");
            let message = error.to_string();
            assert!(message.contains(&path.display().to_string()), "{message}");
            assert!(message.contains("delete it"), "{message}");
            let store = Footprints::load_or_empty(dir.path(), &inventory());
            assert_eq!(store.get(&name("vidi")), None);
        }
    }

    #[test]
    fn services_no_longer_in_the_inventory_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Footprints::empty(dir.path());
        store.observe_peak(&name("vidi"), 9000);
        store.observe_peak(&name("retired"), 3000);
        store.save().unwrap();
        let mut loaded = Footprints::load(dir.path(), &inventory()).unwrap();
        assert_eq!(loaded.peak_mb(&name("retired")), None);
        assert_eq!(loaded.peak_mb(&name("vidi")), Some(9000));
        loaded.observe_peak(&name("vidi"), 9500);
        loaded.save().unwrap();
        let text = std::fs::read_to_string(loaded.path()).unwrap();
        assert!(!text.contains("retired"), "{text}");
    }

    #[test]
    fn forget_resets_a_service_and_is_saved() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Footprints::empty(dir.path());
        store.observe_peak(&name("vidi"), 9000);
        store.save().unwrap();
        let forgotten = store.forget(&name("vidi")).unwrap();
        assert_eq!(forgotten.peak_mb, Some(9000));
        assert_eq!(store.forget(&name("vidi")), None, "nothing left");
        assert!(store.save().unwrap());
        let loaded = Footprints::load(dir.path(), &inventory()).unwrap();
        assert_eq!(loaded.get(&name("vidi")), None);
    }

    #[test]
    fn a_warning_only_above_ten_percent_over_declared() {
        let vidi = name("vidi");
        assert_eq!(FootprintWarning::check(&vidi, 4096, 4505), None, "9.99 %");
        let warning = FootprintWarning::check(&vidi, 4096, 9000).unwrap();
        let text = warning.to_string();
        assert!(text.contains("9000 MB, 119% more"), "{text}");
        assert!(text.contains("gpu-manager forget vidi"), "{text}");

        let dir = tempfile::tempdir().unwrap();
        let mut store = Footprints::empty(dir.path());
        let spec = spec("vidi", 4096, 40, vec![2]);
        assert_eq!(store.warning(&spec, Some(4096)), None);
        assert!(store.warning(&spec, Some(5000)).is_some(), "observed now");
        store.observe_peak(&vidi, 9000);
        assert_eq!(store.warning(&spec, None).unwrap().observed_mb, 9000);
        let table = store.render(&inventory());
        assert!(
            table.contains(
                "vidi: declared 4096 MB, learned peak 9000 MB, residual -; budgeted at 9000 MB"
            ),
            "{table}"
        );
    }
}
