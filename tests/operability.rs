//! Operating a running tunnel against the lab: `bpg-tunnel status`, the metrics lines, the
//! HTTP health endpoint, what "ready" means, and how much is logged.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{connect, field, status, status_json, KeyKind, Tunnel, DB_PASSWORD};

const START: Duration = Duration::from_secs(20);

/// Polls `status --json` until `done` holds of the first add-on, or panics after `timeout`.
fn wait_status(state: &Path, timeout: Duration, done: impl Fn(&Value) -> bool) -> (i32, Value) {
    let deadline = Instant::now() + timeout;
    loop {
        let (code, json) = status_json(state);
        if done(&json["addons"][0]) {
            return (code, json);
        }
        assert!(
            Instant::now() < deadline,
            "status never got there: {json:#}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn assert_no_secret(lab: &support::Lab, text: &str) {
    assert!(
        !text.contains(DB_PASSWORD),
        "the database password leaked: {text}"
    );
    for line in lab.client_key.private.lines().skip(1).take(3) {
        assert!(!text.contains(line), "the private key leaked: {text}");
    }
}

/// `count` connections through `port`, one after another, each running `sql` once.
async fn workload(port: u16, count: usize, sql: &str) {
    for _ in 0..count {
        let client = connect(port).await.expect("connect through the tunnel");
        client
            .simple_query(sql)
            .await
            .expect("query through the tunnel");
    }
}

fn dyno_vars(db: &support::Attachment, state: &Path) -> BTreeMap<String, String> {
    let mut vars = db.vars.clone();
    vars.insert(
        "BPG_TUNNEL_STATE_DIR".into(),
        state.to_str().unwrap().into(),
    );
    vars
}

#[tokio::test(flavor = "multi_thread")]
async fn status_of_the_daemon_counts_a_reconnect_after_a_server_side_kill_and_a_server_down() {
    let Some(mut lab) = support::lab() else {
        return;
    };
    let db = lab.attachment("DATABASE");
    let state = tempfile::tempdir().unwrap();
    let vars = dyno_vars(&db, state.path());
    let dyno = Tunnel::bash(
        &vars,
        "bpg-tunnel start --owner-pid $$; echo booted; sleep 120",
    );
    dyno.wait_for(&["booted"], START);
    workload(db.writer_port, 3, "select 1").await;

    let (code, json) = wait_status(state.path(), START, |a| a["connections"]["open"] == 0);
    assert_eq!(code, 0, "{json:#}");
    assert_eq!(json["running"], true);
    assert_eq!(json["all_up"], true);
    assert_eq!(json["phase"], "serving");
    let addon = &json["addons"][0];
    assert_eq!(addon["addon"], "DATABASE");
    assert_eq!(addon["server"], format!("127.0.0.1:{}", lab.sshd.port));
    assert_eq!(addon["session"]["up"], true);
    assert_eq!(addon["reconnects"], 0);
    assert_eq!(addon["connections"]["accepted"], 3);
    assert!(addon["bytes"]["down"].as_u64().unwrap() > 0);
    let human = status(state.path(), &[]);
    assert_eq!(human.code, 0);
    assert!(
        human.stdout.contains("✓ DATABASE: SSH session up since "),
        "{}",
        human.stdout
    );
    assert!(human.stdout.contains("reconnects: 0"), "{}", human.stdout);
    assert!(
        human.stdout.ends_with("\neverything is up\n"),
        "{}",
        human.stdout
    );

    // The server drops the session: the daemon replaces it, and says so.
    assert!(lab.sshd.signal_sessions(libc::SIGKILL) > 0);
    let (code, json) = wait_status(state.path(), START, |a| {
        a["reconnects"] == 1 && a["session"]["up"] == true
    });
    assert_eq!(code, 0, "{json:#}");
    let error = json["addons"][0]["session"]["last_error"]["error"]
        .as_str()
        .unwrap()
        .to_owned();
    let human = status(state.path(), &[]);
    eprintln!("{}", human.stdout);
    assert!(human.stdout.contains("reconnects: 1"), "{}", human.stdout);
    assert!(
        human.stdout.contains("last error (") && human.stdout.contains(&error),
        "{}",
        human.stdout
    );

    // The server goes away: status says which add-on is down and why, and exits 2.
    lab.sshd.stop();
    let (code, json) = wait_status(state.path(), START, |a| a["session"]["up"] == false);
    assert_eq!(code, 2, "{json:#}");
    assert_eq!(json["all_up"], false);
    let human = status(state.path(), &[]);
    eprintln!("{}", human.stdout);
    assert_eq!(human.code, 2);
    assert!(
        human.stdout.contains("✗ DATABASE: SSH session down since "),
        "{}",
        human.stdout
    );
    assert!(
        human.stdout.ends_with("\nnot everything is up\n"),
        "{}",
        human.stdout
    );
    assert_no_secret(&lab, &human.stdout);
    assert_no_secret(&lab, &json.to_string());
}

#[test]
fn status_with_no_tunnel_running_says_so_and_exits_1() {
    let state = tempfile::tempdir().unwrap();
    let human = status(state.path(), &[]);
    assert_eq!(human.code, 1);
    assert!(
        human.stdout.starts_with("no bpg-tunnel is running here"),
        "{}",
        human.stdout
    );
    let (code, json) = status_json(state.path());
    assert_eq!(code, 1);
    assert_eq!(json["running"], false);
}

/// The l2met pairs of one metrics line.
fn pairs(line: &str) -> BTreeMap<String, String> {
    line.split_whitespace()
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn sum(lines: &[BTreeMap<String, String>], key: &str) -> u64 {
    lines
        .iter()
        .map(|l| {
            l.get(key)
                .unwrap_or_else(|| panic!("no {key} in {l:?}"))
                .parse::<u64>()
                .unwrap()
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_lines_come_at_the_interval_and_count_a_scripted_workload() {
    let Some(lab) = support::lab() else { return };
    let mut db = lab.attachment("DATABASE");
    db.set("BPG_TUNNEL_METRICS_INTERVAL", "1s")
        .set("BPG_TUNNEL_LOG", "info")
        .set("DYNO", "web.3");
    // The lines start with the engine, before the ready wait.
    let spawned = Instant::now();
    let tunnel = Tunnel::spawn(&db.vars, &[]);
    tunnel.wait_for(&["event=ready"], START);
    let ready = Instant::now();
    // 5 connections, each reading 100 kB.
    workload(db.writer_port, 5, "select repeat('x', 100000)").await;

    let metrics = || -> Vec<BTreeMap<String, String>> {
        tunnel
            .lines()
            .iter()
            .filter(|l| l.contains("event=metrics"))
            .map(|l| pairs(l))
            .collect()
    };
    let deadline = Instant::now() + START;
    let lines = loop {
        let lines = metrics();
        let settled = sum(&lines, "count#bpg-tunnel.connections.accepted") == 5
            && lines.last().unwrap()["sample#bpg-tunnel.connections.open"] == "0";
        if settled {
            break lines;
        }
        assert!(
            Instant::now() < deadline,
            "metrics never showed the workload: {lines:#?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    if let Some(line) = tunnel.lines().iter().rfind(|l| l.contains("event=metrics")) {
        eprintln!("{line}");
    }
    // Counts are what happened since the previous line: their sum is the whole workload.
    assert!(sum(&lines, "count#bpg-tunnel.bytes.down") >= 500_000);
    assert!(sum(&lines, "count#bpg-tunnel.bytes.up") > 0);
    assert_eq!(sum(&lines, "count#bpg-tunnel.reconnects"), 0);
    assert_eq!(sum(&lines, "count#bpg-tunnel.connections.wait-expired"), 0);
    // l2met and Heroku's runtime metrics: the dyno is the source; the add-on a key of its own.
    for line in &lines {
        assert_eq!(line["source"], "web.3");
        assert_eq!(line["level"], "info");
        assert_eq!(line["addon"], "DATABASE");
        assert!(line["sample#bpg-tunnel.memory.rss"].ends_with("MB"));
    }
    // Every other line is the tunnel's own.
    for line in tunnel.lines() {
        if !line.contains("event=metrics") {
            assert!(line.starts_with("source=bpg-tunnel level="), "{line}");
        }
    }
    // The session was up for the workload (earlier lines may predate it).
    assert_eq!(lines.last().unwrap()["sample#bpg-tunnel.session.up"], "1");
    let p95 = lines
        .iter()
        .find_map(|l| l.get("measure#bpg-tunnel.channel-open.p95"))
        .expect("a channel-open p95 where channels were opened");
    assert!(p95.ends_with("ms"), "{p95}");
    // At the interval: about one a second, no more since the start, no fewer since ready.
    let (since_ready, count, since_spawn) = (
        ready.elapsed().as_secs_f64(),
        metrics().len() as f64,
        spawned.elapsed().as_secs_f64(),
    );
    assert!(
        count >= since_ready.floor() - 1.0 && count <= since_spawn.ceil(),
        "{count} lines, {since_ready:.1} s after ready, {since_spawn:.1} s after the start"
    );
}

#[test]
fn without_a_dyno_metrics_lines_name_the_host() {
    let Some(lab) = support::lab() else { return };
    let mut db = lab.attachment("DATABASE");
    db.set("BPG_TUNNEL_METRICS_INTERVAL", "1s");
    let tunnel = Tunnel::spawn(&db.vars, &[]);
    let line = tunnel.wait_for(&["event=metrics"], START);
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    assert_eq!(field(&line, "source"), host.trim(), "{line}");
    assert_eq!(field(&line, "addon"), "DATABASE", "{line}");
}

async fn get(port: u16, path: &str) -> (u16, String, String) {
    // reqwest is built without a provider of its own; every test that asks goes through here.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let response = reqwest::get(format!("http://127.0.0.1:{port}{path}"))
        .await
        .expect("GET the health endpoint");
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (status, content_type, response.text().await.unwrap())
}

/// The value of the sample `name{addon="DATABASE"}` in Prometheus text.
fn sample(text: &str, name: &str) -> u64 {
    let prefix = format!("{name}{{addon=\"DATABASE\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
        .parse::<f64>()
        .unwrap() as u64
}

#[tokio::test(flavor = "multi_thread")]
async fn the_health_endpoint_answers_probes_and_its_metrics_match_status() {
    let Some(mut lab) = support::lab() else {
        return;
    };
    let db = lab.attachment("DATABASE");
    let state = tempfile::tempdir().unwrap();
    let mut vars = dyno_vars(&db, state.path());
    let port = support::free_port();
    vars.insert("BPG_TUNNEL_HEALTH_ADDR".into(), format!("127.0.0.1:{port}"));
    let tunnel = Tunnel::spawn(&vars, &[]);
    tunnel.wait_for(&["event=health-listening"], START);
    tunnel.wait_for(&["event=ready"], START);

    assert_eq!(get(port, "/startup").await.0, 200);
    assert_eq!(get(port, "/liveness").await.0, 200);
    let (code, _, body) = get(port, "/readiness").await;
    assert_eq!((code, body.as_str()), (200, "ready\nDATABASE: up\n"));
    assert_eq!(get(port, "/nothing-here").await.0, 404);

    workload(db.writer_port, 4, "select repeat('y', 50000)").await;
    let (_, json) = wait_status(state.path(), START, |a| a["connections"]["open"] == 0);
    let addon = &json["addons"][0];
    let (code, content_type, text) = get(port, "/metrics").await;
    assert_eq!(code, 200);
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    assert!(text.ends_with("# EOF\n"), "{text}");
    assert_eq!(sample(&text, "bpg_tunnel_connections_accepted_total"), 4);
    assert_eq!(sample(&text, "bpg_tunnel_connections_open"), 0);
    assert_eq!(sample(&text, "bpg_tunnel_session_up"), 1);
    assert_eq!(sample(&text, "bpg_tunnel_reconnects_total"), 0);
    assert_eq!(sample(&text, "bpg_tunnel_channel_open_seconds_count"), 4);
    assert_eq!(
        sample(&text, "bpg_tunnel_bytes_down_total"),
        addon["bytes"]["down"].as_u64().unwrap()
    );
    assert_eq!(
        sample(&text, "bpg_tunnel_bytes_up_total"),
        addon["bytes"]["up"].as_u64().unwrap()
    );
    assert!(sample(&text, "bpg_tunnel_bytes_down_total") >= 200_000);
    assert!(text.contains("\nbpg_tunnel_memory_rss_bytes "), "{text}");

    // The server goes away: not ready, and the body says which add-on (why is for `status`).
    lab.sshd.stop();
    let deadline = Instant::now() + START;
    let body = loop {
        let (code, _, body) = get(port, "/readiness").await;
        if code == 503 {
            break body;
        }
        assert!(Instant::now() < deadline, "readiness stayed {code}: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(body, "not ready\nDATABASE: down\n");
    assert_eq!(get(port, "/liveness").await.0, 200);
    assert_no_secret(&lab, &body);
}

#[tokio::test(flavor = "multi_thread")]
async fn readiness_says_each_addons_state_and_never_the_user_the_server_or_the_host_keys() {
    let Some(lab) = support::lab() else { return };
    let db = lab.attachment("DATABASE");
    let mut impostor = lab.attachment("IMPOSTOR");
    let wrong_key = lab.sshd.new_client_key(KeyKind::Ed25519);
    impostor.set_conn_info("SSH_PUBLIC_HOST_KEY", &wrong_key.public);
    let mut stranger = lab.attachment("STRANGER");
    stranger.set_conn_info("SSH_USERNAME", "stranger-user");
    let state = tempfile::tempdir().unwrap();
    let mut vars = dyno_vars(&db, state.path());
    vars.extend(impostor.vars);
    vars.extend(stranger.vars);
    let port = support::free_port();
    vars.insert("BPG_TUNNEL_HEALTH_ADDR".into(), format!("127.0.0.1:{port}"));
    vars.insert("BPG_TUNNEL_READY_TIMEOUT".into(), "1s".into());
    let _tunnel = Tunnel::spawn(&vars, &[]);

    // Serving, with both refusals made; `status` (for the dyno's own user) says why.
    let deadline = Instant::now() + START;
    let why = loop {
        let (_, json) = status_json(state.path());
        let errors: Vec<&str> = json["addons"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|addon| addon["session"]["last_error"]["error"].as_str())
            .collect();
        let database_up = json["addons"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|addon| addon["addon"] == "DATABASE" && addon["session"]["up"] == true);
        if json["phase"] == "serving" && errors.len() == 2 && database_up {
            break errors.join("\n");
        }
        assert!(
            Instant::now() < deadline,
            "status never got there: {json:#}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        why.contains("SHA256:") && why.contains("stranger-user"),
        "{why}"
    );

    let (code, _, body) = get(port, "/readiness").await;
    assert_eq!(code, 503, "{body}");
    let server = format!("127.0.0.1:{}", lab.sshd.port);
    for told in [
        "SHA256:",
        "stranger-user",
        &lab.sshd.user,
        &server,
        "127.0.0.1",
    ] {
        assert!(!body.contains(told), "readiness tells {told:?}: {body}");
    }
    let mut lines: Vec<&str> = body.lines().collect();
    assert_eq!(lines.remove(0), "not ready", "{body}");
    lines.sort_unstable();
    assert_eq!(
        lines,
        ["DATABASE: up", "IMPOSTOR: down", "STRANGER: down"],
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_health_address_in_use_is_reported_and_the_tunnel_serves_anyway() {
    let Some(lab) = support::lab() else { return };
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut db = lab.attachment("DATABASE");
    db.set(
        "BPG_TUNNEL_HEALTH_ADDR",
        taken.local_addr().unwrap().to_string(),
    );
    let tunnel = Tunnel::spawn(&db.vars, &[]);
    let line = tunnel.wait_for(&["event=health-listen-failed"], START);
    assert_eq!(field(&line, "level"), "error");
    assert_eq!(field(&line, "var"), "BPG_TUNNEL_HEALTH_ADDR");
    workload(db.writer_port, 1, "select 1").await;
}

#[test]
fn ready_waits_for_a_channel_to_the_database_and_names_it_while_it_is_closed() {
    let Some(mut lab) = support::lab() else {
        return;
    };
    lab.pg.stop();
    let mut db = lab.attachment("DATABASE");
    db.set("BPG_TUNNEL_READY_TIMEOUT", "3s");
    let command = ["run", "--", "sh", "-c", "echo command-started"];
    let mut tunnel = Tunnel::spawn(&db.vars, &command);
    let unreachable = tunnel.wait_for(&["event=database-unreachable", "role=writer"], START);
    assert_eq!(field(&unreachable, "level"), "error");
    assert_eq!(
        field(&unreachable, "target"),
        format!("127.0.0.1:{}", lab.pg.port)
    );
    assert_eq!(field(&unreachable, "var"), "DATABASE_URL");
    tunnel.wait_for(&["event=database-unreachable", "role=reader"], START);
    // Still lets the app start, at the ready timeout, saying what was not ready.
    tunnel.wait_for(&["command-started"], START);
    tunnel.wait_exit(START);
    let lines = tunnel.lines();
    let at = |needle: &str| lines.iter().position(|l| l.contains(needle));
    assert!(at("event=ssh-connected").unwrap() < at("event=database-unreachable").unwrap());
    let not_ready = &lines[at("event=not-ready").expect("a not-ready line")];
    assert_eq!(field(not_ready, "addons"), "DATABASE");
    assert!(at("event=ready ").is_none(), "{lines:#?}");
    assert!(at("event=not-ready").unwrap() < at("command-started").unwrap());

    // With the database back, ready comes once a channel to it opened, with no error.
    lab.pg.start_again();
    let db = lab.attachment("DATABASE");
    let mut tunnel = Tunnel::spawn(&db.vars, &command);
    tunnel.wait_for(&["command-started"], START);
    tunnel.wait_exit(START);
    assert_eq!(tunnel.count("event=ready "), 1);
    assert_eq!(tunnel.count("event=database-unreachable"), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn per_connection_lines_are_debug_and_quiet_leaves_only_problems() {
    let Some(mut lab) = support::lab() else {
        return;
    };
    let mut db = lab.attachment("DATABASE");
    db.set("BPG_TUNNEL_LOG", "info");
    let info = Tunnel::spawn(&db.vars, &[]);
    let mut quiet_db = lab.attachment("QUIET");
    quiet_db.set("BPG_TUNNEL_LOG", "quiet");
    let quiet = Tunnel::spawn(&quiet_db.vars, &[]);
    info.wait_for(&["event=ready"], START);
    workload(db.writer_port, 20, "select 1").await;
    workload(quiet_db.writer_port, 20, "select 1").await;

    let lines = info.lines();
    assert!(!lines.is_empty());
    for line in &lines {
        assert!(line.starts_with("source=bpg-tunnel level="), "{line}");
        assert!(
            !line.contains("peer="),
            "a per-connection line at info: {line}"
        );
    }
    assert!(quiet.lines().is_empty(), "{:#?}", quiet.lines());

    // A problem still shows, at warn or above.
    lab.sshd.stop();
    quiet.wait_for(&["event=ssh-"], START);
    for line in quiet.lines() {
        let level = field(&line, "level");
        assert!(level == "warn" || level == "error", "{line}");
    }
}
