//! bpg-tunnel: keeps Borealis Isolated Postgres reachable on 127.0.0.1 from a Heroku dyno.
//!
//! One module per concern:
//! - [`config`]: discovers add-on attachments from the environment.
//! - [`options`]: the daemon's own settings (`BPG_TUNNEL_*` and flags).
//! - [`logfmt`]: one logfmt line per event on stdout.
//! - [`ssh`]: one authenticated, pinned, keep-alive-checked SSH session.
//! - [`supervisor`]: keeps a session up per add-on, reconnecting with [`backoff`].
//! - [`forwarder`]: the 127.0.0.1 listeners and the per-connection copy over SSH channels.
//! - [`private_app`]: private-app-tunnel mode: the dyno's registration with the add-on's API.
//! - [`lifecycle`]: how the process starts, serves and stops.

pub mod backoff;
pub mod config;
pub mod forwarder;
pub mod lifecycle;
pub mod logfmt;
pub mod options;
pub mod private_app;
pub mod ssh;
pub mod supervisor;
