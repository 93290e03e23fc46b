//! The way to an SSH-tunnel add-on's server: DNS, TCP, then the SSH session, whose handshake,
//! host key and key are one exchange; what to do when any of them fails.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::config::{Addon, SshServer};
use crate::ssh::{Session, SessionError, SessionSettings};

use super::{Report, Step};

/// DNS, TCP, the handshake, the host key and the key, as far as they pass: the session once
/// every one has.
pub(super) async fn check_session(
    addon: &Addon,
    settings: &SessionSettings,
    report: &mut Report,
) -> Option<Session> {
    let server = &addon.ssh;
    let var = &addon.conn_info_var;
    let limit = settings.connect_timeout;

    let started = Instant::now();
    let resolved = tokio::time::timeout(
        limit,
        tokio::net::lookup_host((server.host.as_str(), server.port)),
    )
    .await;
    let addrs: Vec<SocketAddr> = match resolved {
        Ok(Ok(addrs)) => addrs.collect(),
        Ok(Err(error)) => {
            report.fail(
                Step::Dns,
                Some(started.elapsed()),
                format!("cannot resolve {}: {error}", server.host),
                format!("check SSH_HOST in {var}, and that this dyno can resolve names"),
            );
            return None;
        }
        Err(_) => {
            report.fail(
                Step::Dns,
                Some(started.elapsed()),
                format!("no answer for {} within {limit:?}", server.host),
                "the resolver did not answer: retry; if it persists, the dyno's DNS is at fault",
            );
            return None;
        }
    };
    let shown: Vec<String> = addrs.iter().map(|addr| addr.ip().to_string()).collect();
    report.pass(
        Step::Dns,
        Some(started.elapsed()),
        format!("{} -> {}", server.host, shown.join(", ")),
    );

    reach(&addrs, limit, report).await?;

    let started = Instant::now();
    let session = match Session::connect(server, settings, Default::default()).await {
        Ok(session) => session,
        Err(error) => {
            let took = Some(started.elapsed());
            let (step, advice) = session_advice(&error);
            if matches!(step, Step::HostKey | Step::KeyAccepted) {
                report.pass(Step::Handshake, None, "the server speaks SSH");
            }
            if step == Step::KeyAccepted {
                report.pass(Step::HostKey, None, host_key_matches(server));
            }
            report.fail(step, took, error.to_string(), advice);
            return None;
        }
    };
    report.pass(Step::Handshake, None, "the server speaks SSH");
    report.pass(Step::HostKey, None, host_key_matches(server));
    report.pass(
        Step::KeyAccepted,
        Some(started.elapsed()),
        format!(
            "user {:?}, key type {} (handshake and authentication)",
            server.username,
            server.private_key.0.algorithm()
        ),
    );
    Some(session)
}

/// A TCP connection to the first of `addrs` that takes one; closed again at once, since the
/// session makes its own.
async fn reach(addrs: &[SocketAddr], limit: Duration, report: &mut Report) -> Option<()> {
    let started = Instant::now();
    let mut last_error = None;
    let mut reached = None;
    for addr in addrs {
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
        report.fail(
            Step::Tcp,
            Some(started.elapsed()),
            last_error.unwrap_or_else(|| "no address to connect to".into()),
            "the add-on's SSH server does not accept connections: it may be restarting (retry in \
             a minute), or a firewall drops this dyno's traffic; if it persists, contact the \
             add-on's support",
        );
        return None;
    };
    report.pass(Step::Tcp, Some(started.elapsed()), reached.to_string());
    Some(())
}

fn host_key_matches(server: &SshServer) -> String {
    format!("{} matches SSH_PUBLIC_HOST_KEY", server.host_key.describe())
}

/// The step a failed session stopped at, and what to do about it.
fn session_advice(error: &SessionError) -> (Step, &'static str) {
    match error {
        SessionError::Connect { .. } => (
            Step::Tcp,
            "the server stopped accepting connections between two steps: retry",
        ),
        SessionError::ClosedBeforeGreeting { .. } => (
            Step::Handshake,
            "the server took the connection and closed it before its SSH greeting, as sshd does \
             when too many clients are in their handshakes at once (after the server restarted, \
             say): retry in a few seconds; if it persists, check SSH_HOST and SSH_PORT in the \
             conn-info",
        ),
        SessionError::Timeout { .. } | SessionError::Protocol { .. } => (
            Step::Handshake,
            "something answers at SSH_HOST:SSH_PORT but did not complete an SSH handshake: check \
             both in the conn-info, and retry",
        ),
        SessionError::HostKeyMismatch { .. } => (
            Step::HostKey,
            "the server's host key is not SSH_PUBLIC_HOST_KEY: if the add-on replaced its server, \
             the variable is stale (attach the add-on again to refresh it); otherwise something \
             else answers at that address, and nothing should be sent through it",
        ),
        SessionError::AuthRejected { .. } => (
            Step::KeyAccepted,
            "the server refused SSH_USER_PRIVATE_KEY for SSH_USERNAME: the add-on may have \
             replaced this app's key (attach the add-on again to refresh it)",
        ),
        SessionError::Sha1Only {
            what: "client authentication",
            ..
        } => (
            Step::KeyAccepted,
            "the server would only take an RSA signature made with SHA-1, which is refused as \
             unsafe: the server needs updating",
        ),
        SessionError::Sha1Only { .. } => (
            Step::Handshake,
            "the server offers only SHA-1 RSA host-key signatures, which are refused as unsafe: \
             the server needs updating",
        ),
    }
}
