//! The parts of `P_URL` / `P_READONLY_URL` the tunnel needs: where the app will connect.
//!
//! The URL carries the database password, so nothing here ever formats the URL itself; problems
//! are described by what was expected.

use std::net::{IpAddr, Ipv4Addr};

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

pub fn parse(value: &str) -> Result<DbUrl, UrlProblem> {
    // The parser keeps a copy of what it parses: give it the URL without its user and password.
    let url = url::Url::parse(&without_userinfo(value.trim())?).map_err(|error| match error {
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
    Ok(DbUrl {
        host,
        port,
        port_defaulted,
    })
}

/// `value` without the `user:password@` of its authority (and unchanged when it has none).
/// A URL that clients could read two ways is refused: libpq ends the user information at the
/// first `@` and does not end the authority at `?` or `#`, where the URL standard does both, and
/// the tunnel must listen on the very port the app's client will connect to.
fn without_userinfo(value: &str) -> Result<String, UrlProblem> {
    let Some((scheme, rest)) = value.split_once("://") else {
        return Ok(value.to_owned());
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
    let host = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    Ok(format!("{scheme}://{host}{path}"))
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

    proptest! {
        #[test]
        fn never_panics(raw in any::<String>()) {
            let _ = parse(&raw);
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
