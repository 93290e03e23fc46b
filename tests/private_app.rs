//! Private-app-tunnel mode against a fake of the add-on's API (HTTPS on loopback, a throwaway
//! CA): the exact requests, retries, refusals, renewal, deregistration in each way the dyno can
//! end, and an SSH add-on served alongside.
#![allow(
    clippy::disallowed_methods,
    reason = "a test reads its lab's settings from the environment"
)]

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use support::api::{FakeApi, Reply, Request};
use support::{field, Tunnel};

use bpg_tunnel::ConnInfo;

const T: Duration = Duration::from_secs(30);
const JWT: &str = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ0ZXN0LWFwcCJ9.dGVzdC1zaWduYXR1cmUtc2VjcmV0";

/// Heroku's id of the dyno (`HEROKU_DYNO_ID`, with dyno metadata enabled), in the form of the
/// platform's example.
const DYNO_ID: &str = "1vac4117-c29f-4312-521e-ba4d8638c1ac";

/// The client id a tunnel with the variables of [`private_app`] registers under.
fn client_id() -> String {
    format!("web.1_{DYNO_ID}")
}

/// The config vars of a private-app add-on under `prefix`, plus a private state dir and fast
/// timings for the test.
fn private_app(api: &FakeApi, prefix: &str, state: &Path) -> BTreeMap<String, String> {
    assert!(
        cfg!(feature = "test-api-ca") || support::is_release_binary(),
        "the fake API is trusted only with --features test-api-ca (scripts/test.sh sets it)"
    );
    let conn_info = ConnInfo::render([
        ("API_BASE_URL", api.base_url().as_str()),
        (
            "ADDON_ID",
            &format!("addon-{}", prefix.to_ascii_lowercase()),
        ),
        ("CLIENT_APP_JWT", JWT),
    ]);
    [
        (format!("{prefix}_TUNNEL_BPG_CONN_INFO"), conn_info),
        (
            format!("{prefix}_URL"),
            "postgres://u:p@db.private.example:5432/db".to_owned(),
        ),
        (
            "BPG_TUNNEL_TEST_API_CA_FILE".to_owned(),
            api.ca_file().display().to_string(),
        ),
        (
            "BPG_TUNNEL_STATE_DIR".to_owned(),
            state.display().to_string(),
        ),
        (
            "BPG_TUNNEL_PRIVATE_TUNNEL_REQUEST_TIMEOUT".to_owned(),
            "1s".to_owned(),
        ),
        ("BPG_TUNNEL_LOG".to_owned(), "info".to_owned()),
        ("DYNO".to_owned(), "web.1".to_owned()),
        ("HEROKU_DYNO_ID".to_owned(), DYNO_ID.to_owned()),
    ]
    .into_iter()
    .collect()
}

fn tunnels_path(prefix: &str) -> String {
    format!(
        "/api/heroku/resources/addon-{}/private-app-tunnels",
        prefix.to_ascii_lowercase()
    )
}

fn assert_no_token(lines: &[String]) {
    for line in lines {
        assert!(!line.contains(JWT), "the token leaked: {line}");
        assert!(!line.contains("dGVzdC1zaWduYXR1cmUtc2VjcmV0"), "{line}");
    }
}

fn assert_register(request: &Request, prefix: &str) {
    assert_eq!(request.method, "POST");
    assert_eq!(request.path, tunnels_path(prefix));
    assert_headers(request);
    assert_eq!(request.header("content-type"), Some("application/json"));
    let body: serde_json::Value = serde_json::from_str(&request.body).unwrap();
    assert_eq!(
        body,
        serde_json::json!({
            "clientId": client_id(),
            "autoDestroyDelaySeconds": 4500,
        })
    );
}

fn assert_headers(request: &Request) {
    let bearer = format!("Bearer {JWT}");
    assert_eq!(request.header("authorization"), Some(bearer.as_str()));
    let agent = format!("bpg-tunnel/{}", env!("CARGO_PKG_VERSION"));
    assert_eq!(request.header("user-agent"), Some(agent.as_str()));
}

fn index_of(lines: &[String], needle: &str) -> usize {
    lines
        .iter()
        .position(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("no {needle} in {lines:#?}"))
}

#[test]
fn register_extend_and_deregister_send_exactly_the_contract_requests() {
    let api = FakeApi::start();
    let state = tempfile::tempdir().unwrap();
    let mut vars = private_app(&api, "DATABASE", state.path());
    vars.insert(
        "BPG_TUNNEL_PRIVATE_TUNNEL_EXTEND_INTERVAL".into(),
        "400ms".into(),
    );
    let tunnel = Tunnel::spawn(vars.iter(), &[]);
    tunnel.wait_for(&["event=private-tunnel-registered", "addon=DATABASE"], T);
    tunnel.wait_for_nth(&["event=private-tunnel-extended"], 2, T);
    tunnel.signal(libc::SIGTERM);
    tunnel.wait_for(&["event=private-tunnel-deregistered"], T);
    tunnel.wait_for(&["event=stopped"], T);

    let requests = api.requests();
    let (delete, posts) = requests.split_last().unwrap();
    assert!(posts.len() >= 3, "{requests:#?}");
    for post in posts {
        assert_register(post, "DATABASE");
    }
    // Renewals come at the configured interval, not in a burst.
    for pair in posts.windows(2) {
        assert!(pair[1].at - pair[0].at >= Duration::from_millis(350));
    }
    assert_eq!(delete.method, "DELETE");
    assert_eq!(
        delete.path,
        format!("{}/{}", tunnels_path("DATABASE"), client_id())
    );
    assert_headers(delete);
    assert_eq!(delete.body, "");
    assert_no_token(&tunnel.lines());
}

#[test]
fn registration_retries_a_5xx_a_hung_request_and_a_reset_before_start_reports_ready() {
    let api = FakeApi::start();
    api.script(&[Reply::Status(503), Reply::Hang, Reply::Reset]);
    let state = tempfile::tempdir().unwrap();
    let vars = private_app(&api, "DATABASE", state.path());
    let started = Instant::now();
    let dyno = Tunnel::bash(
        vars.iter(),
        "bpg-tunnel start --owner-pid $$; echo start-returned; sleep 30",
    );
    dyno.wait_for(&["start-returned"], T);
    let took = started.elapsed();
    let lines = dyno.lines();
    assert!(
        index_of(&lines, "event=private-tunnel-registered") < index_of(&lines, "start-returned"),
        "{lines:#?}"
    );
    assert!(
        lines.iter().any(|l| l.contains("event=ready")),
        "{lines:#?}"
    );
    let failures: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("event=private-tunnel-register-failed"))
        .collect();
    assert_eq!(failures.len(), 3, "{lines:#?}");
    assert!(failures[0].contains("status=503"), "{}", failures[0]);
    assert!(
        failures[1].contains("did not answer in time"),
        "{}",
        failures[1]
    );
    let requests = api.requests();
    assert_eq!(requests.len(), 4, "{requests:#?}");
    for request in &requests {
        assert_register(request, "DATABASE");
    }
    eprintln!(
        "registered through 503, hang (1 s timeout) and reset; start returned after {took:?}"
    );
    assert_no_token(&lines);
}

#[test]
fn a_refused_token_is_a_clear_error_the_app_still_boots_and_retries_continue() {
    let api = FakeApi::start();
    api.set_default(Reply::Status(401));
    let state = tempfile::tempdir().unwrap();
    let mut vars = private_app(&api, "DATABASE", state.path());
    vars.insert("BPG_TUNNEL_READY_TIMEOUT".into(), "1s".into());
    vars.insert(
        "BPG_TUNNEL_PRIVATE_TUNNEL_RETRY_INTERVAL".into(),
        "1s".into(),
    );
    let dyno = Tunnel::bash(
        vars.iter(),
        "bpg-tunnel start --owner-pid $$; echo app-booted-$?; sleep 30",
    );
    dyno.wait_for(&["app-booted-0"], T);
    let failed = dyno.wait_for(&["event=private-tunnel-register-failed"], T);
    assert!(failed.contains("level=error"), "{failed}");
    assert!(failed.contains("status=401"), "{failed}");
    assert!(failed.contains("expired or revoked"), "{failed}");
    dyno.wait_for(&["event=not-ready", "DATABASE"], T);

    // Once the token is good again (say, the add-on rotated it), the next retry registers.
    api.set_default(Reply::Status(201));
    dyno.wait_for(&["event=private-tunnel-registered"], T);
    let requests = api.requests();
    assert!(requests.len() >= 2);
    assert!(
        requests[1].at - requests[0].at >= Duration::from_millis(950),
        "a refusal is not retried at once"
    );
    assert_no_token(&dyno.lines());
}

#[test]
fn a_failed_renewal_says_when_the_registration_expires_and_is_retried() {
    let api = FakeApi::start();
    api.script(&[Reply::Status(201), Reply::Status(500)]);
    let state = tempfile::tempdir().unwrap();
    let mut vars = private_app(&api, "DATABASE", state.path());
    vars.insert(
        "BPG_TUNNEL_PRIVATE_TUNNEL_EXTEND_INTERVAL".into(),
        "300ms".into(),
    );
    vars.insert(
        "BPG_TUNNEL_PRIVATE_TUNNEL_RETRY_INTERVAL".into(),
        "500ms".into(),
    );
    let tunnel = Tunnel::spawn(vars.iter(), &[]);
    let failed = tunnel.wait_for(&["event=private-tunnel-extend-failed"], T);
    assert!(failed.contains("status=500"), "{failed}");
    let expires_in: u64 = support::field(&failed, "expires_in_s").parse().unwrap();
    // 4500 s after the registration, less the ~0.3 s since.
    assert!((4498..=4499).contains(&expires_in), "{failed}");
    tunnel.wait_for(&["event=private-tunnel-extended"], T);
    let requests = api.requests();
    assert!(requests[2].at - requests[1].at >= Duration::from_millis(450));
    assert_no_token(&tunnel.lines());
}

#[test]
fn deregisters_when_the_app_exits_after_a_sigterm_drain_and_when_a_one_off_ends() {
    // A web dyno: SIGTERM, the app drains for 1.5 s, exits; the registration goes with it.
    let api = FakeApi::start();
    let state = tempfile::tempdir().unwrap();
    let vars = private_app(&api, "DATABASE", state.path());
    let mut dyno = Tunnel::bash(
        vars.iter(),
        "trap 'sleep 1.5; exit 0' TERM; bpg-tunnel start --owner-pid $$; echo booted; while true; do sleep 0.1; done",
    );
    dyno.wait_for(&["booted"], T);
    let daemon = support::daemon_pid(state.path()).expect("daemon pid file");
    let signalled = Instant::now();
    support::signal(-dyno.pid(), libc::SIGTERM);
    support::signal(daemon, libc::SIGTERM);
    dyno.wait_exit(T).unwrap();
    dyno.wait_for(&["event=private-tunnel-deregistered"], T);
    let requests = api.requests();
    let delete = requests.last().unwrap();
    assert_eq!(delete.method, "DELETE");
    let after = delete.at - signalled;
    assert!(
        after >= Duration::from_millis(1400),
        "not before the app is gone: {after:?}"
    );
    assert!(after < Duration::from_secs(5), "{after:?}");

    // A one-off dyno: the command ends without any signal.
    let api = FakeApi::start();
    let state = tempfile::tempdir().unwrap();
    let mut vars = private_app(&api, "DATABASE", state.path());
    vars.insert("BPG_TUNNEL_GRACE".into(), "500ms".into());
    let mut dyno = Tunnel::bash(
        vars.iter(),
        "bpg-tunnel start --owner-pid $$; echo migrated",
    );
    dyno.wait_exit(T).unwrap();
    dyno.wait_for(&["event=private-tunnel-deregistered"], T);
    let methods: Vec<String> = api.requests().iter().map(|r| r.method.clone()).collect();
    assert_eq!(methods, ["POST", "DELETE"]);
    assert_no_token(&dyno.lines());
}

#[test]
fn a_hung_api_at_shutdown_cannot_hold_the_dyno_past_its_deadline() {
    let api = FakeApi::start();
    api.script(&[Reply::Status(201)]);
    api.set_default(Reply::Hang);
    let state = tempfile::tempdir().unwrap();
    let mut vars = private_app(&api, "DATABASE", state.path());
    vars.insert(
        "BPG_TUNNEL_PRIVATE_TUNNEL_REQUEST_TIMEOUT".into(),
        "30s".into(),
    );
    let mut tunnel = Tunnel::spawn(vars.iter(), &[]);
    tunnel.wait_for(&["event=private-tunnel-registered"], T);
    let signalled = Instant::now();
    tunnel.signal(libc::SIGTERM);
    tunnel.wait_exit(T).expect("exits");
    let took = signalled.elapsed();
    let line = tunnel.wait_for(&["event=private-tunnel-deregister-failed"], T);
    assert!(line.contains("75 min"), "{line}");
    assert!(took < Duration::from_secs(5), "{took:?}");
}

#[test]
fn a_sigterm_during_a_hung_renewal_still_deregisters_at_once() {
    let api = FakeApi::start();
    api.script(&[Reply::Status(201), Reply::Hang]);
    let state = tempfile::tempdir().unwrap();
    let mut vars = private_app(&api, "DATABASE", state.path());
    vars.insert(
        "BPG_TUNNEL_PRIVATE_TUNNEL_EXTEND_INTERVAL".into(),
        "200ms".into(),
    );
    vars.insert(
        "BPG_TUNNEL_PRIVATE_TUNNEL_REQUEST_TIMEOUT".into(),
        "30s".into(),
    );
    let mut tunnel = Tunnel::spawn(vars.iter(), &[]);
    tunnel.wait_for(&["event=private-tunnel-registered"], T);
    api.wait_requests(2, T);
    let signalled = Instant::now();
    tunnel.signal(libc::SIGTERM);
    tunnel.wait_exit(T).expect("exits");
    let requests = api.wait_requests(3, T);
    assert_eq!(requests[2].method, "DELETE", "{requests:#?}");
    tunnel.wait_for(&["event=private-tunnel-deregistered"], T);
    assert!(signalled.elapsed() < Duration::from_secs(5));
}

#[test]
fn an_ssh_addon_and_a_private_app_addon_at_once_each_work() {
    let Some(lab) = support::lab() else { return };
    let api = FakeApi::start();
    let state = tempfile::tempdir().unwrap();
    let db = lab.attachment("DATABASE");
    let mut vars = private_app(&api, "BOREALIS_PG_RED", state.path());
    vars.extend(db.vars.clone());
    let tunnel = Tunnel::spawn(vars.iter(), &[]);
    tunnel.wait_for(
        &["event=private-tunnel-registered", "addon=BOREALIS_PG_RED"],
        T,
    );
    tunnel.wait_for(&["event=ssh-connected", "addon=DATABASE"], T);
    let rt = tokio::runtime::Runtime::new().unwrap();
    assert_eq!(
        rt.block_on(support::server_addr(db.writer_port)).unwrap(),
        "127.0.0.1"
    );
    assert_register(&api.requests()[0], "BOREALIS_PG_RED");
    assert_eq!(
        tunnel.count("event=config-error"),
        0,
        "{:#?}",
        tunnel.lines()
    );
    assert_no_token(&tunnel.lines());
}

/// Release builds leave the tests' CA variable out: the token never goes to a server only a
/// variable vouches for. Test builds (this file's other tests) trust it.
#[test]
fn the_tests_api_ca_is_trusted_by_test_builds_only() {
    let api = FakeApi::start();
    let state = tempfile::tempdir().unwrap();
    let vars = private_app(&api, "DATABASE", state.path());
    let tunnel = Tunnel::spawn(vars.iter(), &[]);
    if !support::is_release_binary() {
        tunnel.wait_for(&["event=private-tunnel-registered"], T);
        assert_eq!(tunnel.count("BPG_TUNNEL_TEST_API_CA_FILE"), 0);
        return;
    }
    let warning = tunnel.wait_for(&["event=setting-invalid", "BPG_TUNNEL_TEST_API_CA_FILE"], T);
    assert!(warning.contains("test builds only"), "{warning}");
    let failed = tunnel.wait_for(&["event=private-tunnel-register-failed"], T);
    assert!(
        failed.contains("certificate") || failed.contains("Certificate"),
        "{failed}"
    );
    assert!(api.requests().is_empty(), "the token reached the fake API");
    assert_no_token(&tunnel.lines());
}

#[test]
fn check_registers_under_its_own_id_removes_it_and_names_a_refused_token() {
    let api = FakeApi::start();
    let state = tempfile::tempdir().unwrap();
    let vars = private_app(&api, "DATABASE", state.path());
    let support::Checked {
        code,
        stdout,
        stderr,
    } = support::check(&vars, &[]);
    assert_eq!(code, 0);
    assert!(stdout.contains("DATABASE (DATABASE_TUNNEL_BPG_CONN_INFO, private-app-tunnel)"));
    for step in ["✓ config", "✓ api", "✓ token"] {
        assert!(stdout.contains(step), "{stdout}");
    }
    // Its own id: a daemon's registration on the same dyno is not the one removed.
    let check_id = format!("{}_check", client_id());
    let requests = api.requests();
    assert_eq!(requests.len(), 2);
    assert_eq!(requests[0].method, "POST");
    assert!(requests[0].body.contains(&check_id), "{}", requests[0].body);
    assert_eq!(requests[1].method, "DELETE");
    assert_eq!(
        requests[1].path,
        format!("{}/{check_id}", tunnels_path("DATABASE"))
    );
    assert_no_token(&[stdout, stderr]);

    api.set_default(Reply::Status(401));
    let support::Checked {
        code,
        stdout,
        stderr,
    } = support::check(&vars, &[]);
    assert_eq!(code, 1);
    assert!(stdout.contains("✓ api"), "{stdout}");
    let refused = stdout
        .lines()
        .find(|line| line.contains("✗ token"))
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(refused.contains("401"), "{refused}");
    assert!(stdout.contains("refused CLIENT_APP_JWT"), "{stdout}");
    assert_no_token(&[stdout, stderr]);
}

#[test]
fn status_shows_the_registration_its_expiry_and_a_refused_renewal() {
    let api = FakeApi::start();
    let state = tempfile::tempdir().unwrap();
    let mut vars = private_app(&api, "DATABASE", state.path());
    vars.insert(
        "BPG_TUNNEL_PRIVATE_TUNNEL_EXTEND_INTERVAL".into(),
        "500ms".into(),
    );
    vars.insert(
        "BPG_TUNNEL_PRIVATE_TUNNEL_RETRY_INTERVAL".into(),
        "500ms".into(),
    );
    let tunnel = Tunnel::spawn(vars.iter(), &[]);
    tunnel.wait_for(&["event=private-tunnel-registered"], T);
    let (code, json) = support::status_json(state.path());
    assert_eq!(code, 0, "{json:#}");
    let registration = &json["registrations"][0];
    assert_eq!(registration["addon"], "DATABASE");
    assert_eq!(registration["registered"], true);
    let renewed = humantime::parse_rfc3339(registration["last_renewed"].as_str().unwrap()).unwrap();
    let expires = humantime::parse_rfc3339(registration["expires_at"].as_str().unwrap()).unwrap();
    assert_eq!(
        expires.duration_since(renewed).unwrap(),
        Duration::from_secs(75 * 60)
    );

    // Renewals refused: still registered until the add-on drops it, and the refusal shown.
    api.set_default(Reply::Status(401));
    tunnel.wait_for(&["event=private-tunnel-extend-failed"], T);
    let (code, json) = support::status_json(state.path());
    let registration = &json["registrations"][0];
    assert_eq!(code, 0, "{json:#}");
    assert_eq!(registration["registered"], true);
    let error = registration["last_error"]["error"].as_str().unwrap();
    assert!(error.contains("401"), "{error}");
    assert!(!json.to_string().contains(JWT));
}

/// A container platform (Heroku Fir, any CNB image): the app is PID 1 of the container, only it
/// gets SIGTERM, and when it exits the kernel kills every other process of the container at
/// once. The launcher is played as it works: PID 1 of a fresh PID namespace runs the layer's
/// exec.d (the binary, linked as `bin/build` links it) with descriptor 3 a pipe read to its end,
/// then execs the process in its own place.
fn container(vars: &BTreeMap<String, String>, layer: &Path, process: &[&str]) -> (Tunnel, i32) {
    // exec.d is this shell's own child (so its parent is PID 1, as under the launcher); the
    // reader of its descriptor 3 ends only once every holder has closed it.
    let launcher = r#""$LAYER/exec.d/bpg-tunnel" 3> >(cat >"$LAYER/fd3"); rc=$?
wait $!
echo "exec.d rc=$rc fd3=[$(cat "$LAYER/fd3")]"
exec "$@""#;
    let mut vars = vars.clone();
    vars.insert("LAYER".into(), layer.display().to_string());
    let path = format!(
        "{}:{}",
        layer.join("bin").display(),
        std::env::var("PATH").unwrap()
    );
    vars.insert("PATH".into(), path);
    let mut unshare = std::process::Command::new("unshare");
    unshare
        .args([
            "--pid",
            "--fork",
            "--kill-child",
            "--mount-proc",
            "bash",
            "-c",
        ])
        .arg(launcher)
        .arg("launcher")
        .args(process);
    let container = Tunnel::command(unshare, vars.iter());
    container.wait_for(&["app-ready"], T);
    let pid1 = support::descendants(container.pid())[0];
    (container, pid1)
}

#[test]
fn in_a_container_only_run_under_the_launcher_deregisters_when_the_app_stops() {
    if !support::can_unshare_pid() {
        return;
    }
    let layer = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(layer.path().join("bin")).unwrap();
    std::fs::create_dir_all(layer.path().join("exec.d")).unwrap();
    std::fs::copy(
        support::tunnel_binary(),
        layer.path().join("bin/bpg-tunnel"),
    )
    .unwrap();
    std::os::unix::fs::symlink("../bin/bpg-tunnel", layer.path().join("exec.d/bpg-tunnel"))
        .unwrap();
    // The app: on SIGTERM it finishes its work for a second, then exits.
    let app = ["bash", "-c", "trap 'sleep 1; echo app-drained; exit 0' TERM; echo app-ready; while true; do sleep 0.1; done"];

    // The daemon exec.d starts is killed with PID 1: it never deregisters.
    let api = FakeApi::start();
    let state = tempfile::tempdir().unwrap();
    let vars = private_app(&api, "DATABASE", state.path());
    let (mut exec_d_only, pid1) = container(&vars, layer.path(), &app);
    // Its pid file holds its pid inside the namespace: found here by what it runs.
    let daemon = support::descendants(exec_d_only.pid())
        .into_iter()
        .find(|pid| {
            *pid != pid1
                && std::fs::read_to_string(format!("/proc/{pid}/comm"))
                    .is_ok_and(|comm| comm.trim() == "bpg-tunnel")
        })
        .expect("exec.d started the daemon");
    support::signal(pid1, libc::SIGTERM);
    let status = exec_d_only
        .wait_exit(T)
        .expect("the container exits with its app");
    assert!(status.success(), "{:#?}", exec_d_only.lines());
    assert!(support::wait_gone(daemon, Duration::from_secs(5)).is_some());
    std::thread::sleep(Duration::from_secs(1));
    let methods: Vec<String> = api.requests().iter().map(|r| r.method.clone()).collect();
    assert_eq!(methods, ["POST"], "the registration outlives the container");
    let out = exec_d_only.lines().join("\n");
    assert!(out.contains("exec.d rc=0 fd3=[]"), "{out}");
    assert!(out.contains("app-drained"), "{out}");
    assert!(!out.contains("event=private-tunnel-deregistered"), "{out}");

    // `web: bpg-tunnel run -- <command>`: run is PID 1, stops the daemon exec.d started for it,
    // serves in its place, passes the SIGTERM on, and deregisters once the app has drained.
    let api = FakeApi::start();
    let state = tempfile::tempdir().unwrap();
    let vars = private_app(&api, "DATABASE", state.path());
    let process: Vec<&str> = ["bpg-tunnel", "run", "--"]
        .iter()
        .chain(&app)
        .copied()
        .collect();
    let (mut under_run, pid1) = container(&vars, layer.path(), &process);
    assert_eq!(
        std::fs::read_to_string(format!("/proc/{pid1}/comm"))
            .unwrap()
            .trim(),
        "bpg-tunnel"
    );
    assert!(
        support::daemon_pid(state.path()).is_none(),
        "run replaced the daemon"
    );
    let signalled = Instant::now();
    support::signal(pid1, libc::SIGTERM);
    let status = under_run
        .wait_exit(T)
        .expect("the container exits with its app");
    let out = under_run.lines().join("\n");
    assert!(status.success(), "{out}");
    assert!(out.contains("event=replacing-daemon"), "{out}");
    assert!(out.contains("app-drained"), "{out}");
    let requests = api.requests();
    let methods: Vec<&str> = requests.iter().map(|r| r.method.as_str()).collect();
    // exec.d's daemon registers and deregisters as it is replaced; run registers, and
    // deregisters after the app.
    assert_eq!(methods, ["POST", "DELETE", "POST", "DELETE"], "{out}");
    let last = requests.last().unwrap();
    assert!(last.at - signalled >= Duration::from_millis(900), "{out}");
    assert_no_token(&under_run.lines());
}

/// `select 1` as the lab's user through `addr` (the add-on's network), and whether it worked.
fn query_through(addr: std::net::SocketAddr) -> Result<(), String> {
    let out = support::psql_at(addr.port(), &["select 1"])
        .env("PGCONNECT_TIMEOUT", "5")
        .output()
        .unwrap();
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[test]
fn a_restarting_dyno_never_removes_its_successors_registration() {
    // Cedar during a restart or deploy: the old web.1 drains while the new web.1 boots, on the
    // same host (the same kernel boot id), without dyno metadata (no HEROKU_DYNO_ID).
    let Some(lab) = support::lab() else { return };
    let api = FakeApi::start();
    let database = api.gate(std::net::SocketAddr::from(([127, 0, 0, 1], lab.pg.port)));
    let (old_state, new_state) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut old_vars = private_app(&api, "DATABASE", old_state.path());
    old_vars.remove("HEROKU_DYNO_ID");
    let mut new_vars = private_app(&api, "DATABASE", new_state.path());
    new_vars.remove("HEROKU_DYNO_ID");
    assert_eq!(old_vars["DYNO"], new_vars["DYNO"]);
    assert!(
        query_through(database).is_err(),
        "the gate admits no one unregistered"
    );

    let old = Tunnel::spawn(old_vars.iter(), &[]);
    let old_id = field(
        &old.wait_for(&["event=private-tunnel-registered"], T),
        "client_id",
    )
    .to_owned();
    let new = Tunnel::spawn(new_vars.iter(), &[]);
    let new_id = field(
        &new.wait_for(&["event=private-tunnel-registered"], T),
        "client_id",
    )
    .to_owned();
    eprintln!("old web.1 registered as {old_id}, new web.1 as {new_id}");
    for id in [&old_id, &new_id] {
        assert!(id.starts_with("web.1_"), "{id}");
    }

    // The old dyno is stopped and deregisters: its own registration, and only that.
    old.signal(libc::SIGTERM);
    old.wait_for(&["event=private-tunnel-deregistered"], T);
    old.wait_for(&["event=stopped"], T);
    // What the user sees first: the new dyno still reaches its database.
    query_through(database).expect("the new dyno's database stays allowed");
    assert_ne!(old_id, new_id, "two dynos, two registrations");
    let deletes: Vec<Request> = api
        .requests()
        .into_iter()
        .filter(|r| r.method == "DELETE")
        .collect();
    assert_eq!(deletes.len(), 1, "{deletes:#?}");
    assert_eq!(
        deletes[0].path,
        format!("{}/{old_id}", tunnels_path("DATABASE"))
    );
    assert_eq!(api.registered(), [new_id.clone()].into());

    new.signal(libc::SIGTERM);
    new.wait_for(&["event=stopped"], T);
    assert!(api.registered().is_empty());
    assert_no_token(&old.lines());
    assert_no_token(&new.lines());
}

#[test]
fn heroku_dyno_id_names_the_registration_and_a_bad_one_is_replaced() {
    let api = FakeApi::start();
    let state = tempfile::tempdir().unwrap();
    let mut vars = private_app(&api, "DATABASE", state.path());
    vars.insert("HEROKU_DYNO_ID".into(), "not/an id".into());
    let tunnel = Tunnel::spawn(vars.iter(), &[]);
    let registered = tunnel.wait_for(&["event=private-tunnel-registered"], T);
    let id = field(&registered, "client_id");
    let notice = tunnel.wait_for(&["event=config-notice", "var=HEROKU_DYNO_ID"], T);
    assert!(!notice.contains("not/an id"), "{notice}");
    assert!(
        id.starts_with("web.1_") && id.len() == "web.1_".len() + 36,
        "{id}"
    );
    drop(tunnel);
    // `check`, where users look first, says so too.
    let checked = support::check(&vars, &[]);
    assert_eq!(checked.code, 0, "{}{}", checked.stdout, checked.stderr);
    assert!(
        checked.stdout.contains("HEROKU_DYNO_ID is not an id"),
        "{}",
        checked.stdout
    );
    assert!(!checked.stdout.contains("not/an id"), "{}", checked.stdout);

    // With a usable id, that id, as the register-and-extend test also checks.
    let vars = private_app(&api, "DATABASE", state.path());
    let tunnel = Tunnel::spawn(vars.iter(), &[]);
    let registered = tunnel.wait_for(&["event=private-tunnel-registered"], T);
    assert_eq!(field(&registered, "client_id"), client_id());
    assert_eq!(tunnel.count("event=config-notice"), 0);
}
