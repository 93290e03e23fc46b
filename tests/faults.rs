//! The fault matrix: each row a fault applied while a load of 16 clients runs through the
//! tunnel, with what a user must see. The SSH session goes through a fault relay
//! (`support::relay`) where the kernel cannot make the fault. Every row prints its figures
//! (`cargo test --test faults -- --nocapture`); docs/performance.md's "Faults survived" comes from them.
#![allow(
    clippy::disallowed_methods,
    reason = "a test reads its lab's settings from the environment"
)]

mod support;

use std::time::{Duration, Instant};

use support::{daemon_pid, wait_gone, Load, PacketLoss, Pgbench, Relay, SshForward, Tunnel};

const T: Duration = Duration::from_secs(30);
/// Keepalive every 1 s, dead after 3 silent ones; reconnects at most 2 s apart.
const FAST: [&str; 6] = [
    "--keepalive-interval",
    "1s",
    "--keepalive-count",
    "3",
    "--reconnect-max-delay",
    "2s",
];
const CLIENTS: usize = 16;

/// One row at a time: each puts a load on the machine, and its timings are the figures.
use support::one_at_a_time;

/// The lab's attachment with its SSH session through a fault relay, and the tunnel serving it.
fn through_relay(lab: &support::Lab) -> (support::Attachment, Relay, Tunnel) {
    let relay = Relay::start(([127, 0, 0, 1], lab.sshd.port).into());
    let mut db = lab.attachment("DATABASE");
    db.set_conn_info("SSH_PORT", &relay.port.to_string());
    let tunnel = Tunnel::spawn(db.vars.iter(), &FAST);
    tunnel.wait_for(&["event=ssh-connected"], T);
    (db, relay, tunnel)
}

/// A load of `CLIENTS` running through a tunnel whose session goes through a fault relay.
fn under_load(lab: &support::Lab) -> (support::Attachment, Relay, Tunnel, Load) {
    let (db, relay, tunnel) = through_relay(lab);
    let load = Load::start(db.writer_port, CLIENTS);
    load.wait_progress(200, T).expect("the load runs");
    (db, relay, tunnel, load)
}

/// Waits until every client has had a query answered again.
fn wait_resumed(load: &Load) {
    load.wait_progress(CLIENTS as u64, T)
        .expect("the load resumes");
}

/// How long a timed fault lasts: `default_secs` in CI, `BPG_TUNNEL_FAULT_SECS` for the long
/// versions (`scripts/bench.sh` runs them at 60 s).
fn fault_length(default_secs: u64) -> Duration {
    Duration::from_secs(
        std::env::var("BPG_TUNNEL_FAULT_SECS")
            .ok()
            .and_then(|secs| secs.parse().ok())
            .unwrap_or(default_secs),
    )
}

fn open_fds(pid: i32) -> usize {
    // Needs root: bpg-tunnel is not dumpable, so only CAP_SYS_PTRACE may list its descriptors.
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap_or_else(|error| panic!("cannot list the descriptors of {pid}: {error}"))
        .count()
}

/// The daemon's open descriptors once back to `baseline`, or after `within` if they are not:
/// what a closed connection held is released a moment later, by another task.
fn fds_back_to(pid: i32, baseline: usize, within: Duration) -> usize {
    let started = Instant::now();
    while open_fds(pid) > baseline && started.elapsed() < within {
        std::thread::sleep(Duration::from_millis(50));
    }
    open_fds(pid)
}

#[test]
fn a_killed_session_under_load_fails_only_what_was_open_and_new_queries_resume_within_1s() {
    let _one = one_at_a_time();
    let Some(lab) = support::lab() else { return };
    let (_db, _relay, tunnel, load) = under_load(&lab);
    let failed_before = load.failed();
    assert!(lab.sshd.signal_sessions(libc::SIGKILL) > 0);
    let killed = Instant::now();
    tunnel.wait_for_nth(&["event=ssh-connected"], 2, T);
    let reconnected = killed.elapsed();
    wait_resumed(&load);
    let resumed = killed.elapsed();
    let failed = load.failed() - failed_before;
    eprintln!(
        "session killed: a new session after {reconnected:?}, queries resumed after {resumed:?}; {failed} queries failed"
    );
    assert!(reconnected < Duration::from_secs(1), "{reconnected:?}");
    assert!(resumed < Duration::from_secs(2), "{resumed:?}");
    // Only what was in flight: at most one query per client.
    assert!(failed <= CLIENTS as u64, "{failed} failed");
}

#[test]
fn a_hung_server_under_load_is_replaced_within_the_keepalive_budget_and_the_load_resumes() {
    let _one = one_at_a_time();
    let Some(lab) = support::lab() else { return };
    let (_db, _relay, tunnel, load) = under_load(&lab);
    assert!(lab.sshd.signal_sessions(libc::SIGSTOP) > 0);
    let hung = Instant::now();
    tunnel.wait_for(&["event=ssh-disconnected"], T);
    let detected = hung.elapsed();
    wait_resumed(&load);
    let resumed = hung.elapsed();
    eprintln!("server hung: replaced after {detected:?}, load resumed after {resumed:?}");
    // interval × count, and a second.
    assert!(detected < Duration::from_secs(4), "{detected:?}");
    assert!(resumed < Duration::from_secs(5), "{resumed:?}");
}

#[test]
fn a_blackhole_is_detected_in_time_and_a_connection_opened_during_it_is_served_after() {
    let _one = one_at_a_time();
    let Some(lab) = support::lab() else { return };
    let length = fault_length(6);
    let (db, relay, tunnel, load) = under_load(&lab);
    relay.pause();
    let dark = Instant::now();
    tunnel.wait_for(&["event=ssh-disconnected"], T);
    let detected = dark.elapsed();
    // A connection the app opens while nothing gets through, late enough that its wait (30 s)
    // outlasts the blackhole: it waits, and is served after.
    std::thread::sleep(
        length
            .saturating_sub(Duration::from_secs(4))
            .saturating_sub(dark.elapsed()),
    );
    let late = support::psql(&db, &["select 'served-after'"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(length.saturating_sub(dark.elapsed()));
    relay.resume();
    let restored = Instant::now();
    let output = late.wait_with_output().unwrap();
    wait_resumed(&load);
    let resumed = restored.elapsed();
    eprintln!(
        "blackhole {length:?}: detected after {detected:?}; served again {resumed:?} after it ended"
    );
    assert!(detected < Duration::from_secs(4), "{detected:?}");
    assert!(String::from_utf8_lossy(&output.stdout).contains("served-after"));
    assert!(resumed < Duration::from_secs(12), "{resumed:?}");
}

/// Queries per second of each load over `window`, measured at the same time, and the longest
/// stretch each went without an answer.
fn rates_and_stalls<const N: usize>(loads: [&Load; N], window: Duration) -> [(f64, Duration); N] {
    let before = loads.map(Load::ok);
    let started = Instant::now();
    let stalls = std::thread::scope(|scope| {
        loads
            .map(|load| scope.spawn(move || load.longest_stall(window)))
            .map(|stall| stall.join().unwrap())
    });
    let seconds = started.elapsed().as_secs_f64();
    std::array::from_fn(|n| ((loads[n].ok() - before[n]) as f64 / seconds, stalls[n]))
}

/// Bytes per second of a 5 MB COPY through a psql.
fn copy_rate(psql: std::process::Command) -> f64 {
    let mut psql = psql;
    let started = Instant::now();
    let copy = psql
        .arg("-c")
        .arg("copy (select repeat('x', 100) from generate_series(1, 50000)) to stdout")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (bytes, _) = support::read_output(copy).join().unwrap();
    assert!(bytes > 5_000_000);
    bytes as f64 / started.elapsed().as_secs_f64()
}

#[test]
fn with_50ms_more_latency_each_way_everything_works_as_fast_as_through_ssh() {
    let _one = one_at_a_time();
    let Some(lab) = support::lab() else { return };
    let relay = Relay::start(([127, 0, 0, 1], lab.sshd.port).into());
    relay.set_delay(Duration::from_millis(50));
    let mut db = lab.attachment("DATABASE");
    db.set_conn_info("SSH_PORT", &relay.port.to_string());
    let tunnel = Tunnel::spawn(db.vars.iter(), &FAST);
    let ssh = SshForward::start(&lab, relay.port);
    tunnel.wait_for(&["event=ssh-connected"], T);
    ssh.wait_listening(T);
    let loads = [
        Load::start(db.writer_port, CLIENTS),
        Load::start(ssh.port, CLIENTS),
    ];
    for load in &loads {
        load.wait_progress(100, T).expect("the load runs");
    }
    let failed_before = loads[0].failed();
    let [(bpg_rate, _), (ssh_rate, _)] =
        rates_and_stalls([&loads[0], &loads[1]], Duration::from_secs(3));
    let failed = loads[0].failed() - failed_before;
    drop(loads);
    // One after the other: two COPYs at once would each measure the other.
    let bpg_copy = copy_rate(support::psql(&db, &[]));
    let ssh_copy = copy_rate(support::psql_at(ssh.port, &[]));
    eprintln!(
        "+50 ms each way, bpg-tunnel (ssh -L): {bpg_rate:.0} ({ssh_rate:.0}) queries/s with {CLIENTS} clients each; \
         COPY {:.1} ({:.1}) MB/s: {:.2}x",
        bpg_copy / 1e6,
        ssh_copy / 1e6,
        bpg_copy / ssh_copy
    );
    // Latency is the link's: through either tunnel, the same rates, give or take the noise of
    // a shared machine.
    assert!(
        bpg_rate >= ssh_rate * 0.7,
        "{bpg_rate:.0} against {ssh_rate:.0}"
    );
    assert!(
        bpg_copy >= ssh_copy * 0.7,
        "{bpg_copy:.0} against {ssh_copy:.0}"
    );
    assert_eq!(failed, 0);
    assert_eq!(tunnel.count("event=ssh-disconnected"), 0);
}

#[test]
fn five_percent_loss_both_ways_slows_the_load_and_fails_nothing() {
    let _one = one_at_a_time();
    let Some(lab) = support::lab() else { return };
    let length = fault_length(10);
    let db = lab.attachment("DATABASE");
    // The default keepalive (3 s × 3): on a lossy link TCP's own retransmissions stall the
    // stream for up to seconds, and a user's session must ride them out.
    let tunnel = Tunnel::spawn(db.vars.iter(), &[]);
    let ssh = SshForward::start(&lab, lab.sshd.port);
    tunnel.wait_for(&["event=ssh-connected"], T);
    ssh.wait_listening(T);
    let (bpg, old) = (
        Load::start(db.writer_port, CLIENTS),
        Load::start(ssh.port, CLIENTS),
    );
    for load in [&bpg, &old] {
        load.wait_progress(200, T).expect("the load runs");
    }
    let window = Duration::from_secs(3);
    let [(bpg_before, _), (ssh_before, _)] = rates_and_stalls([&bpg, &old], window);
    let failed_before = [bpg.failed(), old.failed()];
    // Both sessions go to the same sshd port: the same loss for both, at the same time.
    let loss = PacketLoss::start(lab.sshd.port, 5);
    let [(bpg_during, bpg_stall), (ssh_during, ssh_stall)] = rates_and_stalls([&bpg, &old], length);
    let dropped = loss.dropped();
    drop(loss);
    let failed = [
        bpg.failed() - failed_before[0],
        old.failed() - failed_before[1],
    ];
    // The two share the two cores, so each is compared with itself before the loss.
    let (bpg_kept, ssh_kept) = (bpg_during / bpg_before, ssh_during / ssh_before);
    eprintln!(
        "5 % loss both ways for {length:?} ({dropped} packets dropped), bpg-tunnel (ssh -L): \
         {bpg_during:.0} ({ssh_during:.0}) queries/s against {bpg_before:.0} ({ssh_before:.0}) before, \
         {:.0} % ({:.0} %) kept; longest stall {bpg_stall:?} ({ssh_stall:?}); {} ({}) queries failed",
        bpg_kept * 100.0,
        ssh_kept * 100.0,
        failed[0],
        failed[1],
    );
    assert!(dropped > 100, "the loss dropped only {dropped} packets");
    wait_resumed(&bpg);
    // Errors only if a query times out (the load's bound is 10 s): none here.
    assert_eq!(failed[0], 0);
    assert!(bpg_stall < Duration::from_secs(5), "{bpg_stall:?}");
    assert_eq!(tunnel.count("event=ssh-disconnected"), 0);
}

#[test]
fn sshd_down_connects_are_refused_backoff_stays_within_its_cap_and_serving_resumes_within_it() {
    let _one = one_at_a_time();
    let Some(mut lab) = support::lab() else {
        return;
    };
    let length = fault_length(6);
    // The cap a third of the outage, so that the backoff reaches it; at most the default 10 s.
    let cap = (length / 3).clamp(Duration::from_secs(2), Duration::from_secs(10));
    // Straight to sshd: once it is gone, every connect is refused by the kernel.
    let db = lab.attachment("DATABASE");
    let cap_flag = format!("{}ms", cap.as_millis());
    let tunnel = Tunnel::spawn(
        db.vars.iter(),
        &[&FAST[..4], &["--reconnect-max-delay", &cap_flag]].concat(),
    );
    tunnel.wait_for(&["event=ssh-connected"], T);
    let load = Load::start(db.writer_port, CLIENTS);
    load.wait_progress(200, T).expect("the load runs");
    lab.sshd.stop();
    std::thread::sleep(length);
    lab.sshd.restart();
    let back = Instant::now();
    // The next try that finds sshd listening comes within the cap, and a handshake later the
    // session is up. (A try while sshd was still starting is refused like the others.)
    tunnel.wait_for_nth(&["event=ssh-connected"], 2, T);
    let reconnected = back.elapsed();
    wait_resumed(&load);
    let resumed = back.elapsed();
    let lines = tunnel.lines();
    let delays: Vec<u64> = lines
        .iter()
        .filter(|line| line.contains("event=reconnect-scheduled"))
        .map(|line| support::field(line, "delay_ms").parse().unwrap())
        .collect();
    let refused = lines
        .iter()
        .filter(|line| line.contains("event=ssh-connect-failed") && line.contains("refused"))
        .count();
    eprintln!(
        "sshd down {length:?}: {refused} connects refused, reconnect delays {delays:?} ms (cap {cap:?}); \
         a session {reconnected:?} and queries {resumed:?} after it returned"
    );
    assert!(refused >= 2, "{lines:#?}");
    assert!(
        delays.iter().all(|delay| *delay <= cap.as_millis() as u64),
        "{delays:?}"
    );
    assert!(
        reconnected < cap + Duration::from_secs(1),
        "{reconnected:?}"
    );
    assert!(resumed < cap + Duration::from_millis(1500), "{resumed:?}");
}

#[test]
fn postgresql_restarted_behind_the_tunnel_does_not_cycle_the_session() {
    let _one = one_at_a_time();
    let Some(mut lab) = support::lab() else {
        return;
    };
    let (_db, _relay, tunnel, load) = under_load(&lab);
    lab.pg.stop();
    std::thread::sleep(Duration::from_secs(1));
    lab.pg.start_again();
    let back = Instant::now();
    wait_resumed(&load);
    eprintln!(
        "PostgreSQL restarted: queries again {:?} after it accepted",
        back.elapsed()
    );
    assert_eq!(tunnel.count("event=ssh-connected"), 1);
    assert_eq!(tunnel.count("event=ssh-disconnected"), 0);
}

#[test]
fn clients_that_never_send_half_close_or_reset_leave_no_descriptor_behind() {
    let _one = one_at_a_time();
    let Some(lab) = support::lab() else { return };
    let (db, _relay, tunnel) = through_relay(&lab);
    // One connection through, so that everything the first one sets up is in the baseline.
    let status = support::psql(&db, &["select 1"]).output().unwrap().status;
    assert!(status.success());
    std::thread::sleep(Duration::from_millis(300));
    let baseline = open_fds(tunnel.pid());
    let addr = ("127.0.0.1", db.writer_port);
    for round in 0..3 {
        let mut held = Vec::new();
        for _ in 0..20 {
            // Connects and never sends.
            held.push(std::net::TcpStream::connect(addr).unwrap());
            // Half-closes at once.
            let half = std::net::TcpStream::connect(addr).unwrap();
            half.shutdown(std::net::Shutdown::Write).unwrap();
            held.push(half);
            // Resets.
            let reset = std::net::TcpStream::connect(addr).unwrap();
            socket2::SockRef::from(&reset)
                .set_linger(Some(Duration::ZERO))
                .unwrap();
            drop(reset);
        }
        std::thread::sleep(Duration::from_millis(500));
        let during = open_fds(tunnel.pid());
        drop(held);
        let after = fds_back_to(tunnel.pid(), baseline, Duration::from_secs(10));
        eprintln!("round {round}: descriptors {baseline} before, {during} with 60 odd clients, {after} after");
        assert!(
            after <= baseline,
            "{after} descriptors left, {baseline} before"
        );
    }
    let status = support::psql(&db, &["select 1"]).output().unwrap().status;
    assert!(status.success());
}

#[test]
fn a_sigterm_during_a_blackhole_still_stops_within_the_grace_and_the_stop_bound() {
    let _one = one_at_a_time();
    let Some(lab) = support::lab() else { return };
    let (_db, relay, mut tunnel, _load) = under_load(&lab);
    relay.pause();
    std::thread::sleep(Duration::from_millis(500));
    let signalled = Instant::now();
    tunnel.signal(libc::SIGTERM);
    tunnel.wait_exit(T).expect("it stops");
    let took = signalled.elapsed();
    eprintln!("SIGTERM in a blackhole: stopped after {took:?}");
    // The grace (2 s) and the bound on saying goodbye to a server that does not answer (3 s).
    assert!(took < Duration::from_secs(6), "{took:?}");
    relay.resume();
}

/// A fault for [`a_sigterm_during_each_fault_drains_and_the_daemon_leaves_after_the_app`].
#[derive(Debug, Clone, Copy)]
enum Fault {
    SessionKilled,
    ServerHung,
    Blackhole,
    Latency,
    Loss,
    SshdDown,
    PostgresDown,
    DatabaseUnreachable,
    OutOfDescriptors,
}

/// A listener whose one-place queue is full, so that every new SYN to it is dropped: a host
/// that never answers, as a blackholed database host behind the server.
struct Unanswering {
    port: u16,
    _socket: socket2::Socket,
    _filler: Vec<std::net::TcpStream>,
}

impl Unanswering {
    fn new() -> Unanswering {
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        socket
            .bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .unwrap();
        socket.listen(0).unwrap();
        let port = socket.local_addr().unwrap().as_socket().unwrap().port();
        let filler = (0..4)
            .filter_map(|_| {
                std::net::TcpStream::connect_timeout(
                    &([127, 0, 0, 1], port).into(),
                    Duration::from_millis(300),
                )
                .ok()
            })
            .collect();
        Unanswering {
            port,
            _socket: socket,
            _filler: filler,
        }
    }
}

/// Heroku's shutdown in the middle of each fault: the dyno (a bash app that drains for 1 s
/// after SIGTERM, with the daemon started the profile.d way) and the daemon get SIGTERM while
/// the fault is on and 16 clients are connected. The drain rules must hold as without a fault:
/// the daemon serves (where the fault lets anything through) until the app exits, then gives
/// open connections the grace (2 s), cuts what is left and leaves without running into the
/// stop bound (3 s), long before the drain deadline (10 s here).
#[test]
fn a_sigterm_during_each_fault_drains_and_the_daemon_leaves_after_the_app() {
    let _one = one_at_a_time();
    let Some(mut lab) = support::lab() else {
        return;
    };
    let unanswering = Unanswering::new();
    lab.sshd
        .permit_open(&format!("127.0.0.1:{}", unanswering.port));
    let grace_and_bound = Duration::from_secs(2 + 3);
    let drain_deadline = Duration::from_secs(10);
    let mut figures = Vec::new();
    for fault in [
        Fault::SessionKilled,
        Fault::ServerHung,
        Fault::Blackhole,
        Fault::Latency,
        Fault::Loss,
        Fault::SshdDown,
        Fault::PostgresDown,
        Fault::DatabaseUnreachable,
        Fault::OutOfDescriptors,
    ] {
        let relay = Relay::start(([127, 0, 0, 1], lab.sshd.port).into());
        let state = tempfile::tempdir().unwrap();
        let mut db = lab.attachment("DATABASE");
        if matches!(fault, Fault::Blackhole | Fault::Latency) {
            db.set_conn_info("SSH_PORT", &relay.port.to_string());
        }
        if matches!(fault, Fault::DatabaseUnreachable) {
            db.set_conn_info("POSTGRES_PORT", &unanswering.port.to_string());
        }
        db.set("BPG_TUNNEL_STATE_DIR", state.path().display().to_string())
            .set("BPG_TUNNEL_DRAIN_TIMEOUT", "10s")
            .set("BPG_TUNNEL_KEEPALIVE_INTERVAL", "1s")
            .set("BPG_TUNNEL_KEEPALIVE_COUNT", "3")
            .set("BPG_TUNNEL_RECONNECT_MAX_DELAY", "2s")
            .set("BPG_TUNNEL_LOG", "info");
        let ulimit = match fault {
            Fault::OutOfDescriptors => "ulimit -n 64\n",
            _ => "",
        };
        let mut dyno = Tunnel::bash(
            db.vars.iter(),
            &format!(
                "trap 'sleep 1; exit 0' TERM\n{ulimit}bpg-tunnel start --owner-pid $$\n\
                 echo app-booted\nwhile :; do sleep 0.2; done"
            ),
        );
        dyno.wait_for(&["app-booted"], T);
        let daemon = daemon_pid(state.path()).expect("the daemon's pid file");
        let load = Load::start(db.writer_port, CLIENTS);
        if !matches!(fault, Fault::DatabaseUnreachable) {
            load.wait_progress(100, T).expect("the load runs");
        }
        let mut loss = None;
        let mut held = Vec::new();
        match fault {
            Fault::SessionKilled => assert!(lab.sshd.signal_sessions(libc::SIGKILL) > 0),
            Fault::ServerHung => assert!(lab.sshd.signal_sessions(libc::SIGSTOP) > 0),
            Fault::Blackhole => relay.pause(),
            Fault::Latency => relay.set_delay(Duration::from_millis(50)),
            Fault::Loss => loss = Some(PacketLoss::start(lab.sshd.port, 5)),
            Fault::SshdDown => lab.sshd.stop(),
            Fault::PostgresDown => lab.pg.stop(),
            // The load's connections are already waiting for a channel that does not open.
            Fault::DatabaseUnreachable => {}
            Fault::OutOfDescriptors => {
                let addr = std::net::SocketAddr::from(([127, 0, 0, 1], db.writer_port));
                held = (0..200)
                    .filter_map(|_| {
                        std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(100)).ok()
                    })
                    .collect();
            }
        }
        std::thread::sleep(Duration::from_millis(500));
        let signalled = Instant::now();
        // SAFETY: kill has no memory-safety preconditions.
        unsafe {
            libc::kill(-dyno.pid(), libc::SIGTERM);
            libc::kill(daemon, libc::SIGTERM);
        }
        // Where the fault leaves a way through, the drain keeps serving it until the app is gone.
        let serving = matches!(
            fault,
            Fault::SessionKilled | Fault::Latency | Fault::Loss | Fault::OutOfDescriptors
        );
        let served_in_drain =
            serving.then(|| load.wait_progress(CLIENTS as u64, Duration::from_millis(900)));
        dyno.wait_exit(T).expect("the app exits");
        let app_exited = dyno.exited_at().unwrap();
        wait_gone(daemon, T).expect("the daemon leaves");
        let daemon_left = Instant::now();
        dyno.wait_for(&["event=stopped"], T);
        let lines = dyno.lines();
        let after_app = daemon_left - app_exited;
        let after_signal = daemon_left - signalled;
        eprintln!(
            "SIGTERM during {fault:?}: the app exited after {:?}, the daemon {after_app:?} after it",
            app_exited - signalled
        );
        figures.push((fault, after_app));
        if let Some(served) = served_in_drain {
            assert!(
                served.is_some(),
                "{fault:?}: nothing served during the drain"
            );
        }
        // It drained until the app exited (not until a deadline), whatever the fault did.
        for event in ["event=drain-started", "event=owner-exited"] {
            assert!(
                lines.iter().any(|line| line.contains(event)),
                "{fault:?}: no {event}:\n{}",
                lines.join("\n")
            );
        }
        assert!(
            !lines
                .iter()
                .any(|line| line.contains("drain-deadline") || line.contains("panicked")),
            "{fault:?}:\n{}",
            lines.join("\n")
        );
        assert!(
            after_app < grace_and_bound + Duration::from_millis(500),
            "{fault:?}: the daemon left {after_app:?} after the app"
        );
        assert!(after_signal < drain_deadline, "{fault:?}: {after_signal:?}");

        drop((load, held, loss, relay));
        match fault {
            Fault::ServerHung => {
                lab.sshd.signal_sessions(libc::SIGCONT);
            }
            Fault::SshdDown => lab.sshd.restart(),
            Fault::PostgresDown => lab.pg.start_again(),
            _ => {}
        }
    }
    eprintln!("SIGTERM during a fault, the daemon left after the app: {figures:?}");
}

/// Resident memory and CPU time (user + system) of `pid`.
fn rss_and_cpu(pid: i32) -> (u64, Duration) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after the command name.
    let ticks: u64 = fields
        .get(11..13)
        .map(|t| t.iter().filter_map(|v| v.parse::<u64>().ok()).sum())
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    (
        support::rss_bytes(pid),
        Duration::from_millis(ticks * 1000 / per_second.max(1)),
    )
}

#[test]
fn a_thousand_connections_at_once_are_all_served_and_all_given_back() {
    let _one = one_at_a_time();
    // This process holds both ends of every connection, and sshd (started by the lab) inherits
    // its limit: room for 1,000 of each.
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and change this process's own limits.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    limit.rlim_cur = limit.rlim_max.min(20_000);
    // SAFETY: as above.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) }, 0);
    assert!(limit.rlim_cur >= 5_000, "needs a descriptor limit of 5,000");

    let Some(mut lab) = support::lab() else {
        return;
    };
    // The database would refuse 1,000 clients: the connections go to an echo server instead.
    let echo = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let echo_port = echo.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in echo.incoming().flatten() {
            std::thread::spawn(move || {
                let mut reader = stream.try_clone().unwrap();
                let mut writer = stream;
                let _ = std::io::copy(&mut reader, &mut writer);
            });
        }
    });
    lab.sshd.permit_open(&format!("127.0.0.1:{echo_port}"));
    let mut db = lab.attachment("DATABASE");
    db.set_conn_info("POSTGRES_PORT", &echo_port.to_string());
    let tunnel = Tunnel::bash(db.vars.iter(), "ulimit -n 4096; exec bpg-tunnel");
    tunnel.wait_for(&["event=ssh-connected"], T);
    let pid = tunnel.pid();
    let (rss_before, _) = rss_and_cpu(pid);
    let fds_before = open_fds(pid);

    use std::io::{Read, Write};
    let started = Instant::now();
    let mut clients: Vec<std::net::TcpStream> = (0..1000)
        .map(|_| std::net::TcpStream::connect(("127.0.0.1", db.writer_port)).unwrap())
        .collect();
    for (n, client) in clients.iter_mut().enumerate() {
        client.write_all(format!("{n:06}\n").as_bytes()).unwrap();
    }
    for (n, client) in clients.iter_mut().enumerate() {
        client.set_read_timeout(Some(T)).unwrap();
        let mut echoed = [0u8; 7];
        client.read_exact(&mut echoed).unwrap();
        assert_eq!(echoed, format!("{n:06}\n").as_bytes());
    }
    let all_served = started.elapsed();
    std::thread::sleep(Duration::from_secs(3));
    let (rss_held, _) = rss_and_cpu(pid);
    let fds_held = open_fds(pid);
    drop(clients);
    let fds_after = fds_back_to(pid, fds_before, T);
    eprintln!(
        "1,000 connections: all echoed in {all_served:?}; RSS {:.1} MB idle, {:.1} MB holding them; \
         descriptors {fds_before} idle, {fds_held} holding them, {fds_after} after",
        rss_before as f64 / 1e6,
        rss_held as f64 / 1e6
    );
    assert!(fds_held >= fds_before + 1000);
    assert!(
        fds_after <= fds_before,
        "{fds_after} descriptors left, {fds_before} before"
    );
    assert_eq!(tunnel.count("event=ssh-disconnected"), 0);
}

#[test]
fn out_of_descriptors_the_tunnel_does_not_spin_and_serves_again_when_they_free_up() {
    let _one = one_at_a_time();
    let Some(lab) = support::lab() else { return };
    let db = lab.attachment("DATABASE");
    let tunnel = Tunnel::bash(db.vars.iter(), "ulimit -n 64; exec bpg-tunnel");
    tunnel.wait_for(&["event=ssh-connected"], T);
    let pid = tunnel.pid();
    // Beyond the listen queue, connects time out: that is the kernel's doing, and fine.
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], db.writer_port));
    let held: Vec<_> = (0..200)
        .filter_map(|_| {
            std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()
        })
        .collect();
    tunnel.wait_for(&["event=accept-failed"], T);
    let (_, cpu_before) = rss_and_cpu(pid);
    std::thread::sleep(Duration::from_secs(3));
    let (_, cpu_after) = rss_and_cpu(pid);
    let spent = cpu_after - cpu_before;
    let held_count = held.len();
    drop(held);
    let status = support::psql(&db, &["select 1"]).output().unwrap().status;
    eprintln!(
        "EMFILE with {} connections waiting: {spent:?} of CPU in 3 s",
        held_count
    );
    // A busy loop would spend the 3 s; a 100 ms back-off spends a few milliseconds.
    assert!(spent < Duration::from_millis(300), "{spent:?}");
    assert!(status.success());
}

/// Weeks of uptime, compressed: pgbench's TPC-B-like load through the tunnel with the server
/// session killed every 30 s (at 15 s, 45 s, ...), resident memory and descriptors sampled
/// every 10 s. `BPG_TUNNEL_SOAK_SECS` sets the length (60 s by default; `scripts/bench.sh` runs
/// 10 minutes with the release binary).
#[test]
fn soak_under_pgbench_with_the_session_killed_every_30s_leaks_nothing() {
    let _one = one_at_a_time();
    let Some(lab) = support::lab() else { return };
    let length = Duration::from_secs(
        std::env::var("BPG_TUNNEL_SOAK_SECS")
            .ok()
            .and_then(|secs| secs.parse().ok())
            .unwrap_or(60),
    );
    let (db, _relay, tunnel) = through_relay(&lab);
    let pid = tunnel.pid();
    // Idle, after one connection has set up what every later one reuses.
    let status = support::psql(&db, &["select 1"]).output().unwrap().status;
    assert!(status.success());
    std::thread::sleep(Duration::from_millis(300));
    let idle_fds = open_fds(pid);
    let pgbench = Pgbench::start(db.writer_port, 8, 200);
    let totals = pgbench.totals();
    let started = Instant::now();
    let mut samples = Vec::new();
    let mut kills = 0;
    let mut next_sample = Duration::ZERO;
    // Kills fall between samples: a sample never catches a session being replaced.
    let mut next_kill = Duration::from_secs(15);
    let sample = |at: Duration| {
        let (rss, cpu) = rss_and_cpu(pid);
        (
            at.as_secs(),
            rss,
            open_fds(pid),
            cpu,
            totals
                .transactions
                .load(std::sync::atomic::Ordering::Relaxed),
            totals.cut_short.load(std::sync::atomic::Ordering::Relaxed),
        )
    };
    while started.elapsed() < length {
        let now = started.elapsed();
        if now >= next_kill {
            assert!(
                lab.sshd.signal_sessions(libc::SIGKILL) > 0,
                "no session to kill"
            );
            kills += 1;
            next_kill += Duration::from_secs(30);
        }
        if now >= next_sample {
            samples.push(sample(now));
            next_sample += Duration::from_secs(10);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    samples.push(sample(length));
    let totals = pgbench.finish();
    let load =
        |counter: &std::sync::atomic::AtomicU64| counter.load(std::sync::atomic::Ordering::Relaxed);
    let (runs, cut_short, failed, transactions) = (
        load(&totals.runs),
        load(&totals.cut_short),
        load(&totals.failed),
        load(&totals.transactions),
    );
    let fds_after = fds_back_to(pid, idle_fds, Duration::from_secs(10));
    eprintln!(
        "soak, {kills} sessions killed; pgbench: {transactions} transactions in {runs} runs, \
         {cut_short} cut short, {failed} failed; descriptors {idle_fds} idle before, {fds_after} after"
    );
    eprintln!("     s  RSS MB  fds  CPU s  transactions  runs cut short");
    for (secs, rss, fds, cpu, transactions, cut_short) in &samples {
        eprintln!(
            "  {secs:>4} {:>7.1} {fds:>4} {:>6.1} {transactions:>13} {cut_short:>5}",
            *rss as f64 / 1e6,
            cpu.as_secs_f64()
        );
    }
    // Resident memory: the 1-minute mark (or, in a shorter run, the first sample after its
    // first third, past the warm-up) against the end. Descriptors: idle before and after, since
    // a sample may fall between two pgbench runs.
    let reference = samples
        .iter()
        .find(|(secs, ..)| *secs >= (length.as_secs() / 3).min(60))
        .unwrap();
    let last = samples.last().unwrap();
    assert!(
        last.1 as f64 <= reference.1 as f64 * 1.10,
        "RSS grew from {} to {}",
        reference.1,
        last.1
    );
    assert!(
        fds_after <= idle_fds,
        "descriptors grew from {idle_fds} to {fds_after}"
    );
    assert!(tunnel.lines().iter().all(|line| !line.contains("panicked")));
    // Each kill replaced the session, and cut short only the run it hit.
    assert_eq!(tunnel.count("event=ssh-connected"), kills + 1);
    assert!(
        cut_short + failed <= kills as u64,
        "{cut_short} runs cut short and {failed} failed with {kills} kills"
    );
    assert!(
        transactions > length.as_secs() * 100,
        "{transactions} transactions"
    );
    let status = support::psql(&db, &["select 1"]).output().unwrap().status;
    assert!(status.success());
}

#[test]
fn a_database_the_server_cannot_reach_fails_each_connection_cleanly_and_keeps_the_session() {
    let _one = one_at_a_time();
    let Some(mut lab) = support::lab() else {
        return;
    };
    // sshd's connect to it hangs, as it would to a blackholed database host.
    let unanswering = Unanswering::new();
    let port = unanswering.port;
    lab.sshd.permit_open(&format!("127.0.0.1:{port}"));
    let mut db = lab.attachment("DATABASE");
    db.set_conn_info("POSTGRES_PORT", &port.to_string());
    let mut args = FAST.to_vec();
    args.extend(["--connection-wait-timeout", "2s"]);
    let tunnel = Tunnel::spawn(db.vars.iter(), &args);
    tunnel.wait_for(&["event=ssh-connected"], T);
    let started = Instant::now();
    let clients: Vec<_> = (0..8)
        .map(|_| {
            support::psql(&db, &["select 1"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    for mut client in clients {
        assert!(!client.wait().unwrap().success());
    }
    let failed_after = started.elapsed();
    let line = tunnel.wait_for_nth(&["event=connection-wait-expired"], 8, T);
    // One try per connection: no more lines come.
    std::thread::sleep(Duration::from_millis(500));
    let expired = tunnel.count("event=connection-wait-expired");
    eprintln!("unreachable database: 8 connections failed after {failed_after:?}, {expired} lines: {line}");
    assert!(line.contains(&format!("target=127.0.0.1:{port}")), "{line}");
    assert!(failed_after < Duration::from_secs(5), "{failed_after:?}");
    assert_eq!(expired, 8);
    assert_eq!(tunnel.count("event=ssh-connected"), 1);
    assert_eq!(tunnel.count("event=ssh-disconnected"), 0);
}
