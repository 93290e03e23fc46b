//! Discovery of every Borealis add-on attachment from the environment (see
//! `docs/addon-contract.md`: "Config vars", "The conn-info value", "SSH-forward mode").
//!
//! Discovery never fails as a whole: each add-on is parsed on its own, and whatever is wrong
//! with one becomes a [`Problem`] naming the variable and the key, so the others still run and
//! the app still boots.

pub mod conn_info;
pub mod db_url;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

use russh::keys::{PrivateKey, PublicKey};

use conn_info::ConnInfo;
use db_url::UrlHost;

const CONN_INFO_SUFFIX: &str = "_TUNNEL_BPG_CONN_INFO";
const LEGACY_CONN_INFO_SUFFIX: &str = "_SSH_TUNNEL_BPG_CONNECTION_INFO";
const DEFAULT_SSH_PORT: u16 = 22;

/// An add-on in private-app-tunnel mode (`docs/addon-contract.md`, "Private-app-tunnel mode"): no
/// SSH; the dyno registers with the add-on's API so the add-on's network lets it reach the
/// database at the host in `P_URL`.
#[derive(Debug, Clone)]
pub struct PrivateApp {
    /// The attachment prefix, as for [`Addon::name`].
    pub name: String,
    pub conn_info_var: String,
    /// `API_BASE_URL`, https only, without a trailing slash.
    pub api_base_url: url::Url,
    pub addon_id: String,
    pub jwt: Jwt,
}

/// `CLIENT_APP_JWT`: only ever written into an Authorization header.
#[derive(Clone)]
pub struct Jwt(pub Arc<zeroize::Zeroizing<String>>);

impl fmt::Debug for Jwt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Jwt(<redacted>)")
    }
}

/// One add-on attachment that can be served.
#[derive(Debug, Clone)]
pub struct Addon {
    /// The attachment prefix (`DATABASE`, `BOREALIS_PG_RED`, ...): used in every log line.
    pub name: String,
    /// The variable the conn-info came from.
    pub conn_info_var: String,
    pub ssh: SshServer,
    pub forwards: Vec<Forward>,
}

#[derive(Debug, Clone)]
pub struct SshServer {
    pub host: String,
    pub port: u16,
    pub username: String,
    pub private_key: ClientKey,
    pub host_key: HostKey,
}

/// The client's private key, held only in memory. `ssh_key` zeroizes it on drop.
#[derive(Clone)]
pub struct ClientKey(pub Arc<PrivateKey>);

impl fmt::Debug for ClientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClientKey({})", self.0.algorithm())
    }
}

/// The server key the add-on told us to expect. Compared by exact blob equality.
#[derive(Clone, PartialEq, Eq)]
pub struct HostKey {
    key: PublicKey,
    blob: Vec<u8>,
}

impl HostKey {
    pub fn matches(&self, presented: &PublicKey) -> bool {
        presented
            .to_bytes()
            .is_ok_and(|presented| presented == self.blob)
    }

    /// `ssh-ed25519 SHA256:...`, the form OpenSSH prints, for log lines.
    pub fn describe(&self) -> String {
        describe_key(&self.key)
    }
}

impl fmt::Debug for HostKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HostKey({})", self.describe())
    }
}

pub fn describe_key(key: &PublicKey) -> String {
    format!(
        "{} {}",
        key.algorithm(),
        key.fingerprint(russh::keys::HashAlg::Sha256)
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Writer,
    Reader,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Writer => "writer",
            Role::Reader => "reader",
        })
    }
}

/// A local listener and the database endpoint (resolved on the SSH server) it leads to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    pub role: Role,
    pub listen: SocketAddr,
    /// The URL variable that names `listen`, for error messages (`DATABASE_URL`).
    pub url_var: String,
    pub remote_host: String,
    pub remote_port: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// Something the user configured is not served.
    Error,
    /// Served, but not quite as written (a default applied, a duplicate merged).
    Notice,
}

/// Something discovery wants the user to know. Never contains a secret: messages describe what
/// was expected, and only non-secret values (ports, host names, key types) are quoted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub severity: Severity,
    pub addon: String,
    pub var: String,
    pub key: Option<&'static str>,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.key {
            Some(key) => write!(f, "{}: {}: {}", self.var, key, self.message),
            None => write!(f, "{}: {}", self.var, self.message),
        }
    }
}

#[derive(Debug, Default)]
pub struct Discovery {
    pub addons: Vec<Addon>,
    pub private_apps: Vec<PrivateApp>,
    pub problems: Vec<Problem>,
}

enum Parsed {
    Ssh(Addon),
    PrivateApp(PrivateApp),
}

impl Discovery {
    /// No add-on is attached at all (nothing served, nothing to report).
    pub fn is_empty(&self) -> bool {
        self.addons.is_empty() && self.private_apps.is_empty() && self.problems.is_empty()
    }

    pub fn errors(&self) -> impl Iterator<Item = &Problem> {
        self.problems
            .iter()
            .filter(|p| p.severity == Severity::Error)
    }
}

/// Scans `vars` (normally `std::env::vars_os()`, lossily decoded) for add-on attachments.
pub fn discover<I, K, V>(vars: I) -> Discovery
where
    I: IntoIterator<Item = (K, V)>,
    K: Into<String>,
    V: Into<String>,
{
    let env: BTreeMap<String, String> = vars
        .into_iter()
        .map(|(k, v)| (k.into(), v.into()))
        .collect();
    let mut discovery = Discovery::default();

    // prefix -> conn-info variable; the current name wins over the legacy one.
    let mut attachments: BTreeMap<String, String> = BTreeMap::new();
    for name in env.keys() {
        if let Some(prefix) = strip_suffix_nonempty(name, LEGACY_CONN_INFO_SUFFIX) {
            attachments.entry(prefix.to_owned()).or_insert(name.clone());
        }
    }
    for name in env.keys() {
        if let Some(prefix) = strip_suffix_nonempty(name, CONN_INFO_SUFFIX) {
            if let Some(legacy) = attachments.insert(prefix.to_owned(), name.clone()) {
                if legacy != *name {
                    discovery.problems.push(Problem {
                        severity: Severity::Notice,
                        addon: prefix.to_owned(),
                        var: legacy,
                        key: None,
                        message: format!("ignored: {name} is set too and takes precedence"),
                    });
                }
            }
        }
    }

    // DATABASE first, so that a duplicate attachment is reported under its other names.
    let mut order: Vec<&String> = attachments.keys().collect();
    order.sort_by_key(|prefix| (prefix.as_str() != "DATABASE", prefix.as_str()));

    for prefix in order {
        let var = &attachments[prefix];
        let mut parser = AddonParser {
            env: &env,
            prefix,
            var,
            problems: &mut discovery.problems,
        };
        match parser.parse() {
            Some(Parsed::Ssh(addon)) => admit(addon, &mut discovery),
            Some(Parsed::PrivateApp(app)) => admit_private_app(app, &mut discovery),
            None => {}
        }
    }
    discovery
}

fn strip_suffix_nonempty<'a>(name: &'a str, suffix: &str) -> Option<&'a str> {
    name.strip_suffix(suffix)
        .filter(|prefix| !prefix.is_empty())
}

/// Adds `addon` unless its listeners are already served (a second attachment of the same add-on)
/// or taken by a different add-on (a conflict the user must resolve).
fn admit(mut addon: Addon, discovery: &mut Discovery) {
    let mut kept = Vec::new();
    for forward in std::mem::take(&mut addon.forwards) {
        let existing = discovery.addons.iter().find_map(|other| {
            other
                .forwards
                .iter()
                .find(|f| f.listen == forward.listen)
                .map(|f| (other, f))
        });
        match existing {
            None => kept.push(forward),
            Some((other, served))
                if served.remote_host == forward.remote_host
                    && served.remote_port == forward.remote_port
                    && other.ssh.host == addon.ssh.host
                    && other.ssh.port == addon.ssh.port
                    && other.ssh.username == addon.ssh.username =>
            {
                discovery.problems.push(Problem {
                    severity: Severity::Notice,
                    addon: addon.name.clone(),
                    var: forward.url_var.clone(),
                    key: None,
                    message: format!(
                        "same add-on as {} ({}); {} is served once",
                        other.name, served.url_var, forward.listen
                    ),
                });
            }
            Some((_, served)) => discovery.problems.push(Problem {
                severity: Severity::Error,
                addon: addon.name.clone(),
                var: forward.url_var.clone(),
                key: None,
                message: format!(
                    "local address {} is already used by {} for a different database; expected each add-on to have its own port",
                    forward.listen, served.url_var
                ),
            }),
        }
    }
    if !kept.is_empty() {
        addon.forwards = kept;
        discovery.addons.push(addon);
    }
}

/// The same add-on attached twice registers once.
fn admit_private_app(app: PrivateApp, discovery: &mut Discovery) {
    let same = discovery
        .private_apps
        .iter()
        .find(|other| other.addon_id == app.addon_id && other.api_base_url == app.api_base_url);
    match same {
        Some(other) => discovery.problems.push(Problem {
            severity: Severity::Notice,
            addon: app.name.clone(),
            var: app.conn_info_var.clone(),
            key: Some("ADDON_ID"),
            message: format!(
                "same add-on as {}; the dyno registers with it once",
                other.name
            ),
        }),
        None => discovery.private_apps.push(app),
    }
}

struct AddonParser<'a> {
    env: &'a BTreeMap<String, String>,
    prefix: &'a str,
    var: &'a str,
    problems: &'a mut Vec<Problem>,
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

    fn parse(&mut self) -> Option<Parsed> {
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
        let host = self.required(
            &info,
            "SSH_HOST",
            "the SSH server's host name or IP address",
        );
        let port = self.port(&info, "SSH_PORT", DEFAULT_SSH_PORT);
        let username = self.required(&info, "SSH_USERNAME", "the SSH user name");
        let private_key = self.private_key(&info);
        let host_key = self.host_key(&info);
        let writer_host = self.required(
            &info,
            "POSTGRES_WRITER_HOST",
            "the writer database host name",
        );
        let pg_port = self.port(&info, "POSTGRES_PORT", db_url::DEFAULT_PG_PORT);
        let reader_host = info
            .get("POSTGRES_READER_HOST")
            .map(|h| h.trim().to_owned());

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
        let reader_host = reader_host.filter(|h| !h.is_empty());
        match (reader_host, self.env.contains_key(&reader_var)) {
            (Some(reader_host), true) => {
                if let Some(reader) = self.reader(&reader_var, reader_host, pg_port, &writer) {
                    forwards.push(reader);
                }
            }
            // An add-on without a replica; worth a word since the app may try the URL anyway.
            (None, true) => {
                let var = self.var.to_owned();
                self.problem(
                    Severity::Notice,
                    &var,
                    Some("POSTGRES_READER_HOST"),
                    format!("is not set, so {reader_var} is not served; expected the reader database host when the add-on has a read-only replica"),
                );
            }
            (_, false) => {}
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
            self.key_error(KEY, format!("has scheme {:?}; expected an https:// URL, since the request carries the add-on's token", parsed.scheme()));
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

    fn required(&mut self, info: &ConnInfo, key: &'static str, expected: &str) -> Option<String> {
        match info.get(key).map(str::trim) {
            Some(value) if !value.is_empty() && !value.contains(char::is_whitespace) => {
                Some(value.to_owned())
            }
            Some(_) => {
                self.key_error(key, format!("contains white space; expected {expected}"));
                None
            }
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
                self.key_error(
                    key,
                    format!("is {raw:?}; expected a port number from 1 to 65535"),
                );
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

/// Accepts OpenSSH and PEM (PKCS#1, SEC1, PKCS#8) encodings, tolerating CRLF and stray
/// indentation. The returned message never contains key material.
pub fn parse_private_key(raw: &str) -> Result<PrivateKey, String> {
    let mut normalized = zeroize::Zeroizing::new(String::with_capacity(raw.len() + 1));
    for line in raw.lines() {
        normalized.push_str(line.trim());
        normalized.push('\n');
    }
    match russh::keys::decode_secret_key(&normalized, None) {
        Ok(key) => Ok(key),
        Err(russh::keys::Error::KeyIsEncrypted) => Err(
            "is protected by a passphrase; expected an unencrypted private key".into(),
        ),
        Err(russh::keys::Error::UnsupportedKeyType { .. }) => Err(
            "is of an unsupported type; expected an ed25519, RSA or ECDSA private key".into(),
        ),
        Err(_) => Err(
            "could not be read; expected an unencrypted ed25519, RSA or ECDSA private key in OpenSSH or PEM (PKCS#1, SEC1, PKCS#8) format, with newlines written as \\n"
                .into(),
        ),
    }
}

/// Accepts `<type> <base64> [comment]`, or the bare base64 blob.
pub fn parse_host_key(raw: &str) -> Result<HostKey, String> {
    let expected =
        "expected the server's public key as \"<type> <base64>\", e.g. \"ssh-ed25519 AAAA...\"";
    let tokens: Vec<&str> = raw.split_whitespace().collect();
    let (declared_type, blob) = match tokens.as_slice() {
        [blob] => (None, *blob),
        [key_type, blob, ..] => (Some(*key_type), *blob),
        [] => return Err(format!("is empty; {expected}")),
    };
    let key = russh::keys::parse_public_key_base64(blob)
        .map_err(|_| format!("could not be decoded; {expected}"))?;
    if let Some(declared) = declared_type {
        if declared != key.algorithm().as_str() {
            return Err(format!(
                "says {declared:?} but the key is {}; {expected}",
                key.algorithm()
            ));
        }
    }
    let blob = key
        .to_bytes()
        .map_err(|_| format!("could not be encoded; {expected}"))?;
    Ok(HostKey { key, blob })
}

#[cfg(test)]
mod tests;
