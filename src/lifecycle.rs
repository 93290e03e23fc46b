//! How the process starts, serves and stops.
//!
//! Start-up order matters: every listener is bound before the first SSH connect, so an app that
//! connects at once is queued rather than refused.

use std::process::ExitCode;
use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::config::{self, Discovery, Severity};
use crate::forwarder::Listener;
use crate::options::Options;
use crate::ssh::SessionSettings;
use crate::supervisor::Supervisor;

/// After the listeners stop, how long open connections get to finish on their own.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

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

/// The tunnels of every add-on, bound and ready to be driven.
pub struct Tunnels {
    supervisors: Vec<Supervisor>,
    listeners: Vec<(usize, Listener)>,
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
        };
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
        self.listeners.is_empty()
    }

    /// Serves until `stop` is cancelled, then lets open connections finish for a short grace.
    pub async fn serve(self, options: &Options, stop: CancellationToken) {
        let stop_accepting = CancellationToken::new();
        let stop_sessions = CancellationToken::new();
        let connections = TaskTracker::new();
        let tasks = TaskTracker::new();

        for (index, listener) in self.listeners {
            let sessions = self.supervisors[index].sessions();
            tasks.spawn(listener.serve(
                sessions,
                options.connection_wait_timeout,
                stop_accepting.clone(),
                connections.clone(),
            ));
        }
        for supervisor in self.supervisors {
            tasks.spawn(supervisor.run(stop_sessions.clone()));
        }
        tasks.close();

        stop.cancelled().await;
        stop_accepting.cancel();
        connections.close();
        let open = connections.len();
        if open > 0 {
            info!(
                event = "draining",
                open_connections = open,
                grace_ms = CLOSE_GRACE.as_millis() as u64
            );
        }
        if tokio::time::timeout(CLOSE_GRACE, connections.wait())
            .await
            .is_err()
        {
            warn!(
                event = "connections-cut",
                open_connections = connections.len()
            );
        }
        // Ends every session, which in turn ends any connection still copying.
        stop_sessions.cancel();
        tasks.wait().await;
    }
}

/// `bpg-tunnel` with no subcommand: serve in the foreground until SIGTERM or SIGINT.
pub async fn run_foreground(options: Options) -> ExitCode {
    let discovery = discover_from_env();
    report(&discovery);
    let had_addons = !discovery.addons.is_empty() || discovery.errors().next().is_some();
    let tunnels = Tunnels::bind(discovery, &options).await;
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
        return ExitCode::FAILURE;
    }
    let stop = CancellationToken::new();
    let signals = match stop_on_signals(stop.clone()) {
        Ok(signals) => signals,
        Err(signal_error) => {
            error!(event = "signal-setup-failed", error = %signal_error);
            return ExitCode::FAILURE;
        }
    };
    tunnels.serve(&options, stop).await;
    signals.abort();
    info!(event = "stopped");
    ExitCode::SUCCESS
}

/// Cancels `stop` on the first SIGTERM or SIGINT; a second SIGINT exits at once.
fn stop_on_signals(stop: CancellationToken) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(tokio::spawn(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        info!(event = "signal", signal = name, "stopping");
        stop.cancel();
        int.recv().await;
        warn!(
            event = "signal",
            signal = "SIGINT",
            "second interrupt; exiting at once"
        );
        std::process::exit(130);
    }))
}
