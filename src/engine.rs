//! The engine: every add-on's tunnels, from the environment to the last byte of a graceful stop.
//!
//! [`start`] discovers the add-ons, binds every listener before the first SSH connect (so an app
//! that connects at once is queued rather than refused), and starts a supervisor per add-on, a
//! serving task per listener and a registration per private-app add-on. [`Running::serve`] then
//! serves until the launch form's [`Trigger`] says to stop, and stops the one way there is: stop
//! accepting, give open connections the grace, cut the rest, end every session and registration,
//! all within a bound. Launch forms (`lifecycle/`) decide *when*; this module decides *how*.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::config::{self, Discovery, Severity};
use crate::forwarder::{ForwarderSettings, Listener};
use crate::private_app::{self, Registration, RegistrationSettings};
use crate::supervisor::{SessionSlot, Supervisor, SupervisorSettings};

/// How long stopping may take once connections are cut (room for a private-app deregistration):
/// within Heroku's SIGKILL budget even after a full drain.
const STOP_TIMEOUT: Duration = Duration::from_secs(3);

/// What the engine's components need; see [`crate::options::Options`].
#[derive(Debug, Clone)]
pub struct EngineSettings {
    pub supervisor: SupervisorSettings,
    pub forwarder: ForwarderSettings,
    pub registration: RegistrationSettings,
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

/// Discovers the add-ons in the environment, reports what is wrong with them, binds and starts
/// what can be served; `None` (after saying why) when nothing can.
pub async fn start(settings: &EngineSettings) -> Option<Running> {
    let discovery = config::discover_env();
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
    Some(tunnels.start(settings.forwarder))
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
}

impl Tunnels {
    /// Binds every listener of every add-on. A listener that cannot be bound is reported and
    /// skipped; the rest still serve.
    async fn bind(discovery: Discovery, settings: &EngineSettings) -> Tunnels {
        let mut tunnels = Tunnels {
            supervisors: Vec::new(),
            listeners: Vec::new(),
            registrations: Vec::new(),
        };
        if !discovery.private_apps.is_empty() {
            let (client_id, fallback) = private_app::client_id();
            if let Some(fallback) = fallback {
                warn!(event = "config-notice", var = "DYNO", client_id = %client_id, notice = fallback);
            }
            for app in &discovery.private_apps {
                match Registration::new(app, &client_id, &settings.registration) {
                    Ok(registration) => {
                        info!(event = "private-tunnel-mode", addon = %app.name, api = %app.api_base_url);
                        tunnels.registrations.push(registration);
                    }
                    Err(setup_error) => {
                        error!(event = "config-error", addon = %app.name, var = %app.conn_info_var, error = %setup_error)
                    }
                }
            }
        }
        for addon in discovery.addons {
            let mut bound = Vec::new();
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
            if bound.is_empty() {
                continue;
            }
            let index = tunnels.supervisors.len();
            tunnels
                .supervisors
                .push(Supervisor::new(addon, settings.supervisor.clone()));
            tunnels
                .listeners
                .extend(bound.into_iter().map(|listener| (index, listener)));
        }
        tunnels
    }

    fn is_empty(&self) -> bool {
        self.listeners.is_empty() && self.registrations.is_empty()
    }

    /// Starts accepting, connecting and registering.
    fn start(self, forwarder: ForwarderSettings) -> Running {
        let running = Running {
            stop_accepting: CancellationToken::new(),
            shutdown: CancellationToken::new(),
            connections: TaskTracker::new(),
            tasks: TaskTracker::new(),
            sessions: self
                .supervisors
                .iter()
                .map(|s| (s.addon_name().to_owned(), s.sessions()))
                .collect(),
            registrations: self
                .registrations
                .iter()
                .map(|r| (r.addon_name().to_owned(), r.registered()))
                .collect(),
        };
        for registration in self.registrations {
            running
                .tasks
                .spawn(registration.run(running.shutdown.clone()));
        }
        for (index, listener) in self.listeners {
            running.tasks.spawn(listener.serve(
                self.supervisors[index].sessions(),
                forwarder,
                running.stop_accepting.clone(),
                running.shutdown.clone(),
                running.connections.clone(),
            ));
        }
        for supervisor in self.supervisors {
            running
                .tasks
                .spawn(supervisor.run(running.shutdown.clone()));
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
    sessions: Vec<(String, SessionSlot)>,
    registrations: Vec<(String, tokio::sync::watch::Receiver<bool>)>,
}

impl Running {
    /// Waits until every add-on has a session (or, in private-app-tunnel mode, a registration),
    /// or `timeout`, and logs which it was.
    pub async fn ready(&self, timeout: Duration) -> Result<(), NotReady> {
        let started = tokio::time::Instant::now();
        let deadline = started + timeout;
        let mut not_ready = Vec::new();
        for (name, slot) in &self.sessions {
            let mut slot = slot.clone();
            let ready = tokio::time::timeout_at(deadline, slot.wait_for(Option::is_some)).await;
            if !matches!(ready, Ok(Ok(_))) {
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
        let grace = match trigger.stop(&self).await {
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
