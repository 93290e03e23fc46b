//! `bpg-tunnel check`: the doctor. For each add-on in the environment it walks the path a
//! connection takes, one step at a time, and stops at the first step that fails, saying what to
//! do about it: config → DNS → TCP to the SSH server → SSH handshake → host key → key accepted →
//! a channel to each database host → PostgreSQL answers there. In private-app-tunnel mode:
//! config → the add-on's API answers → the token is accepted.
//!
//! It binds no port, so it runs beside a serving daemon (`heroku ps:exec`), and it prints what
//! the log lines print: variable names, hosts, ports, key types and fingerprints, never a value
//! that may hold a secret. The PostgreSQL step sends only an `SSLRequest`, which a server
//! answers before any credentials, and closes: nothing to log in with, nothing in the server's
//! log.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::{self, Addon, Forward, PrivateApp, Severity};
use crate::private_app::{self, ApiError, Registration, RegistrationSettings};
use crate::ssh::{ChannelError, Session, SessionError, SessionSettings};

/// `SSLRequest`: length 8, then the code 1234 5679. Every PostgreSQL since 7.0 answers it with
/// one byte, `S` or `N`, before asking for anything.
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

/// What `check` needs; see [`crate::options::Options`].
#[derive(Debug, Clone)]
pub struct CheckSettings {
    pub session: SessionSettings,
    pub registration: RegistrationSettings,
    /// One JSON document on stdout instead of lines for people.
    pub json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Config,
    Dns,
    Tcp,
    Handshake,
    HostKey,
    KeyAccepted,
    Channel,
    Postgres,
    Api,
    Token,
}

impl Step {
    fn name(self) -> &'static str {
        match self {
            Step::Config => "config",
            Step::Dns => "dns",
            Step::Tcp => "tcp",
            Step::Handshake => "handshake",
            Step::HostKey => "host-key",
            Step::KeyAccepted => "key-accepted",
            Step::Channel => "channel",
            Step::Postgres => "postgres",
            Step::Api => "api",
            Step::Token => "token",
        }
    }
}

/// One step's outcome.
struct Outcome {
    step: Step,
    ok: bool,
    /// Not every step is timed on its own: the handshake, the host key and the key are one
    /// exchange, timed on its last step.
    took: Option<Duration>,
    detail: String,
    /// For a failed step: what the user can do about it.
    advice: Option<String>,
}

/// Everything checked for one add-on.
struct Report {
    addon: String,
    var: String,
    mode: &'static str,
    outcomes: Vec<Outcome>,
}

impl Report {
    fn new(addon: &str, var: &str, mode: &'static str) -> Report {
        Report {
            addon: addon.to_owned(),
            var: var.to_owned(),
            mode,
            outcomes: Vec::new(),
        }
    }

    fn ok(&self) -> bool {
        self.outcomes.iter().all(|outcome| outcome.ok)
    }

    fn pass(&mut self, step: Step, took: Option<Duration>, detail: impl Into<String>) {
        self.outcomes.push(Outcome {
            step,
            ok: true,
            took,
            detail: detail.into(),
            advice: None,
        });
    }

    /// Records a failure; the caller stops checking this add-on.
    fn fail(
        &mut self,
        step: Step,
        took: Option<Duration>,
        detail: impl Into<String>,
        advice: impl Into<String>,
    ) {
        self.outcomes.push(Outcome {
            step,
            ok: false,
            took,
            detail: detail.into(),
            advice: Some(advice.into()),
        });
    }
}

/// Runs every check and prints the reports; success only if every add-on passes.
pub async fn run(settings: &CheckSettings) -> ExitCode {
    let discovery = config::discover_env();
    let mut reports = Vec::new();
    // Add-ons whose config could not be used at all: their errors are the report.
    for problem in &discovery.problems {
        if problem.severity != Severity::Error {
            continue;
        }
        let served = discovery.addons.iter().any(|a| a.name == problem.addon)
            || discovery
                .private_apps
                .iter()
                .any(|a| a.name == problem.addon);
        if served {
            continue;
        }
        let report = match reports
            .iter()
            .position(|r: &Report| r.addon == problem.addon)
        {
            Some(index) => &mut reports[index],
            None => {
                reports.push(Report::new(&problem.addon, &problem.var, "unusable"));
                reports.last_mut().expect("just pushed")
            }
        };
        // Headed by the conn-info variable, whichever problem came first.
        if config::CONN_INFO_SUFFIXES
            .iter()
            .any(|suffix| problem.var.ends_with(suffix))
        {
            report.var.clone_from(&problem.var);
        }
        report.fail(
            Step::Config,
            None,
            problem.to_string(),
            format!("the add-on sets {}: see that it was not edited or cut short (`heroku config:get {}` shows it), or attach the add-on again", problem.var, problem.var),
        );
    }
    let notes = |addon: &str| -> String {
        discovery
            .problems
            .iter()
            .filter(|problem| problem.addon == addon)
            .map(|problem| format!("; {problem}"))
            .collect()
    };
    for addon in &discovery.addons {
        let mut report = Report::new(&addon.name, &addon.conn_info_var, "ssh-tunnel");
        let forwards: Vec<String> = addon
            .forwards
            .iter()
            .map(|forward| {
                format!(
                    "{} {} -> {}",
                    forward.role,
                    forward.listen,
                    config::host_port(&forward.remote_host, forward.remote_port)
                )
            })
            .collect();
        report.pass(
            Step::Config,
            None,
            format!(
                "SSH tunnel through {} as {:?}: {}{}",
                addon.ssh.address(),
                addon.ssh.username,
                forwards.join(", "),
                notes(&addon.name)
            ),
        );
        check_ssh(addon, &settings.session, &mut report).await;
        reports.push(report);
    }
    if !discovery.private_apps.is_empty() {
        let (client_id, _) = private_app::client_id();
        for app in &discovery.private_apps {
            let mut report = Report::new(&app.name, &app.conn_info_var, "private-app-tunnel");
            report.pass(
                Step::Config,
                None,
                format!(
                    "private-app tunnel with the add-on's API at {}{}",
                    app.api_base_url,
                    notes(&app.name)
                ),
            );
            check_private_app(app, &client_id, &settings.registration, &mut report).await;
            reports.push(report);
        }
    }
    let ok = !reports.is_empty() && reports.iter().all(Report::ok);
    let text = if settings.json {
        json(&reports, ok)
    } else {
        human(&reports)
    };
    print!("{text}");
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

async fn check_ssh(addon: &Addon, settings: &SessionSettings, report: &mut Report) {
    let server = &addon.ssh;
    let var = &addon.conn_info_var;
    let limit = settings.connect_timeout;

    let started = Instant::now();
    let resolved = tokio::time::timeout(
        limit,
        tokio::net::lookup_host((server.host.as_str(), server.port)),
    )
    .await;
    let addrs: Vec<SocketAddr> =
        match resolved {
            Ok(Ok(addrs)) => addrs.collect(),
            Ok(Err(error)) => {
                return report.fail(
                    Step::Dns,
                    Some(started.elapsed()),
                    format!("cannot resolve {}: {error}", server.host),
                    format!("check SSH_HOST in {var}, and that this dyno can resolve names"),
                )
            }
            Err(_) => return report.fail(
                Step::Dns,
                Some(started.elapsed()),
                format!("no answer for {} within {limit:?}", server.host),
                "the resolver did not answer: retry; if it persists, the dyno's DNS is at fault",
            ),
        };
    let shown: Vec<String> = addrs.iter().map(|addr| addr.ip().to_string()).collect();
    report.pass(
        Step::Dns,
        Some(started.elapsed()),
        format!("{} -> {}", server.host, shown.join(", ")),
    );

    let started = Instant::now();
    let mut last_error = None;
    let mut reached = None;
    for addr in &addrs {
        match tokio::time::timeout(limit, tokio::net::TcpStream::connect(addr)).await {
            Ok(Ok(_)) => {
                reached = Some(*addr);
                break;
            }
            Ok(Err(error)) => last_error = Some(format!("{addr}: {error}")),
            Err(_) => last_error = Some(format!("{addr}: no answer within {limit:?}")),
        }
    }
    let Some(reached) = reached else {
        return report.fail(
            Step::Tcp,
            Some(started.elapsed()),
            last_error.unwrap_or_else(|| "no address to connect to".into()),
            "the add-on's SSH server does not accept connections: it may be restarting (retry in a minute), or a firewall drops this dyno's traffic; if it persists, contact the add-on's support",
        );
    };
    report.pass(Step::Tcp, Some(started.elapsed()), reached.to_string());

    let started = Instant::now();
    let session = match Session::connect(server, settings).await {
        Ok(session) => session,
        Err(error) => {
            let took = Some(started.elapsed());
            let (step, advice) = match &error {
                SessionError::Connect { .. } => (Step::Tcp, "the server stopped accepting connections between two steps: retry"),
                SessionError::Timeout { .. } | SessionError::Protocol { .. } => (Step::Handshake, "something answers at SSH_HOST:SSH_PORT but did not complete an SSH handshake: check both in the conn-info, and retry"),
                SessionError::HostKeyMismatch { .. } => (Step::HostKey, "the server's host key is not SSH_PUBLIC_HOST_KEY: if the add-on replaced its server, the variable is stale (attach the add-on again to refresh it); otherwise something else answers at that address, and nothing should be sent through it"),
                SessionError::AuthRejected { .. } => (Step::KeyAccepted, "the server refused SSH_USER_PRIVATE_KEY for SSH_USERNAME: the add-on may have replaced this app's key (attach the add-on again to refresh it)"),
                SessionError::Sha1Only { what: "client authentication", .. } => (Step::KeyAccepted, "the server would only take an RSA signature made with SHA-1, which is refused as unsafe: the server needs updating"),
                SessionError::Sha1Only { .. } => (Step::Handshake, "the server offers only SHA-1 RSA host-key signatures, which are refused as unsafe: the server needs updating"),
            };
            if matches!(step, Step::HostKey | Step::KeyAccepted) {
                report.pass(Step::Handshake, None, "the server speaks SSH");
            }
            if step == Step::KeyAccepted {
                report.pass(
                    Step::HostKey,
                    None,
                    format!("{} matches SSH_PUBLIC_HOST_KEY", server.host_key.describe()),
                );
            }
            return report.fail(step, took, error.to_string(), advice);
        }
    };
    report.pass(Step::Handshake, None, "the server speaks SSH");
    report.pass(
        Step::HostKey,
        None,
        format!("{} matches SSH_PUBLIC_HOST_KEY", server.host_key.describe()),
    );
    report.pass(
        Step::KeyAccepted,
        Some(started.elapsed()),
        format!(
            "user {:?}, key type {} (handshake and authentication)",
            server.username,
            server.private_key.0.algorithm()
        ),
    );

    for forward in &addon.forwards {
        if !check_forward(&session, forward, limit, report).await {
            break;
        }
    }
    session.close().await;
}

/// The channel to one database host, and PostgreSQL's answer there; false if either failed.
async fn check_forward(
    session: &Session,
    forward: &Forward,
    limit: Duration,
    report: &mut Report,
) -> bool {
    let target = config::host_port(&forward.remote_host, forward.remote_port);
    let role = forward.role;
    let started = Instant::now();
    let originator = SocketAddr::from(([127, 0, 0, 1], 0));
    let opened = tokio::time::timeout(
        limit,
        session.open_direct_tcpip(&forward.remote_host, forward.remote_port, originator),
    )
    .await;
    let channel = match opened {
        Ok(Ok(channel)) => channel,
        Ok(Err(error @ ChannelError::Refused { .. })) => {
            report.fail(
                Step::Channel,
                Some(started.elapsed()),
                format!("{role}: {error}"),
                format!("the SSH server could not connect to {target} for the {role} ({}): the database may be down or restarting; if it persists, contact the add-on's support", forward.url_var),
            );
            return false;
        }
        Ok(Err(error)) => {
            report.fail(
                Step::Channel,
                Some(started.elapsed()),
                format!("{role}: {error}"),
                "the SSH session ended while the channel was being opened: retry",
            );
            return false;
        }
        Err(_) => {
            report.fail(
                Step::Channel,
                Some(started.elapsed()),
                format!("{role}: the SSH server did not reach {target} within {limit:?}"),
                format!("the database host {target} does not answer the SSH server: it may be down, or its network unreachable from the server; if it persists, contact the add-on's support"),
            );
            return false;
        }
    };
    report.pass(
        Step::Channel,
        Some(started.elapsed()),
        format!("{role} {target}"),
    );

    let started = Instant::now();
    let mut stream = channel.into_stream();
    let answer = tokio::time::timeout(limit, async {
        stream.write_all(&SSL_REQUEST).await?;
        let mut byte = [0u8; 1];
        match stream.read(&mut byte).await? {
            0 => Ok::<_, std::io::Error>(None),
            _ => Ok(Some(byte[0])),
        }
    })
    .await;
    let _ = stream.shutdown().await;
    let took = Some(started.elapsed());
    let not_postgres = format!("something other than PostgreSQL answers at {target}: check the host and port of {} (the add-on sets it)", forward.url_var);
    match answer {
        Ok(Ok(Some(b'S'))) => {
            report.pass(
                Step::Postgres,
                took,
                format!("{role}: PostgreSQL answered (TLS offered)"),
            );
            true
        }
        Ok(Ok(Some(b'N'))) => {
            report.pass(
                Step::Postgres,
                took,
                format!("{role}: PostgreSQL answered (no TLS)"),
            );
            true
        }
        Ok(Ok(Some(other))) => {
            report.fail(
                Step::Postgres,
                took,
                format!(
                    "{role}: {target} answered with byte 0x{other:02x}, not a PostgreSQL answer"
                ),
                not_postgres,
            );
            false
        }
        Ok(Ok(None)) => {
            report.fail(
                Step::Postgres,
                took,
                format!("{role}: {target} closed the connection without an answer"),
                not_postgres,
            );
            false
        }
        Ok(Err(error)) => {
            report.fail(
                Step::Postgres,
                took,
                format!("{role}: {error}"),
                "the connection broke: retry",
            );
            false
        }
        Err(_) => {
            report.fail(
                Step::Postgres,
                took,
                format!("{role}: no answer from {target} within {limit:?}"),
                not_postgres,
            );
            false
        }
    }
}

async fn check_private_app(
    app: &PrivateApp,
    client_id: &str,
    settings: &RegistrationSettings,
    report: &mut Report,
) {
    // A name of its own: the dyno's own registration, if a daemon holds one, is left alone.
    let check_id = format!("{client_id}_check");
    let registration = match Registration::new(app, &check_id, settings) {
        Ok(registration) => registration,
        Err(error) => {
            return report.fail(
                Step::Api,
                None,
                error.to_string(),
                "fix the setting named above",
            )
        }
    };
    let started = Instant::now();
    let result = registration.probe().await;
    let took = Some(started.elapsed());
    match result {
        Ok(cleanup) => {
            report.pass(Step::Api, None, format!("{} answered", app.api_base_url));
            let detail = match cleanup {
                Ok(()) => format!("registered as {check_id:?} and removed again"),
                Err(error) => format!("registered as {check_id:?}; removing it failed ({error}), the add-on drops it within 75 min"),
            };
            report.pass(Step::Token, took, detail);
        }
        Err(error @ ApiError::Status { .. }) => {
            report.pass(Step::Api, None, format!("{} answered", app.api_base_url));
            let advice = if error.is_refusal() {
                "the add-on refused CLIENT_APP_JWT: it may be expired or revoked (attach the add-on again to refresh it)"
            } else {
                "the add-on's API failed: retry in a minute; if it persists, contact the add-on's support"
            };
            report.fail(Step::Token, took, error.to_string(), advice);
        }
        Err(error) => report.fail(
            Step::Api,
            took,
            error.to_string(),
            format!(
                "check API_BASE_URL in {}, and that this dyno can reach it",
                app.conn_info_var
            ),
        ),
    }
}

fn human(reports: &[Report]) -> String {
    let mut out = String::new();
    if reports.is_empty() {
        out.push_str("no *_TUNNEL_BPG_CONN_INFO variable is set: nothing to check\n");
        return out;
    }
    for report in reports {
        let _ = writeln!(out, "{} ({}, {})", report.addon, report.var, report.mode);
        for (index, outcome) in report.outcomes.iter().enumerate() {
            let mark = if outcome.ok { "✓" } else { "✗" };
            let took = outcome
                .took
                .map(|took| format!(" ({} ms)", took.as_millis()))
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "  {mark} {:<13}{}{took}",
                outcome.step.name(),
                outcome.detail
            );
            // Said once under the last of several failures it covers (config problems).
            let next_advice = report
                .outcomes
                .get(index + 1)
                .and_then(|next| next.advice.as_ref());
            if let Some(advice) = outcome
                .advice
                .as_ref()
                .filter(|advice| Some(*advice) != next_advice)
            {
                let _ = writeln!(out, "    what to do: {advice}");
            }
        }
    }
    let passed = reports.iter().filter(|report| report.ok()).count();
    if passed == reports.len() {
        let _ = writeln!(out, "every add-on passes ({passed})");
    } else {
        let _ = writeln!(
            out,
            "{} of {} add-ons fail",
            reports.len() - passed,
            reports.len()
        );
    }
    out
}

fn json(reports: &[Report], ok: bool) -> String {
    let addons: Vec<serde_json::Value> = reports
        .iter()
        .map(|report| {
            let steps: Vec<serde_json::Value> = report
                .outcomes
                .iter()
                .map(|outcome| {
                    serde_json::json!({
                        "step": outcome.step.name(),
                        "ok": outcome.ok,
                        "ms": outcome.took.map(|took| took.as_millis() as u64),
                        "detail": outcome.detail,
                        "advice": outcome.advice,
                    })
                })
                .collect();
            serde_json::json!({
                "addon": report.addon,
                "var": report.var,
                "mode": report.mode,
                "ok": report.ok(),
                "steps": steps,
            })
        })
        .collect();
    format!("{}\n", serde_json::json!({ "ok": ok, "addons": addons }))
}
