//! `check --login`: a login to each database host with its URL's user, password and database,
//! then `select 1`, over a channel of its own. It owns the login's TLS choice (the URL's
//! `sslmode` and `sslrootcert`, else libpq's environment variables, else libpq's defaults; the
//! TLS itself is [`crate::pg_tls`]), what a server's refusal means for the user, and keeping the
//! password out of whatever is printed.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio_postgres::error::DbError;

use crate::config::db_url::{self, Login, SslMode};
use crate::config::{self, Forward};
use crate::pg_tls::{self, LibpqEnv, Plan, RootCert, Tls, TlsSetupError, Verify};
use crate::ssh::{ChannelError, Session};

use super::forward::channel_advice;
use super::{Report, Step};

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

fn tls_choice(login: &Login, var: &str, env: &LibpqEnv) -> Result<TlsChoice, String> {
    let (mode, mode_from) = match login.sslmode {
        Some(mode) => (Some(mode), var.to_owned()),
        None => match &env.sslmode {
            Some(value) => match SslMode::parse(value) {
                Some(mode) => (Some(mode), "PGSSLMODE".to_owned()),
                None => {
                    return Err(
                        "PGSSLMODE is not an sslmode libpq knows; expected disable, \
                                allow, prefer, require, verify-ca or verify-full"
                            .into(),
                    )
                }
            },
            None => (None, "libpq's default".to_owned()),
        },
    };
    let root_cert = login
        .sslrootcert
        .clone()
        .or_else(|| env.sslrootcert.clone())
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
pub(super) async fn check_login(
    session: &Session,
    forward: &Forward,
    limit: Duration,
    report: &mut Report,
) -> bool {
    let role = forward.role;
    let var = &forward.url_var;
    // Read again here, not kept from discovery: the serving path never holds the password.
    let login = match config::reread_url(var) {
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
                format!(
                    "the add-on sets {var}: see that it was not edited \
                     (`heroku config:get {var}` shows it)"
                ),
            );
            return false;
        }
    };
    let choice = match tls_choice(&login, var, &pg_tls::libpq_env()) {
        Ok(choice) => choice,
        Err(problem) => {
            report.fail(
                Step::Login,
                None,
                format!("{role}: {problem}"),
                "PGSSLMODE is set in this dyno's environment (`heroku config:get PGSSLMODE`): \
                 set it to one of those, or unset it",
            );
            return false;
        }
    };
    let plan = &choice.plan;
    let attempted = Attempted {
        forward,
        login: &login,
        choice: &choice,
        target: config::host_port(&forward.remote_host, forward.remote_port),
        as_who: format!("as {:?} to {:?}", login.user, login.dbname),
    };
    let Attempted { target, as_who, .. } = &attempted;
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
        Ok(Err(failure)) => explain(failure, &attempted),
        Err(_) => (
            format!("{role}: no answer to the login {as_who} from {target} within {limit:?}"),
            "the database took the connection but did not complete the login: it may be \
             overloaded or starting up; retry in a minute; if it persists, contact the add-on's \
             support"
                .into(),
        ),
    };
    let detail = without_password(detail, &login.password, role);
    report.fail(Step::Login, took, detail, advice);
    false
}

/// A login that was tried, with what its failure's detail and advice name.
struct Attempted<'a> {
    forward: &'a Forward,
    login: &'a Login,
    choice: &'a TlsChoice,
    /// The database host, as `host:port`.
    target: String,
    /// `as "user" to "dbname"`.
    as_who: String,
}

/// A failed login's detail and what to do about it.
fn explain(failure: LoginFailure, attempted: &Attempted) -> (String, String) {
    let Attempted {
        forward,
        choice,
        target,
        as_who,
        ..
    } = attempted;
    let role = forward.role;
    let var = &forward.url_var;
    let mode = choice.plan.mode.name();
    let mode_from = &choice.mode_from;
    match failure {
        LoginFailure::Channel(error) => {
            (format!("{role}: {error}"), channel_advice(&error, forward))
        }
        LoginFailure::TlsSetup(error) => (
            format!("{role}: sslmode={mode} ({mode_from}): {error}"),
            "sslrootcert (in the URL, or PGSSLROOTCERT) names a file on this dyno: put the CA \
             certificates there (with the app's code, so that its client finds them too), or \
             name the right file"
                .to_owned(),
        ),
        LoginFailure::TlsRequest(error) => (
            format!("{role}: the TLS request to {target} failed: {error}"),
            "the connection broke or something other than PostgreSQL answered: retry; if it \
             persists, contact the add-on's support"
                .to_owned(),
        ),
        LoginFailure::NoTls => (
            format!(
                "{role}: sslmode={mode} ({mode_from}) requires TLS, and the server at {target} \
                 offers none: the login was not attempted, so no password was sent"
            ),
            "the app's client, with the same sslmode, cannot log in either: if the add-on's \
             server should offer TLS, contact the add-on's support; otherwise connect with a \
             weaker sslmode (prefer, libpq's default, uses TLS whenever the server offers it; \
             the SSH tunnel encrypts the way to the server in any case)"
                .to_owned(),
        ),
        LoginFailure::Handshake(error) => (
            format!("{role}: the TLS handshake with {target} failed (sslmode={mode}): {error}"),
            handshake_advice(attempted),
        ),
        LoginFailure::Postgres(error) => match error.as_db_error() {
            Some(refused) => explain_refusal(refused, attempted),
            None => (
                format!("{role}: the login {as_who} did not complete: {error}"),
                "the connection broke or the server answered out of turn: retry; if it \
                 persists, contact the add-on's support"
                    .into(),
            ),
        },
        LoginFailure::WrongAnswer => (
            format!("{role}: logged in {as_who}, but select 1 was not answered with 1"),
            format!(
                "something other than PostgreSQL answers at {target}: check the host and port \
                 of {var} (the add-on sets it)"
            ),
        ),
    }
}

/// Under a sslmode that checks the server's certificate, what it was checked against.
fn handshake_advice(attempted: &Attempted) -> String {
    let plan = &attempted.choice.plan;
    let mode = plan.mode.name();
    let mode_from = &attempted.choice.mode_from;
    let roots = match &plan.verify {
        Verify::Nothing => {
            return "the server agreed to TLS but the handshake failed: retry; if it persists, \
                    contact the add-on's support"
                .to_owned()
        }
        Verify::Chain(roots) | Verify::ChainAndName(roots) => roots,
    };
    let trusted = match roots {
        Some(RootCert::File(path)) => format!("the CAs in {path}"),
        _ => "the built-in Mozilla roots (no sslrootcert given, or sslrootcert=system)".to_owned(),
    };
    let issuer = "name the CA that signs it with sslrootcert (the add-on's support can say which)";
    let (name, fix) = if matches!(plan.verify, Verify::ChainAndName(_)) {
        (
            format!(", made out to {:?} (the URL's host)", attempted.login.host),
            format!(
                "for an unknown issuer, {issuer}; for a wrong name, connect by the name the \
                 certificate is for, or use sslmode=verify-ca"
            ),
        )
    } else {
        (String::new(), issuer.to_owned())
    };
    format!(
        "sslmode={mode} ({mode_from}) wants the server's certificate signed by {trusted}{name}, \
         and a client with the same settings refuses it too: {fix}"
    )
}

/// A login the server refused, said by what the refusal means for the user.
fn explain_refusal(refused: &DbError, attempted: &Attempted) -> (String, String) {
    let Attempted {
        forward,
        login,
        choice,
        as_who,
        ..
    } = attempted;
    let role = forward.role;
    let var = &forward.url_var;
    let mode = choice.plan.mode.name();
    let mode_from = &choice.mode_from;
    let (sqlstate, message) = (refused.code().code(), refused.message());
    let dbname = &login.dbname;
    let said =
        format!("{role}: the server refused the login {as_who}: {message} (SQLSTATE {sqlstate})");
    match refusal(sqlstate, message) {
        Refusal::TlsRequired if choice.plan.mode == SslMode::Disable => (
            format!(
                "{role}: the server demands TLS for this login {as_who}, and sslmode=disable \
                 ({mode_from}) forbids it: {message} (SQLSTATE {sqlstate})"
            ),
            format!(
                "the server accepts {:?} only over TLS, and the app's client, with the same \
                 sslmode=disable, is refused too: remove sslmode=disable from {mode_from} \
                 (prefer, libpq's default, uses TLS whenever the server offers it)",
                login.user
            ),
        ),
        Refusal::TlsRequired => (
            format!(
                "{role}: the server demands TLS for this login {as_who} but offers no TLS \
                 (sslmode={mode}): {message} (SQLSTATE {sqlstate})"
            ),
            format!(
                "the server accepts {:?} only over TLS and does not offer TLS, so no client can \
                 log in: contact the add-on's support",
                login.user
            ),
        ),
        Refusal::Credentials => (
            said,
            format!(
                "the server refused the user and password in {var}: the add-on may have rotated \
                 them, leaving this dyno an old copy; re-read the config var \
                 (`heroku config:get {var}`; dynos started since the change have the new value) \
                 and run check again; if the current value is refused too, contact the add-on's \
                 support"
            ),
        ),
        Refusal::NoDatabase => (
            said,
            format!(
                "the database {dbname:?} named in {var} does not exist on the server: see that \
                 {var} was not edited (`heroku config:get {var}` shows it); if it was not, \
                 contact the add-on's support"
            ),
        ),
        Refusal::Other => (
            said,
            "the server said why above: retry in a minute; if it persists, contact the add-on's \
             support"
                .into(),
        ),
    }
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
    fn the_urls_tls_settings_come_before_libpqs_environment_variables() {
        let env = LibpqEnv {
            sslmode: Some("verify-ca".into()),
            sslrootcert: Some("/etc/ca.pem".into()),
        };
        let plain = db_url::login("postgres://u:p@127.0.0.1:5432/d").unwrap();
        let choice = tls_choice(&plain, "DATABASE_URL", &env).unwrap();
        assert_eq!(choice.mode_from, "PGSSLMODE");
        assert_eq!(
            choice.plan.verify,
            Verify::Chain(Some(RootCert::File("/etc/ca.pem".into())))
        );
        let url = "postgres://u:p@127.0.0.1:5432/d?sslmode=require&sslrootcert=system";
        let own = db_url::login(url).unwrap();
        let choice = tls_choice(&own, "DATABASE_URL", &env).unwrap();
        assert_eq!(choice.mode_from, "DATABASE_URL");
        assert_eq!(choice.plan.mode, SslMode::Require);
        assert_eq!(choice.plan.verify, Verify::Chain(Some(RootCert::System)));
        let choice = tls_choice(&plain, "DATABASE_URL", &LibpqEnv::default()).unwrap();
        assert_eq!(choice.mode_from, "libpq's default");
        assert_eq!(choice.plan.mode, SslMode::Prefer);
        let unknown = LibpqEnv {
            sslmode: Some("on".into()),
            sslrootcert: None,
        };
        assert!(tls_choice(&plain, "DATABASE_URL", &unknown).is_err());
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
