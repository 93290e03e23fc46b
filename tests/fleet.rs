//! A fleet of dynos against one add-on server: how soon all are back when the server returns,
//! what the server's startup limit (sshd's `MaxStartups`, at OpenSSH's default 10:30:100) does to
//! a herd of them, and what the server's fail2ban makes of it all (Debian's `fail2ban-regex` with
//! the stock `sshd` filter, in its normal and aggressive modes, over the server's log).
//!
//! Each dyno is a bpg-tunnel process of its own whose forward leads to a small echo server the
//! test runs: a round trip through it is the tunnel's first answered query, without timing
//! PostgreSQL's backend startup a hundred times. `cargo test --test fleet -- --nocapture` prints
//! the figures.

mod support;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use support::fail2ban::{self, FINDTIME_SECS, MAXRETRY, MODES};
use support::{attachment_to, field, KeyKind, Sshd, SshdOptions, Tunnel};

const FLEET: usize = 100;
/// How long the server is away, as in the measurement.
const OUTAGE: Duration = Duration::from_secs(5);
/// From the server's return to each tunnel's first answered round trip.
const P95_BOUND: Duration = Duration::from_secs(2);
const MAX_BOUND: Duration = Duration::from_secs(3);
const T: Duration = Duration::from_secs(60);

/// One test at a time: the fleet's figures are timings, and 100 processes are a load.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    eprintln!("binary under test: {}", support::tunnel_binary().display());
    ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// An echo server on 127.0.0.1, for as long as the test runs; its port.
fn echo_server() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut reader = stream.try_clone().unwrap();
                let mut writer = stream;
                let _ = std::io::copy(&mut reader, &mut writer);
            });
        }
    });
    port
}

/// One round trip through the tunnel listening on `port`: connect, send a line, read it back.
/// While the session is down the connection waits in the tunnel.
fn round_trip(port: u16) -> Result<(), String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    stream.set_read_timeout(Some(T)).unwrap();
    let ping = format!("ping {port}\n");
    stream
        .write_all(ping.as_bytes())
        .map_err(|e| e.to_string())?;
    let mut pong = vec![0; ping.len()];
    stream.read_exact(&mut pong).map_err(|e| e.to_string())?;
    if pong != ping.as_bytes() {
        return Err(format!("echoed {:?}", String::from_utf8_lossy(&pong)));
    }
    Ok(())
}

/// For each port at once: how long after `since` a round trip first went through, and how many
/// tries before it failed (a connection accepted just as a session died is reset, and the app
/// would connect again).
fn first_round_trips(ports: &[u16], since: Instant) -> Vec<(Duration, usize)> {
    let threads: Vec<_> = ports
        .iter()
        .map(|&port| {
            std::thread::spawn(move || {
                let mut failed = Vec::new();
                loop {
                    match round_trip(port) {
                        Ok(()) => return (since.elapsed(), failed.len()),
                        Err(error) => failed.push(error),
                    }
                    assert!(
                        since.elapsed() < T,
                        "no round trip through 127.0.0.1:{port} within {T:?}: {failed:?}"
                    );
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

/// p50, p95 and the maximum.
fn percentiles(times: &[(Duration, usize)]) -> (Duration, Duration, Duration) {
    let mut sorted: Vec<Duration> = times.iter().map(|(time, _)| *time).collect();
    sorted.sort();
    let at = |p: usize| sorted[(sorted.len() * p).div_ceil(100) - 1];
    (at(50), at(95), *sorted.last().unwrap())
}

/// The failures fail2ban's `sshd` filter finds in `log`, by mode.
fn failures_by_mode(tool: &std::path::Path, log: &str) -> Vec<(&'static str, Vec<String>)> {
    MODES
        .iter()
        .map(|mode| (*mode, fail2ban::failures(tool, log, mode)))
        .collect()
}

/// Waits until the tunnel has connected `n` times.
fn wait_connected(tunnels: &[Tunnel], n: usize) {
    for tunnel in tunnels {
        tunnel.wait_for_nth(&["event=ssh-connected"], n, T);
    }
}

/// `FLEET` tunnels through one sshd at OpenSSH's default `MaxStartups`: started at once, every
/// session killed at once, and the server down for `OUTAGE` and back. After the kill and the
/// return every tunnel carries a round trip again within the bounds, and fail2ban finds nothing
/// in the server's log.
#[test]
fn a_fleet_of_100_is_back_within_2_s_of_the_servers_return_and_fail2ban_finds_nothing() {
    let _one = one_at_a_time();
    let Some(tools) = support::tools() else {
        return;
    };
    let Some(fail2ban_regex) = fail2ban::fail2ban_regex() else {
        return;
    };
    let echo = echo_server();
    let options = SshdOptions {
        max_startups: None,
        ..SshdOptions::default()
    };
    let mut sshd = Sshd::start_with(&tools, echo, options);
    let key = sshd.new_client_key(KeyKind::Ed25519);
    sshd.authorize(&key.public);
    let states = tempfile::tempdir().unwrap();

    // Started at once, as dynos are after a deploy.
    let started = Instant::now();
    let mut ports = Vec::new();
    let tunnels: Vec<Tunnel> = (0..FLEET)
        .map(|n| {
            let mut db = attachment_to(&sshd, &key, "DATABASE", echo);
            let state = states.path().join(n.to_string());
            std::fs::create_dir(&state).unwrap();
            db.set("BPG_TUNNEL_STATE_DIR", state.to_str().unwrap());
            ports.push(db.writer_port);
            Tunnel::spawn(db.vars.iter(), &[])
        })
        .collect();
    let herd = first_round_trips(&ports, started);
    let herd_log = sshd.log();
    report("started at once", &herd, &herd_log, &tunnels);

    // Every session killed at once (the server's processes, its listener left up): a herd of
    // reconnects, all at once, from the backoff's first step.
    wait_connected(&tunnels, 1);
    let offset = sshd.log().len();
    let killed = Instant::now();
    assert!(sshd.signal_sessions(libc::SIGKILL) >= FLEET);
    for tunnel in &tunnels {
        tunnel.wait_for(&["event=ssh-disconnected"], T);
    }
    let kill = first_round_trips(&ports, killed);
    wait_connected(&tunnels, 2);
    let kill_log = sshd.log_since(offset);
    report("sessions killed", &kill, &kill_log, &tunnels);

    // The server away for OUTAGE, then back.
    let offset = sshd.log().len();
    sshd.stop();
    std::thread::sleep(OUTAGE);
    sshd.restart();
    let back = Instant::now();
    let restart = first_round_trips(&ports, back);
    wait_connected(&tunnels, 3);
    // Until every late line of the handshakes is in the log.
    std::thread::sleep(Duration::from_millis(500));
    let restart_log = sshd.log_since(offset);
    report("server back", &restart, &restart_log, &tunnels);
    eprintln!("the whole run took {:?}", started.elapsed());

    // The start's figures include starting 100 processes: only printed. After the kill, every
    // tunnel (among them those sshd dropped past MaxStartups) is back within the bound on each;
    // after the server's return, p95 as well.
    for (scenario, times, p95_bound, log) in [
        ("started at once", None, None, &herd_log),
        ("sessions killed", Some(&kill), None, &kill_log),
        ("server back", Some(&restart), Some(P95_BOUND), &restart_log),
    ] {
        for (mode, failures) in failures_by_mode(&fail2ban_regex, log) {
            eprintln!("{scenario}: fail2ban ({mode}) counts {}", failures.len());
            assert!(
                failures.is_empty(),
                "{scenario}: fail2ban ({mode}) counts {failures:#?}"
            );
        }
        if let Some(times) = times {
            let (_, p95, max) = percentiles(times);
            assert!(
                p95_bound.is_none_or(|bound| p95 <= bound) && max <= MAX_BOUND,
                "{scenario}: p95 {p95:?}, max {max:?}"
            );
        }
    }
}

/// Prints a scenario's figures: round trips, the drops sshd logged past MaxStartups, how the
/// tunnels saw them.
fn report(scenario: &str, times: &[(Duration, usize)], log: &str, tunnels: &[Tunnel]) {
    let (p50, p95, max) = percentiles(times);
    let retried = times.iter().filter(|(_, failed)| *failed > 0).count();
    let dropped = log.matches("past MaxStartups").count();
    let closed_before_greeting: usize = tunnels
        .iter()
        .map(|t| t.count("before its SSH greeting"))
        .sum();
    eprintln!(
        "{scenario}: {} tunnels, first round trip p50 {p50:?}, p95 {p95:?}, max {max:?} \
         ({retried} needed a second connection); sshd dropped {dropped} past MaxStartups; \
         tunnels saw {closed_before_greeting} connections closed before a greeting so far",
        times.len()
    );
    // The tries that failed so far, by what the tunnels said.
    let mut errors = std::collections::BTreeMap::<String, usize>::new();
    for tunnel in tunnels {
        for line in tunnel.lines() {
            if let Some((_, error)) = line
                .contains("event=ssh-connect-failed")
                .then(|| line.split_once("error="))
                .flatten()
            {
                *errors.entry(error.to_owned()).or_default() += 1;
            }
        }
    }
    for (error, count) in errors {
        eprintln!("    {count} × {error}");
    }
}

/// The worst number of fail2ban failures one rejected attempt makes (a key the server does not
/// know, a host key other than the pinned one), measured on sshd at the lab's LogLevel VERBOSE and
/// at OpenSSH's default INFO, in both of the filter's modes; with the schedule of pauses the
/// daemon follows at its defaults, fewer than 5 fall within any 10 minutes.
#[test]
fn a_wrong_key_or_host_key_makes_fewer_than_5_fail2ban_failures_in_any_10_minutes() {
    let _one = one_at_a_time();
    let Some(tools) = support::tools() else {
        return;
    };
    let Some(fail2ban_regex) = fail2ban::fail2ban_regex() else {
        return;
    };
    let echo = echo_server();
    let base = bpg_tunnel::DEFAULT_AUTH_FAILURE_DELAY;
    let first_pause = bpg_tunnel::auth_failure_pause(base, 1);
    let mut worst = 0;
    for log_level in ["VERBOSE", "INFO"] {
        let options = SshdOptions {
            max_startups: None,
            log_level,
        };
        let sshd = Sshd::start_with(&tools, echo, options);
        let key = sshd.new_client_key(KeyKind::Ed25519);
        sshd.authorize(&key.public);
        let stranger = sshd.new_client_key(KeyKind::Ed25519);
        let impostor = sshd.new_client_key(KeyKind::Ed25519);
        let wrong_key = attachment_to(&sshd, &stranger, "DATABASE", echo);
        let mut wrong_host_key = attachment_to(&sshd, &key, "DATABASE", echo);
        wrong_host_key.set_conn_info("SSH_PUBLIC_HOST_KEY", &impostor.public);
        for (scenario, db, event) in [
            ("wrong key", &wrong_key, "event=auth-failed"),
            ("wrong host key", &wrong_host_key, "event=host-key-mismatch"),
        ] {
            let offset = sshd.log().len();
            let state = tempfile::tempdir().unwrap();
            let mut vars = db.vars.clone();
            vars.insert(
                "BPG_TUNNEL_STATE_DIR".into(),
                state.path().to_str().unwrap().into(),
            );
            let tunnel = Tunnel::spawn(vars.iter(), &[]);
            tunnel.wait_for(&[event], T);
            // The daemon follows the schedule the bound below is computed from.
            let scheduled = tunnel.wait_for(&["event=reconnect-scheduled"], T);
            let delay = Duration::from_millis(field(&scheduled, "delay_ms").parse().unwrap());
            assert!(
                delay >= first_pause && delay <= first_pause.mul_f64(1.25),
                "{scheduled}"
            );
            drop(tunnel);
            // Until sshd has logged the connection's end.
            let deadline = Instant::now() + Duration::from_secs(10);
            while !sshd.log_since(offset).contains("Connection closed")
                && !sshd.log_since(offset).contains("Connection reset")
            {
                assert!(Instant::now() < deadline, "{}", sshd.log_since(offset));
                std::thread::sleep(Duration::from_millis(20));
            }
            std::thread::sleep(Duration::from_millis(200));
            let log = sshd.log_since(offset);
            for (mode, failures) in failures_by_mode(&fail2ban_regex, &log) {
                eprintln!(
                    "{scenario}, LogLevel {log_level}, mode {mode}: {} failure(s) for one attempt {failures:?}",
                    failures.len()
                );
                worst = worst.max(failures.len());
            }
        }
    }

    // The attempts at the default pauses (the jitter only adds to them): the first at 0.
    let window = Duration::from_secs(FINDTIME_SECS);
    let mut at = vec![Duration::ZERO];
    for rejections in 1..50 {
        at.push(*at.last().unwrap() + bpg_tunnel::auth_failure_pause(base, rejections));
    }
    let most_attempts = (0..at.len())
        .map(|first| {
            at[first..]
                .iter()
                .take_while(|t| **t - at[first] <= window)
                .count()
        })
        .max()
        .unwrap();
    let pauses: Vec<u64> = (1..7)
        .map(|n| bpg_tunnel::auth_failure_pause(base, n).as_secs())
        .collect();
    eprintln!(
        "pauses after rejections {pauses:?} s…: at most {most_attempts} attempts in any {FINDTIME_SECS} s, \
         {worst} failure(s) each at worst: {} failures",
        most_attempts * worst
    );
    assert!(
        most_attempts * worst < MAXRETRY,
        "{most_attempts} attempts × {worst} failures reach fail2ban's {MAXRETRY}"
    );
}

/// What costs the server nothing is retried soon, however long it lasts: a refused connection
/// about every second, one sshd closes before its greeting (past MaxStartups) about every 300
/// ms; a handshake that fails once the server spoke backs off from its first step as before.
#[test]
fn refused_and_unanswered_connects_are_retried_about_every_second() {
    let _one = one_at_a_time();
    let Some(tools) = support::tools() else {
        return;
    };
    // A port nothing listens on, one that closes each connection at once (as sshd past
    // MaxStartups), one that says it is SSH and then closes.
    let refused = support::free_port();
    let closing = TcpListener::bind("127.0.0.1:0").unwrap();
    let closing_port = closing.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in closing.incoming() {
            drop(stream);
        }
    });
    let greeting = TcpListener::bind("127.0.0.1:0").unwrap();
    let greeting_port = greeting.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut stream in greeting.incoming().flatten() {
            let _ = stream.write_all(b"SSH-2.0-OpenSSH_9.2\r\n");
        }
    });
    let sshd = Sshd::start(&tools, echo_server());
    let key = sshd.new_client_key(KeyKind::Ed25519);
    let tunnels: Vec<(&str, u16, Tunnel, tempfile::TempDir)> = [
        ("refused", refused),
        ("closed at once", closing_port),
        ("closed after the greeting", greeting_port),
    ]
    .into_iter()
    .map(|(name, port)| {
        let mut db = attachment_to(&sshd, &key, "DATABASE", 9);
        db.set_conn_info("SSH_PORT", &port.to_string());
        let state = tempfile::tempdir().unwrap();
        db.set("BPG_TUNNEL_STATE_DIR", state.path().to_str().unwrap());
        (name, port, Tunnel::spawn(db.vars.iter(), &[]), state)
    })
    .collect();
    for ((name, _, tunnel, _), expected) in tunnels[..2].iter().zip([500..=1500, 150..=450]) {
        tunnel.wait_for_nth(&["event=reconnect-scheduled"], 5, Duration::from_secs(20));
        let lines = tunnel.lines();
        let delays: Vec<u64> = lines
            .iter()
            .filter(|line| line.contains("event=reconnect-scheduled"))
            .map(|line| field(line, "delay_ms").parse().unwrap())
            .collect();
        eprintln!("{name}: delays {delays:?} ms");
        assert!(
            delays.iter().all(|delay| expected.contains(delay)),
            "{name}: {delays:?}, expected within {expected:?} ms"
        );
        let failed = tunnel.wait_for(&["event=ssh-connect-failed"], T);
        if *name == "closed at once" {
            assert!(failed.contains("before its SSH greeting"), "{failed}");
            assert!(failed.contains("MaxStartups"), "{failed}");
        }
    }
    let (name, _, tunnel, _) = &tunnels[2];
    let failed = tunnel.wait_for(&["event=ssh-connect-failed"], T);
    assert!(!failed.contains("before its SSH greeting"), "{failed}");
    // The backoff's first step: within 100 ms.
    let scheduled = tunnel.wait_for(&["event=reconnect-scheduled"], T);
    let delay: u64 = field(&scheduled, "delay_ms").parse().unwrap();
    eprintln!("{name}: first delay {delay} ms");
    assert!(delay <= 100, "{scheduled}");
}
