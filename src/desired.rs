//! The desired-state file (`desired-state/state.yaml`): what people and the API want.
//!
//! It is the single source of truth for "what should run": the API rewrites it
//! atomically, people edit it by hand, and the daemon watches its folder. A broken edit
//! is refused and the last good state stays in force.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::config::{Inventory, Phase, ServiceName};

/// `phase` + `pinned` - `held`: the contract's desired state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DesiredState {
    #[serde(default)]
    pub phase: Option<Phase>,
    #[serde(default)]
    pub pinned: Vec<ServiceName>,
    #[serde(default)]
    pub held: Vec<ServiceName>,
}

/// Why a service is wanted running; carried into plan reasons.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WantReason {
    Phase(Phase),
    Pinned,
}

#[derive(Debug, thiserror::Error)]
pub enum DesiredError {
    #[error("cannot read desired state {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("desired state {path} is not valid YAML for {{phase, pinned, held}}: {detail}; the last good state stays in force")]
    Malformed { path: PathBuf, detail: String },
    #[error("desired state {path}: {detail}; the last good state stays in force")]
    Unknown { path: PathBuf, detail: String },
    #[error("cannot write desired state {path}: {source}")]
    Write {
        path: PathBuf,
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
        Ok(())
    }

    /// The wanted set: phase services + pinned - held, each with why it is wanted.
    pub fn wanted(&self, inventory: &Inventory) -> BTreeMap<ServiceName, WantReason> {
        let mut wanted = BTreeMap::new();
        if let Some(phase) = self.phase {
            for service in inventory.in_phase(phase) {
                wanted.insert(service.name.clone(), WantReason::Phase(phase));
            }
        }
        for name in &self.pinned {
            wanted.entry(name.clone()).or_insert(WantReason::Pinned);
        }
        for name in &self.held {
            wanted.remove(name);
        }
        wanted
    }

    pub fn to_yaml(&self) -> String {
        let mut text = String::from(
            "# Desired state for gpu-manager: phase services + pinned - held.\n\
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

/// Loads and checks the file; a missing file is the empty desired state.
pub fn load(path: &Path, inventory: &Inventory) -> Result<DesiredState, DesiredError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(source) => {
            return Err(DesiredError::Read {
                path: path.to_owned(),
                source,
            })
        }
    };
    let state = DesiredState::parse(path, &text)?;
    state.check_against(path, inventory)?;
    Ok(state)
}

/// Writes the file so that a reader sees the old or the new content, never half of it:
/// a temp file in the same folder, fsync, rename, then fsync the folder.
pub fn write_atomic(path: &Path, state: &DesiredState) -> Result<(), DesiredError> {
    let fail = |source| DesiredError::Write {
        path: path.to_owned(),
        source,
    };
    let folder = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(folder).map_err(fail)?;
    let temp = temp_path(path);
    let mut file = std::fs::File::create(&temp).map_err(fail)?;
    file.write_all(state.to_yaml().as_bytes()).map_err(fail)?;
    file.sync_all().map_err(fail)?;
    drop(file);
    std::fs::rename(&temp, path).map_err(fail)?;
    std::fs::File::open(folder)
        .and_then(|dir| dir.sync_all())
        .map_err(fail)
}

fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp"))
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
    let folder = path.parent().unwrap_or(Path::new(".")).to_owned();
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
