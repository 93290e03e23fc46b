//! Secrets (the private key, the JWT, the database password) reach no output, no argv, no file,
//! no child that asked for them to be scrubbed, and leave no copy in memory once parsed: every
//! launch form, at trace level, with the lab's real secrets as canaries.
#![allow(
    clippy::disallowed_methods,
    reason = "a test reads its lab's settings from the environment"
)]

mod support;

use std::time::Duration;

use support::Tunnel;

const T: Duration = Duration::from_secs(30);

#[test]
fn parsed_secrets_leave_no_copy_in_memory_but_the_environment_block() {
    let Some(lab) = support::lab() else { return };
    if !support::is_root() {
        assert!(
            std::env::var("CI").is_err(),
            "CI=true: this test needs root"
        );
        return;
    }
    let db = lab.attachment("DATABASE");
    let key_line = lab.client_key.private.lines().nth(2).unwrap();
    let password = support::percent_encode(support::DB_PASSWORD);
    // Serving in the foreground; and `run --scrub-env`, once its command has started.
    let foreground = Tunnel::spawn(db.vars.iter(), &[]);
    foreground.wait_for(&["event=ssh-connected"], T);
    let run = Tunnel::spawn(db.vars.iter(), &["run", "--scrub-env", "--", "sleep", "30"]);
    run.wait_for(&["event=command-started"], T);
    for tunnel in [&foreground, &run] {
        for (what, needle) in [
            ("a key line", key_line),
            ("the password", password.as_str()),
        ] {
            let hits = support::memory_hits(tunnel.pid(), needle.as_bytes());
            // The environment block, on the stack, holds the one copy the process was given
            // (the password twice: the writer's and the reader's URL); finding it shows the
            // scan works.
            assert!(
                !hits.is_empty(),
                "{what}: not even the environment block was found"
            );
            assert!(hits.iter().all(|hit| hit == "[stack]"), "{what}: {hits:?}");
        }
    }
}

/// What must never show: each line of the client key, the database password (as written in
/// the URL and decoded), the JWT; compared without regard to case.
struct Canaries(Vec<String>);

impl Canaries {
    fn of(lab: &support::Lab) -> Canaries {
        let mut canaries: Vec<String> = lab
            .client_key
            .private
            .lines()
            .filter(|line| !line.starts_with("-----"))
            .map(str::to_owned)
            .collect();
        canaries.push(support::DB_PASSWORD.to_owned());
        canaries.push(support::percent_encode(support::DB_PASSWORD));
        canaries.push(JWT.to_owned());
        canaries.push(JWT_SIGNATURE.to_owned());
        Canaries(canaries)
    }

    fn assert_absent(&self, what: &str, text: &str) {
        let text = text.to_ascii_lowercase();
        for canary in &self.0 {
            assert!(
                !text.contains(&canary.to_ascii_lowercase()),
                "{what} holds a secret ({}…)",
                &canary[..6]
            );
        }
    }

    /// bpg-tunnel's own lines of `tunnel`'s output (not the app's).
    fn assert_absent_from_logs(&self, what: &str, tunnel: &Tunnel) {
        let ours: Vec<String> = tunnel
            .lines()
            .into_iter()
            .filter(|line| line.starts_with("source=bpg-tunnel") || line.contains("bpg-tunnel"))
            .collect();
        assert!(!ours.is_empty(), "{what}: no output at all");
        self.assert_absent(what, &ours.join("\n"));
    }
}

const JWT: &str = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ0ZXN0LWFwcCJ9.c2VjcmV0LWNhbmFyeS1zaWduYXR1cmU";
const JWT_SIGNATURE: &str = "c2VjcmV0LWNhbmFyeS1zaWduYXR1cmU";

fn cmdline(pid: i32) -> String {
    String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default())
        .replace('\0', " ")
}

/// Every file under `dir`, its name and its content.
fn files_under(dir: &std::path::Path) -> String {
    let mut text = String::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        text.push_str(&path.display().to_string());
        if path.is_dir() {
            text.push_str(&files_under(&path));
        } else {
            text.push_str(&String::from_utf8_lossy(
                &std::fs::read(&path).unwrap_or_default(),
            ));
        }
    }
    text
}

#[test]
fn no_launch_form_lets_a_secret_out_at_trace_level() {
    let Some(lab) = support::lab() else { return };
    let canaries = Canaries::of(&lab);
    let state = tempfile::tempdir().unwrap();
    let db = lab.attachment("DATABASE");
    let mut vars = db.vars.clone();
    vars.insert("BPG_TUNNEL_LOG".into(), "trace".into());
    vars.insert(
        "BPG_TUNNEL_STATE_DIR".into(),
        state.path().display().to_string(),
    );
    vars.insert(
        "APP_URL".into(),
        support::psql_url(&db.vars["DATABASE_URL"]),
    );
    let query = r#"psql "$APP_URL" -XAtc "select 'through'""#;

    // Foreground, with a broken second add-on whose conn-info holds the same secrets.
    let mut broken = vars.clone();
    let conn_info = &db.vars["DATABASE_TUNNEL_BPG_CONN_INFO"];
    broken.insert(
        "BROKEN_TUNNEL_BPG_CONN_INFO".into(),
        conn_info.replace("SSH_PORT:=", "SSH_PORT:=x"),
    );
    broken.insert("BROKEN_URL".into(), "S3cretPW:x@h/db".into());
    let mut tunnel = Tunnel::spawn(broken.iter(), &[]);
    tunnel.wait_for(&["event=ssh-connected"], T);
    let status = support::psql(&db, &["select 1"]).output().unwrap().status;
    assert!(status.success());
    canaries.assert_absent("the foreground process's argv", &cmdline(tunnel.pid()));
    tunnel.signal(libc::SIGTERM);
    tunnel.wait_exit(T).expect("it stops");
    canaries.assert_absent_from_logs("the foreground form's output", &tunnel);
    assert!(tunnel.count("event=config-error") >= 1);
    assert!(!tunnel
        .lines()
        .join("\n")
        .to_ascii_lowercase()
        .contains("s3cretpw"));

    // `start`: the daemon's argv, its state directory, everything it and `start` print.
    let dyno = Tunnel::bash(
        vars.iter(),
        &format!("bpg-tunnel start --owner-pid $$; {query}; echo booted; sleep 30"),
    );
    dyno.wait_for(&["booted"], T);
    let daemon = support::daemon_pid(state.path()).unwrap();
    canaries.assert_absent("the daemon's argv", &cmdline(daemon));
    canaries.assert_absent("the state directory", &files_under(state.path()));
    support::signal(daemon, libc::SIGHUP);
    support::wait_gone(daemon, T).unwrap();
    canaries.assert_absent_from_logs("start's and the daemon's output", &dyno);

    // `run --scrub-env`: not even the command's environment holds the conn-info.
    for scrub in [true, false] {
        let mut args = vec!["run"];
        if scrub {
            args.push("--scrub-env");
        }
        args.extend([
            "--",
            "sh",
            "-c",
            "env; psql \"$APP_URL\" -XAtc \"select 'through'\"",
        ]);
        let mut run = Tunnel::spawn(vars.iter(), &args);
        run.wait_exit(T).expect("run exits");
        assert!(run.lines().iter().any(|line| line == "through"));
        canaries.assert_absent_from_logs("run's output", &run);
        if scrub {
            let key_lines = Canaries(canaries.0[..3].to_vec());
            key_lines.assert_absent(
                "the scrubbed command's environment",
                &run.lines().join("\n"),
            );
        }
    }

    // Private-app-tunnel mode: the JWT.
    let api = support::api::FakeApi::start();
    let conn_info = bpg_tunnel::ConnInfo::render([
        ("API_BASE_URL", api.base_url().as_str()),
        ("ADDON_ID", "addon-1"),
        ("CLIENT_APP_JWT", JWT),
    ]);
    let private = [
        ("PRIVATE_TUNNEL_BPG_CONN_INFO".to_owned(), conn_info),
        (
            "PRIVATE_URL".to_owned(),
            "postgres://u:p@db.private.example:5432/db".to_owned(),
        ),
        (
            "BPG_TUNNEL_TEST_API_CA_FILE".to_owned(),
            api.ca_file().display().to_string(),
        ),
        ("BPG_TUNNEL_LOG".to_owned(), "trace".to_owned()),
        ("DYNO".to_owned(), "web.1".to_owned()),
    ];
    let mut tunnel = Tunnel::spawn(private.iter().map(|(k, v)| (k, v)), &[]);
    tunnel.wait_for(&["event=private-tunnel-"], T);
    std::thread::sleep(Duration::from_millis(300));
    canaries.assert_absent("the private-app process's argv", &cmdline(tunnel.pid()));
    tunnel.signal(libc::SIGTERM);
    tunnel.wait_exit(T).expect("it stops");
    canaries.assert_absent_from_logs("the private-app form's output", &tunnel);
}
