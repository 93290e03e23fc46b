//! The parsers that read each setting's text into its value. They are kept apart from
//! [`super::Options`] because they are the whole of what a user may get wrong: each refusal is an
//! [`InvalidValue`] saying what was expected, and its message is, word for word, the `error=` of
//! the `setting-invalid` warning.

use std::net::SocketAddr;
use std::time::Duration;

/// The longest piece of a bad value quoted back in a warning.
const SHOWN_CHARS: usize = 64;

/// Longest duration accepted anywhere: keeps deadline arithmetic far from overflow.
const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);

/// A zero connect timeout or keepalive interval would keep every session from ever staying up;
/// anything under this is as good as zero.
const MIN_POSITIVE_DURATION: Duration = Duration::from_millis(100);

/// More often would flood the log stream.
const MIN_METRICS_INTERVAL: Duration = Duration::from_secs(1);

/// At least one keepalive is sent and given an interval to be answered.
const KEEPALIVE_COUNT_MIN: u32 = 2;
const KEEPALIVE_COUNT_MAX: u32 = 99;

/// Why a setting's value was refused. The variants are what a caller may match on; the messages
/// are what the user reads, and must not change (docs/operating.md quotes one). A value is kept
/// whole here and cut only when shown, in `Debug` too: a pasted blob never reaches a log whole.
#[derive(Clone, PartialEq, Eq, thiserror::Error)]
pub(super) enum InvalidValue {
    /// Nothing of the value is quoted: it would not survive the log line.
    #[error("is not valid UTF-8")]
    NotUtf8,
    #[error("{} is not a duration; expected e.g. 500ms, 3s, 2m", shown(.value))]
    NotADuration { value: String },
    #[error("{} has the unknown unit {}; expected ms, s, m or h", shown(.value), shown(.unit))]
    UnknownUnit { value: String, unit: String },
    #[error("{} is out of range; expected at most 24h, e.g. 500ms, 3s, 2m", shown(.value))]
    OutOfRange { value: String },
    #[error("{} is too short; expected at least {}", shown(.value), humantime::format_duration(*.min))]
    TooShort { value: String, min: Duration },
    #[error(
        "{} is too short; expected 0 (no metrics lines) or at least {}",
        shown(.value),
        humantime::format_duration(*.min)
    )]
    TooShortForMetrics { value: String, min: Duration },
    #[error("{} is too long; expected less than 75m: the add-on drops a registration 75 min after its last renewal", shown(.value))]
    TooLongForRenewal { value: String },
    #[error("{} is not a count from {min} to {max}", shown(.value))]
    NotACount { value: String, min: u32, max: u32 },
    #[error(
        "{} is not an address; expected an IP address and port such as 127.0.0.1:9090, or off \
         (0.0.0.0:9090 opens it to the whole network: only where the platform's probes \
         need it and nothing else can reach it)",
        shown(.value)
    )]
    NotAnAddress { value: String },
    #[error("{} is not a log filter; expected a level (error, warn, info, debug, trace, off) or target=level pairs separated by commas", shown(.value))]
    NotALogFilter { value: String },
}

impl std::fmt::Debug for InvalidValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "InvalidValue({self})")
    }
}

/// `raw` as quoted back in a message: at most [`SHOWN_CHARS`] characters of it, so that a
/// pasted blob does not become a log line of its own.
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
pub(super) fn parse_log_filter(raw: &str) -> Result<String, InvalidValue> {
    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
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
            return Err(InvalidValue::NotALogFilter {
                value: raw.to_owned(),
            });
        }
    }
    Ok(filter)
}

/// Zero (never), or at least [`MIN_METRICS_INTERVAL`].
pub(super) fn parse_metrics_interval(raw: &str) -> Result<Duration, InvalidValue> {
    match parse_duration(raw)? {
        d if d.is_zero() || d >= MIN_METRICS_INTERVAL => Ok(d),
        _ => Err(InvalidValue::TooShortForMetrics {
            value: raw.to_owned(),
            min: MIN_METRICS_INTERVAL,
        }),
    }
}

/// `host:port`, or `off`.
pub(super) fn parse_health_addr(raw: &str) -> Result<Option<SocketAddr>, InvalidValue> {
    let raw = raw.trim();
    if raw.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    raw.parse()
        .map(Some)
        .map_err(|_| InvalidValue::NotAnAddress {
            value: raw.to_owned(),
        })
}

pub(super) fn parse_keepalive_count(raw: &str) -> Result<u32, InvalidValue> {
    match raw.trim().parse::<u32>() {
        Ok(count) if (KEEPALIVE_COUNT_MIN..=KEEPALIVE_COUNT_MAX).contains(&count) => Ok(count),
        _ => Err(InvalidValue::NotACount {
            value: raw.to_owned(),
            min: KEEPALIVE_COUNT_MIN,
            max: KEEPALIVE_COUNT_MAX,
        }),
    }
}

/// A renewal period the add-on's expiry (`config::AUTO_DESTROY_DELAY`) leaves room for.
pub(super) fn parse_extend_interval(raw: &str) -> Result<Duration, InvalidValue> {
    let interval = parse_positive_duration(raw)?;
    if interval >= crate::config::AUTO_DESTROY_DELAY {
        return Err(InvalidValue::TooLongForRenewal {
            value: raw.to_owned(),
        });
    }
    Ok(interval)
}

/// Like [`parse_duration`], but under [`MIN_POSITIVE_DURATION`] (zero included) is refused.
pub(super) fn parse_positive_duration(raw: &str) -> Result<Duration, InvalidValue> {
    match parse_duration(raw)? {
        d if d < MIN_POSITIVE_DURATION => Err(InvalidValue::TooShort {
            value: raw.to_owned(),
            min: MIN_POSITIVE_DURATION,
        }),
        d => Ok(d),
    }
}

/// Accepts `250ms`, `3s`, `2m`, `1h`, or a bare number of seconds (`1.5`).
pub(super) fn parse_duration(raw: &str) -> Result<Duration, InvalidValue> {
    let raw = raw.trim();
    let split = raw
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(raw.len());
    let (number, unit) = raw.split_at(split);
    let number: f64 = number.parse().map_err(|_| InvalidValue::NotADuration {
        value: raw.to_owned(),
    })?;
    let scale = match unit.trim() {
        "ms" => 0.001,
        "" | "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        other => {
            return Err(InvalidValue::UnknownUnit {
                value: raw.to_owned(),
                unit: other.to_owned(),
            })
        }
    };
    Duration::try_from_secs_f64(number * scale)
        .ok()
        .filter(|d| *d <= MAX_DURATION)
        .ok_or_else(|| InvalidValue::OutOfRange {
            value: raw.to_owned(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every message as the user reads it, byte for byte. Where a value is quoted as given or
    /// trimmed is part of it (` 50ms` against `3 fortnights`).
    #[test]
    fn the_messages_are_the_warnings_users_read() {
        let cases = [
            (
                parse_duration("soon"),
                "\"soon\" is not a duration; expected e.g. 500ms, 3s, 2m",
            ),
            (
                parse_duration(" 3 fortnights "),
                "\"3 fortnights\" has the unknown unit \"fortnights\"; expected ms, s, m or h",
            ),
            (
                parse_duration("3\u{e9}"),
                "\"3\u{e9}\" has the unknown unit \"\u{e9}\"; expected ms, s, m or h",
            ),
            (
                parse_duration("25h"),
                "\"25h\" is out of range; expected at most 24h, e.g. 500ms, 3s, 2m",
            ),
            (
                parse_positive_duration(" 50ms"),
                "\" 50ms\" is too short; expected at least 100ms",
            ),
            (
                parse_positive_duration(" x"),
                "\"x\" is not a duration; expected e.g. 500ms, 3s, 2m",
            ),
            (
                parse_metrics_interval("999ms"),
                "\"999ms\" is too short; expected 0 (no metrics lines) or at least 1s",
            ),
            (
                parse_extend_interval("80m "),
                "\"80m \" is too long; expected less than 75m: the add-on drops a registration \
                 75 min after its last renewal",
            ),
            (
                parse_extend_interval("0"),
                "\"0\" is too short; expected at least 100ms",
            ),
        ];
        for (parsed, message) in cases {
            assert_eq!(parsed.unwrap_err().to_string(), message);
        }
        assert_eq!(
            parse_keepalive_count(" 1").unwrap_err().to_string(),
            "\" 1\" is not a count from 2 to 99"
        );
        assert_eq!(
            parse_health_addr(" 9090 ").unwrap_err().to_string(),
            "\"9090\" is not an address; expected an IP address and port such as 127.0.0.1:9090, \
             or off (0.0.0.0:9090 opens it to the whole network: only where the platform's \
             probes need it and nothing else can reach it)"
        );
        assert_eq!(
            parse_log_filter("Verbose").unwrap_err().to_string(),
            "\"Verbose\" is not a log filter; expected a level (error, warn, info, debug, trace, \
             off) or target=level pairs separated by commas"
        );
        assert_eq!(InvalidValue::NotUtf8.to_string(), "is not valid UTF-8");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(
            crate::fuzz_cases()
        ))]

        #[test]
        fn setting_values_never_panic_and_are_quoted_only_in_part(raw in ".{0,300}") {
            for problem in [
                parse_duration(&raw).err(),
                parse_positive_duration(&raw).err(),
                parse_extend_interval(&raw).err(),
                parse_metrics_interval(&raw).err(),
                parse_keepalive_count(&raw).err(),
                parse_health_addr(&raw).err(),
                parse_log_filter(&raw).err(),
            ]
            .into_iter()
            .flatten()
            {
                let problem = problem.to_string();
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
            assert_eq!(
                parse_log_filter(bad),
                Err(InvalidValue::NotALogFilter {
                    value: bad.to_owned()
                }),
                "{bad}"
            );
        }
    }

    #[test]
    fn long_values_are_quoted_only_in_part() {
        let long = "x".repeat(10_000);
        let problem = parse_duration(&long).unwrap_err().to_string();
        assert!(problem.len() < 200, "{problem}");
        assert!(problem.starts_with(&format!("\"{}\"…", "x".repeat(64))));
        assert_eq!(shown("short"), "\"short\"");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("3s"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("24h"), Ok(MAX_DURATION));
        assert!(matches!(
            parse_duration("soon"),
            Err(InvalidValue::NotADuration { .. })
        ));
        assert!(matches!(
            parse_duration("3 fortnights"),
            Err(InvalidValue::UnknownUnit { .. })
        ));
        assert!(matches!(
            parse_duration("1e30"),
            Err(InvalidValue::UnknownUnit { .. })
        ));
        assert!(matches!(
            parse_duration(&"9".repeat(400)),
            Err(InvalidValue::OutOfRange { .. })
        ));
        assert!(matches!(
            parse_duration("25h"),
            Err(InvalidValue::OutOfRange { .. })
        ));
        assert!(matches!(
            parse_positive_duration("0"),
            Err(InvalidValue::TooShort { .. })
        ));
        assert_eq!(
            parse_positive_duration("100ms"),
            Ok(Duration::from_millis(100))
        );
        assert_eq!(parse_positive_duration("1s"), Ok(Duration::from_secs(1)));
    }

    #[test]
    fn keepalive_counts_are_from_2_to_99() {
        assert_eq!(parse_keepalive_count(" 2 "), Ok(2));
        assert_eq!(parse_keepalive_count("99"), Ok(99));
        for bad in ["1", "100", "-3", "many"] {
            assert!(
                matches!(
                    parse_keepalive_count(bad),
                    Err(InvalidValue::NotACount {
                        min: 2,
                        max: 99,
                        ..
                    })
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn renewals_come_before_the_registration_expires() {
        assert_eq!(
            parse_extend_interval("74m"),
            Ok(Duration::from_secs(74 * 60))
        );
        assert!(matches!(
            parse_extend_interval("75m"),
            Err(InvalidValue::TooLongForRenewal { .. })
        ));
    }

    #[test]
    fn metrics_intervals_are_off_or_at_least_a_second() {
        assert_eq!(parse_metrics_interval("0"), Ok(Duration::ZERO));
        assert_eq!(parse_metrics_interval("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_metrics_interval("60s"), Ok(Duration::from_secs(60)));
        assert!(matches!(
            parse_metrics_interval("999ms"),
            Err(InvalidValue::TooShortForMetrics { .. })
        ));
        assert!(matches!(
            parse_metrics_interval("often"),
            Err(InvalidValue::NotADuration { .. })
        ));
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
            let problem = parse_health_addr(bad).unwrap_err().to_string();
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
