//! `bpg-tunnel status`: how the running tunnel is doing, asked of the tunnel itself.
//!
//! Every serving process (the daemon, `run`, the foreground form) answers on a Unix socket,
//! `bpg-tunnel.sock`, in the first usable place of `state_dir`'s order (a directory of this
//! user's that no other user can write to); the socket itself is owner-only, and a peer of
//! another user is refused. Who answers there is decided by a `flock` on `bpg-tunnel.sock.lock`,
//! held for the process's life: the kernel lets go of it when the process dies, so a socket file
//! left behind is known to be stale, and two tunnels starting at once never remove each other's
//! socket. A connection gets one JSON document (an `Answer`, the type both ends share) and is
//! closed. `status` asks the first socket that answers and prints what it got, for people or
//! (`--json`) as JSON.

use std::fs::{File, TryLockError};
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::error::Category;
use tokio::io::AsyncWriteExt;
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::logfmt::escape_controls;
use crate::state_dir::{check_private, private_dir, state_dirs};
use crate::stats::{rss_bytes, Phase, Stats};

mod answer;

use answer::{Addon, Answer, Bytes, Connections, LastError, Registration, Session, Status};

const SOCKET_NAME: &str = "bpg-tunnel.sock";
const LOCK_NAME: &str = "bpg-tunnel.sock.lock";

/// How long a reader gets to take the answer; the tunnel never waits on it longer.
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// The status socket, bound and not yet answering.
pub struct StatusSocket {
    listener: UnixListener,
    path: PathBuf,
    /// Held while this process answers at `path`.
    _lock: File,
}

impl StatusSocket {
    /// Binds the socket in the first usable place; `None` (after saying why) when another
    /// bpg-tunnel answers there already or no place is usable. Never keeps the tunnel from
    /// serving.
    pub fn bind(state_dir: Option<&Path>) -> Option<StatusSocket> {
        let mut problems = Vec::new();
        for dir in state_dirs(state_dir) {
            if let Err(error) = private_dir(&dir) {
                problems.push(format!("{}: {error}", dir.display()));
                continue;
            }
            let path = dir.join(SOCKET_NAME);
            let lock = match lock(&dir.join(LOCK_NAME)) {
                Ok(Some(lock)) => lock,
                Ok(None) => {
                    info!(event = "status-socket-taken", path = %path.display(), "another bpg-tunnel answers `status` here; this one does not");
                    return None;
                }
                Err(error) => {
                    problems.push(format!("{}: {error}", dir.join(LOCK_NAME).display()));
                    continue;
                }
            };
            // Whatever is at the socket's path was left by a process that is gone.
            match std::fs::remove_file(&path) {
                Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
                    problems.push(format!("{}: {error}", path.display()));
                    continue;
                }
                _ => {}
            }
            match bind_owner_only(&path) {
                Ok(listener) => {
                    debug!(event = "status-socket", path = %path.display());
                    return Some(StatusSocket {
                        listener,
                        path,
                        _lock: lock,
                    });
                }
                Err(error) => problems.push(format!("{}: {error}", path.display())),
            }
        }
        warn!(event = "status-socket-failed", places = %problems.join("; "), "`bpg-tunnel status` will not find this tunnel");
        None
    }

    /// Answers until `shutdown`, then removes the socket.
    pub async fn serve(self, stats: Arc<Stats>, shutdown: CancellationToken) {
        // SAFETY: geteuid has no preconditions.
        let uid = unsafe { libc::geteuid() };
        loop {
            let accepted = tokio::select! {
                accepted = self.listener.accept() => accepted,
                () = shutdown.cancelled() => break,
            };
            let Ok((mut stream, _)) = accepted else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            // The directory and the socket are owner-only already; root may still connect.
            if !stream.peer_cred().is_ok_and(|peer| peer.uid() == uid) {
                continue;
            }
            let Ok(answer) = serde_json::to_vec(&snapshot(&stats)) else {
                continue;
            };
            let _ = tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(&answer)).await;
        }
        // Removed while the lock is still held: no newcomer has bound there yet.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The lock on `path`, or `None` when a live process holds it.
fn lock(path: &Path) -> std::io::Result<Option<File>> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    // std's file locks are flock(2) on Linux, as `lifecycle`'s pid file is.
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(TryLockError::WouldBlock) => Ok(None),
        Err(TryLockError::Error(error)) => Err(error),
    }
}

fn bind_owner_only(path: &Path) -> std::io::Result<UnixListener> {
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// The answer as of now.
fn snapshot(stats: &Stats) -> Answer {
    let now = SystemTime::now();
    let addons = stats
        .addons()
        .iter()
        .map(|addon| {
            let session = addon.session();
            Addon {
                addon: addon.name.clone(),
                server: addon.server.clone(),
                session: Session {
                    up: session.up,
                    since: session.since.map(time),
                    last_error: session.last_error.map(error_at),
                },
                reconnects: addon.reconnects.get(),
                connections: Connections {
                    open: addon.open.get(),
                    accepted: addon.accepted.get(),
                    waited: addon.waited.get(),
                    wait_expired: addon.wait_expired.get(),
                    refused: addon.refused.get(),
                },
                bytes: Bytes {
                    up: addon.bytes_up.get(),
                    down: addon.bytes_down.get(),
                },
            }
        })
        .collect();
    let registrations = stats
        .registrations()
        .iter()
        .map(|registration| {
            let state = registration.state();
            Registration {
                addon: registration.name.clone(),
                registered: state.registered,
                last_renewed: state.last_renewed.map(time),
                expires_at: state.expires_at().map(time),
                last_error: state.last_error.map(error_at),
            }
        })
        .collect();
    Answer {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        pid: std::process::id(),
        started_at: time(stats.started()),
        uptime_s: now
            .duration_since(stats.started())
            .unwrap_or_default()
            .as_secs(),
        phase: stats.phase().name().to_owned(),
        all_up: stats.phase() == Phase::Serving && stats.all_up(),
        rss_bytes: rss_bytes(),
        addons,
        registrations,
    }
}

fn error_at((at, error): (SystemTime, String)) -> LastError {
    LastError {
        at: time(at),
        error,
    }
}

fn time(at: SystemTime) -> String {
    humantime::format_rfc3339_seconds(at).to_string()
}

/// What `bpg-tunnel status` needs.
#[derive(Debug, Clone)]
pub struct StatusSettings {
    pub state_dir: Option<PathBuf>,
    pub json: bool,
}

/// Exit status of `status`: everything up.
const UP: u8 = 0;
/// No tunnel answers.
const NOT_RUNNING: u8 = 1;
/// A tunnel answers, but something in it is not up.
const NOT_ALL_UP: u8 = 2;

/// `bpg-tunnel status`: prints the running tunnel's answer; exits 0 when everything is up, 1
/// when no tunnel runs, 2 when something is down.
pub fn run(settings: &StatusSettings) -> ExitCode {
    let dirs = state_dirs(settings.state_dir.as_deref());
    let mut silent = Vec::new();
    let mut answer = None;
    for path in dirs.iter().map(|dir| dir.join(SOCKET_NAME)) {
        match ask(&path) {
            Asked::Answer(value) => {
                answer = Some(value);
                break;
            }
            Asked::Silent(why) => silent.push(format!("{}: {why}", path.display())),
            Asked::Nobody => {}
        }
    }
    let Some(answer) = answer else {
        let looked: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
        if settings.json {
            let status = Status::NotRunning {
                looked_in: looked,
                no_answer: silent,
            };
            println!("{}", json(&status));
        } else if !silent.is_empty() {
            println!(
                "a bpg-tunnel socket is there, but nothing answered on it ({}); is `status` run as the user the tunnel runs as?",
                escape_controls(&silent.join("; "))
            );
        } else {
            println!(
                "no bpg-tunnel is running here (looked for {SOCKET_NAME} in {})",
                escape_controls(&looked.join(", "))
            );
        }
        return ExitCode::from(NOT_RUNNING);
    };
    let all_up = answer.all_up;
    if settings.json {
        println!("{:#}", json(&Status::Running(answer)));
    } else {
        print!("{}", answer.human());
    }
    ExitCode::from(if all_up { UP } else { NOT_ALL_UP })
}

/// `status` as `--json` prints it: as a [`serde_json::Value`], whose keys come out sorted, as
/// they always have.
fn json(status: &Status) -> serde_json::Value {
    serde_json::to_value(status).expect("an answer is strings, numbers and lists")
}

enum Asked {
    Answer(Answer),
    /// Nothing listens there.
    Nobody,
    /// Something accepted the connection but gave no usable answer, and why.
    Silent(String),
}

/// What the socket at `path` answers, if a tunnel of this user's listens there.
fn ask(path: &Path) -> Asked {
    if path.parent().is_none_or(|dir| check_private(dir).is_err()) {
        return Asked::Nobody;
    }
    let Ok(mut stream) = std::os::unix::net::UnixStream::connect(path) else {
        return Asked::Nobody;
    };
    if stream.set_read_timeout(Some(WRITE_TIMEOUT)).is_err() {
        return Asked::Silent("cannot set a read timeout".into());
    }
    let _ = stream.flush();
    let mut text = String::new();
    if let Err(error) = stream.read_to_string(&mut text) {
        return Asked::Silent(error.to_string());
    }
    match serde_json::from_str(&text) {
        Ok(answer) => Asked::Answer(answer),
        Err(_) if text.is_empty() => Asked::Silent("the connection was closed unanswered".into()),
        Err(error) if error.classify() == Category::Data => Asked::Silent(format!(
            "the answer is not one this bpg-tunnel reads ({error})"
        )),
        Err(_) => Asked::Silent("the answer is not JSON".into()),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn the_answer_for_people_says_what_is_down_and_why() {
        let stats = Stats::new(&[("DATABASE".into(), "ssh.example:22".into())], &[]);
        stats.advance(Phase::Serving);
        let addon = stats.addon("DATABASE").unwrap();
        addon.session_up(false);
        addon.session_down("no answer to keepalives for 9000 ms".into());
        let text = snapshot(&stats).human();
        assert!(
            text.contains("✗ DATABASE: SSH session down since "),
            "{text}"
        );
        assert!(text.contains("server ssh.example:22"), "{text}");
        assert!(
            text.contains("no answer to keepalives for 9000 ms"),
            "{text}"
        );
        assert!(text.ends_with("not everything is up\n"), "{text}");
        addon.session_up(true);
        let text = snapshot(&stats).human();
        assert!(text.contains("✓ DATABASE: SSH session up since "), "{text}");
        assert!(text.contains("reconnects: 1"), "{text}");
        assert!(text.ends_with("\neverything is up\n"), "{text}");
    }

    #[test]
    fn what_a_server_or_the_environment_said_is_shown_escaped() {
        // The add-on's name and server come from the environment, the error from the server.
        let stats = Stats::new(
            &[(
                "DATABASE\x1b]0;owned\x07".into(),
                "ssh.example:22\r\n✓ ok".into(),
            )],
            &[],
        );
        stats.advance(Phase::Serving);
        let addon = stats.addons()[0].clone();
        addon.session_down("bye\x1b[2J\r\n✓ DATABASE: SSH session up\n".into());
        let text = snapshot(&stats).human();
        assert!(
            !text.contains(['\x1b', '\r', '\x07']),
            "raw control characters: {text:?}"
        );
        assert!(
            text.contains(r"last error (")
                && text.contains(r"): bye\u{1b}[2J\u{d}\n✓ DATABASE: SSH session up\n"),
            "{text}"
        );
        assert!(
            text.contains(r"✗ DATABASE\u{1b}]0;owned\u{7}: SSH session down"),
            "{text}"
        );
        assert!(text.contains(r"server ssh.example:22\u{d}\n✓ ok"), "{text}");
        // One line each for the head, the add-on, its connections, its bytes, its last error,
        // and the verdict: none forged.
        assert_eq!(text.lines().count(), 6, "{text}");
        assert_eq!(
            text.lines().filter(|l| l.starts_with('✓')).count(),
            0,
            "{text}"
        );
    }

    /// Stats whose answer has every field set, none at its default.
    fn busy() -> Stats {
        let stats = Stats::new(
            &[("DATABASE".into(), "ssh.example:22".into())],
            &["REPORTS".into()],
        );
        stats.advance(Phase::Serving);
        let addon = stats.addon("DATABASE").unwrap();
        addon.session_down("refused\n\u{1b}[2J".into());
        addon.session_up(false);
        for counter in [
            &addon.accepted,
            &addon.waited,
            &addon.wait_expired,
            &addon.refused,
            &addon.bytes_up,
            &addon.bytes_down,
            &addon.reconnects,
        ] {
            counter.inc();
        }
        addon.open.inc();
        let registration = stats.registration("REPORTS").unwrap();
        registration.renewed();
        registration.failed("status=401".into());
        stats
    }

    #[test]
    fn an_answer_comes_back_from_its_json_as_it_was_sent() {
        let sent = snapshot(&busy());
        assert!(sent.all_up && sent.rss_bytes.is_some(), "{sent:?}");
        assert!(sent.addons[0].session.last_error.is_some(), "{sent:?}");
        assert!(sent.registrations[0].expires_at.is_some(), "{sent:?}");
        let text = serde_json::to_string(&sent).unwrap();
        let read: Answer = serde_json::from_str(&text).unwrap();
        assert_eq!(read, sent);
    }

    #[test]
    fn the_json_has_the_keys_scripts_read() {
        let answer = snapshot(&busy());
        let mut printed = serde_json::to_value(Status::Running(answer.clone())).unwrap();
        for volatile in ["version", "pid", "started_at", "uptime_s", "rss_bytes"] {
            assert!(printed[volatile] != json!(null), "{volatile}: {printed:#}");
            printed[volatile] = json!(null);
        }
        let addon = &answer.addons[0];
        let registration = &answer.registrations[0];
        let expected = json!({
            "running": true,
            "version": null,
            "pid": null,
            "started_at": null,
            "uptime_s": null,
            "phase": "serving",
            "all_up": true,
            "rss_bytes": null,
            "addons": [{
                "addon": "DATABASE",
                "server": "ssh.example:22",
                "session": {
                    "up": true,
                    "since": addon.session.since,
                    "last_error": {
                        "at": addon.session.last_error.as_ref().unwrap().at,
                        "error": "refused\n\u{1b}[2J",
                    },
                },
                "reconnects": 1,
                "connections": {
                    "open": 1, "accepted": 1, "waited": 1, "wait_expired": 1, "refused": 1,
                },
                "bytes": {"up": 1, "down": 1},
            }],
            "registrations": [{
                "addon": "REPORTS",
                "registered": true,
                "last_renewed": registration.last_renewed,
                "expires_at": registration.expires_at,
                "last_error": {
                    "at": registration.last_error.as_ref().unwrap().at,
                    "error": "status=401",
                },
            }],
        });
        assert_eq!(printed, expected);
        assert_eq!(
            serde_json::to_value(Status::NotRunning {
                looked_in: vec!["/tmp/a".into()],
                no_answer: vec![],
            })
            .unwrap(),
            json!({"running": false, "looked_in": ["/tmp/a"], "no_answer": []})
        );
    }
}
