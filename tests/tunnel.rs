//! End-to-end behaviour of the tunnel against a real sshd and PostgreSQL.

mod support;

use std::time::{Duration, Instant};

use support::{connect, field, server_addr, KeyKind, Tunnel};

const START: Duration = Duration::from_secs(20);

fn spawn(vars: &std::collections::BTreeMap<String, String>, args: &[&str]) -> Tunnel {
    Tunnel::spawn(vars.iter(), args)
}

#[tokio::test(flavor = "multi_thread")]
async fn writer_and_reader_both_serve_queries() {
    let Some(lab) = support::lab() else { return };
    let db = lab.attachment("DATABASE");
    let tunnel = spawn(&db.vars, &[]);
    tunnel.wait_for(&["event=ssh-connected", "addon=DATABASE"], START);

    assert_eq!(server_addr(db.writer_port).await.unwrap(), "127.0.0.1");
    assert_eq!(
        server_addr(db.reader_port.unwrap()).await.unwrap(),
        "127.0.0.2"
    );
    // Several connections share the one session.
    let clients = futures_join(db.writer_port, 10).await;
    assert_eq!(clients, 10);
    assert_eq!(tunnel.count("event=ssh-connected"), 1);
    let listening = tunnel
        .lines()
        .iter()
        .filter(|l| l.contains("event=listening"))
        .count();
    assert_eq!(listening, 2);
}

async fn futures_join(port: u16, n: usize) -> usize {
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        tasks.spawn(async move {
            let client = connect(port).await.unwrap();
            let row = client
                .query_one("select $1::int + 1", &[&(i as i32)])
                .await
                .unwrap();
            assert_eq!(row.get::<_, i32>(0), i as i32 + 1);
        });
    }
    let mut done = 0;
    while let Some(result) = tasks.join_next().await {
        result.unwrap();
        done += 1;
    }
    done
}

#[tokio::test(flavor = "multi_thread")]
async fn two_addons_at_once_and_a_duplicate_attachment_served_once() {
    let Some(lab) = support::lab() else { return };
    let first = lab.attachment("DATABASE");
    let second = lab.attachment("BOREALIS_PG_RED");
    // The first add-on attached a second time under another name: same URL, same conn-info.
    let mut vars = first.vars.clone();
    vars.extend(second.vars.clone());
    for (key, value) in &first.vars {
        vars.insert(
            key.replacen("DATABASE", "BOREALIS_PG_BLUE", 1),
            value.clone(),
        );
    }
    let tunnel = spawn(&vars, &[]);
    tunnel.wait_for(&["event=ssh-connected", "addon=DATABASE"], START);
    tunnel.wait_for(&["event=ssh-connected", "addon=BOREALIS_PG_RED"], START);

    assert_eq!(server_addr(first.writer_port).await.unwrap(), "127.0.0.1");
    assert_eq!(server_addr(second.writer_port).await.unwrap(), "127.0.0.1");
    assert_eq!(
        server_addr(second.reader_port.unwrap()).await.unwrap(),
        "127.0.0.2"
    );

    let lines = tunnel.lines();
    assert_eq!(
        lines
            .iter()
            .filter(|l| l.contains("event=listening"))
            .count(),
        4
    );
    assert!(lines.iter().any(|l| l.contains("event=config-notice")
        && l.contains("BOREALIS_PG_BLUE_URL")
        && l.contains("served once")));
    assert!(!lines
        .iter()
        .any(|l| l.contains("addon=BOREALIS_PG_BLUE") && l.contains("ssh-connect")));
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_session_is_replaced_and_the_next_query_just_works() {
    let Some(lab) = support::lab() else { return };
    let db = lab.attachment("DATABASE");
    let tunnel = spawn(&db.vars, &[]);
    tunnel.wait_for(&["event=ssh-connected"], START);
    assert_eq!(server_addr(db.writer_port).await.unwrap(), "127.0.0.1");

    let killed_at = Instant::now();
    assert!(lab.sshd.signal_sessions(libc::SIGKILL) > 0);
    // No pause: the app's very next connection must work, at worst a little later.
    assert_eq!(server_addr(db.writer_port).await.unwrap(), "127.0.0.1");
    let recovered = killed_at.elapsed();
    tunnel.wait_for(&["event=ssh-disconnected"], START);
    tunnel.wait_for_nth(&["event=ssh-connected"], 2, START);
    eprintln!("dropped session: next query succeeded after {recovered:?}");
    assert!(
        recovered < Duration::from_secs(5),
        "recovery took {recovered:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn hung_server_is_detected_and_replaced_within_keepalive_budget() {
    let Some(lab) = support::lab() else { return };
    let db = lab.attachment("DATABASE");
    // The defaults: keepalive every 3 s, dead after 3 unanswered.
    let tunnel = spawn(&db.vars, &[]);
    tunnel.wait_for(&["event=ssh-connected"], START);
    let client = connect(db.writer_port).await.unwrap();
    client.simple_query("select 1").await.unwrap();

    let stopped_at = Instant::now();
    assert!(lab.sshd.signal_sessions(libc::SIGSTOP) > 0);
    let addr = server_addr(db.writer_port).await.unwrap();
    let recovered = stopped_at.elapsed();
    lab.sshd.signal_sessions(libc::SIGCONT);
    assert_eq!(addr, "127.0.0.1");
    let line = tunnel.wait_for(&["event=ssh-disconnected"], START);
    assert!(line.contains("no answer to keepalives"), "{line}");
    eprintln!("hung server: new session served a query after {recovered:?}");
    assert!(
        recovered <= Duration::from_secs(3 * 3 + 2),
        "took {recovered:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn server_down_for_ten_seconds_then_back_recovers_and_waiting_connections_succeed() {
    let Some(mut lab) = support::lab() else {
        return;
    };
    let db = lab.attachment("DATABASE");
    let tunnel = spawn(&db.vars, &[]);
    tunnel.wait_for(&["event=ssh-connected"], START);
    assert_eq!(server_addr(db.writer_port).await.unwrap(), "127.0.0.1");

    lab.sshd.stop();
    tunnel.wait_for(&["event=ssh-disconnected"], START);
    // Opened while the server is away: must wait, not be refused.
    let waiting = tokio::spawn(server_addr(db.writer_port));
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(
        !waiting.is_finished(),
        "the connection should still be waiting"
    );
    lab.sshd.restart();
    let restarted_at = Instant::now();
    let addr = tokio::time::timeout(Duration::from_secs(25), waiting)
        .await
        .expect("waiting connection served after the server came back")
        .unwrap()
        .unwrap();
    eprintln!(
        "server back: waiting connection served after {:?}",
        restarted_at.elapsed()
    );
    assert_eq!(addr, "127.0.0.1");
    assert!(tunnel.count("event=reconnect-scheduled") >= 2);
    // Backoff is capped at 10 s, so recovery after the restart cannot take much longer.
    assert!(restarted_at.elapsed() < Duration::from_secs(12));
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_host_key_never_forwards_and_says_so() {
    let Some(lab) = support::lab() else { return };
    let mut db = lab.attachment("DATABASE");
    let impostor = lab.sshd.new_client_key(KeyKind::Ed25519);
    db.set_conn_info("SSH_PUBLIC_HOST_KEY", &impostor.public);
    let tunnel = spawn(&db.vars, &["--connection-wait-timeout", "3s"]);
    let line = tunnel.wait_for(&["event=host-key-mismatch", "addon=DATABASE"], START);
    assert!(line.contains("refusing to forward"), "{line}");

    let result = server_addr(db.writer_port).await;
    assert!(
        result.is_err(),
        "a query went through a server with the wrong host key"
    );
    tunnel.wait_for(&["event=connection-wait-expired"], START);
    assert_eq!(tunnel.count("event=ssh-connected"), 0);
    // Our key was never offered to the impostor.
    assert!(
        !lab.sshd.log().contains("Accepted publickey"),
        "{}",
        lab.sshd.log()
    );
    // fail2ban-friendly: no quick retry after a rejection.
    let scheduled = tunnel.wait_for(&["event=reconnect-scheduled"], START);
    let delay: u64 = field(&scheduled, "delay_ms").parse().unwrap();
    assert!(delay >= 30_000, "{scheduled}");
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_client_key_is_reported_as_auth_failed() {
    let Some(lab) = support::lab() else { return };
    let mut db = lab.attachment("DATABASE");
    let stranger = lab.sshd.new_client_key(KeyKind::Ed25519);
    db.set_conn_info("SSH_USER_PRIVATE_KEY", &stranger.private);
    let tunnel = spawn(&db.vars, &["--connection-wait-timeout", "2s"]);
    let line = tunnel.wait_for(&["event=auth-failed", "addon=DATABASE"], START);
    assert!(line.contains("rejected SSH_USER_PRIVATE_KEY"), "{line}");
    assert!(server_addr(db.writer_port).await.is_err());
    let scheduled = tunnel.wait_for(&["event=reconnect-scheduled"], START);
    assert!(field(&scheduled, "delay_ms").parse::<u64>().unwrap() >= 30_000);
}

#[tokio::test(flavor = "multi_thread")]
async fn local_port_already_taken_names_the_variable_and_the_port() {
    let Some(lab) = support::lab() else { return };
    let db = lab.attachment("DATABASE");
    let squatter = std::net::TcpListener::bind(("127.0.0.1", db.writer_port)).unwrap();
    let mut vars = db.vars.clone();
    vars.remove("DATABASE_READONLY_URL");
    let mut tunnel = spawn(&vars, &[]);
    let status = tunnel
        .wait_exit(START)
        .expect("exits when nothing can be served");
    assert!(!status.success());
    let line = tunnel.wait_for(&["event=listen-failed"], START);
    assert!(line.contains("DATABASE_URL"), "{line}");
    assert!(line.contains(&format!("port={}", db.writer_port)), "{line}");
    assert!(
        line.contains("already in use") || line.contains("Address in use"),
        "{line}"
    );
    drop(squatter);
}

#[tokio::test(flavor = "multi_thread")]
async fn every_supported_key_type_and_encoding_authenticates() {
    let Some(lab) = support::lab() else { return };
    for kind in KeyKind::ALL {
        let key = lab.sshd.new_client_key(kind);
        lab.sshd.authorize(&key.public);
        let mut db = lab.attachment("DATABASE");
        // CRLF line ends, as a key pasted on Windows would have.
        let private = if kind == KeyKind::RsaPkcs1 {
            key.private.replace('\n', "\r\n")
        } else {
            key.private.clone()
        };
        db.set_conn_info("SSH_USER_PRIVATE_KEY", &private);
        let tunnel = spawn(&db.vars, &[]);
        tunnel.wait_for(&["event=ssh-connected"], START);
        assert_eq!(
            server_addr(db.writer_port).await.unwrap(),
            "127.0.0.1",
            "{kind:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn secrets_never_reach_the_logs() {
    let Some(lab) = support::lab() else { return };
    let mut db = lab.attachment("DATABASE");
    db.set(
        "BROKEN_TUNNEL_BPG_CONN_INFO",
        format!("SSH_USER_PRIVATE_KEY:={}", "x".repeat(10)),
    );
    db.set(
        "BROKEN_URL",
        "postgres://u:hunter2-secret@pg-tunnel.borealis-data.com:1/db",
    );
    let tunnel = spawn(&db.vars, &[]);
    tunnel.wait_for(&["event=ssh-connected"], START);
    server_addr(db.writer_port).await.unwrap();
    let output = tunnel.lines().join("\n");
    assert!(output.contains("event=config-error"));
    let key_body: Vec<&str> = lab.client_key.private.lines().skip(1).take(3).collect();
    for secret in key_body
        .iter()
        .copied()
        .chain(["hunter2-secret", support::DB_PASSWORD, "s3cr"])
    {
        assert!(
            !output.contains(secret),
            "secret {secret:?} in output:\n{output}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_forward_the_server_refuses_fails_fast_and_the_other_still_works() {
    let Some(lab) = support::lab() else { return };
    let mut db = lab.attachment("DATABASE");
    // Outside the server's PermitOpen, as a mistyped writer host would be.
    db.set_conn_info("POSTGRES_WRITER_HOST", "127.0.0.3");
    let tunnel = spawn(&db.vars, &[]);
    tunnel.wait_for(&["event=ssh-connected"], START);
    let started = Instant::now();
    assert!(server_addr(db.writer_port).await.is_err());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the refusal should not wait"
    );
    let line = tunnel.wait_for(&["event=channel-refused"], START);
    assert!(line.contains("127.0.0.3"), "{line}");
    assert_eq!(
        server_addr(db.reader_port.unwrap()).await.unwrap(),
        "127.0.0.2"
    );
    assert_eq!(tunnel.count("event=ssh-connected"), 1);
}

/// A tunnel that declares a silent server dead after 0.9 s (300 ms × 3).
fn spawn_with_short_silence_budget(db: &support::Attachment) -> Tunnel {
    let tunnel = spawn(
        &db.vars,
        &["--keepalive-interval", "300ms", "--keepalive-count", "3"],
    );
    tunnel.wait_for(&["event=ssh-connected"], START);
    tunnel
}

/// psql running an endless `COPY t FROM STDIN` through the writer forward, fed by a thread
/// that writes until psql's stdin closes.
fn endless_upload(db: &support::Attachment) -> (std::process::Child, std::thread::JoinHandle<()>) {
    let mut psql = support::psql(db, &["CREATE TEMP TABLE t (x text)", "COPY t FROM STDIN"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = psql.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
        let line = format!("{}\n", "y".repeat(1000));
        while std::io::Write::write_all(&mut stdin, line.as_bytes()).is_ok() {}
    });
    (psql, writer)
}

/// The child's exit status, or `None` if it is still running after `timeout`.
fn exit_within(
    child: &mut std::process::Child,
    timeout: Duration,
) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_stops_reading_does_not_get_the_session_killed() {
    let Some(lab) = support::lab() else { return };
    let db = lab.attachment("DATABASE");
    // The stalled client below stays stalled for three times this budget, while the server's
    // keepalive replies must still be heard.
    let tunnel = spawn_with_short_silence_budget(&db);

    // psql writing ~50 MB into a pipe nobody reads: it blocks on stdout, stops reading its
    // socket, and the tunnel's channel backs up until its SSH window is full.
    let psql = support::psql(
        &db,
        &["COPY (SELECT repeat('x', 1000) FROM generate_series(1, 50000)) TO STDOUT"],
    )
    .stdout(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    std::thread::sleep(Duration::from_secs(3));

    let (_, lines) = support::read_output(psql).join().unwrap();
    assert_eq!(
        lines, 50_000,
        "the whole result arrives once the client reads"
    );
    assert_eq!(
        tunnel.count("event=ssh-disconnected"),
        0,
        "{:#?}",
        tunnel.lines()
    );
    // And the session is still the first one, serving new connections.
    assert_eq!(server_addr(db.writer_port).await.unwrap(), "127.0.0.1");
    assert_eq!(tunnel.count("event=ssh-connected"), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upload_stuck_on_a_dead_session_is_cut_not_left_hanging() {
    let Some(lab) = support::lab() else { return };
    let db = lab.attachment("DATABASE");
    let tunnel = spawn_with_short_silence_budget(&db);

    // An endless COPY FROM STDIN: once the server hangs, the SSH window runs out and the
    // tunnel's copy waits for window that never comes.
    let (mut psql, writer) = endless_upload(&db);
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        psql.try_wait().unwrap().is_none(),
        "the upload is under way"
    );

    let stopped_at = Instant::now();
    assert!(lab.sshd.signal_sessions(libc::SIGSTOP) > 0);
    let exited = exit_within(&mut psql, Duration::from_secs(10));
    lab.sshd.signal_sessions(libc::SIGCONT);
    if exited.is_none() {
        let _ = psql.kill();
    }
    let cut_after = stopped_at.elapsed();
    let _ = psql.wait();
    writer.join().unwrap();
    assert!(
        exited.is_some_and(|s| !s.success()),
        "the app must see its connection fail, not hang ({cut_after:?})"
    );
    eprintln!("upload on a hung session: connection cut after {cut_after:?}");
    tunnel.wait_for(&["event=ssh-disconnected"], START);
    // The replacement session serves the app's next connection.
    assert_eq!(server_addr(db.writer_port).await.unwrap(), "127.0.0.1");
}

/// Counts the client backends PostgreSQL has besides the one asking.
async fn other_backends(direct: &tokio_postgres::Client) -> i64 {
    direct
        .query_one(
            "select count(*) from pg_stat_activity \
             where backend_type = 'client backend' and pid <> pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connection_closed_on_either_side_ends_on_the_other() {
    let Some(lab) = support::lab() else { return };
    let db = lab.attachment("DATABASE");
    let tunnel = spawn(&db.vars, &[]);
    tunnel.wait_for(&["event=ssh-connected"], START);
    let direct = connect(lab.pg.port).await.unwrap();

    // The app hangs up: nothing of its connections stays open at the database.
    for _ in 0..20 {
        let client = connect(db.writer_port).await.unwrap();
        client.simple_query("select 1").await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while other_backends(&direct).await > 0 {
        assert!(
            Instant::now() < deadline,
            "database connections left open after the app closed them"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The database hangs up (an admin terminates the backend): the app learns at once instead
    // of waiting on a connection nobody serves.
    let client = connect(db.writer_port).await.unwrap();
    let pid: i32 = client
        .query_one("select pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    direct
        .execute("select pg_terminate_backend($1, 5000)", &[&pid])
        .await
        .unwrap();
    let next = tokio::time::timeout(Duration::from_secs(5), client.simple_query("select 1"))
        .await
        .expect("the app's connection was left hanging after the database closed it");
    assert!(next.is_err(), "a terminated backend still answered");
    assert!(client.is_closed());
    assert_eq!(tunnel.count("event=ssh-connected"), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upload_to_a_backend_that_goes_away_fails_instead_of_hanging() {
    let Some(lab) = support::lab() else { return };
    let db = lab.attachment("DATABASE");
    let tunnel = spawn(&db.vars, &[]);
    tunnel.wait_for(&["event=ssh-connected"], START);
    let direct = connect(lab.pg.port).await.unwrap();

    // An endless COPY FROM STDIN, then the database drops the connection mid-upload (a
    // failover, an admin): once sshd closes the channel the app's data has nowhere to go.
    let (mut psql, writer) = endless_upload(&db);
    let deadline = Instant::now() + Duration::from_secs(10);
    let copying = "select pid from pg_stat_activity where query = 'COPY t FROM STDIN'";
    let pid: i32 = loop {
        if let Some(row) = direct.query_opt(copying, &[]).await.unwrap() {
            break row.get(0);
        }
        assert!(Instant::now() < deadline, "the upload never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    direct
        .execute("select pg_terminate_backend($1, 5000)", &[&pid])
        .await
        .unwrap();

    let exited = exit_within(&mut psql, Duration::from_secs(10));
    if exited.is_none() {
        let _ = psql.kill();
    }
    let _ = psql.wait();
    writer.join().unwrap();
    assert!(
        exited.is_some_and(|s| !s.success()),
        "the app must see its upload fail, not hang"
    );
    // Only that connection ended: the session goes on serving.
    assert_eq!(server_addr(db.writer_port).await.unwrap(), "127.0.0.1");
    assert_eq!(tunnel.count("event=ssh-connected"), 1);
    // And nothing of it lingers: with no connection open, a stop does not wait for any (a
    // lingering one held it until the 2 s grace cut it; an empty stop takes tens of ms).
    let mut tunnel = tunnel;
    let stopping = Instant::now();
    tunnel.signal(libc::SIGTERM);
    assert!(
        tunnel.wait_exit(Duration::from_secs(1)).is_some(),
        "a stop waited on a connection the app had already left"
    );
    eprintln!("stopped {:?} after SIGTERM", stopping.elapsed());
}

#[tokio::test(flavor = "multi_thread")]
async fn running_out_of_descriptors_is_said_once_per_interval_and_serving_resumes() {
    let Some(lab) = support::lab() else { return };
    let db = lab.attachment("DATABASE");
    // Few descriptors: once they are used up, every accept fails with EMFILE while the
    // connections pile up in the listen queue.
    let tunnel = Tunnel::bash(db.vars.iter(), "ulimit -n 24; exec bpg-tunnel");
    tunnel.wait_for(&["event=ssh-connected"], START);
    let held: Vec<_> = (0..40)
        .map(|_| std::net::TcpStream::connect(("127.0.0.1", db.writer_port)).unwrap())
        .collect();
    tunnel.wait_for(&["event=accept-failed"], START);
    std::thread::sleep(Duration::from_secs(3));
    let lines = tunnel.count("event=accept-failed");
    assert_eq!(lines, 1, "{:#?}", tunnel.lines());
    drop(held);
    let started = Instant::now();
    while let Err(error) = server_addr(db.writer_port).await {
        assert!(started.elapsed() < START, "serving did not resume: {error}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pinned_rsa_or_ecdsa_host_key_works_on_a_server_that_also_has_ed25519() {
    let Some(mut lab) = support::lab() else {
        return;
    };
    let rsa = lab.sshd.add_host_key(KeyKind::RsaOpenssh);
    let ecdsa = lab.sshd.add_host_key(KeyKind::EcdsaP256Openssh);
    for pinned in [rsa.public, ecdsa.public] {
        let mut db = lab.attachment("DATABASE");
        db.set_conn_info("SSH_PUBLIC_HOST_KEY", &pinned);
        let tunnel = spawn(&db.vars, &[]);
        tunnel.wait_for(&["event=ssh-connected"], START);
        assert_eq!(server_addr(db.writer_port).await.unwrap(), "127.0.0.1");
        assert_eq!(tunnel.count("event=host-key-mismatch"), 0, "{pinned}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_that_takes_only_sha1_rsa_signatures_is_refused_and_told_so() {
    let Some(mut lab) = support::lab() else {
        return;
    };
    // Its host key signed with SHA-1 only.
    let rsa = lab.sshd.add_host_key(KeyKind::RsaOpenssh);
    lab.sshd.configure("HostKeyAlgorithms ssh-rsa");
    let mut db = lab.attachment("DATABASE");
    db.set_conn_info("SSH_PUBLIC_HOST_KEY", &rsa.public);
    let tunnel = spawn(&db.vars, &[]);
    let line = tunnel.wait_for(&["event=weak-algorithm"], START);
    assert!(line.contains("host key"), "{line}");
    assert!(line.contains("level=error"), "{line}");
    assert_eq!(tunnel.count("event=ssh-connected"), 0);
    drop(tunnel);

    // Our RSA key taken with SHA-1 signatures only: never signed that way. OpenSSH before 9.6
    // still advertises the SHA-2 ones, so it refuses us itself (auth-failed); later ones
    // advertise ssh-rsa alone, and we refuse them first (weak-algorithm).
    let Some(mut lab) = support::lab() else {
        return;
    };
    let client = lab.sshd.new_client_key(KeyKind::RsaOpenssh);
    lab.sshd.authorize(&client.public);
    lab.sshd.configure("PubkeyAcceptedAlgorithms ssh-rsa");
    let mut db = lab.attachment("DATABASE");
    db.set_conn_info("SSH_USER_PRIVATE_KEY", &client.private);
    let tunnel = spawn(&db.vars, &[]);
    let started = std::time::Instant::now();
    while tunnel.count("event=auth-failed") + tunnel.count("event=weak-algorithm") == 0 {
        assert!(started.elapsed() < START, "{:#?}", tunnel.lines());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(tunnel.count("event=ssh-connected"), 0);
    let log = lab.sshd.log();
    assert!(!log.contains("Accepted publickey"), "{log}");
}
