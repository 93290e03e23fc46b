//! The daemon's own settings. Every one is a flag and a `BPG_TUNNEL_*` variable, so it can be
//! set as a Heroku config var without touching the Procfile. [`Options::settings`] turns them
//! into each component's own settings, once; nothing else reads `Options`.
//!
//! A value that cannot be used never stops the process (the app would not start with it): clap
//! takes every value as text, and [`Options::settings`] checks it with the parsers in `parse`,
//! uses the default instead of a bad one, and returns what it replaced, for a warning that names
//! the variable (or flag), what was expected and the default used.

mod parse;

use std::ffi::{OsStr, OsString};
use std::path::PathBuf;

use clap::parser::ValueSource;
use clap::{ArgMatches, Args};

use crate::dyno::Dyno;
use crate::engine::{EngineSettings, TelemetrySettings};
use crate::forwarder::ForwarderSettings;
use crate::lifecycle::LifecycleSettings;
use crate::private_app::RegistrationSettings;
use crate::ssh::SessionSettings;
use crate::supervisor::SupervisorSettings;
use parse::{
    parse_duration, parse_extend_interval, parse_health_addr, parse_keepalive_count,
    parse_log_filter, parse_metrics_interval, parse_positive_duration, InvalidValue,
};

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

    /// Any non-empty value starts no tunnel: `start` and `exec-d` do nothing, `run` runs its
    /// command alone, and `bpg-tunnel` exits at once (as the profile.d script, which checks it
    /// before starting anything).
    #[arg(
        long,
        env = "BPG_TUNNEL_DISABLE",
        value_name = "ANY",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "1"
    )]
    disable: Option<OsString>,

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
        let dyno = Dyno::from_env();
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
                dyno: dyno.clone(),
            },
            lifecycle: LifecycleSettings {
                ready_timeout: read.value("ready_timeout", &self.ready_timeout, parse_duration),
                drain_timeout: read.value("drain_timeout", &self.drain_timeout, parse_duration),
                grace: read.value("grace", &self.grace, parse_duration),
                state_dir: path(&self.state_dir),
                flags_env: Vec::new(),
                disabled: self.disable.as_ref().is_some_and(|value| !value.is_empty()),
                in_ps_exec: dyno.in_ps_exec,
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
    #[expect(
        clippy::disallowed_methods,
        reason = "BPG_TUNNEL_* variables are this module's to read"
    )]
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
    fn value<T>(&mut self, id: &str, raw: &OsStr, parse: fn(&str) -> Result<T, InvalidValue>) -> T {
        let default = self.arg(id).get_default_values()[0]
            .to_str()
            .expect("defaults are text")
            .to_owned();
        let default = default.as_str();
        let parsed = match raw.to_str() {
            // An empty value is no value: a config var set to nothing means the default.
            Some(text) if text.trim().is_empty() => return parse(default).expect("defaults parse"),
            Some(text) => parse(text),
            None => Err(InvalidValue::NotUtf8),
        };
        parsed.unwrap_or_else(|problem| {
            let name = self.name_of(id);
            if name.starts_with("--") {
                self.bad_flags.push(id.to_owned());
            }
            self.invalid.push(InvalidSetting {
                name,
                problem: problem.to_string(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, FromArgMatches};
    use std::time::Duration;

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

    #[test]
    fn disable_is_any_non_empty_value_and_the_bare_flag_means_yes() {
        assert!(!settings_from(&[]).0.lifecycle.disabled);
        assert!(settings_from(&["--disable"]).0.lifecycle.disabled);
        assert!(settings_from(&["--disable=0"]).0.lifecycle.disabled);
        assert!(!settings_from(&["--disable="]).0.lifecycle.disabled);
        // A bare flag before a subcommand takes no value from it.
        let (settings, invalid) = settings_from(&["--disable", "start", "--owner-pid", "1"]);
        assert!(settings.lifecycle.disabled);
        assert_eq!(invalid, []);
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
    fn a_value_that_is_not_text_is_replaced_without_being_quoted() {
        use std::os::unix::ffi::OsStringExt;
        let argv = [
            OsString::from("bpg-tunnel"),
            OsString::from("--log"),
            OsString::from_vec(b"de\xffbug".to_vec()),
        ];
        let matches = Cli::command().try_get_matches_from(argv).unwrap();
        let cli = Cli::from_arg_matches(&matches).unwrap();
        let (settings, invalid) = cli.options.settings(&matches);
        assert_eq!(settings.log, "info");
        assert_eq!(
            invalid,
            [InvalidSetting {
                name: "--log".to_owned(),
                problem: "is not valid UTF-8".to_owned(),
                default: "info".to_owned(),
            }]
        );
    }
}
