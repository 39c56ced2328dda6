//! A snapshot of /proc: which processes exist, how they are related, and who started
//! when. The daemon uses it to adopt services after a restart, to kill whole process
//! trees, and to attribute a GPU process to the service whose tree holds it.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io;
use std::path::Path;

const PROC: &str = "/proc";

/// One process as /proc described it when the snapshot was taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcInfo {
    pub pid: u32,
    pub ppid: u32,
    pub pgid: u32,
    /// Start time in clock ticks since boot: with the pid, it names a process uniquely
    /// even after the pid is reused.
    pub start_ticks: u64,
    /// Dead but not yet reaped by its parent (or already being torn down).
    pub zombie: bool,
    /// argv joined by spaces; empty for kernel threads.
    pub cmdline: String,
}

impl ProcInfo {
    fn read(pid: u32) -> io::Result<Self> {
        let dir = Path::new(PROC).join(pid.to_string());
        // Bytes, not a string: the command name is whatever the process chose (an
        // executable's file name, prctl(PR_SET_NAME)), UTF-8 or not.
        let stat = fs::read(dir.join("stat"))?;
        let fields = StatFields::parse(&stat).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "unexpected /proc/{pid}/stat: {:?}",
                    String::from_utf8_lossy(&stat)
                ),
            )
        })?;
        let cmdline = fs::read(dir.join("cmdline"))?;
        Ok(ProcInfo {
            pid,
            ppid: fields.ppid,
            pgid: fields.pgid,
            start_ticks: fields.start_ticks,
            zombie: fields.zombie,
            cmdline: join_cmdline(&cmdline),
        })
    }

    /// Its pid and start time, to find it again later without mistaking a reused pid.
    pub fn identity(&self) -> ProcessIdentity {
        ProcessIdentity {
            pid: self.pid,
            start_ticks: self.start_ticks,
        }
    }
}

/// The fields of /proc/<pid>/stat the daemon needs.
#[derive(Debug, PartialEq, Eq)]
struct StatFields {
    zombie: bool,
    ppid: u32,
    pgid: u32,
    start_ticks: u64,
}

impl StatFields {
    /// Parses `pid (comm) state ppid pgrp ... starttime ...`. The command name may hold
    /// spaces, ')' and bytes that are not UTF-8, so the fixed fields start after the
    /// LAST ')', and only they are read as text.
    fn parse(stat: &[u8]) -> Option<Self> {
        let close = stat.iter().rposition(|&b| b == b')')?;
        let after_comm = std::str::from_utf8(&stat[close + 1..]).ok()?;
        let fields: Vec<&str> = after_comm.split_whitespace().collect();
        // Field numbers from proc(5), counted from 1 at the pid; after the command name,
        // field n sits at index n - 3.
        let field = |n: usize| fields.get(n - 3).copied();
        let state = field(3)?;
        Some(StatFields {
            zombie: state == "Z" || state == "X",
            ppid: field(4)?.parse().ok()?,
            pgid: field(5)?.parse().ok()?,
            start_ticks: field(22)?.parse().ok()?,
        })
    }
}

/// argv is NUL-separated (and NUL-terminated) in /proc/<pid>/cmdline.
fn join_cmdline(raw: &[u8]) -> String {
    raw.split(|&b| b == 0)
        .filter(|arg| !arg.is_empty())
        .map(String::from_utf8_lossy)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Every process visible in /proc at one instant (near enough: /proc is read entry by
/// entry, and processes that vanish while it is read are left out).
#[derive(Debug, Clone, Default)]
pub struct ProcessTable {
    processes: HashMap<u32, ProcInfo>,
}

impl ProcessTable {
    /// Reads /proc. Only a failure to list /proc is an error; a process that exits while
    /// it is being read is simply not in the table.
    pub fn read() -> io::Result<Self> {
        let mut processes = HashMap::new();
        for entry in fs::read_dir(PROC)? {
            let Some(pid) = entry?.file_name().to_str().and_then(|s| s.parse().ok()) else {
                continue;
            };
            if let Ok(info) = ProcInfo::read(pid) {
                processes.insert(pid, info);
            }
        }
        Ok(Self { processes })
    }

    /// Reads only `pids` and their ancestors up to init: all that [`Self::root_among`]
    /// needs to attribute those processes, at a few reads each instead of all of /proc
    /// (a GPU lists a handful of processes; a host runs hundreds).
    pub fn ancestry_of(pids: impl IntoIterator<Item = u32>) -> Self {
        let mut processes = HashMap::new();
        for pid in pids {
            let mut current = pid;
            while current != 0 && !processes.contains_key(&current) {
                let Ok(info) = ProcInfo::read(current) else {
                    break;
                };
                current = info.ppid;
                processes.insert(info.pid, info);
            }
        }
        Self { processes }
    }

    pub fn get(&self, pid: u32) -> Option<&ProcInfo> {
        self.processes.get(&pid)
    }

    /// The members of a process group, zombies included.
    pub fn in_group(&self, pgid: u32) -> impl Iterator<Item = &ProcInfo> {
        self.processes.values().filter(move |p| p.pgid == pgid)
    }

    /// `root` and every process below it by parent links, root first; empty when `root`
    /// is not in the table.
    pub fn descendants(&self, root: u32) -> Vec<u32> {
        if !self.processes.contains_key(&root) {
            return Vec::new();
        }
        let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
        for p in self.processes.values() {
            children.entry(p.ppid).or_default().push(p.pid);
        }
        // A set as well as the list: a pid reused while /proc was read could make a
        // cycle, and a cycle must not loop forever.
        let mut seen = HashSet::from([root]);
        let mut found = vec![root];
        let mut next = 0;
        while let Some(&parent) = found.get(next) {
            for &kid in children.get(&parent).into_iter().flatten() {
                if seen.insert(kid) {
                    found.push(kid);
                }
            }
            next += 1;
        }
        found
    }

    /// Which of `roots` (keyed by pid) holds `pid` in its tree: `pid` itself or its
    /// nearest ancestor that is a root. A process that daemonized away from its parent
    /// keeps its process group, so when the parent chain finds no root, the root whose
    /// pid is `pid`'s group id (a spawned service leads its own group) claims it.
    pub fn root_among<'a, T>(&self, pid: u32, roots: &'a HashMap<u32, T>) -> Option<&'a T> {
        let mut seen = HashSet::new();
        let mut current = pid;
        while seen.insert(current) {
            if let Some(root) = roots.get(&current) {
                return Some(root);
            }
            match self.processes.get(&current) {
                Some(info) if info.ppid != 0 => current = info.ppid,
                _ => break,
            }
        }
        self.processes
            .get(&pid)
            .and_then(|info| roots.get(&info.pgid))
    }

    /// Live processes whose command line contains `pattern`, oldest first. The calling
    /// process and its ancestors never match: the daemon must not adopt itself or the
    /// shell that started it, whose command lines often contain the pattern. An empty
    /// pattern matches nothing.
    pub fn matching(&self, pattern: &str) -> Vec<u32> {
        if pattern.is_empty() {
            return Vec::new();
        }
        let excluded = self.ancestors_of_self();
        let mut found: Vec<&ProcInfo> = self
            .processes
            .values()
            .filter(|p| !p.zombie && !excluded.contains(&p.pid) && p.cmdline.contains(pattern))
            .collect();
        found.sort_by_key(|p| (p.start_ticks, p.pid));
        found.into_iter().map(|p| p.pid).collect()
    }

    /// This process and every ancestor up to init.
    fn ancestors_of_self(&self) -> HashSet<u32> {
        let mut chain = HashSet::new();
        let mut current = std::process::id();
        while current != 0 && chain.insert(current) {
            current = self.processes.get(&current).map_or(0, |p| p.ppid);
        }
        chain
    }
}

/// A process named by pid and start time, so that a reused pid is never mistaken for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ProcessIdentity {
    pub pid: u32,
    pub start_ticks: u64,
}

impl ProcessIdentity {
    /// Whether this very process still runs: the pid exists, started at the same tick,
    /// and is not a zombie.
    pub fn is_alive(&self) -> bool {
        ProcInfo::read(self.pid)
            .is_ok_and(|info| info.start_ticks == self.start_ticks && !info.zombie)
    }
}

/// The command name of `pid` (its `comm`, not UTF-8 at times), for logs and messages.
pub fn command_name(pid: u32) -> Option<String> {
    let comm = fs::read(Path::new(PROC).join(pid.to_string()).join("comm")).ok()?;
    Some(String::from_utf8_lossy(comm.trim_ascii_end()).into_owned())
}

/// The identity of the process now holding `pid` (zombie or not), if any.
pub fn process_identity(pid: u32) -> Option<ProcessIdentity> {
    ProcInfo::read(pid).ok().map(|info| info.identity())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Child, Command};
    use std::thread::sleep;
    use std::time::{Duration, Instant};

    /// Kills and reaps a test child even when an assertion fails first.
    struct Reaped(Child);

    impl Drop for Reaped {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn spawn(args: &[&str]) -> Reaped {
        Reaped(Command::new(args[0]).args(&args[1..]).spawn().unwrap())
    }

    /// Polls until `found` returns something; the box may be loaded, so be generous.
    fn eventually<T>(what: &str, mut found: impl FnMut() -> Option<T>) -> T {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(value) = found() {
                return value;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            sleep(Duration::from_millis(20));
        }
    }

    fn child_of(parent: u32) -> u32 {
        eventually("the child process", || {
            let table = ProcessTable::read().unwrap();
            table.descendants(parent).get(1).copied()
        })
    }

    #[test]
    fn stat_parsing_splits_at_the_last_parenthesis() {
        let stat = "4242 (we ird) (x)) S 17 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 200 18446744073709551615";
        assert_eq!(
            StatFields::parse(stat.as_bytes()),
            Some(StatFields {
                zombie: false,
                ppid: 17,
                pgid: 4242,
                start_ticks: 987654
            })
        );
        let zombie = stat.replace(")) S ", ")) Z ");
        assert!(StatFields::parse(zombie.as_bytes()).unwrap().zombie);
        assert_eq!(StatFields::parse(b"4242 (truncated) S 1"), None);
    }

    #[test]
    fn stat_parsing_takes_a_command_name_that_is_not_utf8() {
        let stat = b"77 (gpu\xff\xfe) job) R 1 77 77 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 5555 0 0";
        assert_eq!(
            StatFields::parse(stat),
            Some(StatFields {
                zombie: false,
                ppid: 1,
                pgid: 77,
                start_ticks: 5555
            })
        );
    }

    #[test]
    fn a_process_whose_command_name_is_not_utf8_is_in_the_table() {
        use std::os::unix::ffi::OsStrExt;
        let dir = tempfile::tempdir().unwrap();
        // The kernel names a process after the file it executed: a link whose name is
        // not UTF-8 gives the sleep such a command name.
        let link = dir.path().join(std::ffi::OsStr::from_bytes(b"gpu\xffjob"));
        std::os::unix::fs::symlink("/bin/sleep", &link).unwrap();
        let child = Reaped(Command::new(&link).arg("30.03125").spawn().unwrap());
        let pid = child.0.id();
        let comm = eventually("the new command name", || {
            let comm = fs::read(format!("/proc/{pid}/comm")).ok()?;
            comm.starts_with(b"gpu\xff").then_some(comm)
        });
        assert_eq!(comm, b"gpu\xffjob\n");
        assert_eq!(command_name(pid).as_deref(), Some("gpu\u{fffd}job"));

        let table = ProcessTable::read().unwrap();
        let info = table.get(pid).expect("the process is in the table");
        assert_eq!(info.ppid, std::process::id());
        assert!(!info.zombie);
        assert!(info.cmdline.ends_with("30.03125"), "{}", info.cmdline);
        let identity = process_identity(pid).expect("its identity");
        assert!(identity.is_alive());
    }

    #[test]
    fn cmdline_joins_argv_with_spaces() {
        assert_eq!(
            join_cmdline(b"python\0main.py\0--listen\0"),
            "python main.py --listen"
        );
        assert_eq!(join_cmdline(b""), "");
    }

    #[test]
    fn reads_this_process() {
        let table = ProcessTable::read().unwrap();
        let me = table.get(std::process::id()).expect("own process in /proc");
        assert!(!me.zombie);
        assert!(me.start_ticks > 0);
        assert!(!me.cmdline.is_empty());
    }

    #[test]
    fn descendants_and_roots_follow_parent_links() {
        let shell = spawn(&["sh", "-c", "sleep 30 & wait"]);
        let sh = shell.0.id();
        let sleeper = child_of(sh);

        let table = ProcessTable::read().unwrap();
        assert_eq!(table.descendants(sh), vec![sh, sleeper]);
        assert_eq!(table.get(sleeper).unwrap().ppid, sh);
        assert!(table.get(sleeper).unwrap().cmdline.contains("sleep 30"));

        let roots = HashMap::from([(sh, "svc"), (u32::MAX, "other")]);
        assert_eq!(table.root_among(sleeper, &roots), Some(&"svc"));
        assert_eq!(table.root_among(sh, &roots), Some(&"svc"));
        assert_eq!(table.root_among(std::process::id(), &roots), None);
        assert!(table.descendants(u32::MAX).is_empty());
    }

    #[test]
    fn an_ancestry_read_attributes_like_a_full_read_and_reads_only_the_chain() {
        let shell = spawn(&["sh", "-c", "sleep 31 & wait"]);
        let sh = shell.0.id();
        let sleeper = child_of(sh);
        let bystander = spawn(&["sleep", "32"]);

        let table = ProcessTable::ancestry_of([sleeper]);
        let roots = HashMap::from([(sh, "svc")]);
        assert_eq!(table.root_among(sleeper, &roots), Some(&"svc"));
        assert_eq!(table.get(sh).map(|p| p.pid), Some(sh));
        assert!(
            table.get(std::process::id()).is_some(),
            "the chain up to init"
        );
        assert!(table.get(bystander.0.id()).is_none(), "not in the chain");
        assert!(ProcessTable::ancestry_of([u32::MAX])
            .get(u32::MAX)
            .is_none());
    }

    #[test]
    fn root_among_falls_back_to_the_process_group() {
        use std::os::unix::process::CommandExt;
        // Orphans come back to this process, so the test can reap the one it makes.
        // SAFETY: prctl with PR_SET_CHILD_SUBREAPER takes no pointers.
        assert_eq!(unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1) }, 0);
        // The shell leads its own group and exits, leaving the sleep orphaned but
        // still in the group: a daemonized service process.
        let mut leader = Command::new("sh")
            .args(["-c", "sleep 30.25 >/dev/null & echo $!"])
            .process_group(0)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let group = leader.id();
        let mut out = String::new();
        std::io::Read::read_to_string(leader.stdout.as_mut().unwrap(), &mut out).unwrap();
        leader.wait().unwrap();
        let orphan: u32 = out.trim().parse().unwrap();

        let table = ProcessTable::read().unwrap();
        let roots = HashMap::from([(group, "svc")]);
        let found = table.root_among(orphan, &roots).copied();
        // SAFETY: kill(2) and waitpid(2) with a null status pointer touch no memory;
        // the pid is this test's own orphan, now its child.
        unsafe {
            libc::kill(orphan as i32, libc::SIGKILL);
            libc::waitpid(orphan as i32, std::ptr::null_mut(), 0);
        }
        assert_eq!(table.get(orphan).map(|p| p.pgid), Some(group));
        assert_eq!(found, Some("svc"));
    }

    #[test]
    fn matching_finds_live_processes_oldest_first_but_never_self() {
        // The pid between fixed words keeps concurrent runs of this test apart.
        let pid_arg = format!("0.{}", std::process::id());
        let command = ["sleep", "30.125", &pid_arg, "0.5"];
        let pattern = command.join(" ");
        let first = spawn(&command);
        sleep(Duration::from_millis(50));
        let second = spawn(&command);
        let table = eventually("both sleepers", || {
            let table = ProcessTable::read().unwrap();
            (table.matching(&pattern).len() == 2).then_some(table)
        });
        assert_eq!(table.matching(&pattern), vec![first.0.id(), second.0.id()]);

        let own = table.get(std::process::id()).unwrap().cmdline.clone();
        assert!(table.matching(&own).is_empty(), "matched itself: {own}");
        assert!(table.matching("").is_empty());
    }

    #[test]
    fn identity_guards_against_exit_zombies_and_reuse() {
        let mut child = Command::new("sleep").arg("30.0625").spawn().unwrap();
        let pid = child.id();
        let identity = process_identity(pid).unwrap();
        assert!(identity.is_alive());
        let reused = ProcessIdentity {
            pid,
            start_ticks: identity.start_ticks + 1,
        };
        assert!(!reused.is_alive(), "another start time is another process");

        child.kill().unwrap();
        let zombie = eventually("the zombie", || {
            let table = ProcessTable::read().unwrap();
            table.get(pid).filter(|p| p.zombie).cloned()
        });
        assert!(zombie.zombie);
        assert!(!identity.is_alive(), "a zombie is not alive");
        let table = ProcessTable::read().unwrap();
        assert!(!table.matching("sleep 30.0625").contains(&pid));

        child.wait().unwrap();
        assert!(!identity.is_alive());
        assert_eq!(process_identity(pid), None);
    }
}
