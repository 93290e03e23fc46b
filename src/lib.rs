//! bpg-tunnel: keeps Borealis Isolated Postgres reachable on 127.0.0.1 from a Heroku dyno.
//!
//! One module per concern; docs/architecture.md walks the data path and says which module may
//! depend on which (`tests/architecture.rs` holds it).
//! - [`options`]: the daemon's own settings (`BPG_TUNNEL_*` and flags), turned into each
//!   component's typed settings.
//! - `config`: discovers add-on attachments from the environment.
//! - `dyno`: who this process is on the platform: the dyno's name and its client id.
//! - `state_dir`: where the pid file and the status socket live.
//! - `engine`: binds, starts, serves and stops the tunnels of the add-ons it is handed.
//! - `supervisor`: keeps a session up per add-on, reconnecting with `backoff`.
//! - `ssh`: one authenticated, pinned, keep-alive-checked SSH session.
//! - `forwarder`: the 127.0.0.1 listeners and the per-connection copy over SSH channels.
//! - `private_app`: private-app-tunnel mode: the dyno's registration with the add-on's API.
//! - [`check`]: `bpg-tunnel check`, which walks each add-on's path step by step and says what
//!   is wrong; `pg_tls`: its login's TLS, as the URL's `sslmode` asks.
//! - `stats`: what the tunnels count and how they are, read by the three below.
//! - [`status`]: the status socket the engine serves and `bpg-tunnel status`, which asks it.
//! - `metrics`: a metrics line per add-on in l2met form, at an interval.
//! - `health`: the optional HTTP endpoint (`/startup`, `/liveness`, `/readiness`, `/metrics`).
//! - [`lifecycle`]: the launch forms (foreground, `start`'s daemon, `run --`): when to stop.
//! - [`logfmt`]: one logfmt line per event on stdout.
//!
//! Only what the binary needs is public, and [`ConnInfo`], with which the tests and the demo
//! write the config vars an add-on would set.

mod backoff;
pub mod check;
mod config;
mod dyno;
mod engine;
mod forwarder;
mod health;
pub mod lifecycle;
pub mod logfmt;
mod metrics;
pub mod options;
mod pg_tls;
mod private_app;
mod ssh;
mod state_dir;
mod stats;
pub mod status;
mod supervisor;
mod tls_roots;

pub use config::conn_info::ConnInfo;
pub use engine::runtime;
/// The pauses after rejections, which tests/fleet.rs holds against fail2ban with what it
/// measures on a real sshd.
#[doc(hidden)]
pub use supervisor::{auth_failure_pause, most_attempts_within, DEFAULT_AUTH_FAILURE_DELAY};

/// How many cases each property test runs: `BPG_TUNNEL_FUZZ_CASES` (`make fuzz`), else 256.
#[cfg(test)]
#[expect(clippy::disallowed_methods, reason = "tests only: `make fuzz` sets it")]
pub(crate) fn fuzz_cases() -> u32 {
    std::env::var("BPG_TUNNEL_FUZZ_CASES")
        .ok()
        .and_then(|cases| cases.parse().ok())
        .unwrap_or(256)
}
