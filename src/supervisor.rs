//! Keeps one SSH session up per add-on, forever, and publishes it to the forwarder.
//!
//! The current session is shared through a `watch` channel: `Some` while it is usable, `None`
//! while it is being replaced. Connections accepted meanwhile wait on the channel instead of
//! being refused.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::backoff::Backoff;
use crate::config::Addon;
use crate::ssh::{Ended, Session, SessionError, SessionSettings};
use crate::stats::AddonStats;

/// The first reconnect comes within this long of a lost session.
const FIRST_RETRY: Duration = Duration::from_millis(100);
/// A session that lasted this long resets the backoff: the next loss is treated as new.
const STABLE_AFTER: Duration = Duration::from_secs(10);
/// Longest pause after repeated rejections (wrong key, wrong host key).
const MAX_AUTH_FAILURE_DELAY: Duration = Duration::from_secs(600);

pub type SessionSlot = watch::Receiver<Option<Arc<Session>>>;

/// Whether a slot's session can carry channels: published and not yet seen to end.
pub fn usable(slot: &Option<Arc<Session>>) -> bool {
    slot.as_ref().is_some_and(|session| !session.is_closed())
}

/// How a supervisor keeps its sessions; see [`crate::options::Options`].
#[derive(Debug, Clone)]
pub struct SupervisorSettings {
    pub session: SessionSettings,
    /// Longest pause between reconnects after network failures.
    pub reconnect_max_delay: Duration,
    /// First pause after the server rejected our key or showed another host key.
    pub auth_failure_delay: Duration,
}

pub struct Supervisor {
    addon: Addon,
    settings: SupervisorSettings,
    current: watch::Sender<Option<Arc<Session>>>,
    stats: Arc<AddonStats>,
}

impl Supervisor {
    pub fn new(addon: Addon, settings: SupervisorSettings, stats: Arc<AddonStats>) -> Supervisor {
        Supervisor {
            addon,
            settings,
            current: watch::Sender::new(None),
            stats,
        }
    }

    pub fn addon_name(&self) -> &str {
        &self.addon.name
    }

    /// Where the forwarder finds the current session.
    pub fn sessions(&self) -> SessionSlot {
        self.current.subscribe()
    }

    /// Runs until `shutdown` is cancelled. Never gives up because the server is away.
    pub async fn run(self, shutdown: CancellationToken) {
        let addon = self.addon.name.as_str();
        let server = self.addon.ssh.address();
        let mut backoff = Backoff::new(FIRST_RETRY, self.settings.reconnect_max_delay);
        let mut rejections = 0u32;
        let mut attempt = 0u32;
        let mut connected_before = false;
        loop {
            attempt += 1;
            info!(event = "ssh-connecting", addon, server, attempt);
            let started = Instant::now();
            let connected = tokio::select! {
                result = Session::connect(
                    &self.addon.ssh,
                    &self.settings.session,
                    self.stats.server_channels_refused.clone(),
                ) => result,
                () = shutdown.cancelled() => break,
            };
            let delay = match connected {
                Ok(session) => {
                    info!(
                        event = "ssh-connected",
                        addon,
                        server,
                        attempt,
                        ms = started.elapsed().as_millis() as u64
                    );
                    rejections = 0;
                    attempt = 0;
                    let session = Arc::new(session);
                    self.stats.session_up(connected_before);
                    connected_before = true;
                    self.current.send_replace(Some(session.clone()));
                    let up_since = Instant::now();
                    let ended = tokio::select! {
                        ended = session.ended(&self.settings.session) => Some(ended),
                        () = shutdown.cancelled() => None,
                    };
                    self.current.send_replace(None);
                    let Some(ended) = ended else {
                        self.stats.session_down("bpg-tunnel is stopping".to_owned());
                        session.close().await;
                        break;
                    };
                    self.stats.session_down(ended.to_string());
                    let up_ms = up_since.elapsed().as_millis() as u64;
                    if let Ended::Violation(_) = ended {
                        // Ours to end, and loud: a server that ignores the protocol may be
                        // corrupting what it sends.
                        self.stats.protocol_violations.inc();
                        error!(event = "protocol-violation", addon, server, reason = %ended, up_ms);
                    } else {
                        warn!(event = "ssh-disconnected", addon, server, reason = %ended, up_ms);
                    }
                    if up_since.elapsed() >= STABLE_AFTER {
                        backoff.reset();
                    }
                    backoff.next_delay()
                }
                Err(error) if error.is_rejection() => {
                    self.stats.session_down(error.to_string());
                    rejections += 1;
                    let event = match error {
                        SessionError::HostKeyMismatch { .. } => "host-key-mismatch",
                        SessionError::Sha1Only { .. } => "weak-algorithm",
                        _ => "auth-failed",
                    };
                    error!(event, addon, server, var = %self.addon.conn_info_var, error = %error);
                    auth_failure_delay(self.settings.auth_failure_delay, rejections)
                }
                Err(error) => {
                    self.stats.session_down(error.to_string());
                    warn!(event = "ssh-connect-failed", addon, server, error = %error);
                    backoff.next_delay()
                }
            };
            info!(
                event = "reconnect-scheduled",
                addon,
                server,
                attempt = attempt + 1,
                delay_ms = delay.as_millis() as u64
            );
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = shutdown.cancelled() => break,
            }
        }
        self.current.send_replace(None);
    }
}

/// Doubles from `base` per consecutive rejection up to ten minutes, with up to 25% added at
/// random so that a fleet of dynos with the same bad key does not knock in step.
fn auth_failure_delay(base: Duration, rejections: u32) -> Duration {
    let doubled = base.saturating_mul(2u32.saturating_pow(rejections.saturating_sub(1).min(16)));
    let capped = doubled.min(MAX_AUTH_FAILURE_DELAY.max(base));
    capped + capped.mul_f64(fastrand::f64() * 0.25)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejections_back_off_from_the_base_and_are_capped() {
        let base = Duration::from_secs(30);
        let first = auth_failure_delay(base, 1);
        assert!(first >= base && first <= base.mul_f64(1.25));
        let second = auth_failure_delay(base, 2);
        assert!(second >= base * 2);
        let many = auth_failure_delay(base, 50);
        assert!(many >= MAX_AUTH_FAILURE_DELAY && many <= MAX_AUTH_FAILURE_DELAY.mul_f64(1.25));
    }
}
