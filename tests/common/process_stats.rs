//! What a running daemon holds, read from /proc: memory, file descriptors, threads and
//! unreaped children, for the orphan and soak tests.

use std::collections::BTreeSet;
use std::fs;

use super::api::Api;

/// One reading of a process's resources.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub rss_kb: u64,
    /// The private part of `rss_kb`: the heap, stacks. Its rest is file-backed (the
    /// executable's code and data pages, faulted in as code paths first run).
    pub rss_anon_kb: u64,
    pub fds: usize,
    pub threads: usize,
    pub zombies: usize,
}

/// Reads `pid`'s resident memory, open fds, threads and zombie children.
pub fn usage(pid: u32) -> Usage {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("process status");
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|value| value.parse().ok())
            .unwrap_or_else(|| panic!("{name} in /proc/{pid}/status"))
    };
    Usage {
        rss_kb: field("VmRSS:"),
        rss_anon_kb: field("RssAnon:"),
        fds: fs::read_dir(format!("/proc/{pid}/fd"))
            .expect("fds")
            .count(),
        threads: field("Threads:") as usize,
        zombies: zombie_children(pid).len(),
    }
}

/// The pids of `parent`'s children that have exited but are not reaped yet.
pub fn zombie_children(parent: u32) -> BTreeSet<u32> {
    let mut zombies = BTreeSet::new();
    for entry in fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // After the command name in parentheses: state, then the parent's pid.
        let mut fields = stat
            .rsplit_once(')')
            .map_or("", |(_, rest)| rest)
            .split_whitespace();
        let state = fields.next();
        let ppid: Option<u32> = fields.next().and_then(|p| p.parse().ok());
        if state == Some("Z") && ppid == Some(parent) {
            zombies.insert(pid);
        }
    }
    zombies
}

/// The value of an unlabelled metric from `GET /metrics`.
pub fn metric(api: &Api, name: &str) -> f64 {
    let text = api.get("/metrics").body;
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("{name} in /metrics:\n{text}"))
}
