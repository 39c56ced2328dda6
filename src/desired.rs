//! The desired-state file (`desired-state/state.yaml`): what people and the API want.
//!
//! It is the single source of truth for "what should run": the API rewrites it
//! atomically, people edit it by hand, and the daemon watches its folder. A broken edit,
//! or a deleted file, is refused and the last good state stays in force.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::config::{Inventory, Phase, ServiceName};
use crate::durable::{self, folder_of, WriteError};
use crate::utc::UtcTime;

pub mod claims;
pub use claims::{Claim, ClaimEnd, Holder};

/// `phase` + `pinned` - `held` + `claims`: the contract's desired state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DesiredState {
    #[serde(default)]
    pub phase: Option<Phase>,
    #[serde(default)]
    pub pinned: Vec<ServiceName>,
    #[serde(default)]
    pub held: Vec<ServiceName>,
    /// Services protected for a holder until a time (docs/ARCHITECTURE.md, "Claims").
    /// Written only when there are some, so files without claims read as before.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub claims: Vec<Claim>,
}

/// Why a service is wanted running; carried into plan reasons.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WantReason {
    Phase(Phase),
    Pinned,
    /// A live claim protects it.
    Claimed,
    /// Its proxy sees it used (src/demand.rs).
    Demanded,
}

#[derive(Debug, thiserror::Error)]
pub enum DesiredError {
    /// Deleting the file is treated like a broken edit: stopping every service because
    /// a file went missing would cost the user every loaded model.
    #[error("desired state {path} is missing; the last good state stays in force: write it again (e.g. `phase: null` to stop everything), or POST a change to the API")]
    Missing { path: PathBuf },
    #[error("cannot read desired state {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("desired state {path} is not valid YAML for {{phase, pinned, held, claims}}: {detail}; the last good state stays in force")]
    Malformed { path: PathBuf, detail: String },
    #[error("desired state {path}: {detail}; the last good state stays in force")]
    Unknown { path: PathBuf, detail: String },
    /// The write failed before the new file replaced the old one.
    #[error("cannot write desired state {path}: {source}; nothing was changed")]
    NotWritten {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The new file replaced the old one, but syncing its folder failed: the new state
    /// is in force, and a power loss now could bring the old file back.
    #[error("desired state {path} was replaced with the new state, but its folder {folder} could not be synced ({source}): the new state is in force but may not survive a power loss")]
    NotDurable {
        path: PathBuf,
        folder: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot watch {path}: {detail}")]
    Watch { path: PathBuf, detail: String },
}

impl DesiredState {
    /// Parses file text; an empty file means "nothing wanted".
    pub fn parse(path: &Path, text: &str) -> Result<Self, DesiredError> {
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        serde_yaml::from_str(text).map_err(|e| DesiredError::Malformed {
            path: path.to_owned(),
            detail: e.to_string(),
        })
    }

    /// Refuses names and phases the inventory does not know, listing the known ones.
    pub fn check_against(&self, path: &Path, inventory: &Inventory) -> Result<(), DesiredError> {
        let unknown = |detail: String| DesiredError::Unknown {
            path: path.to_owned(),
            detail,
        };
        if let Some(phase) = self.phase {
            let known = inventory.phases();
            if !known.contains(&phase) {
                return Err(unknown(format!(
                    "phase {phase} is unknown: known phases are {}",
                    join(known.iter())
                )));
            }
        }
        for (list, names) in [("pinned", &self.pinned), ("held", &self.held)] {
            if let Some(name) = names.iter().find(|n| inventory.get(n).is_none()) {
                return Err(unknown(format!(
                    "{list} names unknown service {name:?}: known services are {}",
                    join(inventory.names().iter())
                )));
            }
        }
        if let Some(claim) = self
            .claims
            .iter()
            .find(|c| inventory.get(&c.service).is_none())
        {
            return Err(unknown(format!(
                "claims name unknown service {:?}: known services are {}",
                claim.service.as_str(),
                join(inventory.names().iter())
            )));
        }
        for (i, claim) in self.claims.iter().enumerate() {
            let twice = self.claims[..i]
                .iter()
                .any(|c| c.service == claim.service && c.holder == claim.holder);
            if twice {
                return Err(unknown(format!(
                    "claims list {} by {:?} twice: one claim per service and holder",
                    claim.service,
                    claim.holder.as_str()
                )));
            }
        }
        Ok(())
    }

    /// The wanted set: phase services + pinned - held + claimed, each with why it is
    /// wanted. A claim outweighs a hold: it is what someone needs now. Claims are taken
    /// as live: the loop prunes expired ones before planning ([`Self::prune_expired`]).
    pub fn wanted(&self, inventory: &Inventory) -> BTreeMap<ServiceName, WantReason> {
        self.wanted_with(inventory, &BTreeSet::new())
    }

    /// [`Self::wanted`] with the services the proxy sees used: phase + pinned +
    /// demanded - held + claimed (docs/ARCHITECTURE.md, "The demand proxy"). A hold
    /// outweighs demand: a held service's proxy refuses its requests.
    pub fn wanted_with(
        &self,
        inventory: &Inventory,
        demanded: &BTreeSet<ServiceName>,
    ) -> BTreeMap<ServiceName, WantReason> {
        let mut wanted = BTreeMap::new();
        if let Some(phase) = self.phase {
            for service in inventory.in_phase(phase) {
                wanted.insert(service.name.clone(), WantReason::Phase(phase));
            }
        }
        for name in &self.pinned {
            wanted.entry(name.clone()).or_insert(WantReason::Pinned);
        }
        for name in demanded {
            wanted.entry(name.clone()).or_insert(WantReason::Demanded);
        }
        for name in &self.held {
            wanted.remove(name);
        }
        for claim in &self.claims {
            wanted.insert(claim.service.clone(), WantReason::Claimed);
        }
        wanted
    }

    /// The claims on one service.
    pub fn claims_on<'a>(&'a self, service: &'a ServiceName) -> impl Iterator<Item = &'a Claim> {
        self.claims.iter().filter(move |c| c.service == *service)
    }

    pub fn is_claimed(&self, service: &ServiceName) -> bool {
        self.claims_on(service).next().is_some()
    }

    /// Drops the claims whose time ran out by `now`, returning them.
    pub fn prune_expired(&mut self, now: UtcTime) -> Vec<Claim> {
        let (live, expired) = std::mem::take(&mut self.claims)
            .into_iter()
            .partition(|c| c.lives_at(now));
        self.claims = live;
        expired
    }

    /// The earliest time a claim ends, when one lives.
    pub fn next_expiry(&self) -> Option<UtcTime> {
        self.claims.iter().map(|c| c.until).min()
    }

    /// Takes a claim, or renews the holder's claim on that service to the new time.
    pub fn claim(&mut self, claim: Claim) {
        match self
            .claims
            .iter_mut()
            .find(|c| c.service == claim.service && c.holder == claim.holder)
        {
            Some(existing) => existing.until = claim.until,
            None => self.claims.push(claim),
        }
    }

    /// Ends `holder`'s claim on `service`; false when there was none.
    pub fn release(&mut self, service: &ServiceName, holder: &Holder) -> bool {
        let before = self.claims.len();
        self.claims
            .retain(|c| !(c.service == *service && c.holder == *holder));
        self.claims.len() != before
    }

    /// Ends every claim on `service` (a forced stop), returning them.
    pub fn end_claims(&mut self, service: &ServiceName) -> Vec<Claim> {
        let (ended, kept) = std::mem::take(&mut self.claims)
            .into_iter()
            .partition(|c| c.service == *service);
        self.claims = kept;
        ended
    }

    pub fn to_yaml(&self) -> String {
        let mut text = String::from(
            "# Desired state for gpu-manager: phase services + pinned - held + claims.\n\
             # Edit by hand or through the API; a broken edit is refused and the last good state kept.\n",
        );
        text.push_str(&serde_yaml::to_string(self).unwrap_or_default());
        text
    }

    /// Pins a service (the API's start): removes it from `held`.
    pub fn pin(&mut self, name: &ServiceName) {
        self.held.retain(|n| n != name);
        if !self.pinned.contains(name) {
            self.pinned.push(name.clone());
        }
    }

    /// Holds a service stopped (the API's stop): unpins it too.
    pub fn hold(&mut self, name: &ServiceName) {
        self.pinned.retain(|n| n != name);
        if !self.held.contains(name) {
            self.held.push(name.clone());
        }
    }
}

fn join<T: std::fmt::Display>(items: impl Iterator<Item = T>) -> String {
    let list: Vec<String> = items.map(|i| i.to_string()).collect();
    if list.is_empty() {
        "(none)".to_owned()
    } else {
        list.join(", ")
    }
}

/// Loads and checks the file, without the claims expired by now. A missing file is an
/// error, like a broken edit.
pub fn load(path: &Path, inventory: &Inventory) -> Result<DesiredState, DesiredError> {
    load_at(path, inventory, UtcTime::now())
}

/// [`load`] with the claims expired by `now` pruned.
pub fn load_at(
    path: &Path,
    inventory: &Inventory,
    now: UtcTime,
) -> Result<DesiredState, DesiredError> {
    let text = std::fs::read_to_string(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => DesiredError::Missing {
            path: path.to_owned(),
        },
        _ => DesiredError::Read {
            path: path.to_owned(),
            source,
        },
    })?;
    let mut state = DesiredState::parse(path, &text)?;
    state.check_against(path, inventory)?;
    state.prune_expired(now);
    Ok(state)
}

/// What a daemon starting now would follow: the file, or, when there is none, the empty
/// state that [`create_if_missing`] writes at start. Writes nothing (for `plan`).
pub fn load_or_initial(path: &Path, inventory: &Inventory) -> Result<DesiredState, DesiredError> {
    match load(path, inventory) {
        Err(DesiredError::Missing { .. }) => Ok(DesiredState::default()),
        other => other,
    }
}

/// At daemon start, writes the empty desired state (`phase: null`, nothing pinned or
/// held) if there is no file yet, so that people can see and edit it. Returns whether
/// it wrote one.
pub fn create_if_missing(path: &Path) -> Result<bool, DesiredError> {
    if path.try_exists().unwrap_or(true) {
        return Ok(false);
    }
    write_atomic(path, &DesiredState::default())?;
    tracing::info!(path = %path.display(), "no desired state yet: wrote an empty one (phase: null) to edit");
    Ok(true)
}

/// Writes the file so that a reader sees the old or the new content, never half of it
/// (see [`durable::write_atomic`]). An error before the rename changed nothing
/// ([`DesiredError::NotWritten`]); one after it left the new state in place
/// ([`DesiredError::NotDurable`]).
pub fn write_atomic(path: &Path, state: &DesiredState) -> Result<(), DesiredError> {
    durable::write_atomic(path, state.to_yaml().as_bytes()).map_err(|error| match error {
        WriteError::NotWritten(source) => DesiredError::NotWritten {
            path: path.to_owned(),
            source,
        },
        WriteError::NotDurable { folder, source } => DesiredError::NotDurable {
            path: path.to_owned(),
            folder,
            source,
        },
    })
}

/// [`write_atomic`] on a blocking thread: it waits on fsync, which must not hold up an
/// async worker (the API and the reconciler run on two).
pub async fn save(path: &Path, state: &DesiredState) -> Result<(), DesiredError> {
    let (task_path, state) = (path.to_owned(), state.clone());
    match tokio::task::spawn_blocking(move || write_atomic(&task_path, &state)).await {
        Ok(result) => result,
        Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
        // Only a runtime shutting down cancels a blocking task, and only before it ran.
        Err(error) => Err(DesiredError::NotWritten {
            path: path.to_owned(),
            source: std::io::Error::other(error.to_string()),
        }),
    }
}

/// Keeps the folder watch alive; dropping it stops watching.
pub struct FileWatch {
    _watcher: RecommendedWatcher,
}

/// How long to gather file events into one reload: editors write a file in several
/// steps (truncate, write, rename), and one reload per edit is enough.
pub const DEBOUNCE: Duration = Duration::from_millis(30);

/// Watches the folder of `path` (editors replace files by rename, so watching the file
/// itself would lose the watch) and sends a trigger whenever the file may have changed.
/// Reads are not changes: the daemon's own reads of the file must not trigger a reload.
pub fn watch(path: &Path, trigger: mpsc::Sender<()>) -> Result<FileWatch, DesiredError> {
    let fail = |detail: String| DesiredError::Watch {
        path: path.to_owned(),
        detail,
    };
    let folder = folder_of(path).to_owned();
    std::fs::create_dir_all(&folder).map_err(|e| fail(e.to_string()))?;
    let file_name = path.file_name().map(|n| n.to_owned());
    let mut watcher = notify::recommended_watcher(move |result: notify::Result<notify::Event>| {
        let relevant = match result {
            Ok(event) => {
                !matches!(event.kind, EventKind::Access(_))
                    && event
                        .paths
                        .iter()
                        .any(|p| p.file_name() == file_name.as_deref())
            }
            Err(_) => true,
        };
        if relevant {
            // A full channel already holds a trigger: one reload covers both.
            let _ = trigger.try_send(());
        }
    })
    .map_err(|e| fail(e.to_string()))?;
    watcher
        .watch(&folder, RecursiveMode::NonRecursive)
        .map_err(|e| fail(e.to_string()))?;
    Ok(FileWatch { _watcher: watcher })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn inventory() -> Inventory {
        let text = r#"
services:
  comfyui: { kind: native, command: "x", vram_mb: 20480, priority: 100, phases: [4] }
  cosyvoice: { kind: docker, container: c, vram_mb: 4096, priority: 50, phases: [3] }
  vidi: { kind: native, command: "x", vram_mb: 4096, priority: 40, phases: [2] }
  ollama: { kind: docker, container: o, vram_mb: 18432, priority: 10 }
"#;
        Config::parse(Path::new("/x/c.yaml"), text)
            .unwrap()
            .inventory
    }

    fn name(s: &str) -> ServiceName {
        ServiceName::parse(s).unwrap()
    }

    #[test]
    fn wanted_is_phase_plus_pinned_minus_held() {
        let state = DesiredState {
            phase: Some(3),
            pinned: vec![name("ollama"), name("vidi")],
            held: vec![name("vidi")],
            claims: Vec::new(),
        };
        let wanted = state.wanted(&inventory());
        assert_eq!(wanted.get(&name("cosyvoice")), Some(&WantReason::Phase(3)));
        assert_eq!(wanted.get(&name("ollama")), Some(&WantReason::Pinned));
        assert_eq!(wanted.len(), 2, "{wanted:?}");
    }

    #[test]
    fn unknown_phase_and_service_list_the_known_ones() {
        let path = Path::new("state.yaml");
        let inv = inventory();
        let bad_phase = DesiredState::parse(path, "phase: 9").unwrap();
        let error = bad_phase.check_against(path, &inv).unwrap_err().to_string();
        assert!(
            error.contains("phase 9") && error.contains("2, 3, 4"),
            "{error}"
        );
        let bad_pin = DesiredState::parse(path, "pinned: [nope]").unwrap();
        let error = bad_pin.check_against(path, &inv).unwrap_err().to_string();
        assert!(
            error.contains("nope") && error.contains("comfyui"),
            "{error}"
        );
    }

    #[test]
    fn malformed_text_is_refused() {
        let path = Path::new("state.yaml");
        assert!(DesiredState::parse(path, "phase: [oops").is_err());
        assert!(DesiredState::parse(path, "phase: 3\nextra: 1").is_err());
        assert_eq!(
            DesiredState::parse(path, "").unwrap(),
            DesiredState::default()
        );
    }

    #[test]
    fn a_bad_name_in_the_file_is_refused_as_malformed() {
        let path = Path::new("state.yaml");
        let error = DesiredState::parse(path, "pinned: [ok, \"../Etc\"]")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("\"../Etc\"") && error.contains("[a-z0-9_-]"),
            "{error}"
        );
        assert!(DesiredState::parse(path, "held: [\"\"]").is_err());
    }

    #[test]
    fn atomic_write_round_trips_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.yaml");
        let mut state = DesiredState {
            phase: Some(4),
            ..Default::default()
        };
        state.pin(&name("ollama"));
        state.hold(&name("vidi"));
        write_atomic(&path, &state).unwrap();
        assert_eq!(load(&path, &inventory()).unwrap(), state);
        let files: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(files.len(), 1);
    }

    #[test]
    fn a_missing_file_is_an_error_that_says_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.yaml");
        let error = load(&path, &inventory()).unwrap_err();
        assert!(matches!(error, DesiredError::Missing { .. }), "{error:?}");
        let message = error.to_string();
        assert!(
            message.contains("missing") && message.contains("last good state"),
            "{message}"
        );
        assert_eq!(
            load_or_initial(&path, &inventory()).unwrap(),
            DesiredState::default()
        );
        assert!(!path.exists(), "load_or_initial writes nothing");
    }

    #[test]
    fn create_if_missing_writes_the_empty_state_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("desired-state/state.yaml");
        assert!(create_if_missing(&path).unwrap());
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("phase: null"), "{text}");
        assert_eq!(load(&path, &inventory()).unwrap(), DesiredState::default());
        std::fs::write(&path, "phase: 3\n").unwrap();
        assert!(!create_if_missing(&path).unwrap());
        assert_eq!(load(&path, &inventory()).unwrap().phase, Some(3));
    }

    #[test]
    fn a_failed_write_changes_nothing_and_says_so() {
        let dir = tempfile::tempdir().unwrap();
        // A file where the folder should be: the write fails before any rename.
        let blocker = dir.path().join("not-a-folder");
        std::fs::write(&blocker, "").unwrap();
        let error =
            write_atomic(&blocker.join("state.yaml"), &DesiredState::default()).unwrap_err();
        assert!(
            matches!(error, DesiredError::NotWritten { .. }),
            "{error:?}"
        );
        assert!(error.to_string().contains("nothing was changed"), "{error}");
        assert_eq!(std::fs::read_to_string(&blocker).unwrap(), "");
    }

    #[tokio::test]
    async fn save_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.yaml");
        let state = DesiredState {
            phase: Some(2),
            ..Default::default()
        };
        save(&path, &state).await.unwrap();
        assert_eq!(load(&path, &inventory()).unwrap(), state);
    }

    #[test]
    fn pin_and_hold_are_exclusive() {
        let mut state = DesiredState::default();
        state.hold(&name("ollama"));
        state.pin(&name("ollama"));
        assert_eq!(state.pinned, [name("ollama")]);
        assert!(state.held.is_empty());
        state.hold(&name("ollama"));
        assert!(state.pinned.is_empty());
        assert_eq!(state.held, [name("ollama")]);
    }

    fn claim(service: &str, holder: &str, until: &str) -> Claim {
        Claim {
            service: name(service),
            holder: Holder::parse(holder).unwrap(),
            until: UtcTime::parse(until).unwrap(),
        }
    }

    const CLAIMED: &str = "phase: 3\nclaims:\n  - { service: comfyui, holder: render-job-42, until: \"2026-12-03T10:15:00Z\" }\n";

    #[test]
    fn claims_are_read_and_a_claimed_service_is_wanted_even_when_held() {
        let path = Path::new("state.yaml");
        let mut state = DesiredState::parse(path, CLAIMED).unwrap();
        assert_eq!(
            state.claims,
            [claim("comfyui", "render-job-42", "2026-12-03T10:15:00Z")]
        );
        state.hold(&name("comfyui"));
        let wanted = state.wanted(&inventory());
        assert_eq!(wanted.get(&name("comfyui")), Some(&WantReason::Claimed));
        assert_eq!(wanted.get(&name("cosyvoice")), Some(&WantReason::Phase(3)));
    }

    #[test]
    fn broken_claims_entries_are_refused() {
        let path = Path::new("state.yaml");
        let inv = inventory();
        for (text, why) in [
            (
                "claims: [{service: comfyui, holder: \"\", until: \"2026-12-03T10:15:00Z\"}]",
                "holder",
            ),
            (
                "claims: [{service: comfyui, holder: me, until: \"tomorrow\"}]",
                "RFC 3339",
            ),
            (
                "claims: [{service: comfyui, holder: me, until: \"2026-12-03T10:15:00+02:00\"}]",
                "end in Z",
            ),
            ("claims: [{service: comfyui, holder: me}]", "until"),
            (
                "claims: [{service: comfyui, holder: me, until: \"2026-12-03T10:15:00Z\", x: 1}]",
                "x",
            ),
        ] {
            let error = DesiredState::parse(path, text).unwrap_err().to_string();
            assert!(error.contains(why), "{text}: {error}");
        }
        let unknown = DesiredState::parse(
            path,
            "claims: [{service: nope, holder: me, until: \"2026-12-03T10:15:00Z\"}]",
        )
        .unwrap();
        let error = unknown.check_against(path, &inv).unwrap_err().to_string();
        assert!(
            error.contains("nope") && error.contains("comfyui"),
            "{error}"
        );
        let twice = DesiredState {
            claims: vec![claim("vidi", "me", "2026-12-03T10:15:00Z"); 2],
            ..Default::default()
        };
        let error = twice.check_against(path, &inv).unwrap_err().to_string();
        assert!(error.contains("twice"), "{error}");
    }

    #[test]
    fn expired_claims_are_pruned_when_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.yaml");
        std::fs::write(&path, CLAIMED).unwrap();
        let until = UtcTime::parse("2026-12-03T10:15:00Z").unwrap();
        let before = load_at(&path, &inventory(), until).unwrap();
        assert!(before.claims.is_empty(), "a claim ends at its time");
        let just_before = UtcTime::from_epoch_s(until.epoch_s() - 1);
        let live = load_at(&path, &inventory(), just_before).unwrap();
        assert_eq!(live.claims.len(), 1);
        assert_eq!(live.next_expiry(), Some(until));
    }

    #[test]
    fn a_claim_is_taken_renewed_released_and_written_back_as_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.yaml");
        let mut state = DesiredState::default();
        state.claim(claim("vidi", "a", "2026-12-03T10:15:00Z"));
        state.claim(claim("vidi", "b", "2026-12-03T10:15:00Z"));
        state.claim(claim("vidi", "a", "2026-12-03T11:00:00Z"));
        assert_eq!(
            state.claims,
            [
                claim("vidi", "a", "2026-12-03T11:00:00Z"),
                claim("vidi", "b", "2026-12-03T10:15:00Z")
            ]
        );
        write_atomic(&path, &state).unwrap();
        let early = UtcTime::parse("2026-12-03T09:00:00Z").unwrap();
        assert_eq!(load_at(&path, &inventory(), early).unwrap(), state);
        assert!(!state.release(&name("vidi"), &Holder::parse("c").unwrap()));
        assert!(state.release(&name("vidi"), &Holder::parse("b").unwrap()));
        assert_eq!(state.end_claims(&name("vidi")).len(), 1);
        assert!(!state.is_claimed(&name("vidi")));
        let text = DesiredState::default().to_yaml();
        assert!(!text.contains("claims:"), "no claims, no key: {text}");
    }

    #[tokio::test]
    async fn reading_the_file_does_not_trigger() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.yaml");
        write_atomic(&path, &DesiredState::default()).unwrap();
        let (tx, mut rx) = mpsc::channel(1);
        let _watch = watch(&path, tx).unwrap();
        for _ in 0..5 {
            load(&path, &inventory()).unwrap();
        }
        let trigger = tokio::time::timeout(Duration::from_millis(500), rx.recv()).await;
        assert!(trigger.is_err(), "a read triggered a reload");
    }

    #[tokio::test]
    async fn watch_triggers_on_rename_into_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.yaml");
        let (tx, mut rx) = mpsc::channel(1);
        let _watch = watch(&path, tx).unwrap();
        write_atomic(&path, &DesiredState::default()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("a trigger within 5 s")
            .expect("channel open");
    }
}
