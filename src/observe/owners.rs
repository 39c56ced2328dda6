//! Which service a GPU process belongs to: the one whose process tree holds it (see
//! [`ProcessTable::root_among`]), or else the one whose container's cgroup it runs in.
//! The cgroup catches what a container runs beside its main process, such as a
//! `docker exec`, whose parent is the engine's shim rather than the container's init.

use std::collections::HashMap;
use std::fs;

use crate::observe::process::ProcessTable;

/// The running services' claims: root pids and container ids.
#[derive(Debug, Clone)]
pub struct Owners<T> {
    roots: HashMap<u32, T>,
    containers: Vec<(String, T)>,
}

impl<T> Default for Owners<T> {
    fn default() -> Self {
        Self {
            roots: HashMap::new(),
            containers: Vec::new(),
        }
    }
}

impl<T: Clone> Owners<T> {
    /// `owner` holds the process tree under `root_pid` and the processes of the
    /// container `container_id`.
    pub fn claim(&mut self, owner: T, root_pid: Option<u32>, container_id: Option<&str>) {
        if let Some(pid) = root_pid {
            self.roots.insert(pid, owner.clone());
        }
        if let Some(id) = container_id {
            self.containers.push((id.to_owned(), owner));
        }
    }

    /// Who holds `pid`: by its process tree first, then by its cgroup.
    pub fn owner_of(&self, table: &ProcessTable, pid: u32) -> Option<&T> {
        table
            .root_among(pid, &self.roots)
            .or_else(|| self.by_cgroup(pid))
    }

    fn by_cgroup(&self, pid: u32) -> Option<&T> {
        if self.containers.is_empty() {
            return None;
        }
        let cgroup = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
        self.containers
            .iter()
            .find(|(id, _)| cgroup_names_container(&cgroup, id))
            .map(|(_, owner)| owner)
    }
}

/// Whether a `/proc/<pid>/cgroup` text puts the process in the container `id`: a path
/// component that is the id (Docker's cgroupfs driver: `/docker/<id>`) or a scope named
/// after it (the systemd driver: `docker-<id>.scope`), in cgroup v1 or v2 lines
/// (`hierarchy:controllers:path`). Ids shorter than Docker's short form never match.
pub fn cgroup_names_container(cgroup: &str, id: &str) -> bool {
    if id.len() < 12 {
        return false;
    }
    let scope = format!("-{id}.scope");
    cgroup
        .lines()
        .filter_map(|line| line.splitn(3, ':').nth(2))
        .flat_map(|path| path.split('/'))
        .any(|part| part == id || part.ends_with(&scope))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "1f6a5511b154001039623aebf2b75145f9f5702f8e062267b9043460a3bba14b";

    #[test]
    fn finds_the_container_in_cgroupfs_and_systemd_layouts() {
        let v1 = format!("9:name=systemd:/docker/{ID}\n4:memory:/docker/{ID}\n0::/\n");
        assert!(cgroup_names_container(&v1, ID));
        let v2 = format!("0::/system.slice/docker-{ID}.scope\n");
        assert!(cgroup_names_container(&v2, ID));
        let nested = format!("0::/kubepods/burstable/pod1/cri-containerd-{ID}.scope\n");
        assert!(cgroup_names_container(&nested, ID));
    }

    #[test]
    fn other_cgroups_and_short_ids_do_not_match() {
        let host = "4:memory:/process_api/f440d3a45a8ac54e1ffa3419913909b7\n0::/\n";
        assert!(!cgroup_names_container(host, ID));
        let other = format!("0::/docker/{}\n", ID.replace('1', "2"));
        assert!(!cgroup_names_container(&other, ID));
        assert!(!cgroup_names_container("0::/docker/\n", ""));
        assert!(!cgroup_names_container(
            &format!("0::/docker/{ID}\n"),
            &ID[..8]
        ));
    }

    #[test]
    fn the_process_tree_claims_before_the_cgroup() {
        let table = ProcessTable::read().unwrap();
        let me = std::process::id();
        let mut owners = Owners::default();
        owners.claim("tree", Some(me), None);
        owners.claim("container", None, Some(ID));
        assert_eq!(owners.owner_of(&table, me), Some(&"tree"));
        let mut only_container = Owners::default();
        only_container.claim("container", None, Some(ID));
        assert_eq!(
            only_container.owner_of(&table, me),
            None,
            "this test runs in no container of that id"
        );
    }
}
