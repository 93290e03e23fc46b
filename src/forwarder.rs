//! The 127.0.0.1 listeners and the copy of each accepted connection over a `direct-tcpip`
//! channel.
//!
//! Listeners are bound before the first SSH connect and never closed while the process serves,
//! so the app never sees "connection refused": while the session is down a new connection
//! simply waits for the next one.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use crate::config::Forward;
use crate::ssh::ChannelError;
use crate::supervisor::SessionSlot;

/// Large enough to fill a 1 Gbit/s link between wake-ups; one pair per open connection.
const COPY_BUFFER: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
#[error("{var}: cannot listen on {addr} (port {port}): {source}; expected the port to be free, is another program (or another bpg-tunnel) using it?", port = addr.port())]
pub struct BindError {
    pub var: String,
    pub addr: SocketAddr,
    pub source: io::Error,
}

/// A bound listener for one forward of one add-on.
pub struct Listener {
    addon: String,
    forward: Forward,
    listener: TcpListener,
}

impl Listener {
    pub async fn bind(addon: &str, forward: &Forward) -> Result<Listener, BindError> {
        let listener = TcpListener::bind(forward.listen)
            .await
            .map_err(|source| BindError {
                var: forward.url_var.clone(),
                addr: forward.listen,
                source,
            })?;
        Ok(Listener {
            addon: addon.to_owned(),
            forward: forward.clone(),
            listener,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().unwrap_or(self.forward.listen)
    }

    /// Accepts until `stop_accepting` is cancelled; each connection runs on `connections` so
    /// the caller can wait for them to finish.
    pub async fn serve(
        self,
        sessions: SessionSlot,
        wait_timeout: Duration,
        stop_accepting: CancellationToken,
        connections: TaskTracker,
    ) {
        loop {
            let accepted = tokio::select! {
                accepted = self.listener.accept() => accepted,
                () = stop_accepting.cancelled() => break,
            };
            match accepted {
                Ok((stream, peer)) => {
                    let connection = Connection {
                        addon: self.addon.clone(),
                        forward: self.forward.clone(),
                        peer,
                    };
                    connections.spawn(connection.run(stream, sessions.clone(), wait_timeout));
                }
                Err(error) => {
                    // Usually EMFILE: back off briefly instead of spinning on the error.
                    warn!(event = "accept-failed", addon = %self.addon, role = %self.forward.role, error = %error);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

struct Connection {
    addon: String,
    forward: Forward,
    peer: SocketAddr,
}

impl Connection {
    async fn run(self, mut stream: TcpStream, mut sessions: SessionSlot, wait_timeout: Duration) {
        let _ = stream.set_nodelay(true);
        let accepted = tokio::time::Instant::now();
        let deadline = accepted + wait_timeout;
        let (addon, role, peer) = (&self.addon, self.forward.role, self.peer);
        debug!(event = "connection-open", addon, %role, %peer);
        loop {
            let ready = |s: &Option<_>| {
                s.as_ref()
                    .is_some_and(|s: &std::sync::Arc<crate::ssh::Session>| !s.is_closed())
            };
            let session = match tokio::time::timeout_at(deadline, sessions.wait_for(ready)).await {
                Ok(Ok(session)) => session.clone().expect("wait_for guarantees Some"),
                // The supervisor is gone: the process is stopping.
                Ok(Err(_)) => return,
                Err(_) => {
                    warn!(
                        event = "connection-wait-expired",
                        addon,
                        %role,
                        %peer,
                        waited_ms = wait_timeout.as_millis() as u64,
                        "no SSH session came up in time; closing the connection"
                    );
                    return;
                }
            };
            // Bounded: a blackholed database host makes sshd answer only when its own connect
            // fails, minutes later.
            let channel = match tokio::time::timeout_at(
                deadline,
                session.open_direct_tcpip(
                    &self.forward.remote_host,
                    self.forward.remote_port,
                    peer,
                ),
            )
            .await
            {
                Ok(channel) => channel,
                Err(_) => {
                    warn!(event = "connection-wait-expired", addon, %role, %peer, waited_ms = wait_timeout.as_millis() as u64, "the SSH server did not open the channel in time; closing the connection");
                    return;
                }
            };
            drop(session);
            let mut channel = match channel {
                Ok(channel) => channel,
                Err(ChannelError::SessionGone { .. }) => continue,
                Err(error @ ChannelError::Refused { .. }) => {
                    error!(event = "channel-refused", addon, %role, %peer, error = %error);
                    return;
                }
            };
            let waited = accepted.elapsed();
            if waited >= Duration::from_millis(100) {
                info!(event = "connection-waited", addon, %role, %peer, ms = waited.as_millis() as u64);
            }
            let copied = tokio::io::copy_bidirectional_with_sizes(
                &mut stream,
                &mut channel,
                COPY_BUFFER,
                COPY_BUFFER,
            )
            .await;
            match copied {
                Ok((up, down)) => {
                    debug!(event = "connection-closed", addon, %role, %peer, bytes_up = up, bytes_down = down)
                }
                Err(error) => {
                    debug!(event = "connection-closed", addon, %role, %peer, error = %error)
                }
            }
            return;
        }
    }
}
