//! One SSH session to an add-on's server: connect, pin the host key, authenticate with the
//! in-memory client key, open `direct-tcpip` channels, and tell when the server stops answering.
//!
//! Liveness is judged from the socket, not from russh's own keepalive: every byte read from the
//! server counts as a sign of life, a keepalive request is sent after each silent interval, and
//! after `interval × count` of silence the session is declared dead and its socket shut down, so
//! that nothing (not even a write blocked on a full send buffer) outlives it.
//!
//! Silence is a sound signal because our russh (patched, see `patches/russh/`) never stops
//! reading the socket: a local client that stops reading holds up only its own channel, whose
//! window the server then stops filling, so the server's keepalive replies and every other
//! channel keep flowing.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use russh::client::{self, ChannelOpenHandle, DisconnectReason, Handle, Msg};
use russh::keys::{PrivateKeyWithHashAlg, PublicKeyOrCertificate};
use russh::{Channel, ChannelId, ChannelOpenFailure};
use tokio::io::{AsyncRead, AsyncWrite, BufReader, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::debug;

use crate::config::keys::{describe_key, HostKey};
use crate::config::SshServer;

/// Two full SSH packets: one read drains what a busy server has sent since the last one.
const SOCKET_READ_BUFFER: usize = 64 * 1024;

/// How much the server may send on one channel before its reader has taken it: OpenSSH's own
/// channel window (and russh's default, set here so the figure below stays true). It is the most
/// data a stalled client makes us hold (20 stalled clients: 42 MB of data, 43 MB of RSS measured),
/// and bounds one connection's download at window / round trip: 2 GB/s at the 1 ms between a
/// dyno and a server in its region, 20 MB/s at 100 ms. Larger windows were measured against
/// OpenSSH 9.2 (docs/performance.md): across a 40 ms round trip they help (a window that grew to
/// 8 MiB for a client that kept up: COPY 44 to 73 MB/s), but sshd reads ahead into its channel
/// buffer as far as a window lets it and spends its CPU moving and wiping that buffer, so on
/// loopback the same COPY fell from 266 to 159 MB/s. A window sized to the round trip is the
/// way there; a fixed or merely reader-paced larger one is not.
const CHANNEL_WINDOW: u32 = 2 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("could not connect to {server}: {source}")]
    Connect { server: String, source: io::Error },
    /// sshd closes a connection at once, before its version line, when more handshakes than its
    /// `MaxStartups` are under way (OpenSSH 8 and later first write "Exceeded MaxStartups"): the
    /// connection cost it nothing, so it can be retried soon.
    #[error("{server} closed the connection before its SSH greeting{}: sshd does this past its MaxStartups limit, when many clients are in their handshakes at once; retrying soon", said_suffix(.said))]
    ClosedBeforeGreeting {
        server: String,
        /// What it wrote instead, if anything (printable characters only, shortened).
        said: String,
    },
    #[error("{server} did not complete the SSH handshake and authentication within {timeout:?}")]
    Timeout { server: String, timeout: Duration },
    #[error("{server} presented host key {presented}, but SSH_PUBLIC_HOST_KEY is {expected}; refusing to forward anything through it")]
    HostKeyMismatch {
        server: String,
        presented: String,
        expected: String,
    },
    #[error("{server} rejected SSH_USER_PRIVATE_KEY ({algorithm}) for user {user:?}")]
    AuthRejected {
        server: String,
        user: String,
        algorithm: String,
    },
    #[error("{server} offers only SHA-1 RSA signatures (ssh-rsa) for {what}; refusing them, as OpenSSH does since 8.8: the server needs rsa-sha2-256 or rsa-sha2-512, or another key type")]
    Sha1Only { server: String, what: &'static str },
    #[error("SSH session with {server} failed: {source}")]
    Protocol { server: String, source: ClientError },
}

fn said_suffix(said: &str) -> String {
    if said.is_empty() {
        String::new()
    } else {
        format!(" (it said {said:?})")
    }
}

/// What the server sent before its SSH version line: RFC 4253 lets it send other lines first,
/// and sshd past MaxStartups sends one ("Exceeded MaxStartups") and closes.
#[derive(Default)]
struct BeforeGreeting {
    /// The version line came, or more than [`BEFORE_GREETING_LIMIT`] bytes without one: the
    /// server is past the point where closing cost it nothing.
    past: AtomicBool,
    text: Mutex<Vec<u8>>,
}

/// More than this many bytes without a version line is not sshd turning us away.
const BEFORE_GREETING_LIMIT: usize = 1024;

impl BeforeGreeting {
    /// Takes the next bytes read from the server, until the version line.
    fn read(&self, bytes: &[u8]) {
        let Ok(mut text) = self.text.lock() else {
            return;
        };
        text.extend_from_slice(bytes);
        let greeted = text.starts_with(b"SSH-") || text.windows(5).any(|w| w == b"\nSSH-");
        if greeted || text.len() > BEFORE_GREETING_LIMIT {
            self.past.store(true, Ordering::Release);
            text.clear();
        }
    }

    /// What it said, if the server closed before its greeting.
    fn closed_before(&self) -> Option<String> {
        if self.past.load(Ordering::Acquire) {
            return None;
        }
        let text = self.text.lock().ok()?;
        let said: String = String::from_utf8_lossy(&text)
            .chars()
            .filter(|c| !c.is_control())
            .take(100)
            .collect();
        Some(said.trim().to_owned())
    }
}

/// What ends a session from our side of it: russh's errors, and a server breaking the protocol
/// in a way russh lets through.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Ssh(#[from] russh::Error),
    #[error("the server sent {0}")]
    Violation(&'static str),
}

impl ClientError {
    /// The server broke the protocol in a way that could cost us memory or data, rather than
    /// the network or the server going away.
    fn is_violation(&self) -> bool {
        matches!(
            self,
            ClientError::Violation(_)
                | ClientError::Ssh(
                    russh::Error::WindowExceeded { .. } | russh::Error::ChannelQueueFull { .. }
                )
        )
    }
}

impl SessionError {
    /// The attempt cost the server nothing: the kernel refused the connection (nothing listens
    /// on the port, so the server is down or restarting), the network said it cannot reach it,
    /// or sshd closed it before its greeting. Such attempts may be repeated every second or so
    /// for as long as the server is away, so that the tunnel is back as soon as it is; what
    /// costs the server a handshake backs off instead.
    pub fn cost_the_server_nothing(&self) -> bool {
        match self {
            SessionError::Connect { source, .. } => matches!(
                source.kind(),
                io::ErrorKind::ConnectionRefused
                    | io::ErrorKind::HostUnreachable
                    | io::ErrorKind::NetworkUnreachable
            ),
            SessionError::ClosedBeforeGreeting { .. } => true,
            _ => false,
        }
    }

    /// The server refused us on purpose: retrying quickly will not help and may trip fail2ban.
    pub fn is_rejection(&self) -> bool {
        matches!(
            self,
            SessionError::HostKeyMismatch { .. }
                | SessionError::AuthRejected { .. }
                | SessionError::Sha1Only { .. }
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("the SSH server refused to open a channel to {target}: {reason}")]
    Refused { target: String, reason: String },
    #[error("the SSH session ended while opening a channel to {target}")]
    SessionGone { target: String },
}

/// Why a session that was up is no longer usable.
#[derive(Debug, Clone)]
pub enum Ended {
    /// Nothing was heard from the server for this long despite keepalive requests.
    Unresponsive(Duration),
    /// The server or the network closed it; the text says how, when known.
    Closed(String),
    /// We ended it: the server broke the protocol (sent data beyond a channel's window, say).
    Violation(String),
}

impl std::fmt::Display for Ended {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ended::Unresponsive(silence) => {
                write!(f, "no answer to keepalives for {} ms", silence.as_millis())
            }
            Ended::Closed(how) | Ended::Violation(how) => f.write_str(how),
        }
    }
}

/// Tuning of one session; see [`crate::options::Options`].
#[derive(Debug, Clone)]
pub struct SessionSettings {
    pub connect_timeout: Duration,
    pub keepalive_interval: Duration,
    pub keepalive_count: u32,
}

pub struct Session {
    handle: Handle<Client>,
    /// A duplicate of the socket's descriptor, used only to shut the socket down.
    socket: socket2::Socket,
    bytes_in: Arc<AtomicU64>,
    closed: CancellationToken,
    close_reason: Arc<Mutex<Option<String>>>,
    violated: Arc<AtomicBool>,
}

impl Session {
    /// Connects and authenticates. Channels the server tries to open are refused and counted
    /// in `server_opens_refused`: we never ask for any.
    pub async fn connect(
        server: &SshServer,
        settings: &SessionSettings,
        server_opens_refused: Counter,
    ) -> Result<Session, SessionError> {
        let name = server.address();
        let deadline = tokio::time::Instant::now() + settings.connect_timeout;
        let timeout = || SessionError::Timeout {
            server: name.clone(),
            timeout: settings.connect_timeout,
        };

        let tcp = tokio::time::timeout_at(
            deadline,
            TcpStream::connect((server.host.as_str(), server.port)),
        )
        .await
        .map_err(|_| timeout())?
        .map_err(|source| SessionError::Connect {
            server: name.clone(),
            source,
        })?;
        let io_error = |source| SessionError::Connect {
            server: name.clone(),
            source,
        };
        tcp.set_nodelay(true).map_err(io_error)?;
        let socket = socket2::SockRef::from(&tcp).try_clone().map_err(io_error)?;

        let bytes_in = Arc::new(AtomicU64::new(0));
        let closed = CancellationToken::new();
        let close_reason = Arc::new(Mutex::new(None));
        let violated = Arc::new(AtomicBool::new(false));
        let presented = Arc::new(Mutex::new(None));
        let client = Client {
            expected: server.host_key.clone(),
            presented: presented.clone(),
            close_reason: close_reason.clone(),
            violated: violated.clone(),
            server_opens_refused,
            _closed_on_drop: closed.clone().drop_guard(),
        };
        let before_greeting = Arc::new(BeforeGreeting::default());
        let stream = CountingStream {
            inner: tcp,
            bytes_in: bytes_in.clone(),
            before_greeting: Some(before_greeting.clone()),
        };
        // russh reads each packet in two calls (its length, then the rest): buffered, one
        // recvfrom usually brings several packets.
        let stream = BufReader::with_capacity(SOCKET_READ_BUFFER, stream);
        let handshake = handshake(server, client, stream, &name, &presented);
        let result = match tokio::time::timeout_at(deadline, handshake).await {
            Ok(result) => result,
            Err(_) => Err(timeout()),
        };
        match result {
            Ok(handle) => Ok(Session {
                handle,
                socket,
                bytes_in,
                closed,
                close_reason,
                violated,
            }),
            Err(error) => {
                // Stops russh's session task, which may be blocked on the socket.
                let _ = socket.shutdown(std::net::Shutdown::Both);
                // The server closed or reset the connection before its version line, which is
                // what sshd does past MaxStartups: no key exchange, nothing it paid for. (A
                // timeout stays a timeout: a server that accepts and says nothing may be
                // overloaded.)
                if matches!(error, SessionError::Protocol { .. }) {
                    if let Some(said) = before_greeting.closed_before() {
                        return Err(SessionError::ClosedBeforeGreeting { server: name, said });
                    }
                }
                Err(error)
            }
        }
    }

    pub fn is_closed(&self) -> bool {
        self.closed.is_cancelled() || self.handle.is_closed()
    }

    /// Cancelled when the session ends, however it ends: a copy waiting on the channel (for SSH
    /// window, say) would otherwise never learn of it.
    pub fn closed(&self) -> CancellationToken {
        self.closed.clone()
    }

    /// Opens a `direct-tcpip` channel to `host:port` as seen from the SSH server.
    pub async fn open_direct_tcpip(
        &self,
        host: &str,
        port: u16,
        originator: SocketAddr,
    ) -> Result<Channel<Msg>, ChannelError> {
        let target = || format!("{host}:{port}");
        let channel = self
            .handle
            .channel_open_direct_tcpip(
                host,
                u32::from(port),
                originator.ip().to_string(),
                u32::from(originator.port()),
            )
            .await
            .map_err(|error| match error {
                russh::Error::ChannelOpenFailure(reason) => ChannelError::Refused {
                    target: target(),
                    reason: format!("{reason:?}"),
                },
                _ => ChannelError::SessionGone { target: target() },
            })?;
        Ok(channel)
    }

    /// Resolves when the session is no longer usable, after shutting its socket down.
    pub async fn ended(&self, settings: &SessionSettings) -> Ended {
        let interval = settings.keepalive_interval;
        let dead_after = interval * settings.keepalive_count;
        // Checking four times per interval bounds detection at dead_after + interval / 4.
        let tick = (interval / 4).max(Duration::from_millis(20));
        let mut seen = self.bytes_in.load(Ordering::Relaxed);
        let mut last_heard = Instant::now();
        let mut keepalives_sent = 0u32;
        loop {
            tokio::select! {
                () = self.closed.cancelled() => {
                    let reason = self.close_reason.lock().ok().and_then(|mut r| r.take());
                    let reason = reason.unwrap_or_else(|| "connection closed".into());
                    if self.violated.load(Ordering::Acquire) {
                        return Ended::Violation(reason);
                    }
                    return Ended::Closed(reason);
                }
                () = tokio::time::sleep(tick) => {}
            }
            let now_seen = self.bytes_in.load(Ordering::Relaxed);
            if now_seen != seen {
                seen = now_seen;
                last_heard = Instant::now();
                keepalives_sent = 0;
            }
            let silence = last_heard.elapsed();
            if silence >= dead_after {
                self.kill();
                return Ended::Unresponsive(silence);
            }
            if silence >= interval * (keepalives_sent + 1) {
                keepalives_sent += 1;
                // Bounded: russh's queue may be full when the server is hung.
                let _ = tokio::time::timeout(tick, self.handle.send_keepalive(true)).await;
            }
        }
    }

    /// Tears the session down at once, whatever state the peer is in.
    pub fn kill(&self) {
        let _ = self.socket.shutdown(std::net::Shutdown::Both);
    }

    /// Says goodbye politely (used at shutdown), then makes sure the socket is gone.
    pub async fn close(&self) {
        let _ = tokio::time::timeout(
            Duration::from_millis(500),
            self.handle.disconnect(
                russh::Disconnect::ByApplication,
                "bpg-tunnel stopping",
                "en",
            ),
        )
        .await;
        self.kill();
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn handshake(
    server: &SshServer,
    client: Client,
    stream: BufReader<CountingStream>,
    name: &str,
    presented: &Mutex<Option<String>>,
) -> Result<Handle<Client>, SessionError> {
    let protocol = |source: russh::Error| SessionError::Protocol {
        server: name.to_owned(),
        source: source.into(),
    };
    let config = Arc::new(client::Config {
        // We judge liveness ourselves (see `Session::ended`).
        keepalive_interval: None,
        inactivity_timeout: None,
        nodelay: true,
        window_size: CHANNEL_WINDOW,
        preferred: preferred_algorithms(&server.host_key),
        ..Default::default()
    });
    let mut handle = match client::connect_stream(config, stream, client).await {
        Ok(handle) => handle,
        Err(error) => {
            if let Some(presented) = presented.lock().ok().and_then(|p| p.clone()) {
                return Err(SessionError::HostKeyMismatch {
                    server: name.to_owned(),
                    presented,
                    expected: server.host_key.describe(),
                });
            }
            if let ClientError::Ssh(russh::Error::NoCommonAlgo {
                kind: russh::AlgorithmKind::Key,
                theirs,
                ..
            }) = &error
            {
                if !theirs.is_empty() && theirs.iter().all(|algorithm| algorithm == "ssh-rsa") {
                    return Err(SessionError::Sha1Only {
                        server: name.to_owned(),
                        what: "its host key",
                    });
                }
            }
            return Err(SessionError::Protocol {
                server: name.to_owned(),
                source: error,
            });
        }
    };

    let key = server.private_key.0.clone();
    let hash = if key.algorithm().is_rsa() {
        match handle.best_supported_rsa_hash().await.map_err(protocol)? {
            Some(Some(hash)) => Some(hash),
            // The server named the signatures it takes, and SHA-1 is the only RSA one.
            Some(None) => {
                return Err(SessionError::Sha1Only {
                    server: name.to_owned(),
                    what: "client authentication",
                })
            }
            // It did not say: the default of OpenSSH's client.
            None => Some(russh::keys::HashAlg::Sha512),
        }
    } else {
        None
    };
    let algorithm = key.algorithm().to_string();
    let result = handle
        .authenticate_publickey(&server.username, PrivateKeyWithHashAlg::new(key, hash))
        .await
        .map_err(protocol)?;
    if !result.success() {
        return Err(SessionError::AuthRejected {
            server: name.to_owned(),
            user: server.username.clone(),
            algorithm,
        });
    }
    Ok(handle)
}

/// russh's algorithms, with three changes. The pinned host key's algorithm goes first, as
/// OpenSSH does for a host in known_hosts: a server with several host keys then shows the one we
/// can check. SHA-1 RSA signatures (`ssh-rsa`) are not offered, as in OpenSSH since 8.8. And where
/// the CPU has AES-NI and carry-less multiply,
/// AES-256-GCM goes first. ring runs it in hardware there, while its ChaCha20-Poly1305 is
/// software; decrypting a bulk `COPY` took about three times the CPU with ChaCha20. The set
/// offered stays the same, so nothing weaker can be negotiated; without AES-NI, ChaCha20 (russh's
/// first choice, and OpenSSH's) stays first because software AES is slower and not constant-time.
fn preferred_algorithms(pinned: &HostKey) -> russh::Preferred {
    use russh::cipher;
    use russh::keys::Algorithm;
    const AES_GCM_FIRST: &[cipher::Name] = &[
        cipher::AES_256_GCM,
        cipher::CHACHA20_POLY1305,
        cipher::AES_256_CTR,
        cipher::AES_192_CTR,
        cipher::AES_128_CTR,
    ];
    let defaults = russh::Preferred::default();
    let pinned = pinned.algorithm();
    let pinned_is_rsa = pinned.clone().is_rsa();
    let is_pinned = |algorithm: &Algorithm| match algorithm {
        Algorithm::Rsa { .. } => pinned_is_rsa,
        other => other == &pinned,
    };
    let mut key: Vec<Algorithm> = defaults
        .key
        .iter()
        .filter(|algorithm| **algorithm != Algorithm::Rsa { hash: None })
        .cloned()
        .collect();
    // Stable: the pinned type's algorithms first, each group in russh's order.
    key.sort_by_key(|algorithm| !is_pinned(algorithm));
    let cipher = if has_aes_hardware() {
        std::borrow::Cow::Borrowed(AES_GCM_FIRST)
    } else {
        defaults.cipher.clone()
    };
    russh::Preferred {
        key: std::borrow::Cow::Owned(key),
        cipher,
        ..defaults
    }
}

fn has_aes_hardware() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("aes")
            && std::arch::is_x86_feature_detected!("pclmulqdq")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

struct Client {
    expected: HostKey,
    /// Set to the presented key's description when it does not match.
    presented: Arc<Mutex<Option<String>>>,
    close_reason: Arc<Mutex<Option<String>>>,
    /// Set when the session ends because the server broke the protocol.
    violated: Arc<AtomicBool>,
    server_opens_refused: Counter,
    /// russh drops the handler when its session task ends, for whatever reason: that is the one
    /// signal that covers every way a session can die.
    _closed_on_drop: DropGuard,
}

impl Client {
    /// We never ask the server to open a channel (no remote forwarding, no agent, no X11): one it
    /// opens would be kept, with its queue, by nobody.
    async fn refuse(&self, kind: &str, reply: ChannelOpenHandle) -> Result<(), ClientError> {
        self.server_opens_refused.inc();
        debug!(event = "server-channel-refused", kind);
        reply
            .reject(ChannelOpenFailure::AdministrativelyProhibited)
            .await;
        Ok(())
    }
}

impl client::Handler for Client {
    type Error = ClientError;

    async fn check_server_key(
        &mut self,
        server_public_key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        // Certificates are not part of the add-on's contract: only the pinned key is trusted.
        let key = match server_public_key {
            PublicKeyOrCertificate::PublicKey { key, .. } => key,
            PublicKeyOrCertificate::Certificate(cert) => {
                if let Ok(mut presented) = self.presented.lock() {
                    *presented = Some(format!("a certificate ({})", cert.algorithm()));
                }
                return Ok(false);
            }
        };
        if self.expected.matches(key) {
            return Ok(true);
        }
        if let Ok(mut presented) = self.presented.lock() {
            *presented = Some(describe_key(key));
        }
        Ok(false)
    }

    async fn disconnected(
        &mut self,
        reason: DisconnectReason<Self::Error>,
    ) -> Result<(), Self::Error> {
        let text = match &reason {
            DisconnectReason::ReceivedDisconnect(info) => {
                format!("server disconnected: {}", info.message)
            }
            DisconnectReason::Error(error) => {
                if error.is_violation() {
                    self.violated.store(true, Ordering::Release);
                }
                error.to_string()
            }
        };
        if let Ok(mut slot) = self.close_reason.lock() {
            slot.get_or_insert(text);
        }
        match reason {
            DisconnectReason::ReceivedDisconnect(_) => Ok(()),
            DisconnectReason::Error(error) => Err(error),
        }
    }

    /// A `direct-tcpip` channel carries one byte stream; OpenSSH never sends extended data on
    /// one, and queueing it for nobody would let a server grow our memory.
    async fn extended_data(
        &mut self,
        _channel: ChannelId,
        _ext: u32,
        _data: &[u8],
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        Err(ClientError::Violation(
            "extended data on a direct-tcpip channel, which carries only the database's stream",
        ))
    }

    // A session's requests, which no direct-tcpip channel carries; an exit-signal's text would be
    // held, unread, for as long as the app does not read.
    async fn exit_status(
        &mut self,
        _channel: ChannelId,
        _exit_status: u32,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        Err(ClientError::Violation(
            "an exit status on a direct-tcpip channel",
        ))
    }

    async fn exit_signal(
        &mut self,
        _channel: ChannelId,
        _signal_name: russh::Sig,
        _core_dumped: bool,
        _error_message: &str,
        _lang_tag: &str,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        Err(ClientError::Violation(
            "an exit signal on a direct-tcpip channel",
        ))
    }

    async fn xon_xoff(
        &mut self,
        _channel: ChannelId,
        _client_can_do: bool,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        Err(ClientError::Violation(
            "a terminal's flow control on a direct-tcpip channel",
        ))
    }

    async fn server_channel_open_forwarded_tcpip(
        &mut self,
        _channel: Channel<Msg>,
        _connected_address: &str,
        _connected_port: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        self.refuse("forwarded-tcpip", reply).await
    }

    async fn server_channel_open_forwarded_streamlocal(
        &mut self,
        _channel: Channel<Msg>,
        _socket_path: &str,
        reply: ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        self.refuse("forwarded-streamlocal", reply).await
    }

    async fn server_channel_open_agent_forward(
        &mut self,
        _channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        self.refuse("agent", reply).await
    }

    async fn should_accept_unknown_server_channel(
        &mut self,
        _id: ChannelId,
        _channel_type: &str,
    ) -> bool {
        // russh refuses it; counted here.
        self.server_opens_refused.inc();
        false
    }

    async fn server_channel_open_session(
        &mut self,
        _channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        self.refuse("session", reply).await
    }

    async fn server_channel_open_direct_tcpip(
        &mut self,
        _channel: Channel<Msg>,
        _host_to_connect: &str,
        _port_to_connect: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        self.refuse("direct-tcpip", reply).await
    }

    async fn server_channel_open_direct_streamlocal(
        &mut self,
        _channel: Channel<Msg>,
        _socket_path: &str,
        reply: ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        self.refuse("direct-streamlocal", reply).await
    }

    async fn server_channel_open_x11(
        &mut self,
        _channel: Channel<Msg>,
        _originator_address: &str,
        _originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        self.refuse("x11", reply).await
    }
}

/// Counts bytes read from the server (the cheapest sign of life there is) and acknowledges them
/// at once.
struct CountingStream {
    inner: TcpStream,
    bytes_in: Arc<AtomicU64>,
    /// Until the server's version line: dropped then, so that every later read pays nothing.
    before_greeting: Option<Arc<BeforeGreeting>>,
}

impl AsyncRead for CountingStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        if read > 0 {
            self.bytes_in.fetch_add(read as u64, Ordering::Relaxed);
            let past = self.before_greeting.as_ref().map(|greeting| {
                greeting.read(&buf.filled()[before..]);
                greeting.past.load(Ordering::Acquire)
            });
            if past == Some(true) {
                self.before_greeting = None;
            }
            // sshd leaves Nagle on for sessions without a terminal: it holds back a small packet
            // while an earlier one is unacknowledged, and Linux delays our ACK by up to 40 ms.
            // With several connections answering at once that stall hit most new connections
            // (pgbench -C at a third of the direct rate). ACKing at once removes it; Linux
            // clears the flag by itself, hence after every read.
            let _ = socket2::SockRef::from(&self.inner).set_tcp_quickack(true);
        }
        result
    }
}

impl AsyncWrite for CountingStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ed25519() -> HostKey {
        crate::config::keys::parse_host_key(
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDfR3+XSNlrSzI4i0Of4DNFSjb/gzoUkkOE3jhf0yZ49",
        )
        .unwrap()
    }

    #[test]
    fn the_pinned_key_type_goes_first_and_sha1_rsa_is_never_offered() {
        use russh::keys::{Algorithm, EcdsaCurve, HashAlg};
        let rsa = crate::config::keys::parse_host_key(RSA_HOST_KEY).unwrap();
        let keys = preferred_algorithms(&rsa).key.into_owned();
        assert_eq!(
            keys[..2],
            [
                Algorithm::Rsa {
                    hash: Some(HashAlg::Sha512)
                },
                Algorithm::Rsa {
                    hash: Some(HashAlg::Sha256)
                }
            ]
        );
        assert!(!keys.contains(&Algorithm::Rsa { hash: None }));
        let ecdsa = crate::config::keys::parse_host_key(ECDSA_HOST_KEY).unwrap();
        let keys = preferred_algorithms(&ecdsa).key.into_owned();
        assert_eq!(
            keys[0],
            Algorithm::Ecdsa {
                curve: EcdsaCurve::NistP256
            }
        );
        assert_eq!(preferred_algorithms(&ed25519()).key[0], Algorithm::Ed25519);
        // The same set, but SHA-1, whatever is pinned.
        assert_eq!(keys.len(), russh::Preferred::default().key.len() - 1);
    }

    // Throwaway public keys, generated for this test.
    const ECDSA_HOST_KEY: &str = "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBOyRdN5UgeN5+GFwqM36FUjkuaxmI+S9fSuvVqallR1xTClBM4HaYSWssgWJ76NrIzPH62a7awt265JujsLC+18=";
    const RSA_HOST_KEY: &str = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAgQDWA/pmJpKy+erjYuZYL3d62y5Dx62UGnvXldxmWTh9IMD2vMMHlMfrpFiQOxbMVg1KHA687tiy5LHEC+AqcirLKQx3W0nGAD3nwqM1entgCnb3Snb+GFSlIbTY6Sz+K4eOKXUB5Bg8H2VBSL8pqDjCxh8N0h/mqeQ04nqN4MMhGw==";

    #[test]
    fn what_a_server_says_before_its_greeting_is_kept_until_the_version_line() {
        // sshd past MaxStartups.
        let dropped = BeforeGreeting::default();
        dropped.read(b"Exceeded Max");
        dropped.read(b"Startups\r\n");
        assert_eq!(
            dropped.closed_before().as_deref(),
            Some("Exceeded MaxStartups")
        );
        assert_eq!(
            BeforeGreeting::default().closed_before().as_deref(),
            Some("")
        );
        // A version line, split across reads, after another line as RFC 4253 allows.
        let greeted = BeforeGreeting::default();
        greeted.read(b"hello\r\nSS");
        greeted.read(b"H-2.0-OpenSSH_9.2\r\n");
        assert_eq!(greeted.closed_before(), None);
        // A flood without one is not sshd turning us away.
        let chatty = BeforeGreeting::default();
        chatty.read(&[b'x'; BEFORE_GREETING_LIMIT + 1]);
        assert_eq!(chatty.closed_before(), None);
        let error = SessionError::ClosedBeforeGreeting {
            server: "ssh.example.com:22".into(),
            said: "Exceeded MaxStartups".into(),
        };
        assert!(error.cost_the_server_nothing());
        assert!(error
            .to_string()
            .starts_with("ssh.example.com:22 closed the connection before its SSH greeting (it said \"Exceeded MaxStartups\"): sshd does this past its MaxStartups limit"));
    }

    /// Reordering must never change what can be negotiated: if a russh upgrade changes its
    /// default list, this fails and the list above needs a look.
    #[test]
    fn preferred_ciphers_are_russhs_own_set_in_another_order() {
        let ours = preferred_algorithms(&ed25519()).cipher.into_owned();
        let mut theirs = russh::Preferred::default().cipher.into_owned();
        let mut sorted = ours.clone();
        sorted.sort_by_key(|c| c.as_ref().to_owned());
        theirs.sort_by_key(|c| c.as_ref().to_owned());
        assert_eq!(sorted, theirs);
        if has_aes_hardware() {
            assert_eq!(ours[0], russh::cipher::AES_256_GCM);
        } else {
            assert_eq!(ours[0], russh::cipher::CHACHA20_POLY1305);
        }
    }
}
