//! The 127.0.0.1 listeners and the copy of each accepted connection over a `direct-tcpip`
//! channel.
//!
//! Listeners are bound before the first SSH connect and never closed while the process serves,
//! so the app never sees "connection refused": while the session is down a new connection
//! simply waits for the next one.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use russh::client::Msg;
use russh::{Channel, ChannelMsg, ChannelReadHalf};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, warn};

use crate::config::Forward;
use crate::ssh::ChannelError;
use crate::stats::AddonStats;
use crate::supervisor::{usable, SessionSlot};

/// At most one `accept-failed` line per listener this often.
const ACCEPT_FAILED_EVERY: Duration = Duration::from_secs(10);

/// The most the app's data is read at once: one SSH packet (russh's default maximum).
const UP_BUFFER: usize = 32 * 1024;

/// How the forwarder treats a connection; see [`crate::options::Options`].
#[derive(Debug, Clone, Copy)]
pub struct ForwarderSettings {
    /// How long a new connection waits for a session (and its channel) before it is closed.
    pub connection_wait_timeout: Duration,
}

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
    /// the caller can wait for them to finish, and is cut when `shutdown` is cancelled.
    pub async fn serve(
        self,
        sessions: SessionSlot,
        stats: Arc<AddonStats>,
        settings: ForwarderSettings,
        stop_accepting: CancellationToken,
        shutdown: CancellationToken,
        connections: TaskTracker,
    ) {
        // Accept errors come in bursts (EMFILE repeats until a descriptor is freed): one line
        // per interval, with how many there were.
        let mut failures = 0u64;
        let mut last_said: Option<tokio::time::Instant> = None;
        loop {
            let accepted = tokio::select! {
                accepted = self.listener.accept() => accepted,
                () = stop_accepting.cancelled() => break,
            };
            match accepted {
                Ok((stream, peer)) => {
                    let connection = Connection {
                        forward: self.forward.clone(),
                        peer,
                        stats: stats.clone(),
                    };
                    connections.spawn(connection.run(
                        stream,
                        sessions.clone(),
                        settings,
                        shutdown.clone(),
                    ));
                }
                Err(error) => {
                    failures += 1;
                    let due = last_said.is_none_or(|at| at.elapsed() >= ACCEPT_FAILED_EVERY);
                    if due {
                        warn!(event = "accept-failed", addon = %self.addon, role = %self.forward.role, count = failures, error = %error);
                        failures = 0;
                        last_said = Some(tokio::time::Instant::now());
                    }
                    // Usually EMFILE: back off briefly instead of spinning on the error.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

struct Connection {
    forward: Forward,
    peer: SocketAddr,
    stats: Arc<AddonStats>,
}

impl Connection {
    async fn run(
        self,
        stream: TcpStream,
        mut sessions: SessionSlot,
        settings: ForwarderSettings,
        shutdown: CancellationToken,
    ) {
        let wait_timeout = settings.connection_wait_timeout;
        let _ = stream.set_nodelay(true);
        let accepted = tokio::time::Instant::now();
        let deadline = accepted + wait_timeout;
        let stats = &self.stats;
        let (addon, role, peer) = (&stats.name, self.forward.role, self.peer);
        let _open = stats.connection_opened();
        debug!(event = "connection-open", addon, %role, %peer);
        if !usable(&sessions.borrow()) {
            stats.waited.inc();
        }
        loop {
            let waited = tokio::select! {
                waited = tokio::time::timeout_at(deadline, sessions.wait_for(usable)) => {
                    waited.map(|slot| slot.map(|session| session.clone()))
                }
                () = shutdown.cancelled() => return,
            };
            let session = match waited {
                Ok(Ok(session)) => session.expect("wait_for guarantees Some"),
                // The supervisor is gone: the process is stopping.
                Ok(Err(_)) => return,
                Err(_) => {
                    stats.wait_expired.inc();
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
            let opening = tokio::time::Instant::now();
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
                    stats.wait_expired.inc();
                    let target = crate::config::host_port(
                        &self.forward.remote_host,
                        self.forward.remote_port,
                    );
                    warn!(event = "connection-wait-expired", addon, %role, %peer, target, waited_ms = wait_timeout.as_millis() as u64, "the SSH server could not reach the database in time; closing the connection");
                    return;
                }
            };
            // Only the signals are kept: holding the session itself would keep it (and its
            // socket) alive after the supervisor has replaced it.
            let session_closed = session.closed();
            drop(session);
            let channel = match channel {
                Ok(channel) => {
                    stats.channel_opened(opening.elapsed());
                    channel
                }
                Err(ChannelError::SessionGone { .. }) => continue,
                Err(error @ ChannelError::Refused { .. }) => {
                    stats.refused.inc();
                    error!(event = "channel-refused", addon, %role, %peer, error = %error);
                    return;
                }
            };
            let waited = accepted.elapsed();
            if waited >= Duration::from_millis(100) {
                debug!(event = "connection-waited", addon, %role, %peer, ms = waited.as_millis() as u64);
            }
            let stopping = async {
                shutdown.cancelled().await;
                io::Error::new(io::ErrorKind::ConnectionAborted, "bpg-tunnel is stopping")
            };
            let copied = copy(stream, channel, stats, &session_closed, stopping).await;
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

/// Copies both ways, passing each end-of-file on, until the channel is closed or `stopping`
/// resolves; like `tokio::io::copy_bidirectional`, but without its two zero-filled buffers per
/// connection: data from the database goes from russh's own packet buffer straight to the app's
/// socket, and the buffer for the app's data is filled only as far as the app writes. Returns
/// the bytes sent up and down.
///
/// When the session ends, the upload stops (a write waiting for SSH window would never be
/// woken) but what the server sent before is still passed on: the channel then ends with the
/// server's close (the stream was whole) or without it (cut short). A copy that ends in any
/// other way than the server closing the channel resets the app's connection: a clean
/// end-of-file there would pass a stream cut short (by a session lost or ended for a protocol
/// violation) off as a whole one.
async fn copy(
    client: TcpStream,
    channel: Channel<Msg>,
    stats: &AddonStats,
    session_closed: &CancellationToken,
    stopping: impl Future<Output = io::Error>,
) -> io::Result<(u64, u64)> {
    let (mut client_read, mut client_write) = client.into_split();
    let (channel_read, channel_write) = channel.split();
    let mut sent_up = 0;
    let copied = async {
        let up = copy_up(
            &mut client_read,
            channel_write.make_writer(),
            &mut sent_up,
            stats,
        );
        let down = copy_down(channel_read, &mut client_write, stats);
        tokio::pin!(up, down);
        let mut up_done = false;
        loop {
            tokio::select! {
                result = &mut up, if !up_done => {
                    result?;
                    up_done = true;
                }
                () = session_closed.cancelled(), if !up_done => up_done = true,
                // Closed: what the app still sends has nowhere to go, and russh stops opening
                // the window for it, so a pending write would otherwise wait forever.
                result = &mut down => return result,
            }
        }
    };
    let copied = tokio::select! {
        copied = copied => copied,
        error = stopping => Err(error),
    };
    if copied.is_err() {
        reset(client_read, client_write);
    }
    // Split halves do not close the channel when dropped (a whole `Channel` stream would): say
    // so, or sshd keeps its side, and the database connection, open.
    let _ = channel_write.close().await;
    copied.map(|received_down| (sent_up, received_down))
}

/// Closes the app's connection with a reset, never an end-of-file.
fn reset(read: OwnedReadHalf, write: OwnedWriteHalf) {
    let _ = socket2::SockRef::from(write.as_ref()).set_linger(Some(Duration::ZERO));
    // Dropping the write half would send a FIN first; the socket closes with the read half.
    write.forget();
    drop(read);
}

async fn copy_up(
    from: &mut OwnedReadHalf,
    mut to: impl AsyncWrite + Unpin,
    sent: &mut u64,
    stats: &AddonStats,
) -> io::Result<()> {
    // Reused for every read; its pages are touched only as far as the largest write.
    let mut buffer = Vec::with_capacity(UP_BUFFER);
    loop {
        buffer.clear();
        if from.read_buf(&mut buffer).await? == 0 {
            return to.shutdown().await;
        }
        to.write_all(&buffer).await?;
        *sent += buffer.len() as u64;
        stats.bytes_up.inc_by(buffer.len() as u64);
    }
}

/// Runs until the channel is closed, not just at its end-of-file: only the close tells that
/// the app's side can stop too. While the app does not read, neither does this, and the server
/// stops sending on this channel once its window is full (see `patches/russh/`). Owns the read
/// half so that, when this ends, what is still queued is given back to the server as window.
/// A channel that ends without the server's close ended with its session: an error.
async fn copy_down(
    mut from: ChannelReadHalf,
    to: &mut OwnedWriteHalf,
    stats: &AddonStats,
) -> io::Result<u64> {
    let mut received = 0;
    let mut eof = false;
    let mut closed = false;
    while let Some(message) = from.wait().await {
        match message {
            ChannelMsg::Data { data } => {
                if eof {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "the SSH server sent data after the channel's end-of-file",
                    ));
                }
                to.write_all(&data).await?;
                received += data.len() as u64;
                stats.bytes_down.inc_by(data.len() as u64);
            }
            ChannelMsg::Eof if !eof => {
                eof = true;
                to.shutdown().await?;
            }
            ChannelMsg::Close => {
                closed = true;
                break;
            }
            // Window adjustments and the like: russh has acted on them already.
            _ => {}
        }
    }
    if !closed {
        return Err(io::Error::new(
            io::ErrorKind::ConnectionAborted,
            "the SSH session ended before the server closed the channel",
        ));
    }
    if !eof {
        to.shutdown().await?;
    }
    Ok(received)
}
