//! `bpg-tunnel check`: the doctor. For each add-on in the environment it walks the path a
//! connection takes, one step at a time, and stops at the first step that fails, saying what to
//! do about it: config → DNS → TCP to the SSH server → SSH handshake → host key → key accepted →
//! a channel to each database host → PostgreSQL answers there (→ with `--login`, a login with
//! the URL's credentials and `select 1`). In private-app-tunnel mode: config → the add-on's API
//! answers → the token is accepted.
//!
//! It binds no port, so it runs beside a serving daemon (`heroku ps:exec`), and it prints what
//! the log lines print: variable names, hosts, ports, key types and fingerprints, database user
//! and database names, never a value that may hold a secret. The PostgreSQL step sends only an
//! `SSLRequest`, which a server answers before any credentials, and closes: nothing in the
//! server's log. Only `--login` reads a password, from the URL variable, at the moment it logs
//! in; it uses TLS as the URL's `sslmode` says, as the app's client does ([`crate::pg_tls`]).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::db_url::{self, Login, SslMode};
use crate::config::{self, Addon, Forward, PrivateApp, Severity};
use crate::dyno::Dyno;
use crate::pg_tls::{self, Plan, RootCert, Tls, TlsSetupError, Verify, SSL_REQUEST};
use crate::private_app::{ApiError, Registration, RegistrationSettings};
use crate::ssh::{ChannelError, Session, SessionError, SessionSettings};

/// What `check` needs; see [`crate::options::Options`].
#[derive(Debug, Clone)]
pub struct CheckSettings {
    pub session: SessionSettings,
    pub registration: RegistrationSettings,
    /// The dyno, whose client id a private-app check registers under (with `_check` added).
    pub dyno: Dyno,
    /// One JSON document on stdout instead of lines for people.
    pub json: bool,
    /// Also log in to each database with its URL's credentials and run `select 1`.
    pub login: bool,
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
    Login,
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
            Step::Login => "login",
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
        check_ssh(addon, settings, &mut report).await;
        reports.push(report);
    }
    if !discovery.private_apps.is_empty() {
        let client_id = &settings.dyno.client_id;
        // What the dyno's identity fell back on, said where the registration is checked.
        let identity: String = settings
            .dyno
            .notices()
            .iter()
            .map(|notice| format!("; {}", notice.notice))
            .collect();
        for app in &discovery.private_apps {
            let mut report = Report::new(&app.name, &app.conn_info_var, "private-app-tunnel");
            report.pass(
                Step::Config,
                None,
                format!(
                    "private-app tunnel with the add-on's API at {}{}{identity}",
                    app.api_base_url,
                    notes(&app.name)
                ),
            );
            check_private_app(app, client_id, &settings.registration, &mut report).await;
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

async fn check_ssh(addon: &Addon, check: &CheckSettings, report: &mut Report) {
    let settings = &check.session;
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
    let session = match Session::connect(server, settings, Default::default()).await {
        Ok(session) => session,
        Err(error) => {
            let took = Some(started.elapsed());
            let (step, advice) = match &error {
                SessionError::Connect { .. } => (Step::Tcp, "the server stopped accepting connections between two steps: retry"),
                SessionError::ClosedBeforeGreeting { .. } => (Step::Handshake, "the server took the connection and closed it before its SSH greeting, as sshd does when too many clients are in their handshakes at once (after the server restarted, say): retry in a few seconds; if it persists, check SSH_HOST and SSH_PORT in the conn-info"),
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
        if check.login && !check_login(&session, forward, limit, report).await {
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
        Ok(Err(error)) => {
            report.fail(
                Step::Channel,
                Some(started.elapsed()),
                format!("{role}: {error}"),
                channel_advice(&error, forward),
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

fn channel_advice(error: &ChannelError, forward: &Forward) -> String {
    let target = config::host_port(&forward.remote_host, forward.remote_port);
    match error {
        ChannelError::Refused { .. } => format!("the SSH server could not connect to {target} for the {} ({}): the database may be down or restarting; if it persists, contact the add-on's support", forward.role, forward.url_var),
        _ => "the SSH session ended while the channel was being opened: retry".into(),
    }
}

/// Why a login did not get its `select 1` answered.
enum LoginFailure {
    Channel(ChannelError),
    /// The TLS settings cannot be used (`sslrootcert`, the host to check).
    TlsSetup(TlsSetupError),
    /// The TLS request itself failed (before anything else was sent).
    TlsRequest(std::io::Error),
    /// The sslmode requires TLS and the server has none: nothing else was sent.
    NoTls,
    /// The server agreed to TLS, and the handshake failed (a certificate check among others).
    Handshake(std::io::Error),
    Postgres(tokio_postgres::Error),
    /// Logged in, but the query's answer was not the one row `1`.
    WrongAnswer,
}

/// The TLS settings of a login: the URL's, else libpq's environment variables (which the
/// app's client reads too), else libpq's defaults.
struct TlsChoice {
    plan: Plan,
    /// Where the sslmode came from, to name it in advice: the URL variable or `PGSSLMODE`.
    mode_from: String,
}

fn tls_choice(login: &Login, var: &str) -> Result<TlsChoice, String> {
    let env = |name: &str| std::env::var(name).ok().filter(|value| !value.is_empty());
    let (mode, mode_from) = match login.sslmode {
        Some(mode) => (Some(mode), var.to_owned()),
        None => match env("PGSSLMODE") {
            Some(value) => match SslMode::parse(&value) {
                Some(mode) => (Some(mode), "PGSSLMODE".to_owned()),
                None => return Err("PGSSLMODE is not an sslmode libpq knows; expected disable, allow, prefer, require, verify-ca or verify-full".into()),
            },
            None => (None, "libpq's default".to_owned()),
        },
    };
    let root_cert = login
        .sslrootcert
        .clone()
        .or_else(|| env("PGSSLROOTCERT"))
        .map(|value| RootCert::parse(&value));
    Ok(TlsChoice {
        plan: Plan::new(mode, root_cert),
        mode_from,
    })
}

/// What the login's TLS was, for its line: the version agreed, or why there was none.
fn tls_said(version: Option<&str>, plan: &Plan) -> String {
    let mode = plan.mode.name();
    match version {
        Some(version) => format!("over TLS ({version}, sslmode={mode})"),
        None if plan.mode == SslMode::Disable => format!("without TLS (sslmode={mode})"),
        None if plan.mode == SslMode::Allow => {
            format!("without TLS (sslmode={mode}: TLS only if the server demands it)")
        }
        None => format!("without TLS (sslmode={mode}, and the server offers none)"),
    }
}

/// What a server's refusal of a login means for the user.
#[derive(Debug, PartialEq, Eq)]
enum Refusal {
    /// pg_hba.conf admits this login only over TLS.
    TlsRequired,
    Credentials,
    NoDatabase,
    Other,
}

fn refusal(sqlstate: &str, message: &str) -> Refusal {
    match sqlstate {
        // pg_hba.conf's refusal for want of TLS has only the general code; PostgreSQL 12 and
        // later end its message with "no encryption", older ones with "SSL off".
        "28000" if message.ends_with("no encryption") || message.ends_with("SSL off") => {
            Refusal::TlsRequired
        }
        "28P01" | "28000" => Refusal::Credentials,
        "3D000" => Refusal::NoDatabase,
        _ => Refusal::Other,
    }
}

/// A login to one database host with its URL's user, password and database, over a channel of
/// its own, then `select 1`; false if it failed.
async fn check_login(
    session: &Session,
    forward: &Forward,
    limit: Duration,
    report: &mut Report,
) -> bool {
    let role = forward.role;
    let var = &forward.url_var;
    // Read again here, not kept from discovery: the serving path never holds the password.
    let login = match std::env::var_os(var).map(config::secret_text) {
        Some(value) => db_url::login(&value).map_err(|problem| format!("{var}: {problem}")),
        None => Err(format!("{var}: is no longer set")),
    };
    let login = match login {
        Ok(login) => login,
        Err(problem) => {
            report.fail(
                Step::Login,
                None,
                format!("{role}: {problem}"),
                format!("the add-on sets {var}: see that it was not edited (`heroku config:get {var}` shows it)"),
            );
            return false;
        }
    };
    let choice = match tls_choice(&login, var) {
        Ok(choice) => choice,
        Err(problem) => {
            report.fail(
                Step::Login,
                None,
                format!("{role}: {problem}"),
                "PGSSLMODE is set in this dyno's environment (`heroku config:get PGSSLMODE`): set it to one of those, or unset it",
            );
            return false;
        }
    };
    let plan = &choice.plan;
    let mode = plan.mode.name();
    let mode_from = &choice.mode_from;
    let target = config::host_port(&forward.remote_host, forward.remote_port);
    let as_who = format!("as {:?} to {:?}", login.user, login.dbname);
    let started = Instant::now();
    let result = tokio::time::timeout(limit, log_in(session, forward, &login, plan)).await;
    let took = Some(started.elapsed());
    let (detail, advice) = match result {
        Ok(Ok(version)) => {
            report.pass(
                Step::Login,
                took,
                format!(
                    "{role}: logged in {as_who} {}, select 1 answered",
                    tls_said(version, plan)
                ),
            );
            return true;
        }
        Ok(Err(LoginFailure::Channel(error))) => {
            (format!("{role}: {error}"), channel_advice(&error, forward))
        }
        Ok(Err(LoginFailure::TlsSetup(error))) => (
            format!("{role}: sslmode={mode} ({mode_from}): {error}"),
            "sslrootcert (in the URL, or PGSSLROOTCERT) names a file on this dyno: put the CA certificates there (with the app's code, so that its client finds them too), or name the right file".to_owned(),
        ),
        Ok(Err(LoginFailure::TlsRequest(error))) => (
            format!("{role}: the TLS request to {target} failed: {error}"),
            "the connection broke or something other than PostgreSQL answered: retry; if it persists, contact the add-on's support".to_owned(),
        ),
        Ok(Err(LoginFailure::NoTls)) => (
            format!("{role}: sslmode={mode} ({mode_from}) requires TLS, and the server at {target} offers none: the login was not attempted, so no password was sent"),
            "the app's client, with the same sslmode, cannot log in either: if the add-on's server should offer TLS, contact the add-on's support; otherwise connect with a weaker sslmode (prefer, libpq's default, uses TLS whenever the server offers it; the SSH tunnel encrypts the way to the server in any case)".to_owned(),
        ),
        Ok(Err(LoginFailure::Handshake(error))) => {
            let advice = match &plan.verify {
                Verify::Nothing => "the server agreed to TLS but the handshake failed: retry; if it persists, contact the add-on's support".to_owned(),
                Verify::Chain(roots) | Verify::ChainAndName(roots) => {
                    let trusted = match roots {
                        Some(RootCert::File(path)) => format!("the CAs in {path}"),
                        _ => "the built-in Mozilla roots (no sslrootcert given, or sslrootcert=system)".to_owned(),
                    };
                    let issuer = "name the CA that signs it with sslrootcert (the add-on's support can say which)";
                    let (name, fix) = if matches!(plan.verify, Verify::ChainAndName(_)) {
                        (
                            format!(", made out to {:?} (the URL's host)", login.host),
                            format!("for an unknown issuer, {issuer}; for a wrong name, connect by the name the certificate is for, or use sslmode=verify-ca"),
                        )
                    } else {
                        (String::new(), issuer.to_owned())
                    };
                    format!("sslmode={mode} ({mode_from}) wants the server's certificate signed by {trusted}{name}, and a client with the same settings refuses it too: {fix}")
                }
            };
            (
                format!("{role}: the TLS handshake with {target} failed (sslmode={mode}): {error}"),
                advice,
            )
        }
        Ok(Err(LoginFailure::Postgres(error))) => match error.as_db_error() {
            Some(refused) => {
                let (sqlstate, message) = (refused.code().code(), refused.message());
                let dbname = &login.dbname;
                match refusal(sqlstate, message) {
                    Refusal::TlsRequired if plan.mode == SslMode::Disable => (
                        format!("{role}: the server demands TLS for this login {as_who}, and sslmode=disable ({mode_from}) forbids it: {message} (SQLSTATE {sqlstate})"),
                        format!("the server accepts {:?} only over TLS, and the app's client, with the same sslmode=disable, is refused too: remove sslmode=disable from {mode_from} (prefer, libpq's default, uses TLS whenever the server offers it)", login.user),
                    ),
                    Refusal::TlsRequired => (
                        format!("{role}: the server demands TLS for this login {as_who} but offers no TLS (sslmode={mode}): {message} (SQLSTATE {sqlstate})"),
                        format!("the server accepts {:?} only over TLS and does not offer TLS, so no client can log in: contact the add-on's support", login.user),
                    ),
                    Refusal::Credentials => (
                        format!("{role}: the server refused the login {as_who}: {message} (SQLSTATE {sqlstate})"),
                        format!("the server refused the user and password in {var}: the add-on may have rotated them, leaving this dyno an old copy; re-read the config var (`heroku config:get {var}`; dynos started since the change have the new value) and run check again; if the current value is refused too, contact the add-on's support"),
                    ),
                    Refusal::NoDatabase => (
                        format!("{role}: the server refused the login {as_who}: {message} (SQLSTATE {sqlstate})"),
                        format!("the database {dbname:?} named in {var} does not exist on the server: see that {var} was not edited (`heroku config:get {var}` shows it); if it was not, contact the add-on's support"),
                    ),
                    Refusal::Other => (
                        format!("{role}: the server refused the login {as_who}: {message} (SQLSTATE {sqlstate})"),
                        "the server said why above: retry in a minute; if it persists, contact the add-on's support".into(),
                    ),
                }
            }
            None => (
                format!("{role}: the login {as_who} did not complete: {error}"),
                "the connection broke or the server answered out of turn: retry; if it persists, contact the add-on's support".into(),
            ),
        },
        Ok(Err(LoginFailure::WrongAnswer)) => (
            format!("{role}: logged in {as_who}, but select 1 was not answered with 1"),
            format!("something other than PostgreSQL answers at {target}: check the host and port of {var} (the add-on sets it)"),
        ),
        Err(_) => (
            format!("{role}: no answer to the login {as_who} from {target} within {limit:?}"),
            "the database took the connection but did not complete the login: it may be overloaded or starting up; retry in a minute; if it persists, contact the add-on's support".into(),
        ),
    };
    let detail = without_password(detail, &login.password, role);
    report.fail(Step::Login, took, detail, advice);
    false
}

/// The login itself, with TLS as `plan` says; the TLS version, if it was used.
async fn log_in(
    session: &Session,
    forward: &Forward,
    login: &Login,
    plan: &Plan,
) -> Result<Option<&'static str>, LoginFailure> {
    // Never needed under `disable`, so a bad sslrootcert is no reason to fail there (libpq
    // does not read it either).
    let tls = match plan.mode {
        SslMode::Disable => None,
        _ => Some(Tls::new(&plan.verify, &login.host).map_err(LoginFailure::TlsSetup)?),
    };
    let mut config = tokio_postgres::Config::new();
    config
        .user(&login.user)
        .dbname(&login.dbname)
        .application_name("bpg-tunnel check")
        // TLS, when there is any, is set up underneath (`attempt`): tokio-postgres is handed
        // the stream to log in over, as is.
        .ssl_mode(tokio_postgres::config::SslMode::Disable);
    if !login.password.is_empty() {
        config.password(login.password.expose());
    }
    let first = attempt(
        session,
        forward,
        &config,
        plan,
        tls.as_ref(),
        plan.ask_first,
    )
    .await;
    match (first, tls.as_ref()) {
        // libpq's `allow`: without TLS first, and over TLS again if the server demands it.
        (Err(LoginFailure::Postgres(error)), Some(tls))
            if plan.retries_with_tls() && demands_tls(&error) =>
        {
            attempt(session, forward, &config, plan, Some(tls), true).await
        }
        (first, _) => first,
    }
}

fn demands_tls(error: &tokio_postgres::Error) -> bool {
    error
        .as_db_error()
        .is_some_and(|db| refusal(db.code().code(), db.message()) == Refusal::TlsRequired)
}

/// One login over a `direct-tcpip` channel of its own through `session`, asking for TLS first
/// when `ask_tls`.
async fn attempt(
    session: &Session,
    forward: &Forward,
    config: &tokio_postgres::Config,
    plan: &Plan,
    tls: Option<&Tls>,
    ask_tls: bool,
) -> Result<Option<&'static str>, LoginFailure> {
    let originator = SocketAddr::from(([127, 0, 0, 1], 0));
    let channel = session
        .open_direct_tcpip(&forward.remote_host, forward.remote_port, originator)
        .await
        .map_err(LoginFailure::Channel)?;
    let mut stream = channel.into_stream();
    if let (true, Some(tls)) = (ask_tls, tls) {
        let offered = pg_tls::request_tls(&mut stream)
            .await
            .map_err(LoginFailure::TlsRequest)?;
        if offered {
            let (stream, version) = tls
                .handshake(stream)
                .await
                .map_err(LoginFailure::Handshake)?;
            select_one(stream, config).await?;
            return Ok(Some(version));
        }
        // The channel is dropped unused: the server sees the connection end after its `N`.
        if !plan.plain_allowed {
            return Err(LoginFailure::NoTls);
        }
    }
    select_one(stream, config).await?;
    Ok(None)
}

/// The startup, the authentication and `select 1`, over `stream` as it is.
async fn select_one<S>(stream: S, config: &tokio_postgres::Config) -> Result<(), LoginFailure>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (client, connection) = config
        .connect_raw(stream, tokio_postgres::NoTls)
        .await
        .map_err(LoginFailure::Postgres)?;
    // The connection does the I/O; once the query is answered the client is dropped, and the
    // connection says goodbye to the server (Terminate) and ends.
    let query = async move { client.simple_query("select 1").await };
    let (answer, _) = tokio::join!(query, connection);
    let answered_one = answer.map_err(LoginFailure::Postgres)?.iter().any(|message| {
        matches!(message, tokio_postgres::SimpleQueryMessage::Row(row) if row.get(0) == Some("1"))
    });
    if answered_one {
        Ok(())
    } else {
        Err(LoginFailure::WrongAnswer)
    }
}

/// The server's text is outside our control: should it ever quote the password, it is left out
/// rather than printed.
fn without_password(detail: String, password: &db_url::Password, role: config::Role) -> String {
    let secret = password.expose();
    let quoted = !secret.is_empty()
        && detail
            .as_bytes()
            .windows(secret.len())
            .any(|window| window == secret);
    if quoted {
        format!(
            "{role}: the login failed (the server's message is left out: it contains the password)"
        )
    } else {
        detail
    }
}

async fn check_private_app(
    app: &PrivateApp,
    client_id: &str,
    settings: &RegistrationSettings,
    report: &mut Report,
) {
    // The process's own id, so a daemon's registration is never touched; the suffix tells the
    // add-on's operators that this one was a check.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_for_want_of_tls_is_told_apart_from_refused_credentials() {
        let hba = "no pg_hba.conf entry for host \"10.0.0.1\", user \"u\", database \"d\"";
        assert_eq!(
            refusal("28000", &format!("{hba}, no encryption")),
            Refusal::TlsRequired
        );
        // PostgreSQL 11 and older.
        assert_eq!(
            refusal("28000", &format!("{hba}, SSL off")),
            Refusal::TlsRequired
        );
        assert_eq!(refusal("28000", hba), Refusal::Credentials);
        assert_eq!(
            refusal("28P01", "password authentication failed for user \"u\""),
            Refusal::Credentials
        );
        assert_eq!(
            refusal("3D000", "database \"d\" does not exist"),
            Refusal::NoDatabase
        );
        assert_eq!(
            refusal("53300", "sorry, too many clients already"),
            Refusal::Other
        );
    }

    #[test]
    fn a_detail_that_quotes_the_password_is_left_out() {
        let login = db_url::login("postgres://u:hunter2@127.0.0.1:5432/d").unwrap();
        let detail = without_password(
            "writer: role \"hunter2\" is not permitted".into(),
            &login.password,
            config::Role::Writer,
        );
        assert!(!detail.contains("hunter2"), "{detail}");
        assert!(detail.starts_with("writer: the login failed"), "{detail}");
        let kept = "writer: password authentication failed for user \"u\"";
        assert_eq!(
            without_password(kept.into(), &login.password, config::Role::Writer),
            kept
        );
        let no_password = db_url::login("postgres://u@127.0.0.1:5432/d").unwrap();
        assert_eq!(
            without_password(kept.into(), &no_password.password, config::Role::Writer),
            kept
        );
    }
}
