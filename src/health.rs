//! The optional HTTP endpoint for containers (`BPG_TUNNEL_HEALTH_ADDR`), with the probes'
//! meanings of Cloud SQL Proxy v2, which Kubernetes users already know:
//! - `/startup`: 200 once the start-up wait is over (every tunnel up, or the ready timeout
//!   passed), 503 before;
//! - `/liveness`: 200 while the process answers at all;
//! - `/readiness`: 200 while every add-on's SSH session is up (and every private-app
//!   registration held) and the tunnel is not stopping; 503 with what is not, otherwise;
//! - `/metrics`: the figures of the metrics lines, in Prometheus' text format.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::stats::{Phase, Stats};

/// A client that opens a connection and sends nothing must not hold it for ever.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Probes are tiny and rare: more connections than this at once are not a prober.
const MAX_CONNECTIONS: usize = 64;

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The bound endpoint, not yet serving.
pub struct Health {
    listener: TcpListener,
}

impl Health {
    /// Binds `addr`; a failure is logged and the tunnels serve without the endpoint.
    pub async fn bind(addr: SocketAddr) -> Option<Health> {
        match TcpListener::bind(addr).await {
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
            if connections.len() >= MAX_CONNECTIONS {
                continue;
            }
            let stats = stats.clone();
            let shutdown = shutdown.clone();
            connections.spawn(async move {
                let service = hyper::service::service_fn(move |request| {
                    let response = answer(&request, &stats);
                    async move { Ok::<_, Infallible>(response) }
                });
                let mut builder = hyper::server::conn::http1::Builder::new();
                builder
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .keep_alive(true);
                let connection = builder.serve_connection(TokioIo::new(stream), service);
                tokio::select! {
                    _ = connection => {}
                    () = shutdown.cancelled() => {}
                }
            });
        }
        connections.close();
        connections.wait().await;
    }
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

/// 200 "ready", or 503 with a line for each thing that is not.
fn readiness(stats: &Stats) -> Response<Full<Bytes>> {
    let mut not = Vec::new();
    match stats.phase() {
        Phase::Starting => not.push("starting".to_owned()),
        Phase::Stopping => not.push("stopping".to_owned()),
        Phase::Serving => {}
    }
    for addon in stats.addons() {
        let session = addon.session();
        if !session.up {
            let why = session
                .last_error
                .map(|(_, error)| format!(": {error}"))
                .unwrap_or_default();
            not.push(format!("{}: SSH session down{why}", addon.name));
        }
    }
    for registration in stats.registrations() {
        if !registration.state().registered {
            not.push(format!("{}: not registered", registration.name));
        }
    }
    if not.is_empty() {
        text(StatusCode::OK, "ready\n".into())
    } else {
        text(StatusCode::SERVICE_UNAVAILABLE, not.join("\n") + "\n")
    }
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
