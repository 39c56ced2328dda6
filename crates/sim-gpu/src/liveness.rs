//! Whether a pid still holds GPU memory, as the driver would see it.

use std::fs;
use std::io;

/// A process is alive while `/proc/<pid>` exists and it is not a zombie: a zombie has
/// exited and only waits to be reaped, so its driver context is already being torn down.
/// When /proc cannot answer for another reason the process counts as alive, so memory is
/// never freed on a guess.
pub(crate) fn is_alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !matches!(state(&stat), Some('Z' | 'X')),
        Err(error) => !is_gone(&error),
    }
}

/// The state letter of a `/proc/<pid>/stat` line. The command name before it is in
/// parentheses and may itself contain spaces or parentheses, hence the last `)`.
fn state(stat: &str) -> Option<char> {
    let (_, rest) = stat.rsplit_once(')')?;
    rest.trim_start().chars().next()
}

fn is_gone(error: &io::Error) -> bool {
    error.kind() == io::ErrorKind::NotFound || error.raw_os_error() == Some(libc::ESRCH)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_state_after_an_odd_command_name() {
        assert_eq!(state("42 (a) b) c) S 1 42"), Some('S'));
        assert_eq!(state("42 (zz) Z 1 42"), Some('Z'));
        assert_eq!(state("garbage"), None);
    }

    #[test]
    fn this_process_is_alive() {
        assert!(is_alive(std::process::id()));
    }
}
