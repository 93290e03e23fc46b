//! The parts of `P_URL` / `P_READONLY_URL` the tunnel needs: where the app will connect; and,
//! for `check --login` only, who it logs in as ([`login`]).
//!
//! The URL carries the database password, so nothing here ever formats the URL itself; problems
//! are described by what was expected.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};

use zeroize::Zeroizing;

/// The public DNS name the add-on puts in `P_URL` in SSH-forward mode; it resolves to 127.0.0.1.
pub const TUNNEL_HOST_NAME: &str = "pg-tunnel.borealis-data.com";

/// libpq's default when a URL names no port.
pub const DEFAULT_PG_PORT: u16 = 5432;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UrlHost {
    /// A name or address on this machine: the tunnel listens there.
    Local(IpAddr),
    /// Any other host: the database is reached directly (private-app-tunnel mode).
    Remote(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DbUrl {
    pub host: UrlHost,
    pub port: u16,
    /// True when the URL named no port, so the client will use libpq's default.
    pub port_defaulted: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlProblem {
    #[error("expected a URL of the form postgres://USER:PASSWORD@HOST:PORT/DATABASE")]
    NotAUrl,
    // The "scheme" is not quoted back: in a value such as `PASSWORD:x@host/db` it is the password.
    #[error("expected the scheme postgres:// or postgresql://")]
    WrongScheme,
    #[error("expected a host after '@' (for example pg-tunnel.borealis-data.com)")]
    NoHost,
    #[error("expected a port number from 1 to 65535 after the host")]
    BadPort,
    #[error("has an '@', '?' or '#' in its user or password; expected them percent-encoded (%40, %3F, %23), so that every client reads the same host and port")]
    Ambiguous,
}

/// What `check --login` logs in with, read from the URL the app uses.
#[derive(Debug)]
pub struct Login {
    pub user: String,
    pub password: Password,
    /// The URL's path, or the user name when it has none (libpq's default).
    pub dbname: String,
    /// The URL's host as written (a name, or an address without brackets): what a client
    /// checks the server's certificate against under `sslmode=verify-full`.
    pub host: String,
    /// `?sslmode=`, when the URL has one.
    pub sslmode: Option<SslMode>,
    /// `?sslrootcert=`, when the URL has one.
    pub sslrootcert: Option<String>,
}

/// libpq's `sslmode`: whether a client uses TLS, and how far it checks the server's
/// certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    pub fn parse(value: &str) -> Option<SslMode> {
        Some(match value {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// A database password, percent-decoded: its `Debug` never shows it, and its buffer is wiped
/// when dropped.
pub struct Password(Zeroizing<Vec<u8>>);

impl Password {
    /// The bytes, for the one place that sends them: the login itself.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(<redacted>)")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoginProblem {
    #[error(transparent)]
    Url(#[from] UrlProblem),
    #[error("names no user to log in as; expected postgres://USER:PASSWORD@HOST:PORT/DATABASE")]
    NoUser,
    #[error(
        "has a {0} that is not UTF-8 once percent-decoded; expected the add-on's value, unedited"
    )]
    NotUtf8(&'static str),
    // The value is not quoted: the query is the one part of the URL a hand may have edited,
    // and nothing says a password was not pasted there.
    #[error("has an sslmode that libpq does not know; expected disable, allow, prefer, require, verify-ca or verify-full")]
    BadSslMode,
}

pub fn parse(value: &str) -> Result<DbUrl, UrlProblem> {
    let (_, public) = split_userinfo(value.trim())?;
    parse_public(&public).map(|(_, db_url)| db_url)
}

/// The user, password and database `value` names, as libpq reads them (each percent-decoded).
/// Only `check --login` calls this: the tunnel itself never needs the password.
pub fn login(value: &str) -> Result<Login, LoginProblem> {
    let (userinfo, public) = split_userinfo(value.trim())?;
    let (url, _) = parse_public(&public)?;
    // libpq ends the user name at the first ':'; everything after it is the password.
    let (user, password) = match userinfo {
        Some(userinfo) => userinfo.split_once(':').unwrap_or((userinfo, "")),
        None => ("", ""),
    };
    let user = decode_text(user, "user name")?;
    if user.is_empty() {
        return Err(LoginProblem::NoUser);
    }
    // Decoding never lengthens, so the buffer never regrows and leaves no copy behind.
    let mut decoded = Zeroizing::new(Vec::with_capacity(password.len()));
    decoded.extend(percent_encoding::percent_decode_str(password));
    let dbname = decode_text(url.path().strip_prefix('/').unwrap_or(""), "database name")?;
    let dbname = if dbname.is_empty() {
        user.clone()
    } else {
        dbname
    };
    let host = match url.host() {
        Some(url::Host::Ipv6(ip)) => ip.to_string(),
        Some(url::Host::Ipv4(ip)) => ip.to_string(),
        Some(url::Host::Domain(name)) => decode_text(name, "host")?,
        None => return Err(UrlProblem::NoHost.into()),
    };
    // libpq keeps the last of a repeated parameter.
    let mut sslmode = None;
    let mut sslrootcert = None;
    for (key, value) in url.query_pairs() {
        match &*key {
            "sslmode" => sslmode = Some(SslMode::parse(&value).ok_or(LoginProblem::BadSslMode)?),
            "sslrootcert" => sslrootcert = Some(value.into_owned()),
            _ => {}
        }
    }
    Ok(Login {
        user,
        password: Password(decoded),
        dbname,
        host,
        sslmode,
        sslrootcert,
    })
}

fn decode_text(encoded: &str, what: &'static str) -> Result<String, LoginProblem> {
    percent_encoding::percent_decode_str(encoded)
        .decode_utf8()
        .map(|text| text.into_owned())
        .map_err(|_| LoginProblem::NotUtf8(what))
}

/// Parses a URL that no longer has user information: the parser keeps a copy of what it parses.
fn parse_public(public: &str) -> Result<(url::Url, DbUrl), UrlProblem> {
    let url = url::Url::parse(public).map_err(|error| match error {
        url::ParseError::InvalidPort => UrlProblem::BadPort,
        url::ParseError::EmptyHost => UrlProblem::NoHost,
        _ => UrlProblem::NotAUrl,
    })?;
    match url.scheme() {
        "postgres" | "postgresql" => {}
        _ => return Err(UrlProblem::WrongScheme),
    }
    let host = match url.host() {
        None => return Err(UrlProblem::NoHost),
        Some(url::Host::Ipv6(ip)) => classify_ip(IpAddr::V6(ip)),
        Some(url::Host::Ipv4(ip)) => classify_ip(IpAddr::V4(ip)),
        // Non-special schemes keep IPv4 literals as opaque names; parse them ourselves.
        Some(url::Host::Domain(name)) => classify_name(name),
    };
    if let UrlHost::Remote(name) = &host {
        if name.is_empty() {
            return Err(UrlProblem::NoHost);
        }
    }
    let (port, port_defaulted) = match url.port() {
        Some(0) => return Err(UrlProblem::BadPort),
        Some(port) => (port, false),
        None => (DEFAULT_PG_PORT, true),
    };
    let db_url = DbUrl {
        host,
        port,
        port_defaulted,
    };
    Ok((url, db_url))
}

/// The `user:password` of `value`'s authority, as written (a slice of `value`, not a copy), and
/// `value` without it. A URL that clients could read two ways is refused: libpq ends the user
/// information at the first `@` and does not end the authority at `?` or `#`, where the URL
/// standard does both, and the tunnel must listen on the very port the app's client will
/// connect to.
fn split_userinfo(value: &str) -> Result<(Option<&str>, String), UrlProblem> {
    let Some((scheme, rest)) = value.split_once("://") else {
        return Ok((None, value.to_owned()));
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    // An '@' after a '?' or '#' but before any '/': libpq would take it for the end of the
    // user information.
    let at_after_query = path
        .split('/')
        .next()
        .is_some_and(|head| head.contains('@'));
    if authority.matches('@').count() > 1 || at_after_query {
        return Err(UrlProblem::Ambiguous);
    }
    let (userinfo, host) = match authority.rsplit_once('@') {
        Some((userinfo, host)) => (Some(userinfo), host),
        None => (None, authority),
    };
    Ok((userinfo, format!("{scheme}://{host}{path}")))
}

fn classify_ip(ip: IpAddr) -> UrlHost {
    if ip.is_loopback() {
        UrlHost::Local(ip)
    } else {
        UrlHost::Remote(ip.to_string())
    }
}

fn classify_name(name: &str) -> UrlHost {
    let decoded = percent_encoding::percent_decode_str(name).decode_utf8_lossy();
    let name = decoded.trim_end_matches('.').to_ascii_lowercase();
    if let Ok(ip) = name.parse::<IpAddr>() {
        return classify_ip(ip);
    }
    // Bound without a DNS lookup: the record is public and always 127.0.0.1, and a dyno must be
    // able to listen before its network (or DNS) is up.
    if name == TUNNEL_HOST_NAME || name == "localhost" {
        return UrlHost::Local(IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
    UrlHost::Remote(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::Ipv6Addr;

    fn local(ip: &str, port: u16) -> DbUrl {
        DbUrl {
            host: UrlHost::Local(ip.parse().unwrap()),
            port,
            port_defaulted: false,
        }
    }

    #[test]
    fn tunnel_name_binds_loopback_without_lookup() {
        assert_eq!(
            parse("postgres://u:p@pg-tunnel.borealis-data.com:6543/db").unwrap(),
            local("127.0.0.1", 6543)
        );
        assert_eq!(
            parse("postgresql://u:p@PG-TUNNEL.borealis-data.com.:6543/db").unwrap(),
            local("127.0.0.1", 6543)
        );
    }

    #[test]
    fn loopback_literals_are_local() {
        assert_eq!(
            parse("postgres://u:p@127.0.0.2:5433/db").unwrap(),
            local("127.0.0.2", 5433)
        );
        assert_eq!(
            parse("postgres://u:p@[::1]:5433/db").unwrap(),
            DbUrl {
                host: UrlHost::Local(IpAddr::V6(Ipv6Addr::LOCALHOST)),
                port: 5433,
                port_defaulted: false
            }
        );
    }

    #[test]
    fn other_hosts_are_remote() {
        assert_eq!(
            parse("postgres://u:p@db.internal.example:5432/d")
                .unwrap()
                .host,
            UrlHost::Remote("db.internal.example".into())
        );
        assert_eq!(
            parse("postgres://u:p@[2001:db8::1]:5432/d").unwrap().host,
            UrlHost::Remote("2001:db8::1".into())
        );
        assert_eq!(
            parse("postgres://u:p@10.1.2.3:5432/d").unwrap().host,
            UrlHost::Remote("10.1.2.3".into())
        );
    }

    #[test]
    fn percent_encoded_userinfo_and_missing_parts_are_accepted() {
        let url =
            parse("postgres://us%40er:p%7Cw%3Ad@pg-tunnel.borealis-data.com:5000/db").unwrap();
        assert_eq!(url, local("127.0.0.1", 5000));
        // No userinfo, no database: still a place the app connects to.
        assert_eq!(
            parse("postgres://pg-tunnel.borealis-data.com:5000").unwrap(),
            local("127.0.0.1", 5000)
        );
    }

    #[test]
    fn missing_port_means_libpq_default() {
        let url = parse("postgres://u:p@pg-tunnel.borealis-data.com/db").unwrap();
        assert_eq!(url.port, 5432);
        assert!(url.port_defaulted);
    }

    #[test]
    fn problems_are_named_without_echoing_the_url() {
        assert_eq!(parse("not a url"), Err(UrlProblem::NotAUrl));
        assert_eq!(parse("mysql://u:p@h:1/d"), Err(UrlProblem::WrongScheme));
        assert_eq!(parse("postgres://u:p@h:99999/d"), Err(UrlProblem::BadPort));
        assert_eq!(parse("postgres://u:p@h:0/d"), Err(UrlProblem::BadPort));
        assert_eq!(parse("postgres:///db"), Err(UrlProblem::NoHost));
        for problem in [
            UrlProblem::NotAUrl,
            UrlProblem::BadPort,
            UrlProblem::NoHost,
            UrlProblem::WrongScheme,
        ] {
            assert!(!problem.to_string().contains("u:p"));
        }
        // No scheme, so the password reads as one: it must not be quoted back, in any case.
        let problem = parse("S3cretPW:x@h/db").unwrap_err().to_string();
        assert!(
            !problem.to_ascii_lowercase().contains("s3cretpw"),
            "{problem}"
        );
    }

    /// What the URL parser is given: `value` without the `user:password@` of its authority.
    fn without_userinfo(value: &str) -> Result<String, UrlProblem> {
        split_userinfo(value).map(|(_, public)| public)
    }

    #[test]
    fn the_parser_never_sees_the_password() {
        assert_eq!(
            without_userinfo("postgres://u:p%40ss@h:5432/db?x=1"),
            Ok("postgres://h:5432/db?x=1".to_owned())
        );
        assert_eq!(
            without_userinfo("postgres://h:1"),
            Ok("postgres://h:1".to_owned())
        );
        assert_eq!(without_userinfo("no scheme"), Ok("no scheme".to_owned()));
        // Read one way by the URL standard, another by libpq: refused.
        assert_eq!(
            parse("postgres://u:a@b@127.0.0.1:6000/db"),
            Err(UrlProblem::Ambiguous)
        );
        assert_eq!(
            parse("postgres://127.0.0.1:7000?@127.0.0.1:6000/db"),
            Err(UrlProblem::Ambiguous)
        );
        assert!(parse("postgres://u:p@h:1/db?options=a@b").is_ok());
    }

    #[test]
    fn login_reads_user_password_and_database_percent_decoded() {
        let parsed =
            login_of("postgres://us%40er:s3cr%2Ft%20p%40ss%7Cw%3Ard@127.0.0.1:5000/my%20db?x=1");
        assert_eq!(parsed.user, "us@er");
        assert_eq!(parsed.password.expose(), b"s3cr/t p@ss|w:rd");
        assert_eq!(parsed.dbname, "my db");
        // A ':' ends the user name; the password keeps any later one.
        let parsed = login_of("postgresql://u:a:b@pg-tunnel.borealis-data.com:5000/db");
        assert_eq!(parsed.user, "u");
        assert_eq!(parsed.password.expose(), b"a:b");
    }

    fn login_of(value: &str) -> Login {
        login(value).unwrap()
    }

    #[test]
    fn login_without_a_database_uses_the_user_name_like_libpq() {
        for url in [
            "postgres://alice:pw@127.0.0.1:5000",
            "postgres://alice:pw@127.0.0.1:5000/",
            "postgres://alice:pw@127.0.0.1:5000?sslmode=disable",
        ] {
            assert_eq!(login_of(url).dbname, "alice", "{url}");
        }
        assert!(login_of("postgres://alice@127.0.0.1:5000/db")
            .password
            .is_empty());
    }

    #[test]
    fn login_reads_the_tls_parameters_and_the_host_as_libpq_does() {
        let parsed = login_of("postgres://u:p@pg-tunnel.borealis-data.com:5000/db");
        assert_eq!(parsed.sslmode, None);
        assert_eq!(parsed.sslrootcert, None);
        assert_eq!(parsed.host, "pg-tunnel.borealis-data.com");
        let parsed = login_of(
            "postgres://u:p@127.0.0.1:5000/db?sslmode=disable&sslrootcert=%2Fetc%2Fca.pem&sslmode=verify-full",
        );
        // The last of a repeated parameter wins.
        assert_eq!(parsed.sslmode, Some(SslMode::VerifyFull));
        assert_eq!(parsed.sslrootcert.as_deref(), Some("/etc/ca.pem"));
        assert_eq!(parsed.host, "127.0.0.1");
        assert_eq!(login_of("postgres://u:p@[::1]:5000/db").host, "::1");
        for mode in [
            "disable",
            "allow",
            "prefer",
            "require",
            "verify-ca",
            "verify-full",
        ] {
            let parsed = login_of(&format!("postgres://u:p@h:1/d?sslmode={mode}"));
            assert_eq!(parsed.sslmode.map(SslMode::name), Some(mode));
        }
        let problem = login("postgres://u:p@h:1/d?sslmode=hunter2").unwrap_err();
        assert_eq!(problem, LoginProblem::BadSslMode);
        assert!(!problem.to_string().contains("hunter2"));
    }

    #[test]
    fn login_problems_are_named_without_the_password() {
        assert_eq!(
            login("postgres://127.0.0.1:5000/db").unwrap_err(),
            LoginProblem::NoUser
        );
        assert_eq!(
            login("postgres://:hunter2@127.0.0.1:5000/db").unwrap_err(),
            LoginProblem::NoUser
        );
        assert_eq!(
            login("postgres://u%ff:hunter2@127.0.0.1:5000/db").unwrap_err(),
            LoginProblem::NotUtf8("user name")
        );
        assert_eq!(
            login("postgres://u:hunter2@a@127.0.0.1:5000/db").unwrap_err(),
            LoginProblem::Url(UrlProblem::Ambiguous)
        );
        assert_eq!(
            login("hunter2:x@h/db").unwrap_err(),
            LoginProblem::Url(UrlProblem::WrongScheme)
        );
        for problem in [
            LoginProblem::NoUser,
            LoginProblem::NotUtf8("database name"),
            LoginProblem::Url(UrlProblem::Ambiguous),
        ] {
            assert!(!problem.to_string().contains("hunter2"));
        }
    }

    #[test]
    fn a_password_never_shows_in_debug_output() {
        let parsed = login_of("postgres://alice:hunter2@127.0.0.1:5000/db");
        let shown = format!("{parsed:?} {:?}", parsed.password);
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(
            shown.contains("alice") && shown.contains("<redacted>"),
            "{shown}"
        );
    }

    proptest! {
        #[test]
        fn never_panics(raw in any::<String>()) {
            let _ = parse(&raw);
        }

        #[test]
        fn login_never_panics(raw in any::<String>()) {
            let _ = login(&raw);
        }

        #[test]
        fn render_then_parse_round_trips(
            user in "[a-z@:/ ]{1,8}",
            pass in "[a-z@:/|% ]{0,8}",
            octet in 0u8..=255,
            port in 1u16..,
        ) {
            let enc = |s: &str| percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string();
            let url = format!("postgres://{}:{}@127.0.0.{octet}:{port}/db", enc(&user), enc(&pass));
            prop_assert_eq!(parse(&url).unwrap(), local(&format!("127.0.0.{octet}"), port));
        }
    }
}
