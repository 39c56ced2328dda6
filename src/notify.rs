//! systemd's readiness protocol (`Type=notify`, sd_notify(3)): one datagram per message
//! to the socket `NOTIFY_SOCKET` names. The daemon says `READY=1` once its first round
//! (observation, and adoption of what runs) is done, a `STATUS=` line whenever its
//! one-line summary changes, and `STOPPING=1` when it shuts down. Without `NOTIFY_SOCKET`
//! (not started by systemd) nothing is sent.

use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};

use tokio::sync::watch;

use crate::status::{ServiceState, Status};

/// The environment variable systemd sets for `Type=notify` services.
pub const SOCKET_VAR: &str = "NOTIFY_SOCKET";

/// A connection to systemd's notification socket.
pub struct Notifier {
    socket: UnixDatagram,
    addr: SocketAddr,
}

impl Notifier {
    /// The notifier `NOTIFY_SOCKET` names; None when it is unset (not under systemd) or
    /// unusable (logged: the daemon runs on, systemd will time out waiting for it).
    pub fn from_env() -> Option<Self> {
        let target = std::env::var_os(SOCKET_VAR)?;
        let target = target.to_string_lossy();
        match Self::open(&target) {
            Ok(notifier) => Some(notifier),
            Err(error) => {
                tracing::warn!(socket = %target, %error, "cannot use systemd's notification socket");
                None
            }
        }
    }

    /// A path, or `@name` for a socket in the abstract namespace (as systemd may give).
    pub fn open(target: &str) -> io::Result<Self> {
        let addr = match target.strip_prefix('@') {
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                SocketAddr::from_abstract_name(name.as_bytes())?
            }
            None => SocketAddr::from_pathname(target)?,
        };
        Ok(Self {
            socket: UnixDatagram::unbound()?,
            addr,
        })
    }

    /// Sends one message (newline-separated `KEY=VALUE` assignments).
    pub fn send(&self, message: &str) -> io::Result<()> {
        self.socket
            .send_to_addr(message.as_bytes(), &self.addr)
            .map(|_| ())
    }

    fn send_logged(&self, message: &str) {
        if let Err(error) = self.send(message) {
            tracing::warn!(%error, message, "cannot notify systemd");
        }
    }
}

/// Sends `STOPPING=1`, when started by systemd: call it as the shutdown begins.
pub fn stopping() {
    if let Some(notifier) = Notifier::from_env() {
        notifier.send_logged(
            "STOPPING=1\nSTATUS=stopping; services keep running and will be adopted on restart",
        );
    }
}

/// systemd's reload protocol (`Type=notify-reload`, sd_notify(3)): `RELOADING=1` with
/// the monotonic clock as the reload begins, when started by systemd.
pub fn reloading() {
    if let Some(notifier) = Notifier::from_env() {
        notifier.send_logged(&reloading_message(monotonic_usec()));
    }
}

/// `READY=1` with the summary line, once a reload is done (applied or refused).
pub fn reloaded(status: &Status) {
    if let Some(notifier) = Notifier::from_env() {
        notifier.send_logged(&format!("READY=1\nSTATUS={}", summary(status)));
    }
}

fn reloading_message(monotonic_usec: u64) -> String {
    format!("RELOADING=1\nMONOTONIC_USEC={monotonic_usec}\nSTATUS=reloading the config")
}

/// CLOCK_MONOTONIC in microseconds, as systemd compares it.
fn monotonic_usec() -> u64 {
    use nix::time::{clock_gettime, ClockId};
    clock_gettime(ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1_000)
        .unwrap_or(0)
}

/// Follows the status snapshots: `READY=1` with the first snapshot whose first round is
/// done, then a `STATUS=` line whenever the summary changes. Returns when the
/// reconciler is gone.
pub async fn follow(notifier: Notifier, mut snapshots: watch::Receiver<Status>) {
    let mut ready = false;
    let mut last_line = String::new();
    loop {
        let (done, line) = {
            let status = snapshots.borrow_and_update();
            (status.first_round_done, summary(&status))
        };
        if done && !ready {
            ready = true;
            notifier.send_logged(&format!("READY=1\nSTATUS={line}"));
            tracing::info!("told systemd the daemon is ready");
            last_line = line;
        } else if ready && line != last_line {
            notifier.send_logged(&format!("STATUS={line}"));
            last_line = line;
        }
        if snapshots.changed().await.is_err() {
            return;
        }
    }
}

/// The daemon in one line, for `systemctl status`: the desired phase, how many services
/// are ready (and failed), VRAM, and the lease.
pub fn summary(status: &Status) -> String {
    let count = |state| {
        status
            .services
            .values()
            .filter(|s| s.state == state)
            .count()
    };
    let phase = status
        .desired
        .phase
        .map_or("no phase".to_owned(), |p| format!("phase {p}"));
    let mut line = format!(
        "{phase}; {}/{} services ready",
        count(ServiceState::Ready),
        status.services.len()
    );
    let failed = count(ServiceState::Failed);
    if failed > 0 {
        line.push_str(&format!(", {failed} failed"));
    }
    line.push_str(&format!(
        "; VRAM {}/{} MB used",
        status.vram.used_mb, status.vram.total_mb
    ));
    if !status.lock.summary.is_empty() {
        line.push_str(&format!("; {}", status.lock.summary));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receive(socket: &UnixDatagram) -> String {
        socket
            .set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let mut buffer = [0u8; 4096];
        let n = socket.recv(&mut buffer).unwrap();
        String::from_utf8_lossy(&buffer[..n]).into_owned()
    }

    #[test]
    fn sends_to_a_path_and_to_an_abstract_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let listener = UnixDatagram::bind(&path).unwrap();
        Notifier::open(path.to_str().unwrap())
            .unwrap()
            .send("READY=1")
            .unwrap();
        assert_eq!(receive(&listener), "READY=1");

        use std::os::linux::net::SocketAddrExt;
        let name = format!("gpu-manager-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let listener = UnixDatagram::bind_addr(&addr).unwrap();
        Notifier::open(&format!("@{name}"))
            .unwrap()
            .send("STOPPING=1")
            .unwrap();
        assert_eq!(receive(&listener), "STOPPING=1");
    }

    // Two workers: the test blocks one on the socket while the follower runs.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ready_waits_for_the_first_round_then_status_lines_follow_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let listener = UnixDatagram::bind(&path).unwrap();
        listener.set_nonblocking(true).unwrap();
        let notifier = Notifier::open(path.to_str().unwrap()).unwrap();
        let (snapshots, status) = watch::channel(Status::default());
        let follower = tokio::spawn(follow(notifier, status));

        let mut next = Status::default();
        next.vram.used_mb = 1;
        snapshots.send_replace(next.clone());
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(
            listener.recv(&mut [0u8; 64]).is_err(),
            "nothing before the first round is done"
        );

        next.first_round_done = true;
        snapshots.send_replace(next.clone());
        listener.set_nonblocking(false).unwrap();
        let ready = receive(&listener);
        assert!(
            ready.starts_with("READY=1\nSTATUS=no phase; 0/0 services ready"),
            "{ready}"
        );

        next.desired.phase = Some(3);
        snapshots.send_replace(next);
        assert!(receive(&listener).starts_with("STATUS=phase 3;"));
        drop(snapshots);
        follower.await.unwrap();
    }
}
