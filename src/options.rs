//! The daemon's own settings. Every one is a flag and a `BPG_TUNNEL_*` variable, so it can be
//! set as a Heroku config var without touching the Procfile. [`Options::settings`] turns them
//! into each component's own settings, once; nothing else reads `Options`.
//!
//! A value that cannot be used never stops the process (the app would not start with it): clap
//! takes every value as text, and [`Options::settings`] checks it, uses the default instead of
//! a bad one, and returns what it replaced, for a warning that names the variable (or flag),
//! what was expected and the default used.

use std::ffi::{OsStr, OsString};
use std::path::PathBuf;
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{ArgMatches, Args};

use crate::dyno::Dyno;
use crate::engine::{EngineSettings, TelemetrySettings};
use crate::forwarder::ForwarderSettings;
use crate::lifecycle::LifecycleSettings;
use crate::private_app::RegistrationSettings;
use crate::ssh::SessionSettings;
use crate::supervisor::SupervisorSettings;

/// The longest piece of a bad value quoted back in a warning.
const SHOWN_CHARS: usize = 64;

// Every field is the value as given; `settings` parses it (see the module's comment).
#[derive(Debug, Clone, Args)]
pub struct Options {
    /// How long to wait for the SSH server to accept, complete the handshake and authenticate.
    #[arg(
        long,
        env = "BPG_TUNNEL_CONNECT_TIMEOUT",
        default_value = "10s",
        value_name = "DURATION"
    )]
    connect_timeout: OsString,

    /// After this long without hearing from the SSH server, ask it for a sign of life.
    #[arg(
        long,
        env = "BPG_TUNNEL_KEEPALIVE_INTERVAL",
        default_value = "3s",
        value_name = "DURATION"
    )]
    keepalive_interval: OsString,

    /// The session is declared dead after this many keepalive intervals without a reply (2 to
    /// 99: at least one keepalive is sent and given an interval to be answered).
    #[arg(
        long,
        env = "BPG_TUNNEL_KEEPALIVE_COUNT",
        default_value = "3",
        value_name = "COUNT"
    )]
    keepalive_count: OsString,

    /// How long a new connection waits for the SSH session while it is down before being closed.
    #[arg(
        long,
        env = "BPG_TUNNEL_CONNECTION_WAIT_TIMEOUT",
        default_value = "30s",
        value_name = "DURATION"
    )]
    connection_wait_timeout: OsString,

    /// Longest pause between reconnect attempts after network failures.
    #[arg(
        long,
        env = "BPG_TUNNEL_RECONNECT_MAX_DELAY",
        default_value = "10s",
        value_name = "DURATION"
    )]
    reconnect_max_delay: OsString,

    /// First pause after the server rejects our key or presents the wrong host key, doubling up
    /// to 10 minutes. The server runs fail2ban (5 failures in 10 minutes ban the address): from
    /// 41 s up, 4 attempts at most fall within any 10 minutes.
    #[arg(
        long,
        env = "BPG_TUNNEL_AUTH_FAILURE_DELAY",
        default_value = "60s",
        value_name = "DURATION"
    )]
    auth_failure_delay: OsString,

    /// `start` and `run` return (or start the app) once every tunnel reaches its database, or
    /// after this long.
    #[arg(
        long,
        env = "BPG_TUNNEL_READY_TIMEOUT",
        default_value = "10s",
        value_name = "DURATION"
    )]
    ready_timeout: OsString,

    /// After SIGTERM, keep serving while the app drains, but leave after this long at most
    /// (Heroku sends SIGKILL 30 s after SIGTERM).
    #[arg(
        long,
        env = "BPG_TUNNEL_DRAIN_TIMEOUT",
        default_value = "25s",
        value_name = "DURATION"
    )]
    drain_timeout: OsString,

    /// Once the app is gone (or on a plain stop), how long open connections get to finish.
    #[arg(
        long,
        alias = "owner-grace",
        env = "BPG_TUNNEL_GRACE",
        default_value = "2s",
        value_name = "DURATION"
    )]
    grace: OsString,

    /// Where the daemon keeps its pid file; by default the first usable of `$XDG_RUNTIME_DIR`,
    /// `$HOME/.borealis-pg` and `borealis-pg-<uid>` under the temporary directory.
    #[arg(long, env = "BPG_TUNNEL_STATE_DIR", value_name = "DIR")]
    state_dir: Option<OsString>,

    /// Private-app-tunnel mode: how often the dyno's registration is renewed (the add-on drops
    /// it 75 min after the last renewal).
    #[arg(
        long,
        env = "BPG_TUNNEL_PRIVATE_TUNNEL_EXTEND_INTERVAL",
        default_value = "65m",
        value_name = "DURATION"
    )]
    private_tunnel_extend_interval: OsString,

    /// Private-app-tunnel mode: pause before retrying a renewal that failed on the network or
    /// with a 5xx.
    #[arg(
        long,
        env = "BPG_TUNNEL_PRIVATE_TUNNEL_RETRY_INTERVAL",
        default_value = "3m",
        value_name = "DURATION"
    )]
    private_tunnel_retry_interval: OsString,

    /// Private-app-tunnel mode: the longest any one request to the add-on's API may take.
    #[arg(
        long,
        env = "BPG_TUNNEL_PRIVATE_TUNNEL_REQUEST_TIMEOUT",
        default_value = "10s",
        value_name = "DURATION"
    )]
    private_tunnel_request_timeout: OsString,

    /// Tests only: a PEM file of one more CA to trust for the add-on's API, on top of the
    /// built-in web roots. Honoured only by builds with the `test-api-ca` feature; declared in
    /// every build, so that a release build warns about it rather than refusing to start.
    #[arg(long, env = "BPG_TUNNEL_TEST_API_CA_FILE", hide = true)]
    test_api_ca_file: Option<OsString>,

    /// How often to log a metrics line per add-on (l2met form, see docs/operating.md); 0 for never.
    #[arg(
        long,
        env = "BPG_TUNNEL_METRICS_INTERVAL",
        default_value = "60s",
        value_name = "DURATION"
    )]
    metrics_interval: OsString,

    /// Serve `/startup`, `/liveness`, `/readiness` and `/metrics` over HTTP at this address
    /// (such as 127.0.0.1:9090); `off` for no endpoint.
    #[arg(
        long,
        env = "BPG_TUNNEL_HEALTH_ADDR",
        default_value = "off",
        value_name = "ADDR"
    )]
    health_addr: OsString,

    /// What to log: a level (`error`, `warn`, `info`, `debug`, `trace`, `off`; `quiet` is
    /// `warn`), or `target=level` pairs separated by commas (`info,russh=debug`). The app's own
    /// RUST_LOG is never read.
    #[arg(
        long,
        env = "BPG_TUNNEL_LOG",
        default_value = "info",
        value_name = "FILTER"
    )]
    log: OsString,
}

/// A setting whose value could not be used, and the default used instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidSetting {
    /// The variable, or the flag when the value came from one.
    pub name: String,
    /// What is wrong and what was expected; the value is quoted at most in part.
    pub problem: String,
    pub default: String,
}

impl Options {
    /// Each component's settings, built once from the values `matches` holds, and whatever had
    /// to be replaced by its default.
    pub fn settings(&self, matches: &ArgMatches) -> (Settings, Vec<InvalidSetting>) {
        let mut read = Reader {
            matches,
            args: options_command(),
            invalid: Vec::new(),
            bad_flags: Vec::new(),
        };
        let mut settings = Settings {
            engine: EngineSettings {
                supervisor: SupervisorSettings {
                    session: SessionSettings {
                        connect_timeout: read.value(
                            "connect_timeout",
                            &self.connect_timeout,
                            parse_positive_duration,
                        ),
                        keepalive_interval: read.value(
                            "keepalive_interval",
                            &self.keepalive_interval,
                            parse_positive_duration,
                        ),
                        keepalive_count: read.value(
                            "keepalive_count",
                            &self.keepalive_count,
                            parse_keepalive_count,
                        ),
                    },
                    reconnect_max_delay: read.value(
                        "reconnect_max_delay",
                        &self.reconnect_max_delay,
                        parse_duration,
                    ),
                    auth_failure_delay: read.value(
                        "auth_failure_delay",
                        &self.auth_failure_delay,
                        parse_duration,
                    ),
                },
                forwarder: ForwarderSettings {
                    connection_wait_timeout: read.value(
                        "connection_wait_timeout",
                        &self.connection_wait_timeout,
                        parse_duration,
                    ),
                },
                registration: RegistrationSettings {
                    extend_interval: read.value(
                        "private_tunnel_extend_interval",
                        &self.private_tunnel_extend_interval,
                        parse_extend_interval,
                    ),
                    retry_interval: read.value(
                        "private_tunnel_retry_interval",
                        &self.private_tunnel_retry_interval,
                        parse_positive_duration,
                    ),
                    request_timeout: read.value(
                        "private_tunnel_request_timeout",
                        &self.private_tunnel_request_timeout,
                        parse_positive_duration,
                    ),
                    test_api_ca_file: self.test_api_ca_file(&mut read),
                },
                telemetry: TelemetrySettings {
                    metrics_interval: read.value(
                        "metrics_interval",
                        &self.metrics_interval,
                        parse_metrics_interval,
                    ),
                    health_addr: read.value("health_addr", &self.health_addr, parse_health_addr),
                    state_dir: path(&self.state_dir),
                },
                dyno: Dyno::from_env(),
            },
            lifecycle: LifecycleSettings {
                ready_timeout: read.value("ready_timeout", &self.ready_timeout, parse_duration),
                drain_timeout: read.value("drain_timeout", &self.drain_timeout, parse_duration),
                grace: read.value("grace", &self.grace, parse_duration),
                state_dir: path(&self.state_dir),
                flags_env: Vec::new(),
            },
            log: read.value("log", &self.log, parse_log_filter),
        };
        settings.lifecycle.flags_env = flags_as_env(&read.args, matches, &read.bad_flags);
        (settings, read.invalid)
    }
}

impl Options {
    #[cfg(feature = "test-api-ca")]
    fn test_api_ca_file(&self, _: &mut Reader) -> Option<PathBuf> {
        path(&self.test_api_ca_file)
    }

    /// A release build says so when the tests' variable is set, and goes on without it.
    #[cfg(not(feature = "test-api-ca"))]
    fn test_api_ca_file(&self, read: &mut Reader) -> Option<PathBuf> {
        if std::env::var_os("BPG_TUNNEL_TEST_API_CA_FILE").is_some() {
            read.invalid.push(InvalidSetting {
                name: "BPG_TUNNEL_TEST_API_CA_FILE".to_owned(),
                problem: "is honoured by test builds only; expected it unset in production"
                    .to_owned(),
                default: "unset".to_owned(),
            });
        }
        None
    }
}

/// An empty value is no value: a config var set to nothing means the default.
fn path(raw: &Option<OsString>) -> Option<PathBuf> {
    raw.as_ref()
        .filter(|raw| !raw.is_empty())
        .map(PathBuf::from)
}

struct Reader<'a> {
    matches: &'a ArgMatches,
    args: clap::Command,
    invalid: Vec<InvalidSetting>,
    /// The options whose flag was replaced by its default: not passed on to the daemon.
    bad_flags: Vec<String>,
}

impl Reader<'_> {
    fn arg(&self, id: &str) -> &clap::Arg {
        self.args
            .get_arguments()
            .find(|arg| arg.get_id() == id)
            .expect("every option is declared")
    }

    /// The flag when the value came from one, otherwise the variable.
    fn name_of(&self, id: &str) -> String {
        let arg = self.arg(id);
        match self.matches.value_source(id) {
            Some(ValueSource::CommandLine) => {
                format!("--{}", arg.get_long().expect("every option is a long flag"))
            }
            _ => arg
                .get_env()
                .expect("every option is a variable")
                .to_string_lossy()
                .into_owned(),
        }
    }

    /// `raw` parsed, or (remembering why) the option's default.
    fn value<T>(&mut self, id: &str, raw: &OsStr, parse: fn(&str) -> Result<T, String>) -> T {
        let default = self.arg(id).get_default_values()[0]
            .to_str()
            .expect("defaults are text")
            .to_owned();
        let default = default.as_str();
        let parsed = match raw.to_str() {
            // An empty value is no value: a config var set to nothing means the default.
            Some(text) if text.trim().is_empty() => return parse(default).expect("defaults parse"),
            Some(text) => parse(text),
            None => Err("is not valid UTF-8".to_owned()),
        };
        parsed.unwrap_or_else(|problem| {
            let name = self.name_of(id);
            if name.starts_with("--") {
                self.bad_flags.push(id.to_owned());
            }
            self.invalid.push(InvalidSetting {
                name,
                problem,
                default: default.to_owned(),
            });
            parse(default).expect("defaults parse")
        })
    }
}

/// Every component's settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub engine: EngineSettings,
    pub lifecycle: LifecycleSettings,
    /// The log filter, checked.
    pub log: String,
}

/// The options as clap declares them: their flags, variables and defaults.
fn options_command() -> clap::Command {
    Options::augment_args(clap::Command::new("options"))
}

/// Warns of each setting replaced by its default: once, by the process that serves.
pub fn report(invalid: &[InvalidSetting]) {
    for setting in invalid {
        tracing::warn!(
            event = "setting-invalid",
            var = %setting.name,
            error = %setting.problem,
            default = %setting.default,
            "using the default; the tunnel runs"
        );
    }
}

/// The options given as flags, as the `BPG_TUNNEL_*` variables they stand for: a re-executed
/// daemon gets them this way (it inherits those set as variables). The table is clap's own
/// (each option's `env`), so no option can be forgotten here.
/// Flags in `bad` (replaced by their default here, and said so) are left out: the daemon takes
/// their variable or default instead.
fn flags_as_env(
    options: &clap::Command,
    matches: &ArgMatches,
    bad: &[String],
) -> Vec<(String, OsString)> {
    options
        .get_arguments()
        .filter_map(|arg| {
            let var = arg.get_env()?;
            let id = arg.get_id().as_str();
            if matches.value_source(id) != Some(ValueSource::CommandLine)
                || bad.iter().any(|b| b == id)
            {
                return None;
            }
            let value = matches.get_raw(id)?.next()?;
            Some((var.to_string_lossy().into_owned(), value.to_owned()))
        })
        .collect()
}

/// `raw` as quoted back in a message: at most [`SHOWN_CHARS`] characters of it.
fn shown(raw: &str) -> String {
    let mut chars = raw.chars();
    let head: String = chars.by_ref().take(SHOWN_CHARS).collect();
    if chars.next().is_some() {
        format!("{head:?}…")
    } else {
        format!("{head:?}")
    }
}

/// A level, or `target=level` directives separated by commas. Stricter than tracing's own
/// syntax on purpose: there a misspelt level (`verbose`) is read as a target name, which would
/// silence the daemon without a word.
fn parse_log_filter(raw: &str) -> Result<String, String> {
    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
    let expected = "expected a level (error, warn, info, debug, trace, off) or target=level pairs separated by commas";
    let filter = raw.trim().to_ascii_lowercase();
    if filter == "quiet" {
        return Ok("warn".to_owned());
    }
    for directive in filter.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let (target_ok, level) = match directive.split_once('=') {
            Some((target, level)) => (
                !target.trim().is_empty()
                    && target
                        .trim()
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | ':' | '-')),
                level,
            ),
            None => (true, directive),
        };
        if !target_ok || !LEVELS.contains(&level.trim()) {
            return Err(format!("{} is not a log filter; {expected}", shown(raw)));
        }
    }
    Ok(filter)
}

/// Zero (never), or at least a second: more often would flood the log stream.
fn parse_metrics_interval(raw: &str) -> Result<Duration, String> {
    match parse_duration(raw)? {
        d if d.is_zero() || d >= Duration::from_secs(1) => Ok(d),
        _ => Err(format!(
            "{} is too short; expected 0 (no metrics lines) or at least 1s",
            shown(raw)
        )),
    }
}

/// `host:port`, or `off`.
fn parse_health_addr(raw: &str) -> Result<Option<std::net::SocketAddr>, String> {
    let raw = raw.trim();
    if raw.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    raw.parse().map(Some).map_err(|_| {
        format!(
            "{} is not an address; expected an IP address and port such as 127.0.0.1:9090, or off \
             (0.0.0.0:9090 opens it to the whole network: only where the platform's probes \
             need it and nothing else can reach it)",
            shown(raw)
        )
    })
}

fn parse_keepalive_count(raw: &str) -> Result<u32, String> {
    match raw.trim().parse::<u32>() {
        Ok(count) if (2..100).contains(&count) => Ok(count),
        _ => Err(format!("{} is not a count from 2 to 99", shown(raw))),
    }
}

/// A renewal period the add-on's 75 min expiry leaves room for.
fn parse_extend_interval(raw: &str) -> Result<Duration, String> {
    let interval = parse_positive_duration(raw)?;
    if interval >= Duration::from_secs(75 * 60) {
        return Err(format!(
            "{} is too long; expected less than 75m: the add-on drops a registration 75 min after its last renewal",
            shown(raw)
        ));
    }
    Ok(interval)
}

/// Like [`parse_duration`], but zero is refused (a zero connect timeout or keepalive interval
/// would keep every session from ever staying up).
fn parse_positive_duration(raw: &str) -> Result<Duration, String> {
    match parse_duration(raw)? {
        d if d < Duration::from_millis(100) => Err(format!(
            "{} is too short; expected at least 100ms",
            shown(raw)
        )),
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
    let number: f64 = number.parse().map_err(|_| {
        format!(
            "{} is not a duration; expected e.g. 500ms, 3s, 2m",
            shown(raw)
        )
    })?;
    let scale = match unit.trim() {
        "ms" => 0.001,
        "" | "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        other => {
            return Err(format!(
                "{} has the unknown unit {}; expected ms, s, m or h",
                shown(raw),
                shown(other)
            ))
        }
    };
    Duration::try_from_secs_f64(number * scale)
        .ok()
        .filter(|d| *d <= MAX_DURATION)
        .ok_or_else(|| {
            format!(
                "{} is out of range; expected at most 24h, e.g. 500ms, 3s, 2m",
                shown(raw)
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, FromArgMatches};

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

    fn settings_from(args: &[&str]) -> (Settings, Vec<InvalidSetting>) {
        let argv = std::iter::once("bpg-tunnel").chain(args.iter().copied());
        let matches = Cli::command().try_get_matches_from(argv).unwrap();
        let cli = Cli::from_arg_matches(&matches).unwrap();
        cli.options.settings(&matches)
    }

    #[test]
    fn the_defaults_are_valid() {
        let (settings, invalid) = settings_from(&[]);
        assert_eq!(invalid, []);
        assert_eq!(settings.lifecycle.grace, Duration::from_secs(2));
        assert_eq!(settings.engine.supervisor.session.keepalive_count, 3);
        assert_eq!(settings.log, "info");
        // What the fail2ban bound is computed from (supervisor.rs, tests/fleet.rs).
        assert_eq!(
            settings.engine.supervisor.auth_failure_delay,
            crate::supervisor::DEFAULT_AUTH_FAILURE_DELAY
        );
    }

    #[test]
    fn a_bad_value_is_named_and_replaced_by_the_default_and_the_rest_still_apply() {
        let (settings, invalid) = settings_from(&[
            "--connect-timeout",
            "10 seconds",
            "--keepalive-count",
            "1",
            "--log",
            "verbose",
            "--grace",
            "250ms",
            "--private-tunnel-extend-interval",
            "80m",
        ]);
        let session = &settings.engine.supervisor.session;
        assert_eq!(session.connect_timeout, Duration::from_secs(10));
        assert_eq!(session.keepalive_count, 3);
        assert_eq!(settings.log, "info");
        assert_eq!(settings.lifecycle.grace, Duration::from_millis(250));
        assert_eq!(
            settings.engine.registration.extend_interval,
            Duration::from_secs(65 * 60)
        );
        let named: Vec<_> = invalid
            .iter()
            .map(|i| (i.name.as_str(), i.default.as_str()))
            .collect();
        assert_eq!(
            named,
            [
                ("--connect-timeout", "10s"),
                ("--keepalive-count", "3"),
                ("--private-tunnel-extend-interval", "65m"),
                ("--log", "info"),
            ]
        );
        assert_eq!(
            invalid[0].problem,
            "\"10 seconds\" has the unknown unit \"seconds\"; expected ms, s, m or h"
        );
        assert_eq!(invalid[1].problem, "\"1\" is not a count from 2 to 99");
        // A bad flag is not passed on to the daemon (it would warn of it as a variable); a good
        // one is.
        let relayed: Vec<_> = settings
            .lifecycle
            .flags_env
            .iter()
            .map(|(var, _)| var.as_str())
            .collect();
        assert_eq!(relayed, ["BPG_TUNNEL_GRACE"]);
    }

    #[test]
    fn an_empty_value_means_the_default() {
        let (settings, invalid) = settings_from(&["--ready-timeout", " ", "--state-dir", ""]);
        assert_eq!(invalid, []);
        assert_eq!(settings.lifecycle.ready_timeout, Duration::from_secs(10));
        assert_eq!(settings.lifecycle.state_dir, None);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(
            std::env::var("BPG_TUNNEL_FUZZ_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(256)
        ))]

        #[test]
        fn setting_values_never_panic_and_are_quoted_only_in_part(raw in ".{0,300}") {
            for problem in [
                parse_duration(&raw).err(),
                parse_positive_duration(&raw).err(),
                parse_extend_interval(&raw).err(),
                parse_keepalive_count(&raw).err(),
                parse_log_filter(&raw).err(),
            ]
            .into_iter()
            .flatten()
            {
                // Debug-quoting may write a character as up to ten (`\u{10ffff}`).
                proptest::prop_assert!(problem.chars().count() <= 10 * SHOWN_CHARS + 200, "{}", problem);
            }
        }
    }

    #[test]
    fn log_filters_are_levels_or_target_level_pairs() {
        assert_eq!(parse_log_filter("INFO"), Ok("info".to_owned()));
        assert_eq!(parse_log_filter(" Quiet "), Ok("warn".to_owned()));
        assert_eq!(
            parse_log_filter("warn, bpg_tunnel=debug,russh::client=trace"),
            Ok("warn, bpg_tunnel=debug,russh::client=trace".to_owned())
        );
        for bad in [
            "verbose",
            "info,loud",
            "bpg_tunnel=loud",
            "a b=info",
            "=info",
        ] {
            assert!(parse_log_filter(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn long_values_are_quoted_only_in_part() {
        let long = "x".repeat(10_000);
        let problem = parse_duration(&long).unwrap_err();
        assert!(problem.len() < 200, "{problem}");
        assert!(problem.starts_with(&format!("\"{}\"…", "x".repeat(64))));
        assert_eq!(shown("short"), "\"short\"");
    }

    #[test]
    fn every_option_is_a_variable_too() {
        let command = options_command();
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
        let mut env = flags_as_env(&options_command(), &matches, &[]);
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
            flags_as_env(&options_command(), &matches, &[]),
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

    #[test]
    fn metrics_intervals_are_off_or_at_least_a_second() {
        assert_eq!(parse_metrics_interval("0"), Ok(Duration::ZERO));
        assert_eq!(parse_metrics_interval("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_metrics_interval("60s"), Ok(Duration::from_secs(60)));
        let short = parse_metrics_interval("999ms").unwrap_err();
        assert!(
            short.contains("expected 0 (no metrics lines) or at least 1s"),
            "{short}"
        );
        assert!(parse_metrics_interval("often").is_err());
    }

    #[test]
    fn health_addresses_are_ip_and_port_or_off() {
        assert_eq!(parse_health_addr("off"), Ok(None));
        assert_eq!(parse_health_addr(" OFF "), Ok(None));
        assert_eq!(
            parse_health_addr("127.0.0.1:9090"),
            Ok(Some("127.0.0.1:9090".parse().unwrap()))
        );
        assert_eq!(
            parse_health_addr("[::1]:9090"),
            Ok(Some("[::1]:9090".parse().unwrap()))
        );
        for bad in [
            "9090",
            "localhost:9090",
            "127.0.0.1",
            "127.0.0.1:99999",
            "on",
        ] {
            let problem = parse_health_addr(bad).unwrap_err();
            assert!(
                problem.contains("such as 127.0.0.1:9090"),
                "{bad}: {problem}"
            );
            // Whoever copies the wildcard address from the message is told what it opens.
            assert!(
                problem.contains("0.0.0.0:9090 opens it to the whole network"),
                "{bad}: {problem}"
            );
        }
    }
}
