//! A metrics line per add-on at an interval, in l2met form, for Heroku's log-based metrics:
//! `sample#` for levels, `count#` for what happened since the previous line, `measure#` for a
//! timing. The names are docs/operating.md's and do not change.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::logfmt::METRICS_TARGET;
use crate::stats::{rss_bytes, AddonStats, Stats};

/// Logs the lines every `interval` until `shutdown`.
pub async fn log_every(interval: Duration, stats: Arc<Stats>, shutdown: CancellationToken) {
    let mut last: Vec<Counts> = stats.addons().iter().map(|a| Counts::of(a)).collect();
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            () = shutdown.cancelled() => return,
        }
        let rss = megabytes(rss_bytes().unwrap_or(0));
        for (addon, last) in stats.addons().iter().zip(&mut last) {
            let now = Counts::of(addon);
            let delta = now.since(last);
            *last = now;
            line(addon, &delta, &rss);
        }
        for registration in stats.registrations() {
            let state = registration.state();
            let expires_in = state
                .expires_at()
                .and_then(|at| at.duration_since(std::time::SystemTime::now()).ok())
                .unwrap_or_default();
            info!(
                target: METRICS_TARGET,
                event = "metrics",
                addon = %registration.name,
                "sample#bpg-tunnel.registration.registered" = u8::from(state.registered),
                "sample#bpg-tunnel.registration.expires-in" = %format!("{}s", expires_in.as_secs()),
                "sample#bpg-tunnel.memory.rss" = %rss
            );
        }
    }
}

fn line(addon: &AddonStats, delta: &Counts, rss: &str) {
    let open = addon.open.get();
    let up = u8::from(addon.session().up);
    macro_rules! metrics {
        ($($p95:tt)*) => {
            info!(
                target: METRICS_TARGET,
                event = "metrics",
                addon = %addon.name,
                "sample#bpg-tunnel.connections.open" = open,
                "count#bpg-tunnel.connections.accepted" = delta.accepted,
                "count#bpg-tunnel.connections.waited" = delta.waited,
                "count#bpg-tunnel.connections.wait-expired" = delta.wait_expired,
                "count#bpg-tunnel.channels.refused" = delta.refused,
                "count#bpg-tunnel.reconnects" = delta.reconnects,
                "count#bpg-tunnel.server-channels.refused" = delta.server_channels_refused,
                "count#bpg-tunnel.protocol-violations" = delta.protocol_violations,
                "sample#bpg-tunnel.session.up" = up,
                "count#bpg-tunnel.bytes.up" = delta.bytes_up,
                "count#bpg-tunnel.bytes.down" = delta.bytes_down,
                "sample#bpg-tunnel.memory.rss" = %rss
                $($p95)*
            )
        };
    }
    // Only when channels were opened: a p95 of nothing would read as zero.
    match addon.take_channel_open_p95() {
        Some(p95) => metrics!(, "measure#bpg-tunnel.channel-open.p95" = %milliseconds(p95)),
        None => metrics!(),
    }
}

/// The counters of one add-on at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Counts {
    accepted: u64,
    waited: u64,
    wait_expired: u64,
    refused: u64,
    reconnects: u64,
    server_channels_refused: u64,
    protocol_violations: u64,
    bytes_up: u64,
    bytes_down: u64,
}

impl Counts {
    fn of(addon: &AddonStats) -> Counts {
        Counts {
            accepted: addon.accepted.get(),
            waited: addon.waited.get(),
            wait_expired: addon.wait_expired.get(),
            refused: addon.refused.get(),
            reconnects: addon.reconnects.get(),
            server_channels_refused: addon.server_channels_refused.get(),
            protocol_violations: addon.protocol_violations.get(),
            bytes_up: addon.bytes_up.get(),
            bytes_down: addon.bytes_down.get(),
        }
    }

    /// What happened between `earlier` and these counts.
    fn since(&self, earlier: &Counts) -> Counts {
        Counts {
            accepted: self.accepted.saturating_sub(earlier.accepted),
            waited: self.waited.saturating_sub(earlier.waited),
            wait_expired: self.wait_expired.saturating_sub(earlier.wait_expired),
            refused: self.refused.saturating_sub(earlier.refused),
            reconnects: self.reconnects.saturating_sub(earlier.reconnects),
            server_channels_refused: self
                .server_channels_refused
                .saturating_sub(earlier.server_channels_refused),
            protocol_violations: self
                .protocol_violations
                .saturating_sub(earlier.protocol_violations),
            bytes_up: self.bytes_up.saturating_sub(earlier.bytes_up),
            bytes_down: self.bytes_down.saturating_sub(earlier.bytes_down),
        }
    }
}

/// `2.35ms`: l2met reads the unit from the value.
fn milliseconds(took: Duration) -> String {
    format!("{:.2}ms", took.as_secs_f64() * 1000.0)
}

/// `5.81MB`, as Heroku's own runtime metrics give memory.
fn megabytes(bytes: u64) -> String {
    format!("{:.2}MB", bytes as f64 / (1024.0 * 1024.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_what_happened_since() {
        let earlier = Counts {
            accepted: 5,
            bytes_up: 100,
            ..Counts::default()
        };
        let now = Counts {
            accepted: 8,
            bytes_up: 100,
            bytes_down: 7,
            reconnects: 1,
            ..Counts::default()
        };
        assert_eq!(
            now.since(&earlier),
            Counts {
                accepted: 3,
                bytes_down: 7,
                reconnects: 1,
                ..Counts::default()
            }
        );
    }

    #[test]
    fn units_are_in_the_values() {
        assert_eq!(milliseconds(Duration::from_micros(2346)), "2.35ms");
        assert_eq!(megabytes(6 * 1024 * 1024 + 512 * 1024), "6.50MB");
    }
}
