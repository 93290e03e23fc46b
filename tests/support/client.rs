//! Database clients through the tunnel.

use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

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

/// A pool of clients running `select 1` in a loop through a port, each reconnecting after an
/// error: the load a fault is applied under. Runs on a runtime of its own, in a thread.
pub struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Load {
    pub fn start(port: u16, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let (stop2, ok2, failed2) = (stop.clone(), ok.clone(), failed.clone());
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let mut tasks = Vec::new();
                for _ in 0..clients {
                    let (stop, ok, failed) = (stop2.clone(), ok2.clone(), failed2.clone());
                    tasks.push(tokio::spawn(async move {
                        let bound = Duration::from_secs(10);
                        while !stop.load(Ordering::Relaxed) {
                            let client = match tokio::time::timeout(bound, connect(port)).await {
                                Ok(Ok(client)) => client,
                                _ => {
                                    failed.fetch_add(1, Ordering::Relaxed);
                                    tokio::time::sleep(Duration::from_millis(100)).await;
                                    continue;
                                }
                            };
                            while !stop.load(Ordering::Relaxed) {
                                let query = client.query_one("select 1", &[]);
                                match tokio::time::timeout(bound, query).await {
                                    Ok(Ok(_)) => {
                                        ok.fetch_add(1, Ordering::Relaxed);
                                        // A steady load, not one that takes both cores from
                                        // the tunnel and the tests' other servers.
                                        tokio::time::sleep(Duration::from_millis(5)).await;
                                    }
                                    _ => {
                                        failed.fetch_add(1, Ordering::Relaxed);
                                        break;
                                    }
                                }
                            }
                        }
                    }));
                }
                for task in tasks {
                    let _ = task.await;
                }
            });
        });
        Load {
            stop,
            ok,
            failed,
            thread: Some(thread),
        }
    }

    pub fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }

    /// Waits until `more` queries beyond now have succeeded; how long that took.
    pub fn wait_progress(&self, more: u64, timeout: Duration) -> Option<Duration> {
        let started = Instant::now();
        let target = self.ok() + more;
        while started.elapsed() < timeout {
            if self.ok() >= target {
                return Some(started.elapsed());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    /// The longest stretch without a successful query within `window`, sampled every 10 ms.
    pub fn longest_stall(&self, window: Duration) -> Duration {
        let started = Instant::now();
        let (mut last_ok, mut last_change, mut longest) =
            (self.ok(), Instant::now(), Duration::ZERO);
        while started.elapsed() < window {
            std::thread::sleep(Duration::from_millis(10));
            let ok = self.ok();
            if ok != last_ok {
                last_ok = ok;
                longest = longest.max(last_change.elapsed());
                last_change = Instant::now();
            }
        }
        longest.max(last_change.elapsed())
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// psql to 127.0.0.1:`port` as the lab's database user, for a tunnel that is not bpg-tunnel's
/// (`ssh -L`), running each command in turn.
pub fn psql_at(port: u16, commands: &[&str]) -> Command {
    let mut psql = Command::new("psql");
    psql.args(["-X", "-h", "127.0.0.1", "-p", &port.to_string()])
        .args(["-U", "postgres", "-d", "postgres"])
        .env("PGPASSWORD", DB_PASSWORD);
    for command in commands {
        psql.args(["-c", command]);
    }
    psql
}

/// pgbench's TPC-B-like load through a port, throttled to a steady rate, in runs of a few
/// seconds, each started again at once when the last ends. pgbench gives up on a client whose
/// connection breaks and never reconnects it; a new run is what an app's pool does instead.
pub struct Pgbench {
    stop: Arc<AtomicBool>,
    totals: Arc<PgbenchTotals>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Default)]
pub struct PgbenchTotals {
    /// Transactions committed, as the runs reported them.
    pub transactions: AtomicU64,
    /// Runs that lost clients to a broken connection (pgbench's exit status 2).
    pub cut_short: AtomicU64,
    /// Runs that could not start (any other failure).
    pub failed: AtomicU64,
    pub runs: AtomicU64,
}

impl Pgbench {
    /// Creates pgbench's tables (scale 1) through `port`, then starts `clients` clients at
    /// `rate` transactions per second in all.
    pub fn start(port: u16, clients: usize, rate: u32) -> Pgbench {
        let init = Command::new("pgbench")
            .args([
                "-i",
                "-q",
                "-s",
                "1",
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .args(["-U", "postgres", "postgres"])
            .env("PGPASSWORD", DB_PASSWORD)
            .output()
            .unwrap();
        assert!(
            init.status.success(),
            "pgbench -i: {}",
            String::from_utf8_lossy(&init.stderr)
        );
        let stop = Arc::new(AtomicBool::new(false));
        let totals = Arc::new(PgbenchTotals::default());
        let (stop2, totals2) = (stop.clone(), totals.clone());
        let thread = std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                let mut pgbench = Command::new("pgbench");
                super::die_with_parent(&mut pgbench);
                let output = pgbench
                    .args(["-n", "-T", "5", "-R", &rate.to_string()])
                    .args(["-c", &clients.to_string(), "-j", "2"])
                    .args(["-h", "127.0.0.1", "-p", &port.to_string()])
                    .args(["-U", "postgres", "postgres"])
                    .env("PGPASSWORD", DB_PASSWORD)
                    .output()
                    .unwrap();
                let stdout = String::from_utf8_lossy(&output.stdout);
                let processed = stdout
                    .lines()
                    .find_map(|line| {
                        line.strip_prefix("number of transactions actually processed: ")
                    })
                    .and_then(|rest| rest.split(['/', ' ']).next()?.parse::<u64>().ok())
                    .unwrap_or(0);
                totals2.transactions.fetch_add(processed, Ordering::Relaxed);
                totals2.runs.fetch_add(1, Ordering::Relaxed);
                match output.status.code() {
                    Some(0) => {}
                    Some(2) => {
                        totals2.cut_short.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {
                        totals2.failed.fetch_add(1, Ordering::Relaxed);
                        // Not a spawn loop while the way to the database is broken.
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            }
        });
        Pgbench {
            stop,
            totals,
            thread: Some(thread),
        }
    }

    pub fn totals(&self) -> &PgbenchTotals {
        &self.totals
    }

    /// Stops after the run under way; the totals are final once this returns.
    pub fn finish(mut self) -> Arc<PgbenchTotals> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            thread.join().unwrap();
        }
        self.totals.clone()
    }
}

impl Drop for Pgbench {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
