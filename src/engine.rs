//! The engine: every add-on's tunnels, from the add-ons found to the last byte of a graceful stop.
//!
//! [`start`] takes the add-ons the launch form discovered, binds every listener before the first
//! SSH connect (so an app that connects at once is queued rather than refused), and starts a
//! supervisor per add-on, a serving task per listener and a registration per private-app
//! add-on. [`Running::serve`] then
//! serves until the launch form's [`Trigger`] says to stop, and stops the one way there is: stop
//! accepting, give open connections the grace, cut the rest, end every session and registration,
//! all within a bound. Launch forms (`lifecycle/`) decide *when*; this module decides *how*.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::config::{self, Discovery, Forward, Severity};
use crate::dyno::Dyno;
use crate::forwarder::{ForwarderSettings, Listener};
use crate::health::Health;
use crate::metrics;
use crate::private_app::{Registration, RegistrationSettings};
use crate::ssh::ChannelError;
use crate::stats::{Phase, Stats};
use crate::status::StatusSocket;
use crate::supervisor::{usable, SessionSlot, Supervisor, SupervisorSettings};

/// How long stopping may take once connections are cut (room for a private-app deregistration):
/// within Heroku's SIGKILL budget even after a full drain.
const STOP_TIMEOUT: Duration = Duration::from_secs(3);

/// What the engine's components need; see [`crate::options::Options`].
#[derive(Debug, Clone)]
pub struct EngineSettings {
    pub supervisor: SupervisorSettings,
    pub forwarder: ForwarderSettings,
    pub registration: RegistrationSettings,
    pub telemetry: TelemetrySettings,
    /// The dyno's name and the client id its private-app registrations are made under.
    pub dyno: Dyno,
}

/// How the engine tells how it is doing; see [`crate::options::Options`].
#[derive(Debug, Clone)]
pub struct TelemetrySettings {
    /// How often a metrics line per add-on is logged; zero for never.
    pub metrics_interval: Duration,
    /// Where the HTTP health and metrics endpoint listens, if anywhere.
    pub health_addr: Option<SocketAddr>,
    /// Where `status` finds the status socket, if not in the default places.
    pub state_dir: Option<PathBuf>,
}

/// How to stop, as a launch form's [`Trigger`] decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Stop accepting, give open connections `grace` to finish, then end everything.
    Gracefully { grace: Duration },
    /// Leave at once, without waiting for anything.
    Now,
}

/// How serving ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    Gracefully,
    /// A [`Stop::Now`], or the trigger's abort while stopping.
    Aborted,
}

/// When to stop: a signal, the owner's exit, the child's exit, as each launch form has it.
pub trait Trigger {
    /// Resolves when serving should end, and says how; `running` tells how many connections
    /// are open, for the trigger's own log lines.
    fn stop(&mut self, running: &Running) -> impl Future<Output = Stop>;

    /// While a graceful stop is under way: resolves if the user wants out at once. The default
    /// never does.
    fn abort(&mut self) -> impl Future<Output = ()> {
        std::future::pending()
    }
}

/// The runtime every launch form uses: one thread, like OpenSSH's event loop. Each add-on's
/// traffic already funnels through its one russh session task, so more worker threads only
/// added wake-ups across threads: on a select-only load they cost about 50 µs of CPU per
/// transaction against 35 µs on one thread, CPU the app and the database on the same dyno
/// need. DNS look-ups still run on tokio's blocking pool.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

/// Reports what is wrong with the add-ons `discovery` found (the launch form asked
/// `config::discover_env` for them), binds and starts what can be served; `None` (after saying
/// why) when nothing can.
pub async fn start(discovery: Discovery, settings: &EngineSettings) -> Option<Running> {
    report(&discovery);
    let had_addons = !discovery.is_empty();
    let tunnels = Tunnels::bind(discovery, settings).await;
    if tunnels.is_empty() {
        if had_addons {
            error!(
                event = "nothing-to-serve",
                "no add-on tunnel could be started; see the errors above"
            );
        } else {
            error!(
                event = "nothing-to-serve",
                "no *_TUNNEL_BPG_CONN_INFO variable is set"
            );
        }
        return None;
    }
    // After the app's listeners: those come first.
    let health = match settings.telemetry.health_addr {
        Some(addr) => Health::bind(addr).await,
        None => None,
    };
    Some(tunnels.start(settings, health))
}

fn report(discovery: &Discovery) {
    for problem in &discovery.problems {
        let key = problem.key.unwrap_or("");
        match problem.severity {
            Severity::Error => error!(
                event = "config-error",
                addon = %problem.addon,
                var = %problem.var,
                key,
                error = %problem.message
            ),
            Severity::Notice => info!(
                event = "config-notice",
                addon = %problem.addon,
                var = %problem.var,
                key,
                notice = %problem.message
            ),
        }
    }
}

/// The tunnels of every add-on, bound and not yet started.
struct Tunnels {
    supervisors: Vec<Supervisor>,
    /// Each listener with the index of its add-on's supervisor.
    listeners: Vec<(usize, Listener)>,
    registrations: Vec<Registration>,
    /// Each add-on's forwards, for the readiness probe.
    forwards: Vec<Vec<Forward>>,
    stats: Arc<Stats>,
}

impl Tunnels {
    /// Binds every listener of every add-on. A listener that cannot be bound is reported and
    /// skipped; the rest still serve.
    async fn bind(discovery: Discovery, settings: &EngineSettings) -> Tunnels {
        let mut registrations = Vec::new();
        if !discovery.private_apps.is_empty() {
            let client_id = &settings.dyno.client_id;
            for notice in settings.dyno.notices() {
                warn!(event = "config-notice", var = notice.var, client_id = %client_id, notice = notice.notice);
            }
            for app in &discovery.private_apps {
                match Registration::new(app, client_id, &settings.registration) {
                    Ok(registration) => {
                        info!(event = "private-tunnel-mode", addon = %app.name, api = %app.api_base_url);
                        registrations.push(registration);
                    }
                    Err(setup_error) => {
                        error!(event = "config-error", addon = %app.name, var = %app.conn_info_var, error = %setup_error)
                    }
                }
            }
        }
        let mut served = Vec::new();
        for addon in discovery.addons {
            let mut bound = Vec::new();
            let mut forwards = Vec::new();
            for forward in &addon.forwards {
                match Listener::bind(&addon.name, forward).await {
                    Ok(listener) => {
                        info!(
                            event = "listening",
                            addon = %addon.name,
                            role = %forward.role,
                            addr = %listener.local_addr(),
                            var = %forward.url_var,
                            target = %config::host_port(&forward.remote_host, forward.remote_port)
                        );
                        bound.push(listener);
                        forwards.push(forward.clone());
                    }
                    Err(bind_error) => error!(
                        event = "listen-failed",
                        addon = %addon.name,
                        role = %forward.role,
                        var = %bind_error.var,
                        port = bind_error.addr.port(),
                        error = %bind_error
                    ),
                }
            }
            if !bound.is_empty() {
                served.push((addon, bound, forwards));
            }
        }
        let stats = Arc::new(Stats::new(
            &served
                .iter()
                .map(|(addon, _, _)| (addon.name.clone(), addon.ssh.address()))
                .collect::<Vec<_>>(),
            &registrations
                .iter()
                .map(|r| r.addon_name().to_owned())
                .collect::<Vec<_>>(),
        ));
        let mut tunnels = Tunnels {
            supervisors: Vec::new(),
            listeners: Vec::new(),
            registrations,
            forwards: Vec::new(),
            stats,
        };
        for (addon, bound, forwards) in served {
            let index = tunnels.supervisors.len();
            let stats = tunnels.stats.addon(&addon.name).expect("counted above");
            tunnels
                .supervisors
                .push(Supervisor::new(addon, settings.supervisor.clone(), stats));
            tunnels
                .listeners
                .extend(bound.into_iter().map(|listener| (index, listener)));
            tunnels.forwards.push(forwards);
        }
        tunnels
    }

    fn is_empty(&self) -> bool {
        self.listeners.is_empty() && self.registrations.is_empty()
    }

    /// Starts accepting, connecting and registering, and telling how it goes.
    fn start(self, settings: &EngineSettings, health: Option<Health>) -> Running {
        let running = Running {
            stop_accepting: CancellationToken::new(),
            shutdown: CancellationToken::new(),
            connections: TaskTracker::new(),
            tasks: TaskTracker::new(),
            sessions: self
                .supervisors
                .iter()
                .zip(self.forwards)
                .map(|(s, forwards)| (s.addon_name().to_owned(), s.sessions(), forwards))
                .collect(),
            registrations: self
                .registrations
                .iter()
                .map(|r| (r.addon_name().to_owned(), r.registered()))
                .collect(),
            stats: self.stats,
        };
        for registration in self.registrations {
            let stats = running
                .stats
                .registration(registration.addon_name())
                .expect("counted when bound");
            running
                .tasks
                .spawn(registration.run(running.shutdown.clone(), stats));
        }
        for (index, listener) in self.listeners {
            let supervisor = &self.supervisors[index];
            running.tasks.spawn(
                listener.serve(
                    supervisor.sessions(),
                    running
                        .stats
                        .addon(supervisor.addon_name())
                        .expect("counted when bound"),
                    settings.forwarder,
                    running.stop_accepting.clone(),
                    running.shutdown.clone(),
                    running.connections.clone(),
                ),
            );
        }
        for supervisor in self.supervisors {
            running
                .tasks
                .spawn(supervisor.run(running.shutdown.clone()));
        }
        let telemetry = &settings.telemetry;
        if !telemetry.metrics_interval.is_zero() {
            running.tasks.spawn(metrics::log_every(
                telemetry.metrics_interval,
                running.stats.clone(),
                running.shutdown.clone(),
            ));
        }
        if let Some(health) = health {
            running
                .tasks
                .spawn(health.serve(running.stats.clone(), running.shutdown.clone()));
        }
        if let Some(socket) = StatusSocket::bind(telemetry.state_dir.as_deref()) {
            running
                .tasks
                .spawn(socket.serve(running.stats.clone(), running.shutdown.clone()));
        }
        running.tasks.close();
        running
    }
}

/// The add-ons that were not up by the ready timeout, by name.
#[derive(Debug)]
pub struct NotReady(pub Vec<String>);

/// Serving tunnels. Dropping this without [`Running::serve`] leaves the tasks to the runtime's
/// own shutdown.
pub struct Running {
    /// Listeners stop accepting; open connections go on.
    stop_accepting: CancellationToken,
    /// Open connections are cut, sessions closed, registrations removed.
    shutdown: CancellationToken,
    connections: TaskTracker,
    tasks: TaskTracker,
    /// Each add-on's session and the forwards the readiness probe opens a channel for.
    sessions: Vec<(String, SessionSlot, Vec<Forward>)>,
    registrations: Vec<(String, tokio::sync::watch::Receiver<bool>)>,
    stats: Arc<Stats>,
}

impl Running {
    /// Waits until every add-on's SSH server has opened a channel to each of its databases (or,
    /// in private-app-tunnel mode, the dyno is registered), or `timeout`, and logs which it was.
    pub async fn ready(&self, timeout: Duration) -> Result<(), NotReady> {
        let started = tokio::time::Instant::now();
        let deadline = started + timeout;
        let mut not_ready = Vec::new();
        for (name, slot, forwards) in &self.sessions {
            if !databases_reachable(name, slot.clone(), forwards, deadline).await {
                not_ready.push(name.clone());
            }
        }
        for (name, registered) in &self.registrations {
            let mut registered = registered.clone();
            let ready = tokio::time::timeout_at(deadline, registered.wait_for(|r| *r)).await;
            if !matches!(ready, Ok(Ok(_))) {
                not_ready.push(name.clone());
            }
        }
        let ms = started.elapsed().as_millis() as u64;
        self.stats.advance(Phase::Serving);
        if not_ready.is_empty() {
            info!(event = "ready", ms);
            Ok(())
        } else {
            warn!(
                event = "not-ready",
                addons = %not_ready.join(","),
                ms,
                "going on without them; their connections wait"
            );
            Err(NotReady(not_ready))
        }
    }

    pub fn open_connections(&self) -> usize {
        self.connections.len()
    }

    /// Serves until `trigger` says to stop, then stops as it says.
    pub async fn serve(self, trigger: &mut impl Trigger) -> Stopped {
        let stop = trigger.stop(&self).await;
        self.stats.advance(Phase::Stopping);
        let grace = match stop {
            Stop::Gracefully { grace } => grace,
            Stop::Now => return Stopped::Aborted,
        };
        tokio::select! {
            () = self.shutdown(grace) => {}
            () = trigger.abort() => return Stopped::Aborted,
        }
        info!(event = "stopped");
        Stopped::Gracefully
    }

    /// Stops accepting, gives open connections `grace` to finish, then ends everything.
    async fn shutdown(self, grace: Duration) {
        self.stop_accepting.cancel();
        self.connections.close();
        let open = self.connections.len();
        if open > 0 {
            info!(
                event = "draining",
                open_connections = open,
                grace_ms = grace.as_millis() as u64
            );
            if tokio::time::timeout(grace, self.connections.wait())
                .await
                .is_err()
            {
                warn!(
                    event = "connections-cut",
                    open_connections = self.connections.len()
                );
            }
        }
        self.shutdown.cancel();
        // Bounded: closing a session says goodbye to a server that may not answer.
        let stopped = async {
            self.tasks.wait().await;
            self.connections.wait().await;
        };
        if tokio::time::timeout(STOP_TIMEOUT, stopped).await.is_err() {
            warn!(event = "stop-timeout", ms = STOP_TIMEOUT.as_millis() as u64);
        }
    }
}

/// How often the readiness probe tries again a database the SSH server could not reach.
const PROBE_RETRY: Duration = Duration::from_millis(500);

/// Whether, by `deadline`, a session of this add-on opened a channel to each of `forwards`'
/// databases: an SSH session alone does not mean the app's first query can be answered. The
/// first failure per database is logged as an error naming it; the channels opened are closed
/// at once, before anything is sent (PostgreSQL logs nothing for such a connection).
async fn databases_reachable(
    addon: &str,
    mut slot: SessionSlot,
    forwards: &[Forward],
    deadline: tokio::time::Instant,
) -> bool {
    let mut reached = vec![false; forwards.len()];
    let mut said = vec![false; forwards.len()];
    while reached.contains(&false) {
        let session = match tokio::time::timeout_at(deadline, slot.wait_for(usable)).await {
            Ok(Ok(session)) => session.clone().expect("wait_for guarantees Some"),
            _ => return false,
        };
        let mut session_gone = false;
        for (i, forward) in forwards.iter().enumerate() {
            if reached[i] {
                continue;
            }
            let target = config::host_port(&forward.remote_host, forward.remote_port);
            let opened = tokio::time::timeout_at(
                deadline,
                session.open_direct_tcpip(
                    &forward.remote_host,
                    forward.remote_port,
                    forward.listen,
                ),
            )
            .await;
            match opened {
                Ok(Ok(channel)) => {
                    let _ = channel.close().await;
                    reached[i] = true;
                    if said[i] {
                        info!(event = "database-reachable", addon, role = %forward.role, target);
                    }
                }
                Ok(Err(ChannelError::SessionGone { .. })) => {
                    // Until the supervisor has seen the end too, or a pause has passed: never
                    // a busy loop on a session that fails channels without closing.
                    let pause = deadline.min(tokio::time::Instant::now() + PROBE_RETRY);
                    let _ = tokio::time::timeout_at(pause, session.closed().cancelled()).await;
                    session_gone = true;
                    break;
                }
                Ok(Err(refused @ ChannelError::Refused { .. })) => {
                    if !said[i] {
                        said[i] = true;
                        error!(event = "database-unreachable", addon, role = %forward.role, target, var = %forward.url_var, error = %refused, "the SSH session is up, but its server cannot reach the database");
                    }
                }
                // The ready timeout came while the server was still connecting: slow, or a host
                // that does not answer; the connections will tell.
                Err(_) => {
                    warn!(event = "database-not-reached", addon, role = %forward.role, target, var = %forward.url_var, "the SSH server had not reached the database by the ready timeout");
                    return false;
                }
            }
        }
        drop(session);
        if !session_gone && reached.contains(&false) {
            let next = tokio::time::Instant::now() + PROBE_RETRY;
            if next >= deadline {
                return false;
            }
            tokio::time::sleep_until(next).await;
        }
    }
    true
}

#[cfg(test)]
impl Running {
    /// Serving nothing: for the launch forms' triggers, which only ask how many connections
    /// are open.
    pub(crate) fn idle() -> Running {
        Running {
            stop_accepting: CancellationToken::new(),
            shutdown: CancellationToken::new(),
            connections: TaskTracker::new(),
            tasks: TaskTracker::new(),
            sessions: Vec::new(),
            registrations: Vec::new(),
            stats: Arc::new(Stats::new(&[], &[])),
        }
    }
}

/// The engine's timing in paused time: an add-on whose SSH server refuses every connection, so
/// no session ever comes and every wait runs to its bound.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::forwarder::ForwarderSettings;
    use crate::ssh::SessionSettings;
    use tokio::io::AsyncReadExt;
    use tokio::time::Instant;

    const CONNECTION_WAIT: Duration = Duration::from_secs(60);

    /// A port free now and never handed out before in this process: the tests run side by
    /// side, and one's refusing server must not be another's listener.
    fn free_port() -> u16 {
        static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
        let mut handed_out = HANDED_OUT
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        loop {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let port = listener.local_addr().unwrap().port();
            if !handed_out.contains(&port) {
                handed_out.push(port);
                return port;
            }
        }
    }

    fn settings(state_dir: &std::path::Path) -> EngineSettings {
        EngineSettings {
            supervisor: SupervisorSettings {
                session: SessionSettings {
                    connect_timeout: Duration::from_secs(10),
                    keepalive_interval: Duration::from_secs(3),
                    keepalive_count: 3,
                },
                reconnect_max_delay: Duration::from_secs(10),
                auth_failure_delay: Duration::from_secs(60),
            },
            forwarder: ForwarderSettings {
                connection_wait_timeout: CONNECTION_WAIT,
            },
            registration: RegistrationSettings {
                extend_interval: Duration::from_secs(3900),
                retry_interval: Duration::from_secs(180),
                request_timeout: Duration::from_secs(10),
                test_api_ca_file: None,
            },
            telemetry: TelemetrySettings {
                metrics_interval: Duration::ZERO,
                health_addr: None,
                state_dir: Some(state_dir.to_owned()),
            },
            dyno: Dyno::from_env(),
        }
    }

    /// The engine serving one add-on on `listen_port` whose server never answers.
    async fn started(state_dir: &std::path::Path, listen_port: u16) -> Running {
        let discovery = config::tests::local_addon(free_port(), listen_port);
        start(discovery, &settings(state_dir))
            .await
            .expect("the listener is bound")
    }

    /// An app's connection to the listener on `port`, once it is accepted and waiting for a
    /// session that never comes.
    async fn waiting_app(running: &Running, port: u16) -> tokio::net::TcpStream {
        let app = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        while running.open_connections() == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        app
    }

    struct StopAt(Stop);

    impl Trigger for StopAt {
        async fn stop(&mut self, _: &Running) -> Stop {
            self.0
        }
    }

    #[tokio::test(start_paused = true)]
    async fn readiness_gives_up_at_the_ready_timeout_and_names_the_addon() {
        let dir = tempfile::tempdir().unwrap();
        let running = started(dir.path(), free_port()).await;
        let began = Instant::now();
        let timeout = Duration::from_secs(10);
        let Err(NotReady(addons)) = running.ready(timeout).await else {
            panic!("ready without a server")
        };
        assert_eq!(addons, ["DATABASE"]);
        assert_eq!(began.elapsed(), timeout, "neither sooner nor later");
        assert_eq!(running.stats.phase(), Phase::Serving);
    }

    #[tokio::test(start_paused = true)]
    async fn with_no_connection_open_a_graceful_stop_takes_no_time() {
        let dir = tempfile::tempdir().unwrap();
        let running = started(dir.path(), free_port()).await;
        let began = Instant::now();
        let grace = Duration::from_secs(30);
        let stopped = running.serve(&mut StopAt(Stop::Gracefully { grace })).await;
        assert_eq!(stopped, Stopped::Gracefully);
        assert!(
            began.elapsed() < Duration::from_millis(10),
            "{:?}",
            began.elapsed()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_connection_gets_the_grace_then_is_cut_within_the_stop_bound() {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let running = started(dir.path(), port).await;
        let mut app = waiting_app(&running, port).await;
        let began = Instant::now();
        let grace = Duration::from_secs(5);
        let stopped = running.serve(&mut StopAt(Stop::Gracefully { grace })).await;
        let took = began.elapsed();
        assert_eq!(stopped, Stopped::Gracefully);
        assert!(took >= grace, "cut before the grace: {took:?}");
        assert!(
            took <= grace + STOP_TIMEOUT,
            "past the stop bound: {took:?}"
        );
        // The app's connection ends with the tunnel, no later.
        let mut byte = [0; 1];
        let read = tokio::time::timeout(Duration::ZERO, app.read(&mut byte)).await;
        assert!(matches!(read, Ok(Ok(0) | Err(_))), "{read:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_task_that_never_ends_holds_the_stop_up_for_the_stop_bound_only() {
        let dir = tempfile::tempdir().unwrap();
        let running = started(dir.path(), free_port()).await;
        // As a session's goodbye to a server that never answers would.
        running.tasks.spawn(std::future::pending::<()>());
        let began = Instant::now();
        let grace = Duration::from_secs(30);
        let stopped = running.serve(&mut StopAt(Stop::Gracefully { grace })).await;
        assert_eq!(stopped, Stopped::Gracefully);
        assert_eq!(began.elapsed(), STOP_TIMEOUT);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stop_now_leaves_at_once_even_with_a_connection_open() {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let running = started(dir.path(), port).await;
        let _app = waiting_app(&running, port).await;
        let began = Instant::now();
        assert_eq!(
            running.serve(&mut StopAt(Stop::Now)).await,
            Stopped::Aborted
        );
        assert_eq!(began.elapsed(), Duration::ZERO);
    }
}
