//! The private-app-tunnel client (`docs/addon-contract.md`, "Private-app-tunnel mode"). In this
//! mode there is no SSH: the database in `P_URL` is reached directly once the add-on's network
//! admits this dyno, which it does for a registration made through the add-on's API. We register
//! before reporting ready, renew the registration (it lapses 75 min after the last renewal), and
//! remove it at shutdown.
//!
//! The token (`CLIENT_APP_JWT`) goes into the Authorization header and nowhere else: errors are
//! built from status codes and error kinds, never from request or response text.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use reqwest::StatusCode;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::backoff::Backoff;
use crate::config::{PrivateApp, AUTO_DESTROY_DELAY};
use crate::stats::RegistrationStats;
use crate::tls_roots::{self, PemFileError};

/// The deregistration runs in the last seconds before Heroku's SIGKILL.
const DEREGISTER_TIMEOUT: Duration = Duration::from_secs(2);
/// First retries of a registration that failed on the network or with a 5xx.
const REGISTER_RETRY_BASE: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("the add-on's API answered {status}")]
    Status { status: StatusCode },
    #[error("the add-on's API did not answer in time")]
    Timeout,
    #[error("could not reach the add-on's API: {0}")]
    Network(String),
}

impl ApiError {
    /// The API refused the request itself (bad or revoked token, unknown add-on): asking again
    /// soon will not help.
    pub fn is_refusal(&self) -> bool {
        // 408 and 429 say "not now", not "never".
        matches!(self, ApiError::Status { status } if status.is_client_error()
            && *status != StatusCode::REQUEST_TIMEOUT
            && *status != StatusCode::TOO_MANY_REQUESTS)
    }

    fn status(&self) -> u16 {
        match self {
            ApiError::Status { status } => status.as_u16(),
            _ => 0,
        }
    }

    fn from_reqwest(error: reqwest::Error) -> ApiError {
        if error.is_timeout() {
            return ApiError::Timeout;
        }
        // The innermost cause says what happened (refused, reset, DNS, certificate) and, unlike
        // reqwest's own text, carries no URL.
        let mut cause: &dyn std::error::Error = &error;
        while let Some(source) = cause.source() {
            cause = source;
        }
        ApiError::Network(cause.to_string())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientSetupError {
    #[error("BPG_TUNNEL_TEST_API_CA_FILE: cannot read {path}: {source}")]
    CaFile {
        path: String,
        source: std::io::Error,
    },
    #[error("BPG_TUNNEL_TEST_API_CA_FILE: {0}; expected a PEM certificate")]
    CaCert(String),
    #[error("cannot set up the HTTPS client: {0}")]
    Tls(String),
}

/// An HTTPS client for one add-on's API: rustls with the built-in web PKI roots (the static
/// binary needs no system CA store), no redirects (they could carry the token elsewhere), and
/// a timeout on every request.
struct ApiClient {
    http: reqwest::Client,
    tunnels_url: url::Url,
    client_id: String,
}

impl ApiClient {
    fn new(
        app: &PrivateApp,
        client_id: &str,
        request_timeout: Duration,
        extra_ca: Option<&Path>,
    ) -> Result<ApiClient, ClientSetupError> {
        let mut roots = tls_roots::mozilla();
        if let Some(path) = extra_ca {
            tls_roots::add_pem_file(&mut roots, path).map_err(|error| match error {
                PemFileError::Unreadable(source) => ClientSetupError::CaFile {
                    path: path.display().to_string(),
                    source,
                },
                PemFileError::Unusable(reason) => ClientSetupError::CaCert(reason),
            })?;
        }
        let tls = rustls::ClientConfig::builder_with_provider(
            rustls::crypto::ring::default_provider().into(),
        )
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientSetupError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();

        let bearer_text = zeroize::Zeroizing::new(format!("Bearer {}", app.jwt.0.as_str()));
        let mut bearer = HeaderValue::from_str(&bearer_text).map_err(|_| {
            ClientSetupError::Tls("CLIENT_APP_JWT is not a valid header value".into())
        })?;
        bearer.set_sensitive(true);
        let mut headers = HeaderMap::new();
        headers.insert(AUTHORIZATION, bearer);
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));

        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .https_only(true)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .connect_timeout(request_timeout)
            .timeout(request_timeout)
            .user_agent(concat!("bpg-tunnel/", env!("CARGO_PKG_VERSION")))
            .default_headers(headers)
            .build()
            .map_err(|e| ClientSetupError::Tls(ApiError::from_reqwest(e).to_string()))?;

        let mut tunnels_url = app.api_base_url.clone();
        tunnels_url
            .path_segments_mut()
            .map_err(|()| ClientSetupError::Tls("API_BASE_URL cannot be a base".into()))?
            .extend(["heroku", "resources", &app.addon_id, "private-app-tunnels"]);
        Ok(ApiClient {
            http,
            tunnels_url,
            client_id: client_id.to_owned(),
        })
    }

    /// Registers this dyno, or renews its registration (the same request).
    async fn register(&self) -> Result<(), ApiError> {
        let body = serde_json::json!({
            "clientId": self.client_id,
            "autoDestroyDelaySeconds": AUTO_DESTROY_DELAY.as_secs(),
        });
        let request = self
            .http
            .post(self.tunnels_url.clone())
            .body(body.to_string());
        check(request.send().await)
    }

    async fn deregister(&self) -> Result<(), ApiError> {
        let mut url = self.tunnels_url.clone();
        url.path_segments_mut()
            .expect("checked in new")
            .push(&self.client_id);
        check(self.http.delete(url).send().await)
    }
}

fn check(response: Result<reqwest::Response, reqwest::Error>) -> Result<(), ApiError> {
    let response = response.map_err(ApiError::from_reqwest)?;
    let status = response.status();
    if status.is_success() {
        Ok(())
    } else {
        Err(ApiError::Status { status })
    }
}

/// How a registration is kept; see [`crate::options::Options`].
#[derive(Debug, Clone)]
pub struct RegistrationSettings {
    pub extend_interval: Duration,
    pub retry_interval: Duration,
    pub request_timeout: Duration,
    /// One more CA to trust for the API (tests only).
    pub test_api_ca_file: Option<PathBuf>,
}

/// Keeps one add-on's registration for the life of the process.
pub struct Registration {
    addon: String,
    api: ApiClient,
    settings: RegistrationSettings,
    registered: watch::Sender<bool>,
}

impl Registration {
    /// The registration of this process, as `client_id` (see [`crate::dyno`]), with `app`.
    pub fn new(
        app: &PrivateApp,
        client_id: &str,
        settings: &RegistrationSettings,
    ) -> Result<Registration, ClientSetupError> {
        let api = ApiClient::new(
            app,
            client_id,
            settings.request_timeout,
            settings.test_api_ca_file.as_deref(),
        )?;
        Ok(Registration {
            addon: app.name.clone(),
            api,
            settings: settings.clone(),
            registered: watch::Sender::new(false),
        })
    }

    pub fn addon_name(&self) -> &str {
        &self.addon
    }

    /// True once the first registration succeeded.
    pub fn registered(&self) -> watch::Receiver<bool> {
        self.registered.subscribe()
    }

    /// For `check`: registers, then removes the registration again. The outer error is the
    /// registration's; the inner result, the removal's.
    pub async fn probe(&self) -> Result<Result<(), ApiError>, ApiError> {
        self.api.register().await?;
        Ok(self.api.deregister().await)
    }

    /// Registers, renews until `shutdown`, then deregisters (bounded, so it always fits in what
    /// is left before the platform's SIGKILL).
    pub async fn run(self, shutdown: CancellationToken, stats: Arc<RegistrationStats>) {
        let addon = self.addon.as_str();
        let client_id = self.api.client_id.as_str();
        let slow = self.settings.retry_interval;
        let mut refusals = Backoff::new(slow, self.settings.extend_interval.max(slow));
        let mut failures = Backoff::new(REGISTER_RETRY_BASE, slow);

        // Register: quickly retried, since the app's first connections depend on it.
        let mut last_ok = loop {
            let started = Instant::now();
            let Some(result) = Self::unless_stopping(&shutdown, self.api.register()).await else {
                // A request cut short may still have registered us.
                self.deregister().await;
                stats.removed();
                return;
            };
            let error = match result {
                Ok(()) => {
                    // Counted first: whoever reads the line may ask `status` at once.
                    stats.renewed();
                    info!(
                        event = "private-tunnel-registered",
                        addon,
                        client_id,
                        ms = started.elapsed().as_millis() as u64
                    );
                    self.registered.send_replace(true);
                    break Instant::now();
                }
                Err(error) => error,
            };
            stats.failed(error.to_string());
            let delay = if error.is_refusal() {
                refusals.next_delay().max(slow)
            } else {
                failures.next_delay()
            };
            if error.is_refusal() {
                error!(event = "private-tunnel-register-failed", addon, status = error.status(), error = %error, retry_in_ms = delay.as_millis() as u64, "the token may be expired or revoked; the app runs, but the database will refuse it until a retry succeeds");
            } else {
                warn!(event = "private-tunnel-register-failed", addon, status = error.status(), error = %error, retry_in_ms = delay.as_millis() as u64);
            }
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = shutdown.cancelled() => {
                    // A request that timed out may still have registered us.
                    self.deregister().await;
                    stats.removed();
                    return;
                }
            }
        };

        // Renew.
        let mut next = last_ok + self.settings.extend_interval;
        refusals.reset();
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(next) => {}
                () = shutdown.cancelled() => break,
            }
            let Some(result) = Self::unless_stopping(&shutdown, self.api.register()).await else {
                break;
            };
            match result {
                Ok(()) => {
                    stats.renewed();
                    info!(event = "private-tunnel-extended", addon, client_id);
                    last_ok = Instant::now();
                    refusals.reset();
                    next = last_ok + self.settings.extend_interval;
                }
                Err(error) => {
                    stats.failed(error.to_string());
                    let expires_in = AUTO_DESTROY_DELAY.saturating_sub(last_ok.elapsed());
                    let delay = if error.is_refusal() {
                        refusals.next_delay().max(slow)
                    } else {
                        slow
                    };
                    warn!(event = "private-tunnel-extend-failed", addon, status = error.status(), error = %error, expires_in_s = expires_in.as_secs(), retry_in_s = delay.as_secs());
                    next = Instant::now() + delay;
                }
            }
        }
        self.deregister().await;
        stats.removed();
    }

    /// `request`, unless shutdown comes first: the deregistration must not wait behind a slow
    /// renewal, or the process would be stopped before it is sent.
    async fn unless_stopping<F: std::future::Future>(
        shutdown: &CancellationToken,
        request: F,
    ) -> Option<F::Output> {
        tokio::select! {
            output = request => Some(output),
            () = shutdown.cancelled() => None,
        }
    }

    async fn deregister(&self) {
        let addon = self.addon.as_str();
        match tokio::time::timeout(DEREGISTER_TIMEOUT, self.api.deregister()).await {
            Ok(Ok(())) => info!(event = "private-tunnel-deregistered", addon),
            Ok(Err(error)) => {
                warn!(event = "private-tunnel-deregister-failed", addon, status = error.status(), error = %error, "the add-on drops the registration by itself within 75 min")
            }
            Err(_) => {
                warn!(
                    event = "private-tunnel-deregister-failed",
                    addon,
                    error = "no answer in time",
                    timeout_ms = DEREGISTER_TIMEOUT.as_millis() as u64,
                    "the add-on drops the registration by itself within 75 min"
                )
            }
        }
    }
}
