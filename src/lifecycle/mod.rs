//! The launch forms: how the process is started, and what tells it to stop. Each asks `config`
//! for the add-ons in the environment, builds its stop trigger (`engine::Trigger`) and hands
//! both to the engine, which serves and stops.
//! - [`foreground`] (`bpg-tunnel`): serve until a signal;
//! - [`daemon`] (`bpg-tunnel start --owner-pid PID`, from profile.d or exec.d): detach, report
//!   readiness, serve while the owner (the app) lives, drain with it on SIGTERM; `stop`;
//! - [`run`] (`bpg-tunnel run -- CMD`, a Docker ENTRYPOINT prefix): serve around a child;
//! - [`exec_d`] (`bpg-tunnel exec-d`, a CNB launcher's exec.d): `start`, owned by the launched
//!   process.

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

pub mod daemon;
pub mod exec_d;
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
    /// `BPG_TUNNEL_DISABLE`: start no tunnel.
    pub disabled: bool,
    /// In a `heroku ps:exec` session, where `exec-d` starts nothing (the profile.d script does
    /// not run `start` there).
    pub in_ps_exec: bool,
}

/// The core-file limit this process was started with, for `run`'s command.
static CORE_LIMIT: OnceLock<libc::rlimit> = OnceLock::new();

/// The private key, the JWT and the database passwords live in this process's memory and
/// environment: never let a crash write them to a core file. Only the soft limit is lowered,
/// so `run` can give its command the limits it was itself started with.
pub fn forbid_core_dumps() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit, setrlimit and prctl only read or change this process's own attributes.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_CORE, &mut limit) == 0 {
            let _ = CORE_LIMIT.set(limit);
        }
        let none = libc::rlimit {
            rlim_cur: 0,
            rlim_max: limit.rlim_max,
        };
        libc::setrlimit(libc::RLIMIT_CORE, &none);
        libc::prctl(libc::PR_SET_DUMPABLE, 0);
    }
}
