//! Database clients through the tunnel.

use std::process::{Child, Command};
use std::time::Duration;

use super::{Attachment, DB_PASSWORD};

pub async fn connect(port: u16) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(port)
        .user("postgres")
        .password(DB_PASSWORD)
        .dbname("postgres")
        .connect_timeout(Duration::from_secs(60));
    let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

/// psql through the attachment's writer forward, running each command in turn.
pub fn psql(db: &Attachment, commands: &[&str]) -> Command {
    let mut psql = Command::new("psql");
    psql.arg(psql_url(&db.vars[&format!("{}_URL", db.prefix)]))
        .arg("-X");
    for command in commands {
        psql.args(["-c", command]);
    }
    psql
}

/// Reads a client's piped stdout to its end in a thread, then requires the client to succeed;
/// returns the bytes and lines read.
pub fn read_output(mut client: Child) -> std::thread::JoinHandle<(u64, u64)> {
    let mut out = client.stdout.take().unwrap();
    std::thread::spawn(move || {
        let (mut bytes, mut lines) = (0u64, 0u64);
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = std::io::Read::read(&mut out, &mut buf).unwrap();
            if n == 0 {
                break;
            }
            bytes += n as u64;
            lines += buf[..n].iter().filter(|b| **b == b'\n').count() as u64;
        }
        assert!(client.wait().unwrap().success(), "the client failed");
        (bytes, lines)
    })
}

/// A libpq URL usable in the lab (which has no DNS for the add-on's host name).
pub fn psql_url(url: &str) -> String {
    format!("{url}?hostaddr=127.0.0.1")
}

/// Connects and returns the address PostgreSQL saw the connection arrive on (127.0.0.1 for the
/// writer host, 127.0.0.2 for the reader host).
pub async fn server_addr(port: u16) -> Result<String, tokio_postgres::Error> {
    let client = connect(port).await?;
    let row = client
        .query_one("select host(inet_server_addr())", &[])
        .await?;
    Ok(row.get(0))
}
