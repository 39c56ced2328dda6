//! Reloading the config (docs/ARCHITECTURE.md, "Reloading the config"): what a reload
//! is asked with, what it answers, and what status says of the config in force. The
//! loop applies the difference (src/reconcile/reload.rs); SIGHUP, `POST /gpu/reload`,
//! `gpu-manager reload` and `serve --watch-config` ask for it.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::diff::{ConfigDiff, ServiceChange};

/// What becomes of the processes of services a reload removes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RemovedServices {
    /// Stopped (drained first, like any stop), then forgotten.
    #[default]
    Stop,
    /// Left running, unmanaged (`?keep_removed=true`).
    Keep,
}

/// Who asked for a reload, for the log and the event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReloadTrigger {
    Signal,
    Api,
    FileWatch,
}

/// One service a reload changed, with the keys that changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangedService {
    pub service: String,
    pub keys: Vec<String>,
}

/// What a reload did: the answer of `POST /gpu/reload`, and the `config_reloaded` event.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadReport {
    /// The config's generation now: 1 for the one the daemon started with.
    pub generation: u64,
    pub sha256: String,
    /// Managed from now on (adopted if they ran already).
    pub added: Vec<String>,
    /// Being stopped (drained first), then forgotten.
    pub removed: Vec<String>,
    /// Removed with `keep_removed`: left running, unmanaged.
    pub kept_removed: Vec<String>,
    /// Running with a launch key changed: restarted (drained first), cause
    /// `config_changed`.
    pub restarted: Vec<ChangedService>,
    /// Changed in place: budget and placement keys, or launch keys of a service that
    /// does not run (it starts the new way next time).
    pub changed: Vec<ChangedService>,
    /// Global keys applied live (`gpu.reserve_mb`, `resync_ms`...).
    pub globals: Vec<String>,
}

impl ReloadReport {
    /// The report's service lists for `diff`; `running` says whether a service whose
    /// launch changed runs (it is restarted) or not (it changes in place).
    pub fn of(diff: &ConfigDiff, removed: RemovedServices, running: impl Fn(&str) -> bool) -> Self {
        let mut report = ReloadReport {
            globals: owned(&diff.globals),
            ..Default::default()
        };
        for (name, change) in &diff.services {
            let service = name.to_string();
            let changed = |keys: &[&'static str]| ChangedService {
                service: service.clone(),
                keys: owned(keys),
            };
            match change {
                ServiceChange::Added => report.added.push(service),
                ServiceChange::Removed => match removed {
                    RemovedServices::Stop => report.removed.push(service),
                    RemovedServices::Keep => report.kept_removed.push(service),
                },
                ServiceChange::Relaunch { keys } if running(&service) => {
                    report.restarted.push(changed(keys))
                }
                ServiceChange::Relaunch { keys } | ServiceChange::Live { keys } => {
                    report.changed.push(changed(keys))
                }
            }
        }
        report
    }
}

impl ReloadReport {
    /// The report in one line, for the CLI and the event stream.
    pub fn summary(&self) -> String {
        let services = |list: &[ChangedService]| {
            list.iter()
                .map(|c| format!("{} ({})", c.service, c.keys.join(", ")))
                .collect::<Vec<_>>()
        };
        let parts = [
            ("added", self.added.clone()),
            ("removed", self.removed.clone()),
            ("kept running unmanaged", self.kept_removed.clone()),
            ("restarting", services(&self.restarted)),
            ("changed", services(&self.changed)),
            ("globals", self.globals.clone()),
        ];
        let said: Vec<String> = parts
            .iter()
            .filter(|(_, list)| !list.is_empty())
            .map(|(what, list)| format!("{what}: {}", list.join(", ")))
            .collect();
        match said.is_empty() {
            true => format!("generation {}: nothing changed", self.generation),
            false => format!("generation {}: {}", self.generation, said.join("; ")),
        }
    }
}

fn owned(keys: &[&'static str]) -> Vec<String> {
    keys.iter().map(|k| (*k).to_owned()).collect()
}

/// The config in force, for status.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigStatus {
    pub path: PathBuf,
    /// When the config in force was loaded, milliseconds since the epoch.
    pub loaded_at_ms: u64,
    /// 1 for the config the daemon started with, one more for each reload that
    /// changed something.
    pub generation: u64,
    /// Of the file's bytes as loaded; empty if it could not be read back at start.
    pub sha256: String,
    /// Why the last reload was refused (file:line:col and the key), until one succeeds.
    pub error: Option<String>,
}

impl ConfigStatus {
    /// The config the daemon started with, read at `path`.
    pub fn at_start(path: &Path, loaded_at_ms: u64) -> Self {
        Self {
            path: path.to_owned(),
            loaded_at_ms,
            generation: 1,
            sha256: std::fs::read(path).map(|b| sha256(&b)).unwrap_or_default(),
            error: None,
        }
    }
}

/// The hex SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::config::ServiceName;

    fn name(s: &str) -> ServiceName {
        ServiceName::parse(s).unwrap()
    }

    #[test]
    fn the_report_says_what_was_done_to_each_service() {
        let diff = ConfigDiff {
            services: BTreeMap::from([
                (name("a"), ServiceChange::Added),
                (name("b"), ServiceChange::Removed),
                (
                    name("c"),
                    ServiceChange::Relaunch {
                        keys: vec!["command"],
                    },
                ),
                (name("d"), ServiceChange::Relaunch { keys: vec!["env"] }),
                (
                    name("e"),
                    ServiceChange::Live {
                        keys: vec!["priority"],
                    },
                ),
            ]),
            globals: vec!["resync_ms"],
        };
        let report = ReloadReport::of(&diff, RemovedServices::Keep, |s| s == "c");
        assert_eq!(report.added, ["a"]);
        assert!(report.removed.is_empty());
        assert_eq!(report.kept_removed, ["b"]);
        assert_eq!(report.restarted.len(), 1);
        assert_eq!(report.restarted[0].service, "c");
        let changed: Vec<&str> = report.changed.iter().map(|c| c.service.as_str()).collect();
        assert_eq!(changed, ["d", "e"]);
        assert_eq!(report.globals, ["resync_ms"]);
        let report = ReloadReport::of(&diff, RemovedServices::Stop, |_| false);
        assert_eq!(report.removed, ["b"]);
    }

    #[test]
    fn sha256_is_the_hex_digest() {
        assert_eq!(
            sha256(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
