//! The daemon's own settings. Every one is a flag and a `BPG_TUNNEL_*` variable, so it can be
//! set as a Heroku config var without touching the Procfile. [`Options::settings`] turns them
//! into each component's own settings, once; nothing else reads `Options`.

use std::ffi::OsString;
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{ArgMatches, Args};

use crate::engine::EngineSettings;
use crate::forwarder::ForwarderSettings;
use crate::lifecycle::LifecycleSettings;
use crate::private_app::RegistrationSettings;
use crate::ssh::SessionSettings;
use crate::supervisor::SupervisorSettings;

#[derive(Debug, Clone, Args)]
pub struct Options {
    /// How long to wait for the SSH server to accept, complete the handshake and authenticate.
    #[arg(long, env = "BPG_TUNNEL_CONNECT_TIMEOUT", default_value = "10s", value_parser = parse_positive_duration)]
    pub connect_timeout: Duration,

    /// After this long without hearing from the SSH server, ask it for a sign of life.
    #[arg(long, env = "BPG_TUNNEL_KEEPALIVE_INTERVAL", default_value = "3s", value_parser = parse_positive_duration)]
    pub keepalive_interval: Duration,

    /// The session is declared dead after this many keepalive intervals without a reply (at
    /// least 2, so that at least one keepalive is sent and given an interval to be answered).
    #[arg(long, env = "BPG_TUNNEL_KEEPALIVE_COUNT", default_value_t = 3, value_parser = clap::value_parser!(u32).range(2..100))]
    pub keepalive_count: u32,

    /// How long a new connection waits for the SSH session while it is down before being closed.
    #[arg(long, env = "BPG_TUNNEL_CONNECTION_WAIT_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub connection_wait_timeout: Duration,

    /// Longest pause between reconnect attempts after network failures.
    #[arg(long, env = "BPG_TUNNEL_RECONNECT_MAX_DELAY", default_value = "10s", value_parser = parse_duration)]
    pub reconnect_max_delay: Duration,

    /// Pause after the server rejects our key or presents the wrong host key (it runs fail2ban).
    #[arg(long, env = "BPG_TUNNEL_AUTH_FAILURE_DELAY", default_value = "30s", value_parser = parse_duration)]
    pub auth_failure_delay: Duration,

    /// `start` and `run` return (or start the app) once every tunnel is up, or after this long.
    #[arg(long, env = "BPG_TUNNEL_READY_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub ready_timeout: Duration,

    /// After SIGTERM, keep serving while the app drains, but leave after this long at most
    /// (Heroku sends SIGKILL 30 s after SIGTERM).
    #[arg(long, env = "BPG_TUNNEL_DRAIN_TIMEOUT", default_value = "25s", value_parser = parse_duration)]
    pub drain_timeout: Duration,

    /// Once the app is gone (or on a plain stop), how long open connections get to finish.
    #[arg(long, alias = "owner-grace", env = "BPG_TUNNEL_GRACE", default_value = "2s", value_parser = parse_duration)]
    pub grace: Duration,

    /// Where the daemon keeps its pid file; default `$XDG_RUNTIME_DIR`, else `$HOME/.borealis-pg`.
    #[arg(long, env = "BPG_TUNNEL_STATE_DIR")]
    pub state_dir: Option<std::path::PathBuf>,

    /// Private-app-tunnel mode: how often the dyno's registration is renewed (the add-on drops
    /// it 75 min after the last renewal).
    #[arg(long, env = "BPG_TUNNEL_PRIVATE_TUNNEL_EXTEND_INTERVAL", default_value = "65m", value_parser = parse_extend_interval)]
    pub private_tunnel_extend_interval: Duration,

    /// Private-app-tunnel mode: pause before retrying a renewal that failed on the network or
    /// with a 5xx.
    #[arg(long, env = "BPG_TUNNEL_PRIVATE_TUNNEL_RETRY_INTERVAL", default_value = "3m", value_parser = parse_positive_duration)]
    pub private_tunnel_retry_interval: Duration,

    /// Private-app-tunnel mode: the longest any one request to the add-on's API may take.
    #[arg(long, env = "BPG_TUNNEL_PRIVATE_TUNNEL_REQUEST_TIMEOUT", default_value = "10s", value_parser = parse_positive_duration)]
    pub private_tunnel_request_timeout: Duration,

    /// Tests only: a PEM file of one more CA to trust for the add-on's API, on top of the
    /// built-in web roots. Never needed in production.
    #[arg(long, env = "BPG_TUNNEL_TEST_API_CA_FILE", hide = true)]
    pub test_api_ca_file: Option<std::path::PathBuf>,

    /// Log filter in RUST_LOG syntax (`info`, `debug`, `bpg_tunnel=debug`); RUST_LOG is read
    /// when this is not set; the default is `info`.
    #[arg(long, env = "BPG_TUNNEL_LOG")]
    pub log: Option<String>,
}

impl Options {
    /// Each component's settings, built once; `flags_env` is what [`flags_as_env`] found.
    pub fn settings(&self, flags_env: Vec<(String, OsString)>) -> Settings {
        Settings {
            engine: EngineSettings {
                supervisor: SupervisorSettings {
                    session: SessionSettings {
                        connect_timeout: self.connect_timeout,
                        keepalive_interval: self.keepalive_interval,
                        keepalive_count: self.keepalive_count,
                    },
                    reconnect_max_delay: self.reconnect_max_delay,
                    auth_failure_delay: self.auth_failure_delay,
                },
                forwarder: ForwarderSettings {
                    connection_wait_timeout: self.connection_wait_timeout,
                },
                registration: RegistrationSettings {
                    extend_interval: self.private_tunnel_extend_interval,
                    retry_interval: self.private_tunnel_retry_interval,
                    request_timeout: self.private_tunnel_request_timeout,
                    test_api_ca_file: self.test_api_ca_file.clone(),
                },
            },
            lifecycle: LifecycleSettings {
                ready_timeout: self.ready_timeout,
                drain_timeout: self.drain_timeout,
                grace: self.grace,
                state_dir: self.state_dir.clone(),
                flags_env,
            },
        }
    }

    pub fn log_filter(&self) -> String {
        self.log
            .clone()
            .or_else(|| std::env::var("RUST_LOG").ok())
            .unwrap_or_else(|| "info".to_owned())
    }
}

/// Every component's settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub engine: EngineSettings,
    pub lifecycle: LifecycleSettings,
}

/// The options given as flags, as the `BPG_TUNNEL_*` variables they stand for: a re-executed
/// daemon gets them this way (it inherits those set as variables). The table is clap's own
/// (each option's `env`), so no option can be forgotten here.
pub fn flags_as_env(matches: &ArgMatches) -> Vec<(String, OsString)> {
    Options::augment_args(clap::Command::new("options"))
        .get_arguments()
        .filter_map(|arg| {
            let var = arg.get_env()?;
            let id = arg.get_id().as_str();
            if matches.value_source(id) != Some(ValueSource::CommandLine) {
                return None;
            }
            let value = matches.get_raw(id)?.next()?;
            Some((var.to_string_lossy().into_owned(), value.to_owned()))
        })
        .collect()
}

/// A renewal period the add-on's 75 min expiry leaves room for.
fn parse_extend_interval(raw: &str) -> Result<Duration, String> {
    let interval = parse_positive_duration(raw)?;
    if interval >= Duration::from_secs(75 * 60) {
        return Err(
            "expected less than 75m: the add-on drops a registration 75 min after its last renewal"
                .into(),
        );
    }
    Ok(interval)
}

/// Like [`parse_duration`], but zero is refused (a zero connect timeout or keepalive interval
/// would keep every session from ever staying up).
fn parse_positive_duration(raw: &str) -> Result<Duration, String> {
    match parse_duration(raw)? {
        d if d < Duration::from_millis(100) => {
            Err(format!("{raw:?} is too short; expected at least 100ms"))
        }
        d => Ok(d),
    }
}

/// Longest duration accepted anywhere: keeps deadline arithmetic far from overflow.
const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);

/// Accepts `250ms`, `3s`, `2m`, `1h`, or a bare number of seconds (`1.5`).
fn parse_duration(raw: &str) -> Result<Duration, String> {
    let raw = raw.trim();
    let split = raw
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(raw.len());
    let (number, unit) = raw.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("{raw:?} is not a duration; expected e.g. 500ms, 3s, 2m"))?;
    let scale = match unit.trim() {
        "ms" => 0.001,
        "" | "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        other => return Err(format!("unknown unit {other:?}; expected ms, s, m or h")),
    };
    Duration::try_from_secs_f64(number * scale)
        .ok()
        .filter(|d| *d <= MAX_DURATION)
        .ok_or_else(|| format!("{raw:?} is out of range; expected at most 24h, e.g. 500ms, 3s, 2m"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[derive(Debug, clap::Parser)]
    struct Cli {
        #[command(flatten)]
        options: Options,
        #[command(subcommand)]
        command: Option<Command>,
    }

    #[derive(Debug, clap::Subcommand)]
    enum Command {
        Start {
            #[arg(long)]
            owner_pid: i32,
        },
    }

    #[test]
    fn every_option_is_a_variable_too() {
        let command = Options::augment_args(clap::Command::new("options"));
        for arg in command.get_arguments() {
            let var = arg.get_env().map(|v| v.to_string_lossy().into_owned());
            assert!(
                var.is_some_and(|v| v.starts_with("BPG_TUNNEL_")),
                "--{} has no BPG_TUNNEL_* variable",
                arg.get_id()
            );
        }
    }

    #[test]
    fn only_flags_given_are_passed_on_as_variables() {
        let matches = Cli::command()
            .try_get_matches_from([
                "bpg-tunnel",
                "--grace",
                "1500ms",
                "--log",
                "debug",
                "start",
                "--owner-pid",
                "5",
            ])
            .unwrap();
        let mut env = flags_as_env(&matches);
        env.sort();
        assert_eq!(
            env,
            [
                ("BPG_TUNNEL_GRACE".to_owned(), OsString::from("1500ms")),
                ("BPG_TUNNEL_LOG".to_owned(), OsString::from("debug")),
            ]
        );
        // The old flag name still works, and means the same variable.
        let matches = Cli::command()
            .try_get_matches_from(["bpg-tunnel", "--owner-grace", "1s"])
            .unwrap();
        assert_eq!(
            flags_as_env(&matches),
            [("BPG_TUNNEL_GRACE".to_owned(), OsString::from("1s"))]
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("3s"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("3 fortnights").is_err());
        assert!(parse_duration("1e30").is_err());
        assert!(parse_duration("25h").is_err());
        assert!(parse_positive_duration("0").is_err());
        assert_eq!(parse_positive_duration("1s"), Ok(Duration::from_secs(1)));
    }
}
