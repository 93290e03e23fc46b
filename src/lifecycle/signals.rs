//! The stop signals the foreground and daemon forms react to.

use tokio::signal::unix::{signal, Signal, SignalKind};
use tracing::warn;

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
