//! A `direct-tcpip` channel through the session to each database host, and PostgreSQL's answer
//! there to an `SSLRequest` (nothing that reaches the server's log); the advice for a channel
//! that does not open, which a login's own channel shares.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::config::{self, Forward};
use crate::pg_tls::SSL_REQUEST;
use crate::ssh::{ChannelError, Session};

use super::{Report, Step};

/// The channel to one database host, and PostgreSQL's answer there; false if either failed.
pub(super) async fn check_forward(
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
                format!(
                    "the database host {target} does not answer the SSH server: it may be down, \
                     or its network unreachable from the server; if it persists, contact the \
                     add-on's support"
                ),
            );
            return false;
        }
    };
    report.pass(
        Step::Channel,
        Some(started.elapsed()),
        format!("{role} {target}"),
    );
    check_postgres(channel.into_stream(), forward, limit, report).await
}

/// PostgreSQL's one-byte answer to an `SSLRequest` over `stream`; false if it did not come.
async fn check_postgres<S>(
    mut stream: S,
    forward: &Forward,
    limit: Duration,
    report: &mut Report,
) -> bool
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let target = config::host_port(&forward.remote_host, forward.remote_port);
    let role = forward.role;
    let started = Instant::now();
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
    let not_postgres = format!(
        "something other than PostgreSQL answers at {target}: check the host and port of {} \
         (the add-on sets it)",
        forward.url_var
    );
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

pub(super) fn channel_advice(error: &ChannelError, forward: &Forward) -> String {
    let target = config::host_port(&forward.remote_host, forward.remote_port);
    match error {
        ChannelError::Refused { .. } => format!(
            "the SSH server could not connect to {target} for the {} ({}): the database may be \
             down or restarting; if it persists, contact the add-on's support",
            forward.role, forward.url_var
        ),
        _ => "the SSH session ended while the channel was being opened: retry".into(),
    }
}
