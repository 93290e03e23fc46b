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
/// The first pause after a rejection, by default. The add-on's server runs fail2ban, whose
/// default jail bans an address for 10 minutes after 5 failures within 10 minutes, and each
/// rejected attempt is one failure in its aggressive mode (measured in tests/fleet.rs). Doubling
/// from 60 s puts a fifth attempt 900 s after the first (60 + 120 + 240 + 480): at most 4
/// failures in any 10 minutes. From 30 s (the old default) the fifth came after 450 s; any base
/// of 41 s or more keeps under the limit.
pub const DEFAULT_AUTH_FAILURE_DELAY: Duration = Duration::from_secs(60);
/// The pause, about one second, after a connection refused or unreachable, which cost the
/// server nothing: a tunnel finds the server within about a second of its return.
const FREE_RETRY: Duration = Duration::from_secs(1);
/// The pause, about 300 ms, after sshd closed the connection before its greeting (past its
/// MaxStartups): that cost it nothing either (an accept, one line written, a close), and it is
/// up, busy with handshakes that take tens of milliseconds each.
const BUSY_RETRY: Duration = Duration::from_millis(300);
/// How many connections closed before the greeting in a row are retried after `BUSY_RETRY`;
/// then the backoff takes over. A busy sshd lets a retry through within a few; something that
/// closes every connection (a balancer in front of a server that is down, a server that is not
/// sshd) would otherwise be knocked on three times a second for as long as it lasts.
const BUSY_RETRIES: u32 = 8;

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
        let mut closed_in_a_row = 0u32;
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
                    closed_in_a_row = 0;
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
                    closed_in_a_row = 0;
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
                    // The backoff is left where it was by what cost the server nothing: it
                    // measures what the server paid.
                    let cap = self.settings.reconnect_max_delay;
                    let closed = matches!(error, SessionError::ClosedBeforeGreeting { .. });
                    closed_in_a_row = if closed { closed_in_a_row + 1 } else { 0 };
                    if closed && closed_in_a_row <= BUSY_RETRIES {
                        free_retry_delay(BUSY_RETRY, cap)
                    } else if closed {
                        // Never sooner than while it looked busy.
                        backoff.next_delay().max(BUSY_RETRY)
                    } else if error.cost_the_server_nothing() {
                        free_retry_delay(FREE_RETRY, cap)
                    } else {
                        backoff.next_delay()
                    }
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

/// Uniform in [0.5, 1.5] × `mean`, never above `cap` (`--reconnect-max-delay`, as for the
/// backoff, never below its first step). Spread over a whole second, a fleet that waited out the
/// same outage comes back as a stream rather than in one burst, which keeps sshd's queue of
/// handshakes short; a connection it still drops past MaxStartups is retried within 0.15-0.45 s.
fn free_retry_delay(mean: Duration, cap: Duration) -> Duration {
    mean.mul_f64(0.5 + fastrand::f64())
        .min(cap.max(FIRST_RETRY))
}

/// The pause after the `rejections`-th consecutive rejection, before jitter: doubling from
/// `base` up to ten minutes. The tests hold it against fail2ban's limits (tests/fleet.rs).
#[doc(hidden)]
pub fn auth_failure_pause(base: Duration, rejections: u32) -> Duration {
    let doubled = base.saturating_mul(2u32.saturating_pow(rejections.saturating_sub(1).min(16)));
    doubled.min(MAX_AUTH_FAILURE_DELAY.max(base))
}

/// The most of the first `attempts` attempts that fall within any `window`, the first at 0
/// and each next one `pause(rejections so far)` later: what fail2ban would count of a schedule of
/// pauses (the tests hold [`auth_failure_pause`] against its limit with it).
#[doc(hidden)]
pub fn most_attempts_within(
    window: Duration,
    attempts: u32,
    pause: impl Fn(u32) -> Duration,
) -> usize {
    let mut at = vec![Duration::ZERO];
    for rejections in 1..attempts {
        at.push(*at.last().unwrap() + pause(rejections));
    }
    (0..at.len())
        .map(|first| {
            at[first..]
                .iter()
                .take_while(|t| **t - at[first] <= window)
                .count()
        })
        .max()
        .unwrap_or(0)
}

/// [`auth_failure_pause`] with up to 25% added at random, so that a fleet of dynos with the same
/// bad key does not knock in step. Only ever added: attempts are never closer than the pauses.
fn auth_failure_delay(base: Duration, rejections: u32) -> Duration {
    let pause = auth_failure_pause(base, rejections);
    pause + pause.mul_f64(fastrand::f64() * 0.25)
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

    /// fail2ban's default jail: 5 failures within 10 minutes ban the address. Each rejected
    /// attempt makes one failure (tests/fleet.rs measures it), so at most 4 attempts may fall
    /// within any 10 minutes; the jitter only adds to the pauses.
    #[test]
    fn rejections_at_the_default_stay_under_fail2bans_default_limit() {
        let window = Duration::from_secs(600);
        let ours = most_attempts_within(window, 40, |n| {
            auth_failure_pause(DEFAULT_AUTH_FAILURE_DELAY, n)
        });
        assert_eq!(ours, 4);
        // The old default made a fifth attempt 450 s after the first.
        let old = most_attempts_within(window, 40, |n| {
            auth_failure_pause(Duration::from_secs(30), n)
        });
        assert_eq!(old, 5);
        for n in 1..40 {
            let delay = auth_failure_delay(DEFAULT_AUTH_FAILURE_DELAY, n);
            assert!(delay >= auth_failure_pause(DEFAULT_AUTH_FAILURE_DELAY, n));
        }
    }

    #[test]
    fn free_retries_come_about_every_second_and_never_above_the_cap() {
        let cap = Duration::from_secs(10);
        for _ in 0..1000 {
            let refused = free_retry_delay(FREE_RETRY, cap);
            assert!(
                refused >= Duration::from_millis(500) && refused <= Duration::from_millis(1500)
            );
            let busy = free_retry_delay(BUSY_RETRY, cap);
            assert!(busy >= Duration::from_millis(150) && busy <= Duration::from_millis(450));
            let low_cap = Duration::from_millis(300);
            assert!(free_retry_delay(FREE_RETRY, low_cap) <= low_cap);
            // Never a tight loop, whatever the cap.
            assert!(free_retry_delay(FREE_RETRY, Duration::ZERO) >= FIRST_RETRY);
        }
    }
}
