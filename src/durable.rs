//! Durable writes of the daemon's small files (the desired state, learned footprints):
//! a reader sees the old content or the new one, never half of either, and a power loss
//! after the write returns cannot bring the old file back.

use std::io::Write;
use std::path::{Path, PathBuf};

/// Why a write did not (fully) happen; the callers name the file's role in their errors.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The write failed before the new file replaced the old one: nothing changed.
    #[error("{0}")]
    NotWritten(std::io::Error),
    /// The new file replaced the old one, but syncing its folder failed: the new content
    /// is in place, and a power loss now could bring the old file back.
    #[error("the folder {} could not be synced: {source}", folder.display())]
    NotDurable {
        folder: PathBuf,
        source: std::io::Error,
    },
}

/// Writes `bytes` to `path`: a temp file in the same folder, fsync, rename, then fsync
/// the folder. Creates the folder when missing.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), WriteError> {
    let folder = folder_of(path);
    std::fs::create_dir_all(folder).map_err(WriteError::NotWritten)?;
    let temp = temp_path(path);
    let mut file = std::fs::File::create(&temp).map_err(WriteError::NotWritten)?;
    let written = file.write_all(bytes).and_then(|()| file.sync_all());
    drop(file);
    if let Err(source) = written.and_then(|()| std::fs::rename(&temp, path)) {
        // Best effort: the error below is what matters.
        let _ = std::fs::remove_file(&temp);
        return Err(WriteError::NotWritten(source));
    }
    std::fs::File::open(folder)
        .and_then(|dir| dir.sync_all())
        .map_err(|source| WriteError::NotDurable {
            folder: folder.to_owned(),
            source,
        })
}

/// The folder holding `path`; a bare file name's folder is the working directory (its
/// parent is the empty path, which cannot be opened).
pub fn folder_of(path: &Path) -> &Path {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    }
}

fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bare_file_name_lives_in_the_working_directory() {
        assert_eq!(folder_of(Path::new("state.yaml")), Path::new("."));
        assert_eq!(folder_of(Path::new("/x/state.yaml")), Path::new("/x"));
    }

    #[test]
    fn the_new_content_replaces_the_old_and_no_temp_file_is_left() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/file.json");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(dir.path().join("sub"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["file.json"]);
    }
}
