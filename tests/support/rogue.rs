//! A misbehaving SSH server: russh's own server, breaking the protocol on purpose (OpenSSH cannot
//! be made to), so that tests can show what a hostile or buggy add-on server costs a dyno.
//!
//! It accepts any client key and every `direct-tcpip` channel, and answers a channel's first
//! data (the app's first bytes through the tunnel) with its [`Misbehaviour`]. It runs on a
//! thread of its own until dropped.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use russh::server::{self, Auth, ChannelOpenHandle, Msg, Session, VerifiedPublicKey};
use russh::{Channel, ChannelId};

use super::{keygen, Tools};

/// bpg-tunnel's receive window per channel (`src/ssh.rs`).
pub const CHANNEL_WINDOW: usize = 2 * 1024 * 1024;
/// What the server puts in one data message beyond the window: within any client's maximum.
const PACKET: usize = 16 * 1024;

/// The byte at `offset` of what an overrunning server sends.
pub fn pattern(offset: usize) -> u8 {
    (offset % 251) as u8
}

#[derive(Clone, Copy, Debug)]
pub enum Misbehaviour {
    /// `total` bytes of [`pattern`]: the window's worth, then `excess` bytes beyond the window,
    /// then the rest as the client grants window; then end-of-file and close.
    Overrun { total: usize, excess: usize },
    /// `pairs` one-byte data messages, each followed by one byte of extended data (stderr):
    /// nothing a client can merge, all within the window.
    TinyMixed { pairs: usize },
    /// Opens `count` channels towards the client, of every kind in turn, counting how they are
    /// answered; then writes `opened\n` on the channel.
    OpenChannels { count: usize },
}

/// What the server saw.
#[derive(Debug, Default)]
pub struct Report {
    pub sessions: AtomicUsize,
    pub opens_accepted: AtomicUsize,
    pub opens_refused: AtomicUsize,
}

pub struct RogueServer {
    pub port: u16,
    /// Its host key, as `SSH_PUBLIC_HOST_KEY` holds it.
    pub host_key: String,
    pub report: Arc<Report>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RogueServer {
    pub fn start(tools: &Tools, misbehaviour: Misbehaviour) -> RogueServer {
        let dir = tempfile::tempdir().unwrap();
        let pair = keygen(tools, dir.path(), "rogue_host", &["-t", "ed25519"]);
        let key = russh::keys::decode_secret_key(&pair.private, None).unwrap();
        let config = Arc::new(server::Config {
            inactivity_timeout: None,
            auth_rejection_time: Duration::ZERO,
            keys: vec![key],
            ..Default::default()
        });
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let report = Arc::new(Report::default());
        let (stop, mut stopped) = tokio::sync::oneshot::channel();
        let seen = report.clone();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                loop {
                    let socket = tokio::select! {
                        accepted = listener.accept() => match accepted {
                            Ok((socket, _)) => socket,
                            Err(_) => continue,
                        },
                        _ = &mut stopped => return,
                    };
                    seen.sessions.fetch_add(1, Ordering::SeqCst);
                    let handler = Rogue {
                        misbehaviour,
                        report: seen.clone(),
                        triggered: false,
                    };
                    let config = config.clone();
                    tokio::spawn(async move {
                        if let Ok(session) = server::run_stream(config, socket, handler).await {
                            let _ = session.await;
                        }
                    });
                }
            });
        });
        RogueServer {
            port,
            host_key: pair.public,
            report,
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for RogueServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

struct Rogue {
    misbehaviour: Misbehaviour,
    report: Arc<Report>,
    /// Each session misbehaves once, on the first data it receives.
    triggered: bool,
}

impl server::Handler for Rogue {
    type Error = russh::Error;

    async fn auth_publickey(
        &mut self,
        _user: &str,
        _key: VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        Ok(Auth::Accept)
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        _channel: Channel<Msg>,
        _host_to_connect: &str,
        _port_to_connect: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        reply.accept().await;
        Ok(())
    }

    async fn data(
        &mut self,
        channel: ChannelId,
        _data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if std::mem::replace(&mut self.triggered, true) {
            return Ok(());
        }
        match self.misbehaviour {
            Misbehaviour::Overrun { total, excess } => {
                let bytes: Vec<u8> = (0..total).map(pattern).collect();
                let within = CHANNEL_WINDOW.min(total);
                let beyond = (within + excess).min(total);
                session.data(channel, bytes[..within].to_vec())?;
                for chunk in bytes[within..beyond].chunks(PACKET) {
                    session.data_beyond_window(channel, chunk)?;
                }
                session.data(channel, bytes[beyond..].to_vec())?;
                session.eof(channel)?;
                session.close(channel)?;
            }
            Misbehaviour::TinyMixed { pairs } => {
                for _ in 0..pairs {
                    session.data(channel, &b"d"[..])?;
                    session.extended_data(channel, 1, &b"e"[..])?;
                }
            }
            Misbehaviour::OpenChannels { count } => {
                let handle = session.handle();
                let report = self.report.clone();
                tokio::spawn(async move {
                    open_channels(&handle, count, &report).await;
                    let _ = handle.data(channel, &b"opened\n"[..]).await;
                });
                return Ok(());
            }
        }
        Ok(())
    }
}

/// Opens `count` channels of every kind in turn, 64 at a time.
async fn open_channels(handle: &server::Handle, count: usize, report: &Arc<Report>) {
    let mut opening = tokio::task::JoinSet::new();
    for n in 0..count {
        if opening.len() >= 64 {
            opening.join_next().await;
        }
        let handle = handle.clone();
        let report = report.clone();
        opening.spawn(async move {
            let accepted = match n % 7 {
                0 => handle
                    .channel_open_forwarded_tcpip("127.0.0.1", 5432, "10.0.0.1", 40000)
                    .await
                    .is_ok(),
                1 => handle.channel_open_session().await.is_ok(),
                2 => handle.channel_open_x11("10.0.0.1", 6000).await.is_ok(),
                3 => handle.channel_open_agent().await.is_ok(),
                4 => handle
                    .channel_open_direct_tcpip("127.0.0.1", 5432, "10.0.0.1", 40000)
                    .await
                    .is_ok(),
                5 => handle
                    .channel_open_direct_streamlocal("/tmp/socket")
                    .await
                    .is_ok(),
                _ => handle
                    .channel_open_forwarded_streamlocal("/tmp/socket")
                    .await
                    .is_ok(),
            };
            let counter = if accepted {
                &report.opens_accepted
            } else {
                &report.opens_refused
            };
            counter.fetch_add(1, Ordering::SeqCst);
        });
    }
    opening.join_all().await;
}
