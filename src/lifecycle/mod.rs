//! The launch forms: how the process is started, and what tells it to stop. Each builds its
//! stop trigger (`engine::Trigger`) and hands it to the engine, which serves and stops.
//! - [`foreground`] (`bpg-tunnel`): serve until a signal;
//! - [`daemon`] (`bpg-tunnel start --owner-pid PID`, from profile.d or exec.d): detach, report
//!   readiness, serve while the owner (the app) lives, drain with it on SIGTERM; `stop`;
//! - [`run`] (`bpg-tunnel run -- CMD`, a Docker ENTRYPOINT prefix): serve around a child.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

pub mod daemon;
pub mod foreground;
mod owner;
mod pidfile;
pub mod run;
mod signals;

/// What the launch forms need; see [`crate::options::Options`].
#[derive(Debug, Clone)]
pub struct LifecycleSettings {
    /// `start` and `run` go on once every tunnel is up, or after this long.
    pub ready_timeout: Duration,
    /// After SIGTERM, serve while the app drains, but no longer than this.
    pub drain_timeout: Duration,
    /// Once the app is gone (or on a plain stop), how long open connections get to finish.
    pub grace: Duration,
    /// Where the daemon's pid file lives, if not in the default place.
    pub state_dir: Option<PathBuf>,
    /// The options given as flags, as variables, for the re-executed daemon.
    pub flags_env: Vec<(String, OsString)>,
}
