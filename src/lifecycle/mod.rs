//! How the process starts, serves and stops, in each of its launch forms:
//! - foreground (`bpg-tunnel`): serve until a signal;
//! - [`daemon`] (`bpg-tunnel start --owner-pid PID`, from profile.d or exec.d): detach, report
//!   readiness, serve while the owner (the app) lives, drain with it on SIGTERM;
//! - [`run`] (`bpg-tunnel run -- CMD`, a Docker ENTRYPOINT prefix): serve around a child.
//!
//! Start-up order matters: every listener is bound before the first SSH connect, so an app that
//! connects at once is queued rather than refused.

use std::process::ExitCode;
use std::time::Duration;

use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::config::{self, Discovery, Severity};
use crate::forwarder::Listener;
use crate::options::Options;
use crate::private_app::{self, ApiClient, Registration, RegistrationSettings};
use crate::ssh::SessionSettings;
use crate::supervisor::{SessionSlot, Supervisor};

pub mod daemon;
pub mod owner;
pub mod run;

/// Reads the environment the way the add-on sets it; non-UTF-8 values cannot be add-on config,
/// so they are decoded lossily rather than rejected.
pub fn discover_from_env() -> Discovery {
    config::discover(std::env::vars_os().map(|(k, v)| {
        (
            k.to_string_lossy().into_owned(),
            v.to_string_lossy().into_owned(),
        )
    }))
}

pub fn report(discovery: &Discovery) {
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

/// How long stopping may take once connections are cut (room for a private-app deregistration):
/// within Heroku's SIGKILL budget even after a full drain.
const STOP_TIMEOUT: Duration = Duration::from_secs(3);

/// The tunnels of every add-on, bound and ready to be driven.
pub struct Tunnels {
    supervisors: Vec<Supervisor>,
    listeners: Vec<(usize, Listener)>,
    registrations: Vec<Registration>,
}

impl Tunnels {
    /// Binds every listener of every add-on. A listener that cannot be bound is reported and
    /// skipped; the rest still serve.
    pub async fn bind(discovery: Discovery, options: &Options) -> Tunnels {
        let settings = SessionSettings {
            connect_timeout: options.connect_timeout,
            keepalive_interval: options.keepalive_interval,
            keepalive_count: options.keepalive_count,
        };
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
            let settings = RegistrationSettings {
                extend_interval: options.private_tunnel_extend_interval,
                retry_interval: options.private_tunnel_retry_interval,
            };
            for app in &discovery.private_apps {
                match ApiClient::new(
                    app,
                    &client_id,
                    options.private_tunnel_request_timeout,
                    options.test_api_ca_file.as_deref(),
                ) {
                    Ok(api) => {
                        info!(event = "private-tunnel-mode", addon = %app.name, api = %app.api_base_url);
                        tunnels.registrations.push(Registration::new(
                            &app.name,
                            api,
                            settings.clone(),
                        ));
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
                            target = %format!("{}:{}", forward.remote_host, forward.remote_port)
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
            tunnels.supervisors.push(Supervisor::new(
                addon,
                settings.clone(),
                options.reconnect_max_delay,
                options.auth_failure_delay,
            ));
            tunnels
                .listeners
                .extend(bound.into_iter().map(|listener| (index, listener)));
        }
        tunnels
    }

    pub fn is_empty(&self) -> bool {
        self.listeners.is_empty() && self.registrations.is_empty()
    }

    /// Starts accepting and connecting; the returned handle stops it all.
    pub fn start(self, options: &Options) -> Running {
        let running = Running {
            stop_accepting: CancellationToken::new(),
            stop_sessions: CancellationToken::new(),
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
                .spawn(registration.run(running.stop_sessions.clone()));
        }
        for (index, listener) in self.listeners {
            let sessions = self.supervisors[index].sessions();
            running.tasks.spawn(listener.serve(
                sessions,
                options.connection_wait_timeout,
                running.stop_accepting.clone(),
                running.stop_sessions.clone(),
                running.connections.clone(),
            ));
        }
        for supervisor in self.supervisors {
            running
                .tasks
                .spawn(supervisor.run(running.stop_sessions.clone()));
        }
        running.tasks.close();
        running
    }
}

/// Serving tunnels. Dropping this without [`Running::shutdown`] leaves the tasks to the
/// runtime's own shutdown.
pub struct Running {
    stop_accepting: CancellationToken,
    stop_sessions: CancellationToken,
    connections: TaskTracker,
    tasks: TaskTracker,
    sessions: Vec<(String, SessionSlot)>,
    registrations: Vec<(String, tokio::sync::watch::Receiver<bool>)>,
}

impl Running {
    /// Waits until every add-on has a session, or `timeout`; returns the add-ons still without.
    pub async fn wait_ready(&self, timeout: Duration) -> Vec<String> {
        let deadline = tokio::time::Instant::now() + timeout;
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
        not_ready
    }

    pub fn open_connections(&self) -> usize {
        self.connections.len()
    }

    /// Stops accepting, gives open connections `grace` to finish, then ends every session.
    pub async fn shutdown(self, grace: Duration) {
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
        // Cuts every connection still open and ends every session.
        self.stop_sessions.cancel();
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

/// `bpg-tunnel` with no subcommand: serve in the foreground until SIGTERM or SIGINT, then give
/// open connections a short grace.
pub async fn run_foreground(options: Options) -> ExitCode {
    let Some(running) = bind_and_start(&options).await else {
        return ExitCode::FAILURE;
    };
    let mut signals = match Signals::new() {
        Ok(signals) => signals,
        Err(signal_error) => {
            error!(event = "signal-setup-failed", error = %signal_error);
            return ExitCode::FAILURE;
        }
    };
    let name = signals.next_stop().await;
    info!(event = "signal", signal = name, "stopping");
    tokio::select! {
        () = running.shutdown(options.owner_grace) => {}
        () = signals.second_interrupt() => return ExitCode::from(130),
    }
    info!(event = "stopped");
    ExitCode::SUCCESS
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

/// Discovers, reports and binds; `None` (after saying why) when nothing can be served.
pub async fn bind_and_start(options: &Options) -> Option<Running> {
    let discovery = discover_from_env();
    report(&discovery);
    let had_addons = !discovery.is_empty();
    let tunnels = Tunnels::bind(discovery, options).await;
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
    Some(tunnels.start(options))
}

/// The signals the lifecycle reacts to.
pub struct Signals {
    term: Signal,
    int: Signal,
    hup: Signal,
}

impl Signals {
    pub fn new() -> std::io::Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// The next SIGTERM, SIGINT or SIGHUP, by name.
    pub async fn next_stop(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
            _ = self.hup.recv() => "SIGHUP",
        }
    }

    /// Ctrl+C twice in a terminal: the user wants out now.
    pub async fn second_interrupt(&mut self) {
        self.int.recv().await;
        warn!(
            event = "signal",
            signal = "SIGINT",
            "second interrupt; exiting at once"
        );
    }
}
