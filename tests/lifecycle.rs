//! The dyno lifecycle, simulated with real processes: a bash "dyno" that starts the daemon the
//! way a profile.d script does and then runs the app, Heroku's SIGTERM to every process, and
//! `run --` as PID 1 of a fresh PID namespace.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use support::{daemon_pid, psql_url, wait_gone, Tunnel};

const T: Duration = Duration::from_secs(30);

/// The add-on's vars plus a private state dir, so parallel tests' daemons never meet.
fn dyno_vars(lab: &support::Lab, state: &tempfile::TempDir) -> (BTreeMap<String, String>, String) {
    let db = lab.attachment("DATABASE");
    let mut vars = db.vars.clone();
    vars.insert(
        "BPG_TUNNEL_STATE_DIR".into(),
        state.path().display().to_string(),
    );
    vars.insert("BPG_TUNNEL_LOG".into(), "info".into());
    vars.insert("APP_URL".into(), psql_url(&db.vars["DATABASE_URL"]));
    (vars, db.vars["DATABASE_URL"].clone())
}

#[test]
fn boot_the_apps_first_query_succeeds_twenty_times_in_a_row() {
    let Some(lab) = support::lab() else { return };
    let mut waits = Vec::new();
    for run in 0..20 {
        let state = tempfile::tempdir().unwrap();
        let (vars, _) = dyno_vars(&lab, &state);
        // psql does not retry: a refused or failed first attempt fails the run.
        let mut dyno = Tunnel::bash(
            vars.iter(),
            r#"bpg-tunnel start --owner-pid $$; s=$(date +%s%N); psql "$APP_URL" -XAtc "select 'first-query-ok'"; echo "wait_ms=$(( ($(date +%s%N) - s) / 1000000 ))"; exit 0"#,
        );
        let status = dyno.wait_exit(T).expect("the dyno finishes");
        assert!(status.success());
        let out = dyno.lines().join("\n");
        assert!(out.contains("first-query-ok"), "run {run}:\n{out}");
        waits.push(
            out.lines()
                .find_map(|l| l.strip_prefix("wait_ms="))
                .unwrap_or("?")
                .to_owned(),
        );
        let pid = daemon_pid(state.path());
        if let Some(pid) = pid {
            assert!(
                wait_gone(pid, Duration::from_secs(5)).is_some(),
                "daemon outlived its one-off dyno"
            );
        }
    }
    eprintln!(
        "first query after start returned, ms per run: {}",
        waits.join(" ")
    );
}

#[test]
fn shutdown_in_flight_and_new_queries_succeed_while_the_app_drains() {
    let Some(lab) = support::lab() else { return };
    let state = tempfile::tempdir().unwrap();
    let (vars, _) = dyno_vars(&lab, &state);
    // The app: ignores SIGTERM for itself and its children (as a draining server would), has
    // one query in flight and opens a new connection after the SIGTERM.
    let mut dyno = Tunnel::bash(
        vars.iter(),
        r#"trap '' TERM
bpg-tunnel start --owner-pid $$
echo app-booted
psql "$APP_URL" -XAtc "select 'slow-ok', pg_sleep(3)" &
sleep 2
psql "$APP_URL" -XAtc "select 'new-after-sigterm-ok'"
wait
echo app-exiting"#,
    );
    dyno.wait_for(&["app-booted"], T);
    let daemon = daemon_pid(state.path()).expect("daemon pid file");
    std::thread::sleep(Duration::from_millis(800));
    // Heroku signals every process in the dyno: the app's group and the daemon's session.
    support::signal(-dyno.pid(), libc::SIGTERM);
    support::signal(daemon, libc::SIGTERM);
    support::signal(daemon, libc::SIGTERM);
    let status = dyno.wait_exit(T).expect("the app finishes draining");
    let app_exited = dyno.exited_at().unwrap();
    assert!(status.success());
    let out = dyno.lines().join("\n");
    assert!(out.contains("slow-ok"), "{out}");
    assert!(out.contains("new-after-sigterm-ok"), "{out}");
    assert!(out.contains("event=drain-started"), "{out}");
    let gone = wait_gone(daemon, Duration::from_secs(3)).expect("daemon exits after the app");
    eprintln!(
        "daemon exited {:?} after the app",
        app_exited.elapsed().max(gone)
    );
    assert!(app_exited.elapsed() < Duration::from_secs(1) + Duration::from_millis(200));
}

#[test]
fn deadline_the_daemon_leaves_by_the_drain_timeout_if_the_app_ignores_sigterm() {
    let Some(lab) = support::lab() else { return };
    let state = tempfile::tempdir().unwrap();
    let (mut vars, _) = dyno_vars(&lab, &state);
    vars.insert("BPG_TUNNEL_DRAIN_TIMEOUT".into(), "2s".into());
    let dyno = Tunnel::bash(
        vars.iter(),
        "trap '' TERM; bpg-tunnel start --owner-pid $$; echo app-booted; sleep 60",
    );
    dyno.wait_for(&["app-booted"], T);
    let daemon = daemon_pid(state.path()).unwrap();
    let signalled = Instant::now();
    support::signal(daemon, libc::SIGTERM);
    wait_gone(daemon, Duration::from_secs(6)).expect("daemon leaves at the drain timeout");
    let took = signalled.elapsed();
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(4),
        "{took:?}"
    );
    dyno.wait_for(&["event=drain-deadline"], T);
    assert!(
        !state.path().join("bpg-tunnel.pid").exists(),
        "pid file cleaned up"
    );
}

#[test]
fn one_off_owner_exits_without_a_signal_and_the_daemon_follows() {
    let Some(lab) = support::lab() else { return };
    let state = tempfile::tempdir().unwrap();
    let (mut vars, _) = dyno_vars(&lab, &state);
    vars.insert("BPG_TUNNEL_GRACE".into(), "1s".into());
    let mut dyno = Tunnel::bash(
        vars.iter(),
        r#"bpg-tunnel start --owner-pid $$; psql "$APP_URL" -XAtc "select 'migrated'""#,
    );
    dyno.wait_exit(T).unwrap();
    let exited = dyno.exited_at().unwrap();
    assert!(dyno.lines().iter().any(|l| l == "migrated"));
    let daemon_gone = dyno.wait_for(&["event=stopped"], T);
    assert!(!daemon_gone.is_empty());
    assert!(exited.elapsed() < Duration::from_secs(2), "grace 1 s + 1 s");
    // Nothing but errors on a one-off dyno's terminal: info lines only, no warnings or errors.
    assert!(!dyno
        .lines()
        .iter()
        .any(|l| l.contains("level=error") || l.contains("level=warn")));
}

#[test]
fn settings_given_to_start_as_flags_reach_the_daemon() {
    let Some(lab) = support::lab() else { return };
    let state = tempfile::tempdir().unwrap();
    let (mut vars, _) = dyno_vars(&lab, &state);
    vars.remove("BPG_TUNNEL_STATE_DIR");
    vars.insert("STATE".into(), state.path().display().to_string());
    // BPG_TUNNEL_LOG=info is set too: the flag must win in the daemon as it does in `start`.
    let dyno = Tunnel::bash(
        vars.iter(),
        r#"bpg-tunnel --state-dir "$STATE" --log debug start --owner-pid $$; psql "$APP_URL" -XAtc "select 'ok'"; echo booted; sleep 30"#,
    );
    dyno.wait_for(&["booted"], T);
    assert!(dyno.lines().iter().any(|l| l == "ok"));
    let daemon = daemon_pid(state.path()).expect("the daemon's pid file is in --state-dir");
    dyno.wait_for(&["event=connection-open"], T);
    support::signal(daemon, libc::SIGHUP);
    wait_gone(daemon, Duration::from_secs(5)).unwrap();
}

#[test]
fn start_is_idempotent_ignores_a_stale_pid_file_and_never_blocks_the_boot() {
    let Some(lab) = support::lab() else { return };
    let state = tempfile::tempdir().unwrap();
    let (vars, _) = dyno_vars(&lab, &state);
    // Stale: left by a daemon killed with SIGKILL (its lock died with it).
    std::fs::write(state.path().join("bpg-tunnel.pid"), "4000000\n").unwrap();
    let dyno = Tunnel::bash(
        vars.iter(),
        r#"bpg-tunnel start --owner-pid $$; bpg-tunnel start --owner-pid $$; psql "$APP_URL" -XAtc "select 'ok'"; echo booted; sleep 30"#,
    );
    dyno.wait_for(&["booted"], T);
    assert_eq!(dyno.count("event=already-running"), 1);
    assert_eq!(dyno.count("event=ssh-connected"), 1);
    assert!(dyno.lines().iter().any(|l| l == "ok"));
    let daemon = daemon_pid(state.path()).unwrap();
    assert_ne!(daemon, 4_000_000);
    support::signal(daemon, libc::SIGHUP);
    wait_gone(daemon, Duration::from_secs(5)).unwrap();

    // A broken config: start reports it, returns at once, and the shell goes on.
    let mut broken = BTreeMap::new();
    broken.insert(
        "DATABASE_TUNNEL_BPG_CONN_INFO".to_string(),
        "SSH_HOST:=".to_string(),
    );
    broken.insert(
        "DATABASE_URL".to_string(),
        "postgres://u:p@pg-tunnel.borealis-data.com:1/d".to_string(),
    );
    broken.insert(
        "BPG_TUNNEL_STATE_DIR".to_string(),
        state.path().display().to_string(),
    );
    let started = Instant::now();
    let mut dyno = Tunnel::bash(
        broken.iter(),
        "bpg-tunnel start --owner-pid $$; echo shell-continues-$?",
    );
    dyno.wait_exit(T).unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert!(
        dyno.lines().iter().any(|l| l == "shell-continues-0"),
        "{:?}",
        dyno.lines()
    );
    assert!(dyno.count("event=config-error") >= 1);
}

#[test]
fn run_as_pid_1_forwards_sigterm_reaps_zombies_and_propagates_the_status() {
    let Some(lab) = support::lab() else { return };
    if !support::can_unshare_pid() {
        return;
    }
    let state = tempfile::tempdir().unwrap();
    let (vars, _) = dyno_vars(&lab, &state);
    let app = r#"trap 'echo got-sigterm; wait $q; exit 3' TERM
for i in 1 2 3 4 5; do (sleep 0.1 &) ; done
psql "$APP_URL" -XAtc "select 'in-flight-ok', pg_sleep(2)" & q=$!
sleep 1
zombies=$(grep -l '^State:.Z' /proc/[0-9]*/status 2>/dev/null | wc -l)
echo "pid1=$(cat /proc/1/comm) zombies=$zombies"
echo app-ready
while true; do sleep 0.1; done"#;
    let script = format!(
        "exec unshare --pid --fork --kill-child --mount-proc bpg-tunnel run -- bash -c {}",
        shell_quote(app)
    );
    let mut dyno = Tunnel::bash(vars.iter(), &script);
    dyno.wait_for(&["app-ready"], T);
    let out = dyno.lines().join("\n");
    assert!(out.contains("pid1=bpg-tunnel zombies=0"), "{out}");
    // PID 1 of the namespace, seen from here: unshare's child.
    let pid1 = support::descendants(dyno.pid())[0];
    support::signal(pid1, libc::SIGTERM);
    let status = dyno.wait_exit(T).expect("run exits with its child");
    let out = dyno.lines().join("\n");
    assert!(out.contains("got-sigterm"), "{out}");
    assert!(out.contains("in-flight-ok"), "{out}");
    assert_eq!(status.code(), Some(3), "{out}");
}

#[test]
fn run_scrubs_the_secrets_reports_a_missing_command_and_runs_the_app_without_tunnels() {
    let Some(lab) = support::lab() else { return };
    let state = tempfile::tempdir().unwrap();
    let (vars, _) = dyno_vars(&lab, &state);

    let app = r#"echo "conn-info=${DATABASE_TUNNEL_BPG_CONN_INFO:-unset} url=${DATABASE_URL:+set}"; psql "$APP_URL" -XAtc "select 'through'""#;
    let mut run = Tunnel::spawn(vars.iter(), &["run", "--scrub-env", "--", "sh", "-c", app]);
    let status = run.wait_exit(T).expect("run exits with its command");
    let out = run.lines().join("\n");
    assert!(status.success(), "{out}");
    assert!(out.contains("conn-info=unset url=set"), "{out}");
    assert!(out.contains("through"), "{out}");
    assert!(out.contains("event=stopped"), "{out}");

    // As a shell would: 127 for a command that is not there; the tunnels still stop in order.
    let mut run = Tunnel::spawn(
        vars.iter(),
        &["run", "--", "/nonexistent/app", "--password=hunter2"],
    );
    let status = run.wait_exit(T).expect("run exits");
    let out = run.lines().join("\n");
    assert_eq!(status.code(), Some(127), "{out}");
    assert!(out.contains("event=command-failed"), "{out}");
    assert!(out.contains("/nonexistent/app"), "{out}");
    assert!(
        !out.contains("hunter2"),
        "the arguments may hold secrets:\n{out}"
    );
    assert!(out.contains("event=stopped"), "{out}");

    // Nothing to serve: the app still runs, and its status is run's.
    let no_addon = BTreeMap::<String, String>::new();
    let mut run = Tunnel::spawn(no_addon.iter(), &["run", "--", "sh", "-c", "exit 7"]);
    let status = run.wait_exit(T).expect("run exits");
    let out = run.lines().join("\n");
    assert_eq!(status.code(), Some(7), "{out}");
    assert!(out.contains("event=nothing-to-serve"), "{out}");
}

#[test]
fn bpg_tunnel_disable_starts_no_tunnel_in_any_launch_form_and_the_app_still_runs() {
    let Some(lab) = support::lab() else { return };
    let state = tempfile::tempdir().unwrap();
    let (mut vars, _) = dyno_vars(&lab, &state);
    vars.insert("BPG_TUNNEL_DISABLE".into(), "1".into());

    let mut run = Tunnel::spawn(
        vars.iter(),
        &["run", "--", "sh", "-c", "echo app-ran; exit 5"],
    );
    let status = run.wait_exit(T).expect("run exits with its command");
    let out = run.lines().join("\n");
    assert_eq!(status.code(), Some(5), "{out}");
    assert!(out.contains("app-ran"), "{out}");
    assert!(out.contains("event=disabled"), "{out}");
    assert!(!out.contains("event=listening"), "a tunnel started:\n{out}");

    let mut foreground = Tunnel::spawn(vars.iter(), &[]);
    let status = foreground
        .wait_exit(T)
        .expect("the foreground form exits at once");
    let out = foreground.lines().join("\n");
    assert!(status.success(), "{out}");
    assert!(out.contains("event=disabled"), "{out}");
    assert!(!out.contains("event=listening"), "a tunnel started:\n{out}");

    let owner = std::process::id().to_string();
    let mut start = Tunnel::spawn(vars.iter(), &["start", "--owner-pid", &owner]);
    let status = start.wait_exit(T).expect("start returns");
    assert!(status.success(), "{}", start.lines().join("\n"));
    assert_eq!(daemon_pid(state.path()), None, "start left a daemon");

    // Empty means unset, as in the profile.d script's test.
    vars.insert("BPG_TUNNEL_DISABLE".into(), String::new());
    let mut run = Tunnel::spawn(vars.iter(), &["run", "--", "sh", "-c", "exit 0"]);
    run.wait_exit(T).expect("run exits with its command");
    let out = run.lines().join("\n");
    assert!(out.contains("event=listening"), "{out}");
}

#[test]
fn an_invalid_setting_or_the_apps_rust_log_never_keeps_the_app_or_the_tunnel_from_starting() {
    let Some(lab) = support::lab() else { return };
    let state = tempfile::tempdir().unwrap();
    let (vars, _) = dyno_vars(&lab, &state);

    // `run`: the app starts and reaches the database; the tunnel says what it replaced, and the
    // app's own RUST_LOG does not silence it.
    let app = r#"echo app-started; psql "$APP_URL" -XAtc "select 'through'""#;
    let script = format!(
        r#"unset BPG_TUNNEL_LOG; export RUST_LOG=myapp=debug BPG_TUNNEL_CONNECT_TIMEOUT="10 seconds"; exec bpg-tunnel run -- sh -c {}"#,
        shell_quote(app)
    );
    let mut run = Tunnel::bash(vars.iter(), &script);
    let status = run.wait_exit(T).expect("run exits with its command");
    let out = run.lines().join("\n");
    assert!(status.success(), "{out}");
    assert!(out.contains("app-started"), "{out}");
    assert!(out.contains("through"), "{out}");
    assert!(out.contains("event=ready"), "{out}");
    let warning = run.wait_for(&["event=setting-invalid"], T);
    assert!(warning.contains("level=warn"), "{warning}");
    assert!(
        warning.contains("var=BPG_TUNNEL_CONNECT_TIMEOUT"),
        "{warning}"
    );
    assert!(warning.contains("default=10s"), "{warning}");

    // `start`: the daemon serves with the default and says so, once.
    let dyno = Tunnel::bash(
        vars.iter(),
        r#"export BPG_TUNNEL_KEEPALIVE_COUNT=many; bpg-tunnel start --owner-pid $$; psql "$APP_URL" -XAtc "select 'booted'"; sleep 30"#,
    );
    dyno.wait_for(&["booted"], T);
    dyno.wait_for(
        &["event=setting-invalid", "var=BPG_TUNNEL_KEEPALIVE_COUNT"],
        T,
    );
    assert_eq!(dyno.count("event=setting-invalid"), 1);
    let daemon = daemon_pid(state.path()).unwrap();
    support::signal(daemon, libc::SIGHUP);
    wait_gone(daemon, Duration::from_secs(5)).unwrap();
}

/// The attachment with its SSH server unreachable (nothing listens on its port).
fn server_down_vars(lab: &support::Lab, state: &tempfile::TempDir) -> BTreeMap<String, String> {
    let mut db = lab.attachment("DATABASE");
    db.set_conn_info("SSH_PORT", &support::free_port().to_string());
    let mut vars = db.vars.clone();
    vars.insert(
        "BPG_TUNNEL_STATE_DIR".into(),
        state.path().display().to_string(),
    );
    vars.insert("BPG_TUNNEL_READY_TIMEOUT".into(), "10s".into());
    vars.insert("BPG_TUNNEL_DRAIN_TIMEOUT".into(), "2s".into());
    vars
}

#[test]
fn a_sigterm_while_start_waits_for_the_server_starts_the_drain_at_once() {
    let Some(lab) = support::lab() else { return };
    let state = tempfile::tempdir().unwrap();
    let vars = server_down_vars(&lab, &state);
    // The app ignores SIGTERM and stays: only the drain deadline ends the daemon.
    let dyno = Tunnel::bash(
        vars.iter(),
        r#"trap '' TERM; bpg-tunnel start --owner-pid $$; sleep 60"#,
    );
    // Serving (its signal handlers set), and waiting for a server that does not answer.
    dyno.wait_for(&["event=ssh-connect-failed"], T);
    let daemon = daemon_pid(state.path()).expect("the daemon's pid file");
    support::signal(daemon, libc::SIGTERM);
    let gone = wait_gone(daemon, T).expect("the daemon leaves");
    // Drain 2 s from the signal, not from the end of the 10 s ready wait.
    assert!(gone < Duration::from_secs(4), "left {gone:?} after SIGTERM");
}

#[test]
fn a_sigterm_while_run_waits_for_the_server_never_starts_the_command() {
    let Some(lab) = support::lab() else { return };
    let state = tempfile::tempdir().unwrap();
    let vars = server_down_vars(&lab, &state);
    let mut run = Tunnel::spawn(
        vars.iter(),
        &["run", "--", "sh", "-c", "echo command-started; sleep 30"],
    );
    run.wait_for(&["event=ssh-connect-failed"], T);
    let signalled = Instant::now();
    run.signal(libc::SIGTERM);
    let status = run.wait_exit(T).expect("run exits");
    let out = run.lines().join("\n");
    assert!(signalled.elapsed() < Duration::from_secs(5), "{out}");
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "{out}");
    assert!(!out.contains("command-started"), "{out}");
}

#[test]
fn an_owner_pid_that_is_no_process_is_refused() {
    let Some(lab) = support::lab() else { return };
    let state = tempfile::tempdir().unwrap();
    let (vars, _) = dyno_vars(&lab, &state);
    for owner in ["0", "-1"] {
        let mut start = Tunnel::spawn(vars.iter(), &["start", "--owner-pid", owner]);
        let status = start.wait_exit(T).expect("start exits");
        let out = start.lines().join("\n");
        assert_eq!(status.code(), Some(2), "{owner}: {out}");
        assert!(out.contains("--owner-pid"), "{owner}: {out}");
        assert_eq!(daemon_pid(state.path()), None, "{owner}: a daemon started");
    }
}

#[test]
fn stop_signals_nothing_but_the_daemon() {
    let Some(_lab) = support::lab() else { return };
    let state = tempfile::tempdir().unwrap();
    let path = state.path().join("bpg-tunnel.pid");
    let mut bystander = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .unwrap();
    let bystander_pid = bystander.id().to_string();
    // A pid file some process holds locked: empty (a daemon between its lock and its write),
    // or naming a process that is not a daemon.
    for content in ["", bystander_pid.as_str()] {
        std::fs::write(&path, content).unwrap();
        let held = std::fs::File::open(&path).unwrap();
        held.lock().unwrap();
        let mut command = std::process::Command::new(support::tunnel_binary());
        command.args(["--state-dir", &state.path().display().to_string(), "stop"]);
        // In a process group of its own: kill(0, …) would hit nothing else.
        let mut stop = Tunnel::command(command, std::iter::empty());
        let status = stop.wait_exit(T).expect("stop exits");
        let out = stop.lines().join("\n");
        assert_eq!(status.code(), Some(1), "{content:?}: {out}");
        assert!(out.contains("event=stop-failed"), "{content:?}: {out}");
        assert!(
            bystander.try_wait().unwrap().is_none(),
            "the bystander was signalled"
        );
    }
    let _ = bystander.kill();
    let _ = bystander.wait();
}

#[test]
fn an_unwritable_home_still_gives_one_daemon_that_stop_finds() {
    let Some(lab) = support::lab() else { return };
    let state = tempfile::tempdir().unwrap();
    let (mut vars, _) = dyno_vars(&lab, &state);
    vars.remove("BPG_TUNNEL_STATE_DIR");
    // Nothing can be created under /proc, not even by root.
    vars.insert("HOME".into(), "/proc/no-such-home".into());
    vars.insert("TMPDIR".into(), state.path().display().to_string());
    let dyno = Tunnel::bash(
        vars.iter(),
        r#"bpg-tunnel start --owner-pid $$; bpg-tunnel start --owner-pid $$; psql "$APP_URL" -XAtc "select 'ok'"; bpg-tunnel stop; echo "stop-status=$?"; sleep 30"#,
    );
    dyno.wait_for(&["stop-status="], T);
    let out = dyno.lines().join("\n");
    assert!(out.contains("stop-status=0"), "{out}");
    assert_eq!(dyno.count("event=already-running"), 1, "{out}");
    assert_eq!(
        dyno.count("event=listening addon=DATABASE role=writer"),
        1,
        "one daemon only:\n{out}"
    );
    assert!(out.contains("event=daemon-stopped"), "{out}");
}

#[test]
fn a_symlink_planted_in_place_of_the_state_dir_is_never_followed() {
    let Some(lab) = support::lab() else { return };
    // A directory of root's (the tests' user), holding files named as the daemon's.
    let victim = tempfile::tempdir().unwrap();
    let victim_files = [
        ("bpg-tunnel.pid", "the victim's pid file\n"),
        ("bpg-tunnel.sock", "the victim's socket\n"),
    ];
    for (name, content) in victim_files {
        std::fs::write(victim.path().join(name), content).unwrap();
    }
    // Where the daemon's own place under the temporary directory would be, another user
    // planted a link to it.
    let tmp = tempfile::tempdir().unwrap();
    let uid = support::euid();
    let planted = tmp.path().join(format!("borealis-pg-{uid}"));
    std::os::unix::fs::symlink(victim.path(), &planted).unwrap();
    let (mut vars, _) = dyno_vars(&lab, &tmp);
    vars.remove("BPG_TUNNEL_STATE_DIR");
    vars.insert("HOME".into(), "/proc/no-such-home".into());
    vars.insert("TMPDIR".into(), tmp.path().display().to_string());
    vars.insert("BPG_TUNNEL_GRACE".into(), "1s".into());
    let mut dyno = Tunnel::bash(
        vars.iter(),
        r#"bpg-tunnel start --owner-pid $$; psql "$APP_URL" -XAtc "select 'served'""#,
    );
    dyno.wait_exit(T).unwrap();
    // The daemon follows its owner out: whatever it removes on the way is gone by now.
    dyno.wait_for(&["event=stopped"], T);
    let out = dyno.lines().join("\n");
    assert!(dyno.lines().iter().any(|l| l == "served"), "{out}");

    let mut left: Vec<String> = std::fs::read_dir(victim.path())
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["bpg-tunnel.pid", "bpg-tunnel.sock"], "{out}");
    for (name, content) in victim_files {
        let now = std::fs::read_to_string(victim.path().join(name));
        assert_eq!(now.ok().as_deref(), Some(content), "{name}:\n{out}");
    }
    assert!(std::fs::symlink_metadata(&planted)
        .unwrap()
        .file_type()
        .is_symlink());
    // Serving goes on without a pid file or status socket, saying why.
    let refused = dyno.wait_for(&["event=pidfile-failed", &planted.display().to_string()], T);
    assert!(refused.contains("symbolic link"), "{refused}");
    let refused = dyno.wait_for(&["event=status-socket-failed"], T);
    assert!(refused.contains("symbolic link"), "{refused}");
}

#[test]
fn runs_command_gets_the_core_limits_run_was_started_with() {
    let Some(_lab) = support::lab() else { return };
    let script = r#"ulimit -S -c 1024 2>/dev/null; echo "outer=$(ulimit -S -c)/$(ulimit -H -c)"; exec bpg-tunnel run -- bash -c 'echo "inner=$(ulimit -S -c)/$(ulimit -H -c)"'"#;
    let mut run = Tunnel::bash(std::iter::empty(), script);
    run.wait_exit(T).expect("run exits");
    let lines = run.lines();
    let value = |prefix: &str| {
        lines
            .iter()
            .find_map(|l| l.strip_prefix(prefix))
            .unwrap_or_else(|| panic!("no {prefix} in {lines:#?}"))
            .to_owned()
    };
    assert_eq!(value("inner="), value("outer="), "{lines:#?}");
}

fn shell_quote(raw: &str) -> String {
    format!("'{}'", raw.replace('\'', r"'\''"))
}
