//! How a service's process (or container) ended, in one shape for every runtime, so the
//! reconciler and the readiness wait need not care whether it was native or Docker. It
//! sits below both `observe` (the readiness wait) and `act` (the drivers), importing
//! neither.

use std::fmt;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;

/// The end of a service's main process or container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitInfo {
    /// It exited on its own with this status code.
    Code(i32),
    /// A signal ended it (Docker reports this as exit code 128 + signal).
    Signal(i32),
    /// It is gone but its status is not ours to read: an adopted process is not the
    /// daemon's child, so only its real parent learns how it ended.
    Unknown,
}

impl From<ExitStatus> for ExitInfo {
    fn from(status: ExitStatus) -> Self {
        match (status.code(), status.signal()) {
            (Some(code), _) => ExitInfo::Code(code),
            (None, Some(signal)) => ExitInfo::Signal(signal),
            (None, None) => ExitInfo::Unknown,
        }
    }
}

impl fmt::Display for ExitInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitInfo::Code(code) => write!(f, "exited with code {code}"),
            ExitInfo::Signal(signal) => match signal_name(*signal) {
                Some(name) => write!(f, "killed by signal {signal} ({name})"),
                None => write!(f, "killed by signal {signal}"),
            },
            ExitInfo::Unknown => f.write_str("exited (status unknown: not the daemon's child)"),
        }
    }
}

/// Names of the signals that end services in practice, for readable messages.
fn signal_name(signal: i32) -> Option<&'static str> {
    Some(match signal {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGTERM => "SIGTERM",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn displays_codes_and_signals() {
        assert_eq!(ExitInfo::Code(3).to_string(), "exited with code 3");
        assert_eq!(
            ExitInfo::Signal(9).to_string(),
            "killed by signal 9 (SIGKILL)"
        );
        assert_eq!(ExitInfo::Signal(64).to_string(), "killed by signal 64");
    }

    #[test]
    fn converts_real_exit_statuses() {
        let code = Command::new("sh").args(["-c", "exit 3"]).status().unwrap();
        assert_eq!(ExitInfo::from(code), ExitInfo::Code(3));
        let killed = Command::new("sh")
            .args(["-c", "kill -KILL $$"])
            .status()
            .unwrap();
        assert_eq!(ExitInfo::from(killed), ExitInfo::Signal(libc::SIGKILL));
    }
}
