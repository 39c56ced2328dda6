//! The folder's `.lock`: an exclusive `flock` serialises every reader and writer, across
//! processes and across threads of one process (each holder opens the file anew, and
//! `flock` locks belong to the open file description).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

/// Holds the lock until dropped: closing the file releases it.
pub(crate) struct FolderLock {
    _file: File,
}

impl FolderLock {
    /// Blocks until the lock is ours.
    pub(crate) fn acquire(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        loop {
            // SAFETY: flock only reads the descriptor, which `file` keeps open.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } == 0 {
                return Ok(Self { _file: file });
            }
            let error = io::Error::last_os_error();
            if error.kind() != io::ErrorKind::Interrupted {
                return Err(error);
            }
        }
    }
}
