//! `bpg-tunnel` with no subcommand: serve in the foreground until SIGTERM, SIGINT or SIGHUP,
//! then give open connections the grace; a second Ctrl+C leaves at once.

use std::process::ExitCode;
use std::time::Duration;

use tracing::{error, info};

use super::signals::Signals;
use super::LifecycleSettings;
use crate::config;
use crate::engine::{self, EngineSettings, Running, Stop, Stopped, Trigger};

pub async fn run(engine: &EngineSettings, lifecycle: &LifecycleSettings) -> ExitCode {
    if lifecycle.disabled {
        info!(
            event = "disabled",
            var = "BPG_TUNNEL_DISABLE",
            "no tunnel started"
        );
        return ExitCode::SUCCESS;
    }
    let signals = match Signals::new() {
        Ok(signals) => signals,
        Err(signal_error) => {
            error!(event = "signal-setup-failed", error = %signal_error);
            return ExitCode::FAILURE;
        }
    };
    let Some(running) = engine::start(config::discover_env(), engine).await else {
        return ExitCode::FAILURE;
    };
    let mut trigger = Interrupted {
        signals,
        grace: lifecycle.grace,
        early: None,
    };
    // Nothing waits on it here, but the log, `status` and `/startup` say when it is ready. A
    // signal meanwhile ends the wait.
    tokio::select! {
        _ = running.ready(lifecycle.ready_timeout) => {}
        name = trigger.signals.next_stop() => trigger.early = Some(name),
    }
    match running.serve(&mut trigger).await {
        Stopped::Gracefully => ExitCode::SUCCESS,
        Stopped::Aborted => ExitCode::from(130),
    }
}

struct Interrupted {
    signals: Signals,
    grace: Duration,
    /// A stop signal that came during the ready wait.
    early: Option<&'static str>,
}

impl Trigger for Interrupted {
    async fn stop(&mut self, _: &Running) -> Stop {
        let name = match self.early.take() {
            Some(name) => name,
            None => self.signals.next_stop().await,
        };
        info!(event = "signal", signal = name, "stopping");
        Stop::Gracefully { grace: self.grace }
    }

    async fn abort(&mut self) {
        self.signals.second_interrupt().await;
    }
}
