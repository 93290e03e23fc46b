//! TLS for `check --login`, as libpq's `sslmode` asks for it: rustls with ring, inside the
//! SSH channel. The app's own client reads the same URL, so check uses TLS when and as the app
//! would, and its verdict on a login is the app's.
//!
//! One departure from libpq: `verify-ca` and `verify-full` without `sslrootcert` check against
//! the Mozilla roots built in, where libpq would fail for want of `~/.postgresql/root.crt`.
//!
//! The `SSLRequest` and the handshake are done here, before tokio-postgres sees the stream:
//! once TLS is required, the startup message (and so any password) can only ever be written
//! into the TLS stream, and check knows which protocol version was agreed, to say so.

use std::io;
use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::tls_roots::{self, PemFileError};

use crate::config::db_url::SslMode;

/// `SSLRequest`: length 8, then the code 1234 5679. Every PostgreSQL since 7.0 answers it with
/// one byte, `S` or `N`, before asking for anything.
pub const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

/// What `sslrootcert` names: a file of CA certificates, or libpq's `system`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootCert {
    File(String),
    /// `sslrootcert=system`: the platform's trusted roots. A static binary on a dyno has no
    /// dependable system store, so this means the Mozilla roots built in (webpki-roots), the
    /// ones the add-on's API client trusts too.
    System,
}

impl RootCert {
    pub fn parse(value: &str) -> RootCert {
        if value == "system" {
            RootCert::System
        } else {
            RootCert::File(value.to_owned())
        }
    }
}

/// How the server's certificate is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verify {
    /// `prefer`, `allow`, `require`: encryption only, as libpq does; the certificate is not
    /// looked at. The SSH session's pinned host key already stands for the way to the server.
    Nothing,
    /// `verify-ca`: signed by a trusted CA, whatever name it is for.
    Chain(Option<RootCert>),
    /// `verify-full`: signed by a trusted CA and made out to the URL's host.
    ChainAndName(Option<RootCert>),
}

/// What a login does about TLS, from the URL's `sslmode` and `sslrootcert` (libpq's rules).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub mode: SslMode,
    /// Whether to ask the server for TLS on the first attempt (false only for `disable` and
    /// `allow`).
    pub ask_first: bool,
    /// Whether the login may go on without TLS when the server has none.
    pub plain_allowed: bool,
    pub verify: Verify,
}

impl Plan {
    pub fn new(mode: Option<SslMode>, root_cert: Option<RootCert>) -> Plan {
        // libpq 16: `sslrootcert=system` without an sslmode means verify-full.
        let mode = mode.unwrap_or(if root_cert == Some(RootCert::System) {
            SslMode::VerifyFull
        } else {
            SslMode::Prefer
        });
        let verify = match mode {
            SslMode::VerifyCa => Verify::Chain(root_cert),
            SslMode::VerifyFull => Verify::ChainAndName(root_cert),
            // libpq: with a root certificate given, require checks the chain as verify-ca does.
            SslMode::Require if root_cert.is_some() => Verify::Chain(root_cert),
            _ => Verify::Nothing,
        };
        Plan {
            mode,
            ask_first: !matches!(mode, SslMode::Disable | SslMode::Allow),
            plain_allowed: matches!(mode, SslMode::Disable | SslMode::Allow | SslMode::Prefer),
            verify,
        }
    }

    /// Whether a login refused for want of TLS may be tried again over TLS (`allow`).
    pub fn retries_with_tls(&self) -> bool {
        self.mode == SslMode::Allow
    }
}

/// libpq's environment variables for TLS, which the app's client falls back on for what its URL
/// does not set: each one set and not empty (libpq takes an empty one for unset).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LibpqEnv {
    /// `PGSSLMODE`, as written: whether libpq knows it is for the caller to say.
    pub sslmode: Option<String>,
    /// `PGSSLROOTCERT`.
    pub sslrootcert: Option<String>,
}

/// Reads [`LibpqEnv`] from this process's environment, which the app's client shares.
#[expect(
    clippy::disallowed_methods,
    reason = "libpq's variables are this module's to read"
)]
pub fn libpq_env() -> LibpqEnv {
    let var = |name: &str| std::env::var(name).ok().filter(|value| !value.is_empty());
    LibpqEnv {
        sslmode: var("PGSSLMODE"),
        sslrootcert: var("PGSSLROOTCERT"),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("cannot read sslrootcert {path:?}: {source}; expected a file of PEM certificates, the CAs that sign the server's certificate")]
    RootCertUnreadable { path: String, source: io::Error },
    #[error("sslrootcert {path:?} holds no usable certificate ({reason}); expected PEM certificates (-----BEGIN CERTIFICATE-----)")]
    RootCertUnusable { path: String, reason: String },
    #[error("the URL's host {host:?} is neither a DNS name nor an IP address, so no certificate can be checked against it")]
    Host { host: String },
    #[error("cannot set up TLS: {0}")]
    Rustls(String),
}

/// A TLS client for one login: the checks `verify` asks for, against `host`.
pub struct Tls {
    config: Arc<rustls::ClientConfig>,
    server_name: ServerName<'static>,
}

impl Tls {
    pub fn new(verify: &Verify, host: &str) -> Result<Tls, TlsSetupError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let (roots, check_name) = match verify {
            Verify::Nothing => (None, false),
            Verify::Chain(root_cert) => (Some(roots(root_cert.as_ref())?), false),
            Verify::ChainAndName(root_cert) => (Some(roots(root_cert.as_ref())?), true),
        };
        let verifier = Arc::new(Verifier {
            roots,
            check_name,
            algorithms: provider.signature_verification_algorithms,
        });
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsSetupError::Rustls(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        // The name libpq would check and send (SNI): the host the app's URL names, not the
        // address the SSH server connects to.
        let server_name = match ServerName::try_from(host.to_owned()) {
            Ok(name) => name,
            // Nothing is checked against it, so a host rustls cannot take only goes without
            // SNI (as an address does) rather than failing a login libpq would make.
            Err(_) if !check_name => ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()),
            Err(_) => {
                return Err(TlsSetupError::Host {
                    host: host.to_owned(),
                })
            }
        };
        Ok(Tls {
            config: Arc::new(config),
            server_name,
        })
    }

    /// The handshake over `stream`, once the server has said yes to [`request_tls`]; returns
    /// the TLS stream and the protocol version agreed.
    pub async fn handshake<S>(
        &self,
        stream: S,
    ) -> io::Result<(tokio_rustls::client::TlsStream<S>, &'static str)>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let connector = tokio_rustls::TlsConnector::from(self.config.clone());
        let stream = connector.connect(self.server_name.clone(), stream).await?;
        let version = match stream.get_ref().1.protocol_version() {
            Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
            Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
            _ => "TLS",
        };
        Ok((stream, version))
    }
}

/// Sends `SSLRequest` and reads the server's one-byte answer: true for `S`. Exactly one byte
/// is read, so nothing the server sends after it can pass for part of the TLS handshake's
/// plaintext (CVE-2021-23222).
pub async fn request_tls<S>(stream: &mut S) -> io::Result<bool>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    stream.write_all(&SSL_REQUEST).await?;
    let mut answer = [0u8; 1];
    stream.read_exact(&mut answer).await?;
    match answer[0] {
        b'S' => Ok(true),
        b'N' => Ok(false),
        other => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("the server answered the TLS request with byte 0x{other:02x}, not S or N"),
        )),
    }
}

fn roots(root_cert: Option<&RootCert>) -> Result<Arc<RootCertStore>, TlsSetupError> {
    let path = match root_cert {
        None | Some(RootCert::System) => return Ok(Arc::new(tls_roots::mozilla())),
        Some(RootCert::File(path)) => path,
    };
    let mut roots = RootCertStore::empty();
    let unusable = |reason: String| TlsSetupError::RootCertUnusable {
        path: path.clone(),
        reason,
    };
    match tls_roots::add_pem_file(&mut roots, Path::new(path)) {
        Ok(0) => Err(unusable("no certificate in it".into())),
        Ok(_) => Ok(Arc::new(roots)),
        Err(PemFileError::Unreadable(source)) => Err(TlsSetupError::RootCertUnreadable {
            path: path.clone(),
            source,
        }),
        Err(PemFileError::Unusable(reason)) => Err(unusable(reason)),
    }
}

/// libpq's three levels of certificate checking; the handshake's signatures are checked at
/// every level, so that the server at least holds the key of the certificate it shows.
#[derive(Debug)]
struct Verifier {
    roots: Option<Arc<RootCertStore>>,
    check_name: bool,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Some(roots) = &self.roots {
            let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
            rustls::client::verify_server_cert_signed_by_trust_anchor(
                &cert,
                roots,
                intermediates,
                now,
                self.algorithms.all,
            )?;
            if self.check_name {
                rustls::client::verify_server_name(&cert, server_name)?;
            }
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_follow_libpq() {
        let plan = Plan::new(None, None);
        assert_eq!(plan.mode, SslMode::Prefer);
        assert!(plan.ask_first && plan.plain_allowed);
        assert_eq!(plan.verify, Verify::Nothing);

        let plan = Plan::new(Some(SslMode::Disable), None);
        assert!(!plan.ask_first && plan.plain_allowed && !plan.retries_with_tls());

        let plan = Plan::new(Some(SslMode::Allow), None);
        assert!(!plan.ask_first && plan.plain_allowed && plan.retries_with_tls());

        let plan = Plan::new(Some(SslMode::Require), None);
        assert!(plan.ask_first && !plan.plain_allowed);
        assert_eq!(plan.verify, Verify::Nothing);

        let file = RootCert::File("/ca.pem".into());
        let plan = Plan::new(Some(SslMode::Require), Some(file.clone()));
        assert_eq!(plan.verify, Verify::Chain(Some(file.clone())));

        let plan = Plan::new(Some(SslMode::VerifyFull), Some(file.clone()));
        assert!(!plan.plain_allowed);
        assert_eq!(plan.verify, Verify::ChainAndName(Some(file)));

        let plan = Plan::new(None, Some(RootCert::System));
        assert_eq!(plan.mode, SslMode::VerifyFull);
        assert_eq!(plan.verify, Verify::ChainAndName(Some(RootCert::System)));
    }

    #[test]
    fn a_root_cert_file_that_is_missing_or_empty_is_named() {
        let missing = RootCert::File("/nonexistent/root.crt".into());
        let error = Tls::new(&Verify::Chain(Some(missing)), "db.example.com")
            .err()
            .unwrap();
        assert!(
            error.to_string().contains("/nonexistent/root.crt"),
            "{error}"
        );
        let empty = tempfile::NamedTempFile::new().unwrap();
        let path = empty.path().display().to_string();
        let error = Tls::new(&Verify::Chain(Some(RootCert::File(path))), "db.example.com")
            .err()
            .unwrap();
        assert!(
            error.to_string().contains("no usable certificate"),
            "{error}"
        );
    }

    #[test]
    fn names_and_addresses_are_accepted_as_hosts() {
        for host in ["pg-tunnel.borealis-data.com", "127.0.0.1", "::1"] {
            assert!(Tls::new(&Verify::Nothing, host).is_ok(), "{host}");
        }
        // Checked against nothing, so no reason to refuse it.
        assert!(Tls::new(&Verify::Nothing, "not a host").is_ok());
        assert!(Tls::new(&Verify::ChainAndName(None), "not a host").is_err());
    }
}
