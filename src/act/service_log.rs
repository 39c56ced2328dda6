//! Where a native service's stdout and stderr go: size-rotated files, or the journal
//! (docs/ARCHITECTURE.md, "Service logs").
//!
//! Files: the service writes into a pipe whose only reader is a small log writer,
//! `gpu-manager service-log`, a process of its own (its own process group, not the
//! daemon's thread). It does nothing but read the pipe and append to `NAME.log`,
//! renaming it to `NAME.log.1` (and so on, up to `keep`) before a write would take it
//! past `max_bytes`, so the files are capped exactly. Because of that split:
//! - a service never stalls on a full pipe while the daemon is busy: the writer does not
//!   wait for the daemon, and a rotation is a few renames, not a copy;
//! - a daemon restart does not touch the service's output: the writer outlives the
//!   daemon (it is reparented like the service), so the pipe keeps a reader and the
//!   service never sees SIGPIPE;
//! - the writer exits by itself once every process holding the pipe (the service and
//!   its descendants) has exited.
//!
//! Journald: the service's stdout and stderr are connected straight to journald's stream
//! socket, under the service's name as identifier (`journalctl -t NAME`), as
//! `systemd-cat` does; the daemon is not in between at all.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::os::linux::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nix::fcntl::{fcntl, FcntlArg, Flock, FlockArg, OFlag};
use tokio::process::Command;
use tokio::sync::watch;

use crate::act::reaper;

/// journald's socket for stdout streams (see `sd_journal_stream_fd(3)`).
pub const JOURNAL_STREAM_SOCKET: &str = "/run/systemd/journal/stdout";
/// The subcommand of the `gpu-manager` binary that runs [`write_rotated`].
pub const WRITER_SUBCOMMAND: &str = "service-log";
/// The pipe's capacity: room for bursts while the writer waits for the CPU. 1 MiB is
/// the most an unprivileged process may ask for by default (/proc/sys/fs/pipe-max-size).
const PIPE_BYTES: i32 = 1 << 20;
/// How much the writer reads at a time.
const CHUNK_BYTES: usize = 64 * 1024;

/// The binary that runs the log writer: this one when it is `gpu-manager`; otherwise
/// (a test binary using the library) the `gpu-manager` binary cargo built beside it.
pub fn writer_program() -> io::Result<PathBuf> {
    let me = std::env::current_exe()?;
    if me.file_name().is_some_and(|name| name == "gpu-manager") {
        // /proc/self/exe still runs this binary when an upgrade has replaced its file.
        return Ok(PathBuf::from("/proc/self/exe"));
    }
    me.ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join("gpu-manager"))
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "no gpu-manager binary beside {} to write service logs with",
                    me.display()
                ),
            )
        })
}

/// Tells when a log writer has written all it was sent: it exits at the end of its
/// input, once the service and every process sharing its output are gone.
#[derive(Debug, Clone)]
pub struct WriterDone(watch::Receiver<bool>);

impl WriterDone {
    /// Waits up to `limit` for the writer to finish; false if it is still running
    /// (processes the service left behind still hold its output).
    pub async fn wait(mut self, limit: Duration) -> bool {
        let finished = self.0.wait_for(|done| *done);
        matches!(tokio::time::timeout(limit, finished).await, Ok(Ok(_)))
    }
}

/// Starts a log writer for `path` and returns the write end of its pipe, for the
/// service's stdout and stderr. Must run inside a Tokio runtime: a task waits for the
/// writer to exit.
pub fn start_writer(
    program: &Path,
    path: &Path,
    max_bytes: u64,
    keep: u32,
) -> io::Result<(OwnedFd, WriterDone)> {
    let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    if let Err(error) = fcntl(&write, FcntlArg::F_SETPIPE_SZ(PIPE_BYTES)) {
        tracing::debug!(%error, "keeping the default pipe size for a service log");
    }
    let mut command = Command::new(program);
    command
        .arg0("gpu-manager")
        .arg(WRITER_SUBCOMMAND)
        .arg("--path")
        .arg(path)
        .args(["--max-bytes", &max_bytes.to_string()])
        .args(["--keep", &keep.to_string()])
        .stdin(Stdio::from(read))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        // Its own group: a stop signals the service's group, and the writer must stay to
        // record the service's last words, ending only when the pipe is closed.
        .process_group(0)
        .kill_on_drop(false);
    let mut writer = reaper::spawn_owned(&mut command)?;
    let log = path.to_owned();
    let (done_tx, done_rx) = watch::channel(false);
    tokio::spawn(async move {
        let exit = writer.wait().await;
        done_tx.send_replace(true);
        match exit {
            Ok(status) if status.success() => {}
            Ok(status) => {
                tracing::warn!(log = %log.display(), %status, "the service log writer failed")
            }
            Err(error) => tracing::warn!(log = %log.display(), %error, "the service log writer"),
        }
    });
    Ok((write, WriterDone(done_rx)))
}

/// Connects to journald's stream socket at `socket` as `identifier`, with `priority`
/// (6 info for stdout, 3 err for stderr), the way `sd_journal_stream_fd(3)` does.
pub fn journal_stream(socket: &Path, identifier: &str, priority: u8) -> io::Result<OwnedFd> {
    let mut stream = UnixStream::connect(socket)?;
    // identifier, unit id, priority, level prefix, then forward to syslog, kmsg, console.
    write!(stream, "{identifier}\n\n{priority}\n0\n0\n0\n0\n")?;
    stream.shutdown(std::net::Shutdown::Read)?;
    Ok(stream.into())
}

/// The log writer's loop: copies `input` to `path` until end of input, rotating the file
/// by size. A write that fails (a full disk) drops that output and says so in the log
/// once writing works again, so the service is never held up.
pub fn write_rotated(
    mut input: impl Read,
    path: &Path,
    max_bytes: u64,
    keep: u32,
) -> io::Result<()> {
    let mut log = RotatingLog::open(path, max_bytes, keep)?;
    let mut chunk = vec![0; CHUNK_BYTES];
    let mut lost = 0u64;
    loop {
        let read = match input.read(&mut chunk) {
            Ok(0) => return Ok(()),
            Ok(read) => read,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(error),
        };
        if lost > 0 {
            let note = format!(
                "[gpu-manager: {lost} bytes of output were lost: the log could not be written]\n"
            );
            if log.write(note.as_bytes()).is_ok() {
                lost = 0;
            }
        }
        if log.write(&chunk[..read]).is_err() {
            lost += read as u64;
        }
    }
}

/// `NAME.log`, kept under `max_bytes` by renaming it to `NAME.log.1` (shifting older
/// ones up to `NAME.log.<keep>`, dropping the oldest). Several writers may share one
/// (an escaped process of an earlier run still writing beside the new run): they append
/// to the same file, serialize rotations on a lock, and follow each other's renames.
#[derive(Debug)]
pub struct RotatingLog {
    path: PathBuf,
    max_bytes: u64,
    keep: u32,
    file: File,
}

impl RotatingLog {
    pub fn open(path: &Path, max_bytes: u64, keep: u32) -> io::Result<Self> {
        Ok(Self {
            path: path.to_owned(),
            max_bytes: max_bytes.max(1),
            keep,
            file: open_append(path)?,
        })
    }

    /// Appends `bytes`, rotating first whenever they would not fit. Splits at the last
    /// line end that fits, so lines stay whole unless one alone exceeds `max_bytes`.
    pub fn write(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            self.follow_rotation()?;
            let len = self.file.metadata()?.len();
            let room = usize::try_from(self.max_bytes.saturating_sub(len)).unwrap_or(usize::MAX);
            if bytes.len() <= room {
                return self.file.write_all(bytes);
            }
            let fits = &bytes[..room];
            let cut = match fits.iter().rposition(|&b| b == b'\n') {
                Some(end) => end + 1,
                None if len == 0 => room,
                None => 0,
            };
            self.file.write_all(&bytes[..cut])?;
            bytes = &bytes[cut..];
            self.rotate()?;
        }
        Ok(())
    }

    /// Renames the full file away and starts a new one, unless another writer already
    /// has (it holds the lock while it renames; then this one only reopens).
    fn rotate(&mut self) -> io::Result<()> {
        let locked = Flock::lock(self.file.try_clone()?, FlockArg::LockExclusive)
            .map_err(|(_, errno)| io::Error::from(errno))?;
        if self.is_current()? {
            for index in (1..self.keep).rev() {
                rename_if_present(&self.numbered(index), &self.numbered(index + 1))?;
            }
            if self.keep == 0 {
                fs::remove_file(&self.path)?;
            } else {
                fs::rename(&self.path, self.numbered(1))?;
            }
        }
        drop(locked);
        self.file = open_append(&self.path)?;
        Ok(())
    }

    /// Reopens the path when another writer has rotated the file this one holds.
    fn follow_rotation(&mut self) -> io::Result<()> {
        if !self.is_current()? {
            self.file = open_append(&self.path)?;
        }
        Ok(())
    }

    fn is_current(&self) -> io::Result<bool> {
        let held = self.file.metadata()?;
        Ok(match fs::metadata(&self.path) {
            Ok(named) => named.st_ino() == held.st_ino() && named.st_dev() == held.st_dev(),
            Err(error) if error.kind() == io::ErrorKind::NotFound => false,
            Err(error) => return Err(error),
        })
    }

    fn numbered(&self, index: u32) -> PathBuf {
        numbered(&self.path, index)
    }
}

/// `NAME.log.<index>`.
pub fn numbered(path: &Path, index: u32) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{index}"));
    PathBuf::from(name)
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

fn rename_if_present(from: &Path, to: &Path) -> io::Result<()> {
    match fs::rename(from, to) {
        Err(error) if error.kind() != io::ErrorKind::NotFound => Err(error),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sizes(dir: &Path) -> Vec<(String, u64)> {
        let mut files: Vec<(String, u64)> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap())
            .map(|e| {
                (
                    e.file_name().into_string().unwrap(),
                    e.metadata().unwrap().len(),
                )
            })
            .collect();
        files.sort();
        files
    }

    #[test]
    fn rotates_by_size_keeping_whole_lines_and_at_most_keep_old_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("svc.log");
        let lines: String = (0..1000).map(|i| format!("line {i:04}\n")).collect();
        write_rotated(lines.as_bytes(), &path, 1000, 2).unwrap();

        let files = sizes(dir.path());
        let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["svc.log", "svc.log.1", "svc.log.2"]);
        assert!(files.iter().all(|(_, size)| *size <= 1000), "{files:?}");
        // 10-byte lines, 100 to a full file: the newest are in svc.log, whole.
        let current = fs::read_to_string(&path).unwrap();
        assert!(current.ends_with("line 0999\n"), "{current}");
        assert!(current.lines().all(|l| l.len() == 9), "{current}");
        let previous = fs::read_to_string(numbered(&path, 1)).unwrap();
        assert_eq!(previous.lines().last(), Some("line 0899"));
    }

    #[test]
    fn a_line_longer_than_the_cap_is_split_and_keep_zero_keeps_no_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("svc.log");
        write_rotated(&[b'x'; 2500][..], &path, 1000, 0).unwrap();
        assert_eq!(sizes(dir.path()), [("svc.log".to_owned(), 500)]);
    }

    #[test]
    fn a_second_writer_follows_the_first_ones_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("svc.log");
        let mut old_run = RotatingLog::open(&path, 100, 3).unwrap();
        let mut new_run = RotatingLog::open(&path, 100, 3).unwrap();
        old_run.write(&[b'a'; 60]).unwrap();
        new_run.write(&[b'b'; 60]).unwrap(); // rotates: aaa... goes to .1
        old_run.write(&[b'c'; 10]).unwrap(); // must land in the new file, not in .1
        assert_eq!(fs::read(numbered(&path, 1)).unwrap(), [b'a'; 60]);
        let mut expected = vec![b'b'; 60];
        expected.extend([b'c'; 10]);
        assert_eq!(fs::read(&path).unwrap(), expected);
        assert!(!numbered(&path, 2).exists());
    }

    #[test]
    fn journal_streams_send_the_header_journald_expects() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("stdout");
        let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let fd = journal_stream(&socket, "comfyui", 6).unwrap();
        let mut service_stdout = File::from(fd);
        service_stdout.write_all(b"loading model\n").unwrap();
        drop(service_stdout);
        let (mut journald, _) = listener.accept().unwrap();
        let mut received = String::new();
        journald.read_to_string(&mut received).unwrap();
        assert_eq!(received, "comfyui\n\n6\n0\n0\n0\n0\nloading model\n");
    }
}
