//! The daemon's own settings. Every one is a flag and a `BPG_TUNNEL_*` variable, so it can be
//! set as a Heroku config var without touching the Procfile.

use std::time::Duration;

use clap::Args;

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
    #[arg(long, env = "BPG_TUNNEL_GRACE", default_value = "2s", value_parser = parse_duration)]
    pub owner_grace: Duration,

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
    /// These settings as `BPG_TUNNEL_*` variables, so a re-executed daemon gets the values the
    /// caller gave as flags.
    pub fn to_env(&self) -> Vec<(&'static str, String)> {
        let ms = |d: Duration| format!("{}ms", d.as_millis());
        let mut env = vec![
            ("BPG_TUNNEL_CONNECT_TIMEOUT", ms(self.connect_timeout)),
            ("BPG_TUNNEL_KEEPALIVE_INTERVAL", ms(self.keepalive_interval)),
            (
                "BPG_TUNNEL_KEEPALIVE_COUNT",
                self.keepalive_count.to_string(),
            ),
            (
                "BPG_TUNNEL_CONNECTION_WAIT_TIMEOUT",
                ms(self.connection_wait_timeout),
            ),
            (
                "BPG_TUNNEL_RECONNECT_MAX_DELAY",
                ms(self.reconnect_max_delay),
            ),
            ("BPG_TUNNEL_AUTH_FAILURE_DELAY", ms(self.auth_failure_delay)),
            ("BPG_TUNNEL_READY_TIMEOUT", ms(self.ready_timeout)),
            ("BPG_TUNNEL_DRAIN_TIMEOUT", ms(self.drain_timeout)),
            ("BPG_TUNNEL_GRACE", ms(self.owner_grace)),
            ("BPG_TUNNEL_LOG", self.log_filter()),
        ];
        env.push((
            "BPG_TUNNEL_PRIVATE_TUNNEL_EXTEND_INTERVAL",
            ms(self.private_tunnel_extend_interval),
        ));
        env.push((
            "BPG_TUNNEL_PRIVATE_TUNNEL_RETRY_INTERVAL",
            ms(self.private_tunnel_retry_interval),
        ));
        env.push((
            "BPG_TUNNEL_PRIVATE_TUNNEL_REQUEST_TIMEOUT",
            ms(self.private_tunnel_request_timeout),
        ));
        if let Some(dir) = &self.state_dir {
            env.push(("BPG_TUNNEL_STATE_DIR", dir.display().to_string()));
        }
        if let Some(file) = &self.test_api_ca_file {
            env.push(("BPG_TUNNEL_TEST_API_CA_FILE", file.display().to_string()));
        }
        env
    }

    pub fn log_filter(&self) -> String {
        self.log
            .clone()
            .or_else(|| std::env::var("RUST_LOG").ok())
            .unwrap_or_else(|| "info".to_owned())
    }
}

/// A renewal period the add-on's 75 min expiry leaves room for.
pub fn parse_extend_interval(raw: &str) -> Result<Duration, String> {
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
pub fn parse_positive_duration(raw: &str) -> Result<Duration, String> {
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
pub fn parse_duration(raw: &str) -> Result<Duration, String> {
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
