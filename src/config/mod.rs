//! Discovery of every Borealis add-on attachment from the environment (see
//! `docs/addon-contract.md`: "Config vars", "The conn-info value", "SSH-forward mode"): the
//! model of what was found, and the scan that finds it. Each attachment's variables are read by
//! [`parser`], its keys by [`keys`].
//!
//! Discovery never fails as a whole: each add-on is parsed on its own, and whatever is wrong
//! with one becomes a [`Problem`] naming the variable and the key, so the others still run and
//! the app still boots.

pub mod conn_info;
pub mod db_url;
pub mod keys;
mod parser;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use keys::{ClientKey, HostKey};
use parser::{AddonParser, Parsed};
use zeroize::Zeroizing;

/// The suffix of the variable that holds an attachment's conn-info, and its legacy form; what
/// comes before it is the attachment's prefix (`DATABASE`, `BOREALIS_PG_RED`, ...).
pub const CONN_INFO_SUFFIXES: [&str; 2] = [CONN_INFO_SUFFIX, LEGACY_CONN_INFO_SUFFIX];
const CONN_INFO_SUFFIX: &str = "_TUNNEL_BPG_CONN_INFO";
const LEGACY_CONN_INFO_SUFFIX: &str = "_SSH_TUNNEL_BPG_CONNECTION_INFO";

/// The add-on drops a private-app registration this long after it was made or last renewed
/// (`docs/addon-contract.md`, "Private-app-tunnel mode"): the registration asks for it, and
/// what reports the registration's expiry counts with it.
pub const AUTO_DESTROY_DELAY: Duration = Duration::from_secs(4500);

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

impl SshServer {
    /// `host:port`, with an IPv6 address in brackets: for log lines and messages.
    pub fn address(&self) -> String {
        host_port(&self.host, self.port)
    }
}

/// `host:port`, with an IPv6 address in brackets.
pub fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
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

impl Discovery {
    /// No add-on is attached at all (nothing served, nothing to report).
    pub fn is_empty(&self) -> bool {
        self.addons.is_empty() && self.private_apps.is_empty() && self.problems.is_empty()
    }
}

/// Reads the environment the way the add-on sets it; non-UTF-8 values cannot be add-on config,
/// so they are decoded lossily rather than rejected.
#[expect(
    clippy::disallowed_methods,
    reason = "the add-ons' config vars are this module's to read"
)]
pub fn discover_env() -> Discovery {
    discover(
        std::env::vars_os()
            .map(|(name, value)| (name.to_string_lossy().into_owned(), secret_text(value))),
    )
}

/// `value` as text, in the same buffer when it is UTF-8 (no copy is left behind); otherwise a
/// lossy copy, the original wiped. Values may be secrets: every copy must be accounted for.
pub fn secret_text(value: std::ffi::OsString) -> Zeroizing<String> {
    match value.into_string() {
        Ok(text) => Zeroizing::new(text),
        Err(value) => {
            let bytes = Zeroizing::new(std::os::unix::ffi::OsStringExt::into_vec(value));
            // Sized for the worst case (every byte a 3-byte U+FFFD), so it never regrows.
            let mut text = Zeroizing::new(String::with_capacity(3 * bytes.len()));
            for chunk in bytes.utf8_chunks() {
                text.push_str(chunk.valid());
                if !chunk.invalid().is_empty() {
                    text.push(char::REPLACEMENT_CHARACTER);
                }
            }
            text
        }
    }
}

/// A database URL variable read again, as [`secret_text`]: the serving path never keeps a URL's
/// password, so `check --login` reads the variable again at the moment it logs in. `None` if it
/// is no longer set.
#[expect(
    clippy::disallowed_methods,
    reason = "the add-ons' config vars are this module's to read"
)]
pub(crate) fn reread_url(var: &str) -> Option<Zeroizing<String>> {
    std::env::var_os(var).map(secret_text)
}

/// Scans `vars` (normally `std::env::vars_os()`, lossily decoded) for add-on attachments.
pub fn discover<I, K, V>(vars: I) -> Discovery
where
    I: IntoIterator<Item = (K, V)>,
    K: Into<String>,
    V: Into<Zeroizing<String>>,
{
    let env: BTreeMap<String, Zeroizing<String>> = vars
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

#[cfg(test)]
pub(crate) mod tests;
