//! What a reload would change (docs/ARCHITECTURE.md, "Reloading the config"): the
//! difference between the running config and a new one, service by service. Pure: it
//! decides nothing about what runs; the loop applies it. A service whose launch fields
//! changed must be restarted to take them; budget and placement fields apply live; a
//! global key that the running daemon cannot change (where it listens, its lease, its
//! folders) refuses the whole reload.

use std::collections::BTreeMap;

use super::{Config, Runtime, ServiceName, ServiceSpec};

/// How one service differs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServiceChange {
    /// New in the config: managed from now on (adopted if it runs already).
    Added,
    /// Gone from the config: stopped and forgotten (or left running, unmanaged).
    Removed,
    /// How it is launched changed: a running instance is restarted to take it. Lists
    /// the keys that changed, and any others that did too.
    Relaunch { keys: Vec<&'static str> },
    /// Only what the planner and the checks read changed: applied live, no restart.
    Live { keys: Vec<&'static str> },
}

/// The difference between two configs that a running daemon can apply.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigDiff {
    /// Services that differ; those missing here are unchanged.
    pub services: BTreeMap<ServiceName, ServiceChange>,
    /// Global keys that changed and apply live (`gpu.reserve_mb`, `resync_ms`...).
    pub globals: Vec<&'static str>,
}

impl ConfigDiff {
    pub fn is_empty(&self) -> bool {
        self.services.is_empty() && self.globals.is_empty()
    }
}

/// A reload that only a restart can apply: these keys changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{} cannot change while the daemon runs: restart it to apply (systemctl restart gpu-manager), or put back the running value",
    keys.join(", ")
)]
pub struct NeedsRestart {
    pub keys: Vec<&'static str>,
}

/// What changes from `old` to `new`, or the keys that need a restart.
pub fn diff(old: &Config, new: &Config) -> Result<ConfigDiff, NeedsRestart> {
    let fixed = changed_keys(&[
        ("api.listen", old.api.listen == new.api.listen),
        ("api.token_file", old.api.token_file == new.api.token_file),
        ("lease", old.lease == new.lease),
        ("desired_state", old.desired_state == new.desired_state),
        ("state_dir", old.state_dir == new.state_dir),
        ("gpu.index", old.gpu.index == new.gpu.index),
        (
            "gpu.nvml_library",
            old.gpu.nvml_library == new.gpu.nvml_library,
        ),
        (
            "gpu.cuda_library",
            old.gpu.cuda_library == new.gpu.cuda_library,
        ),
        ("gpu.simulated", old.gpu.simulated == new.gpu.simulated),
    ]);
    if !fixed.is_empty() {
        return Err(NeedsRestart { keys: fixed });
    }
    let globals = changed_keys(&[
        ("gpu.reserve_mb", old.gpu.reserve_mb == new.gpu.reserve_mb),
        ("gpu.total_mb", old.gpu.total_mb == new.gpu.total_mb),
        (
            "gpu.reclaim_timeout_ms",
            old.gpu.reclaim_timeout == new.gpu.reclaim_timeout,
        ),
        ("resync_ms", old.resync == new.resync),
        (
            "shutdown_timeout_ms",
            old.shutdown_timeout == new.shutdown_timeout,
        ),
    ]);
    let mut services = BTreeMap::new();
    for spec in old.inventory.iter() {
        let change = match new.inventory.get(&spec.name) {
            None => Some(ServiceChange::Removed),
            Some(next) => service_change(spec, next),
        };
        if let Some(change) = change {
            services.insert(spec.name.clone(), change);
        }
    }
    for spec in new.inventory.iter() {
        if old.inventory.get(&spec.name).is_none() {
            services.insert(spec.name.clone(), ServiceChange::Added);
        }
    }
    Ok(ConfigDiff { services, globals })
}

/// How a service kept by the new config differs, if it does.
fn service_change(old: &ServiceSpec, new: &ServiceSpec) -> Option<ServiceChange> {
    let launch = launch_keys(&old.runtime, &new.runtime);
    let mut keys = launch.clone();
    keys.extend(changed_keys(&[
        ("vram_mb", old.vram_mb == new.vram_mb),
        ("priority", old.priority == new.priority),
        ("phases", old.phases == new.phases),
        ("health", old.health == new.health),
        ("start_timeout_ms", old.start_timeout == new.start_timeout),
        ("stop_timeout_ms", old.stop_timeout == new.stop_timeout),
        ("park", old.park == new.park),
        ("drain", old.drain == new.drain),
        // The proxy follows the config in force (docs/ARCHITECTURE.md, "Reloading the
        // config"): a new listen address is bound before the reload is accepted.
        ("proxy", old.proxy == new.proxy),
        ("log", !log_changed(&old.runtime, &new.runtime)),
    ]));
    match (launch.is_empty(), keys.is_empty()) {
        (_, true) => None,
        (false, false) => Some(ServiceChange::Relaunch { keys }),
        (true, false) => Some(ServiceChange::Live { keys }),
    }
}

/// The launch keys that differ: what a running instance was started with.
fn launch_keys(old: &Runtime, new: &Runtime) -> Vec<&'static str> {
    match (old, new) {
        (Runtime::Native(a), Runtime::Native(b)) => changed_keys(&[
            ("command", a.command == b.command),
            ("workdir", a.workdir == b.workdir),
            ("env", a.env == b.env),
            ("match", a.match_pattern == b.match_pattern),
        ]),
        (Runtime::Docker(a), Runtime::Docker(b)) => {
            changed_keys(&[("container", a.container == b.container)])
        }
        _ => vec!["kind"],
    }
}

/// Whether a native service's output goes elsewhere: read at each start, so it applies
/// live (a change of kind says the rest).
fn log_changed(old: &Runtime, new: &Runtime) -> bool {
    match (old, new) {
        (Runtime::Native(a), Runtime::Native(b)) => a.log != b.log,
        _ => false,
    }
}

/// The keys whose values are not the same.
fn changed_keys(keys: &[(&'static str, bool)]) -> Vec<&'static str> {
    keys.iter()
        .filter(|(_, same)| !same)
        .map(|(key, _)| *key)
        .collect()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    const BASE: &str = "services:
  comfyui: { kind: native, command: [\"comfyui\"], vram_mb: 20480, priority: 100, phases: [4], health: { url: \"http://127.0.0.1:8188/\" } }
  cosyvoice: { kind: docker, container: mcn_cosyvoice, vram_mb: 4096, priority: 50, phases: [3] }
  vidi: { kind: native, command: [\"vidi\"], vram_mb: 4096, priority: 40, phases: [2] }
";

    fn config(text: &str) -> Config {
        Config::parse(Path::new("/etc/gpu/config.yaml"), text)
            .unwrap_or_else(|e| panic!("{e}\n{text}"))
    }

    fn name(s: &str) -> ServiceName {
        ServiceName::parse(s).unwrap()
    }

    fn diff_to(text: &str) -> Result<ConfigDiff, NeedsRestart> {
        diff(&config(BASE), &config(text))
    }

    #[test]
    fn the_same_config_changes_nothing() {
        assert!(diff_to(BASE).unwrap().is_empty());
    }

    #[test]
    fn budget_and_placement_fields_apply_live() {
        let text = BASE
            .replace("priority: 40", "priority: 45")
            .replace("8188/\"", "8188/\", timeout_ms: 3000");
        let diff = diff_to(&text).unwrap();
        assert_eq!(
            diff.services,
            BTreeMap::from([
                (
                    name("comfyui"),
                    ServiceChange::Live {
                        keys: vec!["health"]
                    }
                ),
                (
                    name("vidi"),
                    ServiceChange::Live {
                        keys: vec!["priority"]
                    }
                ),
            ])
        );
    }

    #[test]
    fn a_proxy_added_moved_or_retuned_applies_live() {
        let proxied = |proxy: &str| {
            BASE.replace(
                "priority: 40, phases: [2]",
                &format!("priority: 40, phases: [2], proxy: {{ {proxy} }}"),
            )
        };
        let on_9100 = proxied("listen: \"127.0.0.1:9100\", upstream: \"http://127.0.0.1:9101\"");
        let live = Some(ServiceChange::Live {
            keys: vec!["proxy"],
        });
        assert_eq!(
            diff_to(&on_9100)
                .unwrap()
                .services
                .get(&name("vidi"))
                .cloned(),
            live
        );
        for changed in [
            on_9100.replace("9100", "9200"),
            on_9100.replace("9101", "9201"),
            on_9100.replace("9101\" }", "9101\", max_queue: 3, idle_ms: 1000 }"),
        ] {
            let diff = diff(&config(&on_9100), &config(&changed)).unwrap();
            assert_eq!(diff.services.get(&name("vidi")).cloned(), live, "{changed}");
            assert!(diff.globals.is_empty());
        }
    }

    #[test]
    fn launch_fields_need_a_relaunch_and_say_what_else_changed() {
        let text = BASE.replace(
            "command: [\"vidi\"], vram_mb: 4096",
            "command: [\"vidi\", \"--fast\"], vram_mb: 5000",
        );
        let diff = diff_to(&text).unwrap();
        assert_eq!(
            diff.services[&name("vidi")],
            ServiceChange::Relaunch {
                keys: vec!["command", "vram_mb"]
            }
        );
        let text = BASE.replace("container: mcn_cosyvoice", "container: cosy2");
        assert_eq!(
            diff_to(&text).unwrap().services[&name("cosyvoice")],
            ServiceChange::Relaunch {
                keys: vec!["container"]
            }
        );
        let text = BASE.replace(
            "kind: docker, container: mcn_cosyvoice",
            "kind: native, command: [\"cosyvoice\"]",
        );
        assert_eq!(
            diff_to(&text).unwrap().services[&name("cosyvoice")],
            ServiceChange::Relaunch { keys: vec!["kind"] }
        );
    }

    #[test]
    fn added_and_removed_services_are_listed() {
        let text = BASE.replace(
            "  vidi: { kind: native, command: [\"vidi\"], vram_mb: 4096, priority: 40, phases: [2] }\n",
            "  ollama: { kind: native, command: [\"ollama\", \"serve\"], vram_mb: 8192, priority: 10, phases: [] }\n",
        );
        let diff = diff_to(&text).unwrap();
        assert_eq!(diff.services[&name("vidi")], ServiceChange::Removed);
        assert_eq!(diff.services[&name("ollama")], ServiceChange::Added);
        assert_eq!(diff.services.len(), 2);
    }

    #[test]
    fn global_keys_apply_live_unless_the_daemon_cannot_change_them() {
        let text = format!("gpu:\n  reserve_mb: 1024\nresync_ms: 500\n{BASE}");
        assert_eq!(
            diff_to(&text).unwrap().globals,
            ["gpu.reserve_mb", "resync_ms"]
        );
        let text = format!("api:\n  listen: \"127.0.0.1:9000\"\nstate_dir: /var/lib/other\n{BASE}");
        let error = diff_to(&text).unwrap_err();
        assert_eq!(error.keys, ["api.listen", "state_dir"]);
        assert!(error.to_string().contains("restart"), "{error}");
    }
}
