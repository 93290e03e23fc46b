//! What the tunnels have done and how they are, counted where it happens and read by `status`,
//! the metrics log lines and the health endpoint's `/metrics`, so the three always agree.
//!
//! The counters are prometheus-client's own (one atomic each, shared by clone), gathered in one
//! registry labelled by add-on; what a counter cannot hold (since when a session is up, its last
//! error, a registration's expiry) sits beside them under a lock that is only taken when it
//! changes or is read.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// At most this many channel-open times are kept between two metrics lines (a uniform sample
/// of them when there are more), for the line's 95th percentile.
const OPEN_TIMES_KEPT: usize = 1024;

type AddonLabel = [(&'static str, String); 1];

/// Where the whole process is in its life, for the health endpoint and `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    /// Waiting for the first sessions (and channels) before reporting ready.
    Starting = 0,
    /// The ready wait is over: every tunnel was up, or the ready timeout passed.
    Serving = 1,
    /// Draining or stopping.
    Stopping = 2,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::Serving => "serving",
            Phase::Stopping => "stopping",
        }
    }
}

/// Every add-on's figures and the registry that exports them.
pub struct Stats {
    started: SystemTime,
    phase: AtomicU8,
    addons: Vec<Arc<AddonStats>>,
    registrations: Vec<Arc<RegistrationStats>>,
    registry: Registry,
    rss: Gauge,
}

impl Stats {
    pub fn new(addons: &[(String, String)], registrations: &[String]) -> Stats {
        let mut registry = Registry::with_prefix("bpg_tunnel");
        let families = Families::register(&mut registry);
        let rss = Gauge::default();
        registry.register(
            "memory_rss_bytes",
            "Resident memory of the bpg-tunnel process",
            rss.clone(),
        );
        Stats {
            started: SystemTime::now(),
            phase: AtomicU8::new(Phase::Starting as u8),
            addons: addons
                .iter()
                .map(|(name, server)| Arc::new(AddonStats::new(name, server, &families)))
                .collect(),
            registrations: registrations
                .iter()
                .map(|name| Arc::new(RegistrationStats::new(name, &families)))
                .collect(),
            registry,
            rss,
        }
    }

    pub fn addon(&self, name: &str) -> Option<Arc<AddonStats>> {
        self.addons.iter().find(|a| a.name == name).cloned()
    }

    pub fn registration(&self, name: &str) -> Option<Arc<RegistrationStats>> {
        self.registrations.iter().find(|r| r.name == name).cloned()
    }

    pub fn addons(&self) -> &[Arc<AddonStats>] {
        &self.addons
    }

    pub fn registrations(&self) -> &[Arc<RegistrationStats>] {
        &self.registrations
    }

    pub fn started(&self) -> SystemTime {
        self.started
    }

    pub fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Relaxed) {
            0 => Phase::Starting,
            1 => Phase::Serving,
            _ => Phase::Stopping,
        }
    }

    /// Moves forward only: a late "ready" never undoes "stopping".
    pub fn advance(&self, to: Phase) {
        self.phase.fetch_max(to as u8, Ordering::Relaxed);
    }

    /// Every SSH session is up and every registration held.
    pub fn all_up(&self) -> bool {
        self.addons.iter().all(|a| a.session().up)
            && self.registrations.iter().all(|r| r.state().registered)
    }

    /// The Prometheus (OpenMetrics) text of every figure.
    pub fn prometheus(&self) -> String {
        self.rss.set(rss_bytes().unwrap_or(0) as i64);
        for registration in &self.registrations {
            // Reading the state refreshes its expiry gauge.
            registration.state();
        }
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

/// One family per figure, each with an `addon` label.
struct Families {
    open: Family<AddonLabel, Gauge>,
    accepted: Family<AddonLabel, Counter>,
    waited: Family<AddonLabel, Counter>,
    wait_expired: Family<AddonLabel, Counter>,
    refused: Family<AddonLabel, Counter>,
    bytes_up: Family<AddonLabel, Counter>,
    bytes_down: Family<AddonLabel, Counter>,
    reconnects: Family<AddonLabel, Counter>,
    server_channels_refused: Family<AddonLabel, Counter>,
    protocol_violations: Family<AddonLabel, Counter>,
    session_up: Family<AddonLabel, Gauge>,
    channel_open: Family<AddonLabel, Histogram, fn() -> Histogram>,
    registered: Family<AddonLabel, Gauge>,
    registration_expiry: Family<AddonLabel, Gauge>,
}

impl Families {
    fn register(registry: &mut Registry) -> Families {
        let families = Families {
            open: Family::default(),
            accepted: Family::default(),
            waited: Family::default(),
            wait_expired: Family::default(),
            refused: Family::default(),
            bytes_up: Family::default(),
            bytes_down: Family::default(),
            reconnects: Family::default(),
            server_channels_refused: Family::default(),
            protocol_violations: Family::default(),
            session_up: Family::default(),
            // 1 ms to about 16 s.
            channel_open: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.001, 2.0, 15))
            }),
            registered: Family::default(),
            registration_expiry: Family::default(),
        };
        let f = &families;
        registry.register(
            "connections_open",
            "Connections from the app open now",
            f.open.clone(),
        );
        registry.register(
            "connections_accepted",
            "Connections accepted from the app",
            f.accepted.clone(),
        );
        registry.register(
            "connections_waited",
            "Connections that had to wait for an SSH session",
            f.waited.clone(),
        );
        registry.register(
            "connections_wait_expired",
            "Connections closed because no session or channel came in time",
            f.wait_expired.clone(),
        );
        registry.register(
            "channels_refused",
            "Connections the SSH server refused to forward to the database",
            f.refused.clone(),
        );
        registry.register(
            "bytes_up",
            "Bytes sent from the app to the database",
            f.bytes_up.clone(),
        );
        registry.register(
            "bytes_down",
            "Bytes sent from the database to the app",
            f.bytes_down.clone(),
        );
        registry.register(
            "reconnects",
            "SSH sessions established after the first",
            f.reconnects.clone(),
        );
        registry.register(
            "server_channels_refused",
            "Channels the SSH server tried to open towards us, all refused",
            f.server_channels_refused.clone(),
        );
        registry.register(
            "protocol_violations",
            "SSH sessions ended because the server broke the protocol",
            f.protocol_violations.clone(),
        );
        registry.register(
            "session_up",
            "1 while the add-on's SSH session is up",
            f.session_up.clone(),
        );
        registry.register(
            "channel_open_seconds",
            "Time for the SSH server to open a channel to the database",
            f.channel_open.clone(),
        );
        registry.register(
            "registration_registered",
            "1 while the private-app registration is held",
            f.registered.clone(),
        );
        registry.register(
            "registration_expires_in_seconds",
            "Seconds until the add-on drops the registration unless it is renewed",
            f.registration_expiry.clone(),
        );
        families
    }
}

/// The state of an add-on's SSH session, as `status` shows it.
#[derive(Debug, Clone, Default)]
pub struct SessionState {
    pub up: bool,
    /// When it last came up or went down; `None` before the first attempt ended.
    pub since: Option<SystemTime>,
    pub last_error: Option<(SystemTime, String)>,
}

/// One SSH add-on's figures.
pub struct AddonStats {
    pub name: String,
    /// `host:port` of its SSH server.
    pub server: String,
    pub open: Gauge,
    pub accepted: Counter,
    pub waited: Counter,
    pub wait_expired: Counter,
    pub refused: Counter,
    pub bytes_up: Counter,
    pub bytes_down: Counter,
    pub reconnects: Counter,
    pub server_channels_refused: Counter,
    pub protocol_violations: Counter,
    session_up: Gauge,
    channel_open: Histogram,
    session: Mutex<SessionState>,
    open_times: Mutex<OpenTimes>,
}

impl AddonStats {
    fn new(name: &str, server: &str, families: &Families) -> AddonStats {
        let label = [("addon", name.to_owned())];
        AddonStats {
            name: name.to_owned(),
            server: server.to_owned(),
            open: families.open.get_or_create(&label).clone(),
            accepted: families.accepted.get_or_create(&label).clone(),
            waited: families.waited.get_or_create(&label).clone(),
            wait_expired: families.wait_expired.get_or_create(&label).clone(),
            refused: families.refused.get_or_create(&label).clone(),
            bytes_up: families.bytes_up.get_or_create(&label).clone(),
            bytes_down: families.bytes_down.get_or_create(&label).clone(),
            reconnects: families.reconnects.get_or_create(&label).clone(),
            server_channels_refused: families
                .server_channels_refused
                .get_or_create(&label)
                .clone(),
            protocol_violations: families.protocol_violations.get_or_create(&label).clone(),
            session_up: families.session_up.get_or_create(&label).clone(),
            channel_open: families.channel_open.get_or_create(&label).clone(),
            session: Mutex::default(),
            open_times: Mutex::default(),
        }
    }

    pub fn session(&self) -> SessionState {
        lock(&self.session).clone()
    }

    /// A session came up; `replacing` when an earlier one had been up.
    pub fn session_up(&self, replacing: bool) {
        if replacing {
            self.reconnects.inc();
        }
        self.session_up.set(1);
        let mut state = lock(&self.session);
        state.up = true;
        state.since = Some(SystemTime::now());
    }

    /// The session went down, or an attempt failed, for `reason`.
    pub fn session_down(&self, reason: String) {
        self.session_up.set(0);
        let now = SystemTime::now();
        let mut state = lock(&self.session);
        if state.up || state.since.is_none() {
            state.since = Some(now);
        }
        state.up = false;
        state.last_error = Some((now, reason));
    }

    pub fn channel_opened(&self, took: Duration) {
        self.channel_open.observe(took.as_secs_f64());
        lock(&self.open_times).add(took);
    }

    /// The 95th percentile of the channel-open times since the last call, if any were seen.
    pub fn take_channel_open_p95(&self) -> Option<Duration> {
        lock(&self.open_times).take_p95()
    }

    /// Counts a connection as open until the returned guard is dropped.
    pub fn connection_opened(self: &Arc<Self>) -> OpenConnection {
        self.accepted.inc();
        self.open.inc();
        OpenConnection(self.clone())
    }
}

/// An accepted connection, counted as open while this lives.
pub struct OpenConnection(Arc<AddonStats>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.open.dec();
    }
}

/// A uniform sample of the channel-open times of one interval (reservoir sampling).
#[derive(Default)]
struct OpenTimes {
    kept: Vec<Duration>,
    seen: usize,
}

impl OpenTimes {
    fn add(&mut self, took: Duration) {
        self.seen += 1;
        if self.kept.len() < OPEN_TIMES_KEPT {
            self.kept.push(took);
        } else {
            let slot = fastrand::usize(..self.seen);
            if slot < OPEN_TIMES_KEPT {
                self.kept[slot] = took;
            }
        }
    }

    fn take_p95(&mut self) -> Option<Duration> {
        let mut kept = std::mem::take(&mut self.kept);
        self.seen = 0;
        percentile(&mut kept, 95)
    }
}

/// The `pct`th percentile (nearest rank) of `values`, `None` when there are none.
fn percentile(values: &mut [Duration], pct: usize) -> Option<Duration> {
    if values.is_empty() {
        return None;
    }
    values.sort_unstable();
    let rank = (values.len() * pct).div_ceil(100).max(1);
    Some(values[rank - 1])
}

/// The state of a private-app registration, as `status` shows it.
#[derive(Debug, Clone, Default)]
pub struct RegistrationState {
    pub registered: bool,
    /// When the add-on last accepted the registration or its renewal.
    pub last_renewed: Option<SystemTime>,
    pub last_error: Option<(SystemTime, String)>,
}

impl RegistrationState {
    /// When the add-on drops the registration unless it is renewed first.
    pub fn expires_at(&self) -> Option<SystemTime> {
        self.last_renewed
            .map(|at| at + crate::config::AUTO_DESTROY_DELAY)
    }
}

/// One private-app add-on's registration.
pub struct RegistrationStats {
    pub name: String,
    registered: Gauge,
    expiry: Gauge,
    state: Mutex<RegistrationState>,
}

impl RegistrationStats {
    fn new(name: &str, families: &Families) -> RegistrationStats {
        let label = [("addon", name.to_owned())];
        RegistrationStats {
            name: name.to_owned(),
            registered: families.registered.get_or_create(&label).clone(),
            expiry: families.registration_expiry.get_or_create(&label).clone(),
            state: Mutex::default(),
        }
    }

    pub fn state(&self) -> RegistrationState {
        let state = lock(&self.state).clone();
        // Refreshed when read, so that a scrape sees it count down.
        let left = state
            .expires_at()
            .and_then(|at| at.duration_since(SystemTime::now()).ok())
            .unwrap_or_default();
        self.expiry.set(left.as_secs() as i64);
        state
    }

    pub fn renewed(&self) {
        self.registered.set(1);
        let mut state = lock(&self.state);
        state.registered = true;
        state.last_renewed = Some(SystemTime::now());
    }

    pub fn failed(&self, reason: String) {
        let mut state = lock(&self.state);
        state.last_error = Some((SystemTime::now(), reason));
        // Still held until it expires.
        state.registered = state.expires_at().is_some_and(|at| at > SystemTime::now());
        self.registered.set(i64::from(state.registered));
    }

    pub fn removed(&self) {
        self.registered.set(0);
        lock(&self.state).registered = false;
    }
}

/// A poisoned lock only means a panic elsewhere mid-update of plain figures: keep going.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// This process's resident memory, from `/proc/self/statm`.
pub fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(values: &[u64]) -> Vec<Duration> {
        values.iter().map(|v| Duration::from_millis(*v)).collect()
    }

    #[test]
    fn the_95th_percentile_is_the_nearest_rank() {
        assert_eq!(percentile(&mut [], 95), None);
        assert_eq!(
            percentile(&mut ms(&[7]), 95),
            Some(Duration::from_millis(7))
        );
        let mut hundred: Vec<_> = (1..=100).rev().map(Duration::from_millis).collect();
        assert_eq!(
            percentile(&mut hundred, 95),
            Some(Duration::from_millis(95))
        );
        let mut twenty = ms(&(1..=20).collect::<Vec<_>>());
        assert_eq!(percentile(&mut twenty, 95), Some(Duration::from_millis(19)));
    }

    #[test]
    fn open_times_are_taken_once_and_bounded() {
        let mut times = OpenTimes::default();
        for i in 0..5000 {
            times.add(Duration::from_micros(i));
        }
        assert_eq!(times.kept.len(), OPEN_TIMES_KEPT);
        let p95 = times.take_p95().unwrap();
        // A uniform sample of 0..5000 µs: its p95 is near 4750 µs.
        assert!((4400..=5000).contains(&(p95.as_micros() as u64)), "{p95:?}");
        assert_eq!(times.take_p95(), None);
    }

    #[test]
    fn counters_reach_the_prometheus_text_with_the_addon_label() {
        let stats = Stats::new(&[("DATABASE".into(), "ssh.example:22".into())], &[]);
        let addon = stats.addon("DATABASE").unwrap();
        let open = addon.connection_opened();
        addon.bytes_up.inc_by(42);
        addon.session_up(true);
        let text = stats.prometheus();
        assert!(
            text.contains("bpg_tunnel_connections_open{addon=\"DATABASE\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("bpg_tunnel_connections_accepted_total{addon=\"DATABASE\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("bpg_tunnel_bytes_up_total{addon=\"DATABASE\"} 42"),
            "{text}"
        );
        assert!(
            text.contains("bpg_tunnel_reconnects_total{addon=\"DATABASE\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("bpg_tunnel_session_up{addon=\"DATABASE\"} 1"),
            "{text}"
        );
        drop(open);
        assert!(stats
            .prometheus()
            .contains("bpg_tunnel_connections_open{addon=\"DATABASE\"} 0"));
        assert!(stats.all_up());
        addon.session_down("gone".into());
        assert!(!stats.all_up());
    }

    #[test]
    fn a_failed_renewal_keeps_the_registration_until_it_expires() {
        let stats = Stats::new(&[], &["PRIVATE".into()]);
        let registration = stats.registration("PRIVATE").unwrap();
        registration.failed("refused".into());
        assert!(!registration.state().registered);
        registration.renewed();
        registration.failed("timed out".into());
        let state = registration.state();
        assert!(state.registered);
        assert!(state.expires_at().unwrap() > SystemTime::now() + Duration::from_secs(74 * 60));
        registration.removed();
        assert!(!registration.state().registered);
    }
}
