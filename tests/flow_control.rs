//! A client that stops reading (or a database that stops accepting) holds up its own connection
//! and nothing else: the other connections of the add-on, the session's liveness and the
//! daemon's memory are unaffected. Each test runs alone (see `SERIAL`): they measure latency and
//! memory, which other tests' load on the same two cores would blur.

mod support;

use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::{connect, Attachment, Tunnel};

const START: Duration = Duration::from_secs(20);
/// The yardstick: `ssh -L` keeps probes under 50 ms while a client is stalled.
const WORST_PROBE: Duration = Duration::from_millis(250);
/// bpg-tunnel's per-channel window (`src/ssh.rs`): the most a stalled client may cost.
const WINDOW_BYTES: u64 = 2 * 1024 * 1024;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn spawn(db: &Attachment, args: &[&str]) -> Tunnel {
    let tunnel = Tunnel::spawn(db.vars.iter(), args);
    tunnel.wait_for(&["event=ssh-connected"], START);
    tunnel
}

/// psql through the writer forward, stopping at the first error.
fn psql(db: &Attachment, command: &str) -> Command {
    let mut psql = support::psql(db, &[command]);
    psql.args(["-v", "ON_ERROR_STOP=1"]);
    psql
}

/// The query of a `rows`-row result of about 207 bytes a row, and its exact size as COPY text.
fn big_result(rows: u64) -> (String, u64) {
    let query =
        format!("COPY (SELECT repeat('x', 200) || g FROM generate_series(1, {rows}) g) TO STDOUT");
    let digits: u64 = (1..=rows).map(|g| g.to_string().len() as u64).sum();
    (query, rows * 201 + digits)
}

/// psql running `query` with its output into a pipe that nobody reads yet: it blocks on the
/// pipe, stops reading its socket, and the tunnel's channel backs up behind it.
fn stalled_client(db: &Attachment, query: &str) -> Child {
    psql(db, query)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// A new connection and `select 1` through the tunnel every 200 ms for `period`, as an app's
/// other requests would; returns each probe's time, failing on the first error.
async fn probe(port: u16, period: Duration) -> Vec<Duration> {
    let mut times = Vec::new();
    let until = Instant::now() + period;
    while Instant::now() < until {
        let started = Instant::now();
        let client = tokio::time::timeout(Duration::from_secs(30), connect(port))
            .await
            .expect("a probe could not connect for 30 s")
            .expect("a probe's connection failed");
        client.simple_query("select 1").await.unwrap();
        times.push(started.elapsed());
        drop(client);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    times
}

fn report(what: &str, times: &[Duration]) -> Duration {
    let worst = times.iter().max().copied().unwrap_or_default();
    let mut sorted = times.to_vec();
    sorted.sort();
    let median = sorted.get(sorted.len() / 2).copied().unwrap_or_default();
    eprintln!(
        "{what}: {} probes, median {median:?}, worst {worst:?}",
        times.len()
    );
    worst
}

/// The RSS once it has stopped growing for a second.
fn settled_rss(pid: i32) -> u64 {
    let mut last = support::rss_bytes(pid);
    for _ in 0..30 {
        std::thread::sleep(Duration::from_secs(1));
        let now = support::rss_bytes(pid);
        if now <= last {
            return now;
        }
        last = now;
    }
    last
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_stops_reading_stalls_no_other_connection() {
    let _serial = SERIAL.lock().await;
    let Some(lab) = support::lab() else { return };
    let db = lab.attachment("DATABASE");
    let tunnel = spawn(&db, &[]);

    // About 207 MB, held back for the 10 s of probes.
    let rows = 1_000_000;
    let (query, size) = big_result(rows);
    let stalled = stalled_client(&db, &query);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let times = probe(db.writer_port, Duration::from_secs(10)).await;
    let worst = report("probes while a client is stalled", &times);

    let (bytes, lines) = support::read_output(stalled).join().unwrap();
    assert_eq!(
        (lines, bytes),
        (rows, size),
        "the stalled client gets every row once it reads"
    );
    assert!(times.len() >= 30, "only {} probes in 10 s", times.len());
    assert!(
        worst <= WORST_PROBE,
        "a probe took {worst:?} while another client was stalled"
    );
    assert_eq!(tunnel.count("event=ssh-disconnected"), 0);
    assert_eq!(tunnel.count("event=ssh-connected"), 1);
}

/// The upload direction: the tunnel's writer waits for the server's window of that channel
/// alone. This already held before the flow-control patch; it guards against a regression.
#[tokio::test(flavor = "multi_thread")]
async fn an_upload_the_database_stops_accepting_stalls_no_other_connection() {
    let _serial = SERIAL.lock().await;
    let Some(lab) = support::lab() else { return };
    let db = lab.attachment("DATABASE");
    let tunnel = spawn(&db, &[]);

    let direct = connect(lab.pg.port).await.unwrap();
    direct
        .batch_execute("CREATE TABLE upload (k int PRIMARY KEY, pad text)")
        .await
        .unwrap();
    // Another transaction holds key 1: the COPY's first row waits for it, and PostgreSQL stops
    // reading the upload while psql keeps sending.
    let blocker = connect(lab.pg.port).await.unwrap();
    blocker
        .batch_execute("BEGIN; INSERT INTO upload VALUES (1, 'held')")
        .await
        .unwrap();

    let rows = 100_000u32;
    let mut upload = psql(&db, "COPY upload FROM STDIN")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = upload.stdin.take().unwrap();
    // About 100 MB: far more than the socket buffers and the SSH window between psql and the
    // database.
    let feeder = std::thread::spawn(move || {
        let pad = "y".repeat(1000);
        for k in 1..=rows {
            stdin.write_all(format!("{k}\t{pad}\n").as_bytes()).unwrap();
        }
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!feeder.is_finished(), "the upload is held up");

    let times = probe(db.writer_port, Duration::from_secs(10)).await;
    let worst = report("probes while an upload is held up", &times);

    blocker.batch_execute("ROLLBACK").await.unwrap();
    feeder.join().unwrap();
    let output = upload.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let loaded: i64 = direct
        .query_one("SELECT count(*) FROM upload", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(loaded, i64::from(rows), "every uploaded row arrives");
    assert!(
        worst <= WORST_PROBE,
        "a probe took {worst:?} while an upload was held up"
    );
    assert_eq!(tunnel.count("event=ssh-disconnected"), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hung_server_is_replaced_in_time_even_while_a_client_is_stalled() {
    let _serial = SERIAL.lock().await;
    let Some(lab) = support::lab() else { return };
    let db = lab.attachment("DATABASE");
    // Dead after 0.9 s of silence (300 ms × 3).
    let tunnel = spawn(
        &db,
        &["--keepalive-interval", "300ms", "--keepalive-count", "3"],
    );
    let (query, _) = big_result(1_000_000);
    let mut stalled = stalled_client(&db, &query);
    // Long enough for the stall to reach the SSH window, and for the old "the clock stops while
    // a client is stalled" rule to have kicked in.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        tunnel.count("event=ssh-disconnected"),
        0,
        "a stall is not a fault"
    );

    let stopped_at = Instant::now();
    assert!(lab.sshd.signal_sessions(libc::SIGSTOP) > 0);
    let served = tokio::time::timeout(Duration::from_secs(20), connect(db.writer_port)).await;
    let recovered = stopped_at.elapsed();
    lab.sshd.signal_sessions(libc::SIGCONT);
    let _ = stalled.kill();
    let _ = stalled.wait();
    let client = served
        .expect("no new session within 20 s")
        .expect("connection failed");
    client.simple_query("select 1").await.unwrap();
    let line = tunnel.wait_for(&["event=ssh-disconnected"], START);
    assert!(line.contains("no answer to keepalives"), "{line}");
    eprintln!("hung server while a client was stalled: served again after {recovered:?}");
    assert!(
        recovered <= Duration::from_millis(900) + Duration::from_secs(2),
        "took {recovered:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn twenty_stalled_clients_cost_at_most_a_window_each() {
    let _serial = SERIAL.lock().await;
    let Some(lab) = support::lab() else { return };
    let db = lab.attachment("DATABASE");
    let tunnel = spawn(&db, &[]);
    // One connection first, so that idle includes what serving one costs.
    let (query, size) = big_result(1_000);
    let (bytes, _) = support::read_output(stalled_client(&db, &query))
        .join()
        .unwrap();
    assert_eq!(bytes, size);
    let idle = settled_rss(tunnel.pid());

    // About 31 MB each: more than the window plus every socket buffer on the way.
    let rows = 150_000;
    let (query, size) = big_result(rows);
    let mut clients: Vec<Child> = (0..20).map(|_| stalled_client(&db, &query)).collect();
    // Every backend blocked on its socket: each stream has backed up as far as it can.
    let direct = connect(lab.pg.port).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let blocked: i64 = direct
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'ClientWrite'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if blocked == 20 {
            break;
        }
        if Instant::now() >= deadline {
            // What the rest were doing: a client gone, or a backend waiting on something else.
            let exited: Vec<String> = clients
                .iter_mut()
                .filter_map(|client| client.try_wait().ok().flatten())
                .map(|status| status.to_string())
                .collect();
            let backends: Vec<String> = direct
                .query(
                    "SELECT coalesce(wait_event, state, '?') FROM pg_stat_activity \
                     WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()",
                    &[],
                )
                .await
                .unwrap()
                .iter()
                .map(|row| row.get(0))
                .collect();
            panic!(
                "only {blocked} of 20 clients stalled; clients exited: {exited:?}; backends: \
                 {backends:?}; the tunnel said:\n{}",
                tunnel.lines().join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stalled = settled_rss(tunnel.pid());
    let bound = 20 * WINDOW_BYTES + 10 * 1024 * 1024;
    eprintln!(
        "RSS: idle {:.1} MB, 20 stalled clients {:.1} MB (bound {:.1} MB)",
        idle as f64 / 1e6,
        stalled as f64 / 1e6,
        bound as f64 / 1e6
    );
    // Each stalled client holds one window of data; the rest is its connection's buffers.
    let growth = stalled.saturating_sub(idle);
    assert!(
        growth < bound,
        "20 stalled clients took {growth} bytes over idle"
    );
    // The debug build's own pages make its idle RSS several times the release binary's.
    if support::is_release_binary() {
        assert!(stalled < bound, "RSS {stalled} with 20 stalled clients");
    }

    let readers: Vec<_> = clients.into_iter().map(support::read_output).collect();
    for reader in readers {
        assert_eq!(reader.join().unwrap(), (size, rows));
    }
    let after = settled_rss(tunnel.pid());
    eprintln!("RSS after they read: {:.1} MB", after as f64 / 1e6);
    assert!(
        after < idle + 4 * 1024 * 1024,
        "RSS {after} after the clients read, {idle} idle"
    );
}
