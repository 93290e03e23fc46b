//! The optional HTTP endpoint for containers (`BPG_TUNNEL_HEALTH_ADDR`), with the probes'
//! meanings of Cloud SQL Proxy v2, which Kubernetes users already know:
//! - `/startup`: 200 once the start-up wait is over (every tunnel up, or the ready timeout
//!   passed), 503 before;
//! - `/liveness`: 200 while the process answers at all;
//! - `/readiness`: 200 while every add-on's SSH session is up (and every private-app
//!   registration held) and the tunnel serves; 503 otherwise; either way each add-on's state;
//! - `/metrics`: the figures of the metrics lines, in Prometheus' text format.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, ALLOW, CONNECTION, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::stats::{Phase, Stats};

/// A client that opens a connection and sends nothing must not hold it for ever.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Probes are tiny and rare: more connections than this at once are not a prober. A new one
/// beyond it takes the place of another (see [`Open::admit`]), so that a probe is answered
/// whoever holds the rest. A probe that has not sent its request yet looks like any silent
/// connection, and is safe only until this many newer ones come: room for a prober that is
/// slow to send, at two descriptors a connection (its own and the one that watches it).
const MAX_CONNECTIONS: usize = 128;

/// The longest a connection is kept, busy or idle, before it is closed (plus at most
/// [`LAST_ANSWER_TIMEOUT`] to finish an answer under way). A prober opens one per probe, or
/// keeps one alive between scrapes and opens another when it is closed; a client that sends
/// and never reads holds its slot no longer than this.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(10);

/// How long a connection at the end of its lifetime gets to take its last answer.
const LAST_ANSWER_TIMEOUT: Duration = Duration::from_secs(1);

/// Requests answered on one connection before it is closed (the last answer says
/// `Connection: close`): a client that pipelines requests and reads nothing gets this many
/// answers queued for it, and no more.
const MAX_REQUESTS_PER_CONNECTION: u32 = 16;

/// The kernel's buffers (each way) and hyper's read buffer per connection: a probe's request
/// and answer are a few hundred bytes, `/metrics` a few kB. Without a bound, the kernel grows a
/// socket's send buffer to megabytes for a client that does not read.
const BUFFER_BYTES: usize = 16 * 1024;

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The bound endpoint, not yet serving.
pub struct Health {
    listener: TcpListener,
}

impl Health {
    /// Binds `addr`; a failure is logged and the tunnels serve without the endpoint.
    pub async fn bind(addr: SocketAddr) -> Option<Health> {
        match listen(addr) {
            Ok(listener) => {
                info!(event = "health-listening", addr = %listener.local_addr().unwrap_or(addr));
                Some(Health { listener })
            }
            Err(bind_error) => {
                error!(event = "health-listen-failed", var = "BPG_TUNNEL_HEALTH_ADDR", addr = %addr, error = %bind_error, "serving the tunnels without the health endpoint");
                None
            }
        }
    }

    /// Answers until `shutdown`.
    pub async fn serve(self, stats: Arc<Stats>, shutdown: CancellationToken) {
        let connections = TaskTracker::new();
        let open = Arc::new(Mutex::new(Open::default()));
        // Accept errors come in bursts (EMFILE): one line per interval.
        let mut last_said: Option<tokio::time::Instant> = None;
        loop {
            let accepted = tokio::select! {
                accepted = self.listener.accept() => accepted,
                () = shutdown.cancelled() => break,
            };
            let stream = match accepted {
                Ok((stream, _)) => stream,
                Err(accept_error) => {
                    if last_said.is_none_or(|at| at.elapsed() >= Duration::from_secs(10)) {
                        warn!(event = "health-accept-failed", error = %accept_error);
                        last_said = Some(tokio::time::Instant::now());
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let (id, cut) = open
                .lock()
                .expect("never poisoned")
                .admit(&stream, &shutdown);
            let stats = stats.clone();
            let open = open.clone();
            connections.spawn(async move {
                tokio::select! {
                    () = serve_connection(stream, stats) => {}
                    () = cut.cancelled() => {}
                }
                open.lock().expect("never poisoned").remove(id);
            });
            // The runtime has one thread, and a burst of queued connections would otherwise be
            // accepted in one go: a probe among them would be cut as the oldest before its
            // request was ever read. Each new connection gets its turn first.
            tokio::task::yield_now().await;
        }
        connections.close();
        connections.wait().await;
    }
}

/// A listener whose connections get small socket buffers (inherited from it, so they hold from
/// the first byte).
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.set_recv_buffer_size(BUFFER_BYTES)?;
    socket.set_send_buffer_size(BUFFER_BYTES)?;
    socket.bind(&addr.into())?;
    // Room for a burst of connections, so that a probe's connect is not dropped (and retried
    // by its kernel only a second later) while they are accepted and the oldest cut.
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

/// The connections being served, oldest first.
#[derive(Default)]
struct Open {
    next: u64,
    by_age: BTreeMap<u64, Slot>,
}

struct Slot {
    /// Cuts the connection.
    cut: CancellationToken,
    /// The connection's socket, to see whether a request waits on it unread (a duplicate
    /// descriptor: the connection itself is hyper's). None if none could be had (EMFILE).
    socket: Option<OwnedFd>,
}

impl Slot {
    /// Bytes have come that nobody has read yet: a request on its way to being answered.
    fn has_unread(&self) -> bool {
        let Some(socket) = &self.socket else {
            return false;
        };
        let mut byte = [MaybeUninit::uninit(); 1];
        // The descriptor shares the connection's non-blocking mode: this never waits.
        matches!(SockRef::from(socket).peek(&mut byte), Ok(n) if n > 0)
    }
}

impl Open {
    /// Room for `stream`, made by cutting one if every place is taken: the oldest with no
    /// request waiting unread, else the oldest. A probe is read at the I/O driver's next turn,
    /// and a burst can bring dozens of connections before that; cut by age alone, a probe
    /// whose request had come could be pushed out by the burst behind it.
    fn admit(
        &mut self,
        stream: &TcpStream,
        shutdown: &CancellationToken,
    ) -> (u64, CancellationToken) {
        while self.by_age.len() >= MAX_CONNECTIONS {
            let victim = self
                .by_age
                .iter()
                .find(|(_, slot)| !slot.has_unread())
                .or_else(|| self.by_age.iter().next())
                .map(|(id, _)| *id);
            if let Some(slot) = victim.and_then(|id| self.by_age.remove(&id)) {
                slot.cut.cancel();
            }
        }
        let id = self.next;
        self.next += 1;
        let cut = shutdown.child_token();
        let socket = stream.as_fd().try_clone_to_owned().ok();
        self.by_age.insert(
            id,
            Slot {
                cut: cut.clone(),
                socket,
            },
        );
        (id, cut)
    }

    fn remove(&mut self, id: u64) {
        self.by_age.remove(&id);
    }
}

/// One connection, within its lifetime and request budget.
async fn serve_connection(stream: TcpStream, stats: Arc<Stats>) {
    let answered = AtomicU32::new(0);
    let service = hyper::service::service_fn(|request| {
        let mut response = answer(&request, &stats);
        if answered.fetch_add(1, Ordering::Relaxed) + 1 >= MAX_REQUESTS_PER_CONNECTION {
            response
                .headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
        }
        async move { Ok::<_, Infallible>(response) }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(BUFFER_BYTES)
        .keep_alive(true);
    let connection = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    tokio::select! {
        _ = connection.as_mut() => return,
        () = tokio::time::sleep(CONNECTION_LIFETIME) => {}
    }
    // At the end of its lifetime: an answer under way is finished (saying `Connection: close`)
    // and an idle keep-alive connection closed, so a scraper knows to open another; a client
    // that does not read its answer gets a moment more, then is cut.
    connection.as_mut().graceful_shutdown();
    let _ = tokio::time::timeout(LAST_ANSWER_TIMEOUT, connection).await;
}

fn answer(request: &Request<Incoming>, stats: &Stats) -> Response<Full<Bytes>> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n".into());
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    match request.uri().path() {
        "/startup" => match stats.phase() {
            Phase::Starting => text(StatusCode::SERVICE_UNAVAILABLE, "starting\n".into()),
            _ => text(StatusCode::OK, "started\n".into()),
        },
        "/liveness" => text(StatusCode::OK, "ok\n".into()),
        "/readiness" => readiness(stats),
        "/metrics" => {
            let mut response = text(StatusCode::OK, stats.prometheus());
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static(OPENMETRICS));
            response
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "try /startup, /liveness, /readiness or /metrics\n".into(),
        ),
    }
}

/// 200 when every add-on is up and the tunnel serves, 503 otherwise; the body says which, with
/// each add-on's name and state and nothing more. Anyone who reaches the port reads it, and an
/// error's text names the SSH user, the server, or the host keys' fingerprints.
fn readiness(stats: &Stats) -> Response<Full<Bytes>> {
    let (status, body) = readiness_of(stats);
    text(status, body)
}

fn readiness_of(stats: &Stats) -> (StatusCode, String) {
    let mut ready = stats.phase() == Phase::Serving;
    let mut states = String::new();
    for addon in stats.addons() {
        let session = addon.session();
        ready &= session.up;
        let state = match (session.up, session.since) {
            (true, _) => "up",
            // No attempt has ended yet.
            (false, None) => "connecting",
            (false, Some(_)) => "down",
        };
        states += &format!("{}: {state}\n", addon.name);
    }
    for registration in stats.registrations() {
        let registered = registration.state().registered;
        ready &= registered;
        let state = if registered {
            "registered"
        } else {
            "not registered"
        };
        states += &format!("{}: {state}\n", registration.name);
    }
    let (status, verdict) = match (ready, stats.phase()) {
        (true, _) => (StatusCode::OK, "ready"),
        (false, Phase::Starting) => (StatusCode::SERVICE_UNAVAILABLE, "starting"),
        (false, Phase::Stopping) => (StatusCode::SERVICE_UNAVAILABLE, "stopping"),
        (false, Phase::Serving) => (StatusCode::SERVICE_UNAVAILABLE, "not ready"),
    };
    (status, format!("{verdict}\n{states}"))
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_says_each_addons_state_and_nothing_its_errors_said() {
        let stats = Stats::new(
            &[
                ("DATABASE".into(), "ssh.example:2222".into()),
                ("BOREALIS_PG_RED".into(), "ssh.example:2222".into()),
            ],
            &["PRIVATE_DB".into()],
        );
        assert_eq!(
            readiness_of(&stats),
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "starting\nDATABASE: connecting\nBOREALIS_PG_RED: connecting\nPRIVATE_DB: not registered\n".into()
            )
        );
        stats.advance(Phase::Serving);
        let red = stats.addon("BOREALIS_PG_RED").unwrap();
        red.session_down("ssh.example:2222 presented host key SHA256:AAAA, but SSH_PUBLIC_HOST_KEY is SHA256:BBBB".into());
        stats.addon("DATABASE").unwrap().session_up(false);
        stats.registration("PRIVATE_DB").unwrap().renewed();
        assert_eq!(
            readiness_of(&stats),
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "not ready\nDATABASE: up\nBOREALIS_PG_RED: down\nPRIVATE_DB: registered\n".into()
            )
        );
        red.session_up(false);
        assert_eq!(
            readiness_of(&stats),
            (
                StatusCode::OK,
                "ready\nDATABASE: up\nBOREALIS_PG_RED: up\nPRIVATE_DB: registered\n".into()
            )
        );
        stats.advance(Phase::Stopping);
        assert_eq!(readiness_of(&stats).0, StatusCode::SERVICE_UNAVAILABLE);
        assert!(readiness_of(&stats).1.starts_with("stopping\n"));
    }
}
