//! Reads one attachment's variables (its conn-info and the URLs that go with it) into an
//! [`Addon`] or a [`PrivateApp`], collecting every mistake as a [`Problem`] on the way.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use zeroize::Zeroizing;

use super::conn_info::ConnInfo;
use super::db_url::{self, UrlHost};
use super::keys::{parse_host_key, parse_private_key, ClientKey, HostKey};
use super::{Addon, Forward, Jwt, PrivateApp, Problem, Role, Severity, SshServer};

const DEFAULT_SSH_PORT: u16 = 22;
/// The longest host name, user name or id accepted (a DNS name has at most 253 characters).
const MAX_WORD: usize = 255;

pub(super) enum Parsed {
    Ssh(Addon),
    PrivateApp(PrivateApp),
}

pub(super) struct AddonParser<'a> {
    pub(super) env: &'a BTreeMap<String, Zeroizing<String>>,
    pub(super) prefix: &'a str,
    pub(super) var: &'a str,
    pub(super) problems: &'a mut Vec<Problem>,
}

impl AddonParser<'_> {
    fn problem(
        &mut self,
        severity: Severity,
        var: &str,
        key: Option<&'static str>,
        message: String,
    ) {
        self.problems.push(Problem {
            severity,
            addon: self.prefix.to_owned(),
            var: var.to_owned(),
            key,
            message,
        });
    }

    fn key_error(&mut self, key: &'static str, message: impl Into<String>) {
        let var = self.var.to_owned();
        self.problem(Severity::Error, &var, Some(key), message.into());
    }

    pub(super) fn parse(&mut self) -> Option<Parsed> {
        let info = ConnInfo::parse(&self.env[self.var]);
        if !info.malformed_items().is_empty() {
            let var = self.var.to_owned();
            let items = info
                .malformed_items()
                .iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join(",");
            self.problem(
                Severity::Notice,
                &var,
                None,
                format!("item(s) {items} ignored: expected KEY:=VALUE"),
            );
        }

        let url_var = format!("{}_URL", self.prefix);
        let writer_url = self.url(&url_var, true)?;
        let UrlHost::Local(listen_ip) = writer_url.host else {
            // The database is reached directly: private-app-tunnel mode.
            return self.private_app(&info).map(Parsed::PrivateApp);
        };

        // Parse every key before giving up, so one run of the app lists every mistake.
        let host = self.host(
            &info,
            "SSH_HOST",
            "the SSH server's host name or IP address",
        );
        let port = self.port(&info, "SSH_PORT", DEFAULT_SSH_PORT);
        let username = self.required(&info, "SSH_USERNAME", "the SSH user name");
        let private_key = self.private_key(&info);
        let host_key = self.host_key(&info);
        let writer_host = self.host(
            &info,
            "POSTGRES_WRITER_HOST",
            "the writer database host name",
        );
        let pg_port = self.port(&info, "POSTGRES_PORT", db_url::DEFAULT_PG_PORT);
        let reader_given = info
            .get("POSTGRES_READER_HOST")
            .is_some_and(|h| !h.trim().is_empty());
        let reader_host = if reader_given {
            self.host(
                &info,
                "POSTGRES_READER_HOST",
                "the reader database host name",
            )
        } else {
            None
        };

        let (
            Some(host),
            Some(port),
            Some(username),
            Some(private_key),
            Some(host_key),
            Some(writer_host),
            Some(pg_port),
        ) = (
            host,
            port,
            username,
            private_key,
            host_key,
            writer_host,
            pg_port,
        )
        else {
            return None;
        };

        let writer = Forward {
            role: Role::Writer,
            listen: SocketAddr::new(listen_ip, writer_url.port),
            url_var: url_var.clone(),
            remote_host: writer_host,
            remote_port: pg_port,
        };
        let mut forwards = vec![writer.clone()];
        let reader_var = format!("{}_READONLY_URL", self.prefix);
        match (reader_host, self.env.contains_key(&reader_var)) {
            (Some(reader_host), true) => {
                if let Some(reader) = self.reader(&reader_var, reader_host, pg_port, &writer) {
                    forwards.push(reader);
                }
            }
            // An add-on without a replica; worth a word since the app may try the URL anyway.
            (None, true) if !reader_given => {
                let var = self.var.to_owned();
                self.problem(
                    Severity::Notice,
                    &var,
                    Some("POSTGRES_READER_HOST"),
                    format!("is not set, so {reader_var} is not served; expected the reader database host when the add-on has a read-only replica"),
                );
            }
            _ => {}
        }

        Some(Parsed::Ssh(Addon {
            name: self.prefix.to_owned(),
            conn_info_var: self.var.to_owned(),
            ssh: SshServer {
                host,
                port,
                username,
                private_key,
                host_key,
            },
            forwards,
        }))
    }

    fn private_app(&mut self, info: &ConnInfo) -> Option<PrivateApp> {
        let api_base_url = self.api_base_url(info);
        let addon_id = self.required(info, "ADDON_ID", "the add-on's id");
        let jwt = match info.get("CLIENT_APP_JWT").map(str::trim) {
            Some(jwt) if !jwt.is_empty() && !jwt.contains(char::is_whitespace) => {
                Some(Jwt(Arc::new(zeroize::Zeroizing::new(jwt.to_owned()))))
            }
            Some(_) => {
                self.key_error(
                    "CLIENT_APP_JWT",
                    "contains white space; expected the add-on's client token",
                );
                None
            }
            None => {
                self.key_error(
                    "CLIENT_APP_JWT",
                    "is missing; expected the add-on's client token (private-app-tunnel mode, since the URL's host is not pg-tunnel.borealis-data.com)",
                );
                None
            }
        };
        Some(PrivateApp {
            name: self.prefix.to_owned(),
            conn_info_var: self.var.to_owned(),
            api_base_url: api_base_url?,
            addon_id: addon_id?,
            jwt: jwt?,
        })
    }

    fn api_base_url(&mut self, info: &ConnInfo) -> Option<url::Url> {
        const KEY: &str = "API_BASE_URL";
        let raw = self.required(
            info,
            KEY,
            "the add-on's API address (private-app-tunnel mode, since the URL's host is not pg-tunnel.borealis-data.com)",
        )?;
        let parsed = match url::Url::parse(&raw) {
            Ok(parsed) => parsed,
            Err(error) => {
                self.key_error(
                    KEY,
                    format!("is not a URL ({error}); expected https://host[/path]"),
                );
                return None;
            }
        };
        if parsed.scheme() != "https" || parsed.host().is_none() {
            self.key_error(
                KEY,
                "is not https; expected an https:// URL, since the request carries the add-on's token",
            );
            return None;
        }
        if parsed.query().is_some()
            || parsed.fragment().is_some()
            || !parsed.username().is_empty()
            || parsed.password().is_some()
        {
            self.key_error(
                KEY,
                "has a query, fragment or user info; expected https://host[:port][/path]",
            );
            return None;
        }
        let mut base = parsed;
        let trimmed = base.path().trim_end_matches('/').to_owned();
        base.set_path(&trimmed);
        Some(base)
    }

    fn reader(
        &mut self,
        reader_var: &str,
        reader_host: String,
        pg_port: u16,
        writer: &Forward,
    ) -> Option<Forward> {
        let url = self.url(reader_var, false)?;
        let UrlHost::Local(ip) = url.host else {
            self.problem(
                Severity::Error,
                reader_var,
                None,
                "expected the same local host as the writer URL (pg-tunnel.borealis-data.com); the reader is not served".into(),
            );
            return None;
        };
        let listen = SocketAddr::new(ip, url.port);
        if listen == writer.listen {
            self.problem(
                Severity::Error,
                reader_var,
                None,
                format!(
                    "names the same local port {} as {}; expected a different port, so the reader is not served",
                    url.port, writer.url_var
                ),
            );
            return None;
        }
        Some(Forward {
            role: Role::Reader,
            listen,
            url_var: reader_var.to_owned(),
            remote_host: reader_host,
            remote_port: pg_port,
        })
    }

    fn url(&mut self, var: &str, required: bool) -> Option<db_url::DbUrl> {
        let Some(value) = self.env.get(var) else {
            if required {
                self.problem(
                    Severity::Error,
                    var,
                    None,
                    format!(
                        "is not set; expected the database URL that goes with {}",
                        self.var
                    ),
                );
            }
            return None;
        };
        match db_url::parse(value) {
            Ok(url) => {
                if url.port_defaulted {
                    self.problem(
                        Severity::Notice,
                        var,
                        None,
                        format!(
                            "names no port; listening on {}, the port PostgreSQL clients use by default",
                            url.port
                        ),
                    );
                }
                Some(url)
            }
            Err(problem) => {
                let served = if required {
                    "this add-on"
                } else {
                    "the reader"
                };
                self.problem(
                    Severity::Error,
                    var,
                    None,
                    format!("{problem}; {served} is not served"),
                );
                None
            }
        }
    }

    /// A single word (host, user, id): these values are quoted back in log lines, so one that
    /// could carry more (another item run into it, a pasted blob) is refused, unquoted.
    /// A host: a name or an IP address, an IPv6 one with or without its brackets.
    fn host(&mut self, info: &ConnInfo, key: &'static str, expected: &str) -> Option<String> {
        let host = self.required(info, key, expected)?;
        match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            Some(inner) if inner.parse::<std::net::Ipv6Addr>().is_ok() => Some(inner.to_owned()),
            _ => Some(host),
        }
    }

    fn required(&mut self, info: &ConnInfo, key: &'static str, expected: &str) -> Option<String> {
        match info.get(key).map(str::trim) {
            Some(value) if value.contains(char::is_whitespace) => {
                self.key_error(key, format!("contains white space; expected {expected}"));
                None
            }
            Some(value) if value.contains(":=") || value.contains('|') => {
                self.key_error(
                    key,
                    format!("contains ':=' or '|'; expected {expected} (is a '|' missing between two items?)"),
                );
                None
            }
            Some(value) if value.len() > MAX_WORD => {
                self.key_error(
                    key,
                    format!("is longer than {MAX_WORD} characters; expected {expected}"),
                );
                None
            }
            Some(value) => Some(value.to_owned()),
            None => {
                self.key_error(key, format!("is missing; expected {expected}"));
                None
            }
        }
    }

    fn port(&mut self, info: &ConnInfo, key: &'static str, default: u16) -> Option<u16> {
        let Some(raw) = info.get(key) else {
            return Some(default);
        };
        match raw.trim().parse::<u16>() {
            Ok(port) if port != 0 => Some(port),
            _ => {
                // Not quoted back: a value with an item run into it would carry that item.
                self.key_error(key, "is not a port number; expected 1 to 65535".to_owned());
                None
            }
        }
    }

    fn private_key(&mut self, info: &ConnInfo) -> Option<ClientKey> {
        const KEY: &str = "SSH_USER_PRIVATE_KEY";
        let Some(raw) = info.get(KEY) else {
            self.key_error(KEY, "is missing; expected the SSH client private key");
            return None;
        };
        match parse_private_key(raw) {
            Ok(key) => Some(ClientKey(Arc::new(key))),
            Err(message) => {
                self.key_error(KEY, message);
                None
            }
        }
    }

    fn host_key(&mut self, info: &ConnInfo) -> Option<HostKey> {
        const KEY: &str = "SSH_PUBLIC_HOST_KEY";
        let Some(raw) = info.get(KEY) else {
            self.key_error(
                KEY,
                "is missing; expected the SSH server's public key as \"<type> <base64>\"",
            );
            return None;
        };
        match parse_host_key(raw) {
            Ok(key) => Some(key),
            Err(message) => {
                self.key_error(KEY, message);
                None
            }
        }
    }
}
