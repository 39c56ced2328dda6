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
    children(parent)
        .into_iter()
        .filter(|child| child.state == "Z")
        .map(|child| child.pid)
        .collect()
}

/// One child process, as its `stat` says.
pub struct ChildProcess {
    pub pid: u32,
    /// "R", "S", "Z" (exited, not reaped)...
    pub state: String,
}

/// `parent`'s child processes.
pub fn children(parent: u32) -> Vec<ChildProcess> {
    pids()
        .filter_map(|pid| {
            let fields = stat_fields(pid)?;
            let ppid: u32 = fields.get(1)?.parse().ok()?;
            (ppid == parent).then(|| ChildProcess {
                pid,
                state: fields[0].clone(),
            })
        })
        .collect()
}

/// Every process's pid.
pub fn pids() -> impl Iterator<Item = u32> {
    fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
}

/// The CPU time (user + system, all threads) `pid` has used so far, in seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    let fields = stat_fields(pid).unwrap_or_else(|| panic!("/proc/{pid}/stat"));
    // utime and stime are fields 14 and 15 of stat.
    let ticks: u64 = [&fields[11], &fields[12]]
        .iter()
        .map(|field| field.parse::<u64>().expect("a tick count"))
        .sum();
    // SAFETY: sysconf takes a constant name and touches no memory of ours.
    let ticks_per_s = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks as f64 / ticks_per_s
}

/// The fields of `/proc/PID/stat` after the command name (which may hold spaces and
/// parentheses): `[0]` is field 3, the state, `[1]` the parent's pid. None once the
/// process is gone.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// The value of an unlabelled metric from `GET /metrics`.
pub fn metric(api: &Api, name: &str) -> f64 {
    let text = api.get("/metrics").body;
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("{name} in /metrics:\n{text}"))
}
