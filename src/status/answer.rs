//! What a running tunnel answers on its status socket: one type for both ends. The tunnel
//! builds an [`Answer`] from its stats and sends it as JSON; `bpg-tunnel status` reads it back
//! into the same type and shows it, for people or (`--json`) as a [`Status`].
//!
//! A field the answer lacks takes its default (empty, zero, `false`, none), so that `status`
//! shows what a tunnel of another version says instead of failing on it. Times are RFC 3339
//! strings to the second, as the tunnel wrote them: `status` shows them as they came.

use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize, Serializer};

use crate::logfmt::escape_controls;

/// How the running tunnel is doing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Answer {
    pub version: String,
    pub pid: u32,
    pub started_at: String,
    pub uptime_s: u64,
    /// [`Phase::name`](crate::stats::Phase::name).
    pub phase: String,
    /// Serving, with every session up and every registration held.
    pub all_up: bool,
    /// `None` when `/proc` could not tell.
    pub rss_bytes: Option<u64>,
    pub addons: Vec<Addon>,
    pub registrations: Vec<Registration>,
}

/// An SSH add-on's session and figures.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Addon {
    /// Its name (the config var's prefix).
    pub addon: String,
    /// `host:port` of its SSH server.
    pub server: String,
    pub session: Session,
    /// SSH sessions established after the first.
    pub reconnects: u64,
    pub connections: Connections,
    pub bytes: Bytes,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Session {
    pub up: bool,
    /// When it last came up or went down; none before the first attempt ended.
    pub since: Option<String>,
    pub last_error: Option<LastError>,
}

/// The app's connections to the add-on's database, as the metrics count them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Connections {
    pub open: i64,
    pub accepted: u64,
    /// Had to wait for an SSH session.
    pub waited: u64,
    /// Closed because no session or channel came in time.
    pub wait_expired: u64,
    /// The SSH server refused to forward them to the database.
    pub refused: u64,
}

/// Bytes from the app to the database (`up`) and back (`down`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Bytes {
    pub up: u64,
    pub down: u64,
}

/// The last thing that went wrong, and when. `error` is what was said, often by the server.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct LastError {
    pub at: String,
    pub error: String,
}

/// A private-app add-on's registration with the add-on's API.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Registration {
    pub addon: String,
    pub registered: bool,
    pub last_renewed: Option<String>,
    /// When the add-on drops the registration unless it is renewed first.
    pub expires_at: Option<String>,
    pub last_error: Option<LastError>,
}

/// What `status --json` prints: the tunnel's answer with `"running": true`, or, with
/// `"running": false`, where `status` looked and which sockets gave no usable answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    Running(Answer),
    NotRunning {
        looked_in: Vec<String>,
        no_answer: Vec<String>,
    },
}

impl Serialize for Status {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Running<'a> {
            running: bool,
            #[serde(flatten)]
            answer: &'a Answer,
        }
        #[derive(Serialize)]
        struct NotRunning<'a> {
            running: bool,
            looked_in: &'a [String],
            no_answer: &'a [String],
        }
        match self {
            Status::Running(answer) => Running {
                running: true,
                answer,
            }
            .serialize(serializer),
            Status::NotRunning {
                looked_in,
                no_answer,
            } => NotRunning {
                running: false,
                looked_in,
                no_answer,
            }
            .serialize(serializer),
        }
    }
}

impl Answer {
    /// The answer for people: a head line, then a few lines per add-on. Every string in it is
    /// shown escaped: an error's text is what the server said (an SSH disconnect message, an
    /// API's answer), and names and addresses come from the environment.
    pub fn human(&self) -> String {
        let mut out = format!(
            "bpg-tunnel {} (pid {}), {}, running for {}, memory {}\n",
            shown(&self.version),
            self.pid,
            shown(&self.phase),
            ago(self.uptime_s),
            self.rss_bytes
                .map(|b| format!("{:.1} MB", b as f64 / (1024.0 * 1024.0)))
                .unwrap_or_else(|| "?".into()),
        );
        let now = SystemTime::now();
        for addon in &self.addons {
            let session = &addon.session;
            let up = session.up;
            let since = session
                .since
                .as_deref()
                .map(|at| format!(" since {}{}", escape_controls(at), since_ago(at, now)))
                .unwrap_or_default();
            out += &format!(
                "{} {}: SSH session {}{since}, server {}\n",
                if up { "✓" } else { "✗" },
                shown(&addon.addon),
                if up { "up" } else { "down" },
                shown(&addon.server),
            );
            let c = &addon.connections;
            out += &format!(
                "    connections: {} open, {} in all, {} waited for a session, {} gave up waiting, {} refused by the server\n",
                c.open, c.accepted, c.waited, c.wait_expired, c.refused
            );
            out += &format!(
                "    bytes: {} up, {} down; reconnects: {}\n",
                addon.bytes.up, addon.bytes.down, addon.reconnects
            );
            out += &last_error(session.last_error.as_ref());
        }
        for registration in &self.registrations {
            let registered = registration.registered;
            out += &format!(
                "{} {}: {}",
                if registered { "✓" } else { "✗" },
                shown(&registration.addon),
                if registered {
                    "registered"
                } else {
                    "not registered"
                },
            );
            if let Some(renewed) = &registration.last_renewed {
                out += &format!(", renewed {}", escape_controls(renewed));
            }
            if let Some(expires) = &registration.expires_at {
                out += &format!(", expires {} unless renewed", escape_controls(expires));
            }
            out += "\n";
            out += &last_error(registration.last_error.as_ref());
        }
        out += if self.all_up {
            "everything is up\n"
        } else {
            "not everything is up\n"
        };
        out
    }
}

/// The `last error` line, or nothing when there was none.
fn last_error(error: Option<&LastError>) -> String {
    match error {
        Some(error) => format!(
            "    last error ({}): {}\n",
            shown(&error.at),
            shown(&error.error)
        ),
        None => String::new(),
    }
}

/// A string of the answer as people see it: escaped, or `?` when it is missing (empty).
fn shown(value: &str) -> String {
    if value.is_empty() {
        "?".into()
    } else {
        escape_controls(value)
    }
}

/// ` (5m 3s ago)`, when `at` can be read.
fn since_ago(at: &str, now: SystemTime) -> String {
    humantime::parse_rfc3339(at)
        .ok()
        .and_then(|at| now.duration_since(at).ok())
        .map(|d| format!(" ({} ago)", ago(d.as_secs())))
        .unwrap_or_default()
}

fn ago(secs: u64) -> String {
    humantime::format_duration(Duration::from_secs(secs)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_lacking_fields_or_with_more_is_read() {
        let read: Answer = serde_json::from_str(
            r#"{"pid": 7, "addons": [{"addon": "DATABASE", "session": {}}], "later": 1}"#,
        )
        .unwrap();
        assert_eq!(read.pid, 7);
        assert!(!read.all_up && read.rss_bytes.is_none() && read.registrations.is_empty());
        assert_eq!(read.addons[0].addon, "DATABASE");
        assert_eq!(read.addons[0].session, Session::default());
        assert_eq!(read.addons[0].bytes, Bytes::default());
    }
}
