//! `bpg-tunnel check` against the lab: what a user running it on a dyno (`heroku run
//! bpg-tunnel check`) reads, for an add-on that works and for each way one breaks.

mod support;

use std::collections::BTreeMap;

use support::{check, Checked, KeyKind, ServerTls, Tunnel};

/// The lab's secrets, none of which may appear in anything `check` prints.
fn assert_no_secret(lab: &support::Lab, checked: &Checked) {
    let key_body: Vec<&str> = lab.client_key.private.lines().skip(1).take(3).collect();
    for secret in key_body
        .iter()
        .copied()
        .chain([support::DB_PASSWORD, "s3cr"])
    {
        for output in [&checked.stdout, &checked.stderr] {
            assert!(!output.contains(secret), "secret {secret:?} in:\n{output}");
        }
    }
}

const EVERY_STEP: [&str; 10] = [
    "config",
    "dns",
    "tcp",
    "handshake",
    "host-key",
    "key-accepted",
    "channel",
    "postgres",
    "channel",
    "postgres",
];

#[test]
fn a_working_addon_passes_every_step_writer_and_reader() {
    let Some(lab) = support::lab() else { return };
    let db = lab.attachment("DATABASE");
    let checked = check(&db.vars, &[]);
    assert_eq!(checked.code, 0);
    assert_eq!(checked.steps(), EVERY_STEP);
    assert!(checked
        .stdout
        .starts_with("DATABASE (DATABASE_TUNNEL_BPG_CONN_INFO, ssh-tunnel)\n"));
    assert!(checked.line("✓", "config").contains(&format!(
        "writer 127.0.0.1:{} -> 127.0.0.1:{}",
        db.writer_port, lab.pg.port
    )));
    assert!(checked.line("✓", "host-key").contains("SHA256:"));
    let postgres: Vec<&str> = checked
        .stdout
        .lines()
        .filter(|line| line.contains("✓ postgres"))
        .collect();
    assert!(
        postgres[0].contains("writer: PostgreSQL answered"),
        "{postgres:?}"
    );
    assert!(
        postgres[1].contains("reader: PostgreSQL answered"),
        "{postgres:?}"
    );
    assert!(checked.stdout.ends_with("every add-on passes (1)\n"));
    assert!(checked.stderr.is_empty(), "{}", checked.stderr);
    assert_no_secret(&lab, &checked);
}

/// With `--login`: each forward's channel, then PostgreSQL's answer, then the login.
const EVERY_STEP_WITH_LOGIN: [&str; 12] = [
    "config",
    "dns",
    "tcp",
    "handshake",
    "host-key",
    "key-accepted",
    "channel",
    "postgres",
    "login",
    "channel",
    "postgres",
    "login",
];

/// The attachment with `password` in place of the real one in its writer URL.
fn with_writer_password(lab: &support::Lab, password: &str) -> support::Attachment {
    let mut db = lab.attachment("DATABASE");
    let url = format!(
        "postgres://postgres:{}@pg-tunnel.borealis-data.com:{}/postgres",
        support::percent_encode(password),
        db.writer_port
    );
    db.set("DATABASE_URL", url);
    db
}

#[test]
fn login_logs_in_to_writer_and_reader_with_the_urls_credentials() {
    let Some(lab) = support::lab() else { return };
    let db = lab.attachment("DATABASE");
    let checked = check(&db.vars, &["--login"]);
    assert_eq!(checked.code, 0);
    assert_eq!(checked.steps(), EVERY_STEP_WITH_LOGIN);
    let logins: Vec<&str> = checked
        .stdout
        .lines()
        .filter(|line| line.contains("✓ login"))
        .collect();
    for (line, role) in logins.iter().zip(["writer", "reader"]) {
        assert!(
            line.contains(&format!(
                "{role}: logged in as \"postgres\" to \"postgres\" without TLS (sslmode=prefer, and the server offers none), select 1 answered ("
            )),
            "{line}"
        );
    }
    assert!(checked.stdout.ends_with("every add-on passes (1)\n"));
    assert!(checked.stderr.is_empty(), "{}", checked.stderr);
    assert_no_secret(&lab, &checked);
}

#[test]
fn a_wrong_password_fails_at_login_says_the_credentials_were_refused_and_prints_no_password() {
    let Some(lab) = support::lab() else { return };
    const WRONG: &str = "wr0ng/pass@word";
    let db = with_writer_password(&lab, WRONG);
    let checked = check(&db.vars, &["--login"]);
    assert_eq!(checked.code, 1);
    // Every step before it passed; the writer's login is the one that failed.
    assert_eq!(checked.steps(), EVERY_STEP_WITH_LOGIN[..9]);
    assert_eq!(checked.stdout.matches("✗").count(), 1, "{}", checked.stdout);
    let line = checked.line("✗", "login");
    assert!(line.contains("writer: the server refused the login as \"postgres\" to \"postgres\": password authentication failed for user \"postgres\" (SQLSTATE 28P01)"), "{line}");
    assert!(checked.stdout.contains(
        "what to do: the server refused the user and password in DATABASE_URL: the add-on may have rotated them"
    ));
    assert!(checked.stdout.ends_with("1 of 1 add-ons fail\n"));
    let wrong_encoded = support::percent_encode(WRONG);
    let right_encoded = support::percent_encode(support::DB_PASSWORD);
    for secret in [WRONG, "wr0ng", &wrong_encoded, &right_encoded] {
        for output in [&checked.stdout, &checked.stderr] {
            assert!(!output.contains(secret), "{secret:?} in:\n{output}");
        }
    }
    assert_no_secret(&lab, &checked);
}

#[test]
fn a_database_that_does_not_exist_fails_at_login_naming_it() {
    let Some(lab) = support::lab() else { return };
    let mut db = lab.attachment("DATABASE");
    let url = db.vars["DATABASE_URL"]
        .strip_suffix("/postgres")
        .map(|base| format!("{base}/no_such_db"))
        .unwrap();
    db.set("DATABASE_URL", url);
    let checked = check(&db.vars, &["--login"]);
    assert_eq!(checked.code, 1);
    let line = checked.line("✗", "login");
    assert!(
        line.contains("database \"no_such_db\" does not exist (SQLSTATE 3D000)"),
        "{line}"
    );
    assert!(checked
        .stdout
        .contains("what to do: the database \"no_such_db\" named in DATABASE_URL does not exist"));
    assert_no_secret(&lab, &checked);
}

/// The attachment with `query` (`sslmode=…`) added to both of its URLs.
fn with_query(lab: &support::Lab, query: &str) -> support::Attachment {
    let mut db = lab.attachment("DATABASE");
    for var in ["DATABASE_URL", "DATABASE_READONLY_URL"] {
        let url = format!("{}?{query}", db.vars[var]);
        db.set(var, url);
    }
    db
}

/// `pg_hba.conf` for a server that admits the lab's user over TCP only with TLS, as the
/// add-on's may.
const TLS_ONLY: &[&str] = &[
    "hostssl all all 127.0.0.0/8 scram-sha-256",
    "hostnossl all all 127.0.0.0/8 reject",
];

/// Each `✓ login` line of a report.
fn logins(checked: &Checked) -> Vec<&str> {
    checked
        .stdout
        .lines()
        .filter(|line| line.contains("✓ login"))
        .collect()
}

/// The server's log lines of the check's logins that it admitted over TLS.
fn tls_logins(log: &str) -> usize {
    log.lines()
        .filter(|line| {
            line.contains("connection authorized: user=postgres")
                && line.contains("application_name=bpg-tunnel check")
                && line.contains("SSL enabled (protocol=TLSv1.3")
        })
        .count()
}

#[test]
fn sslmode_require_logs_in_over_tls_and_says_so() {
    let Some(mut lab) = support::lab() else {
        return;
    };
    lab.pg.configure(&ServerTls {
        ssl: true,
        names: &["localhost"],
        hba: &["host all all 127.0.0.0/8 scram-sha-256"],
    });
    let checked = check(&with_query(&lab, "sslmode=require").vars, &["--login"]);
    assert_eq!(checked.code, 0);
    assert_eq!(checked.steps(), EVERY_STEP_WITH_LOGIN);
    // The certificate (self-made, for another name) is not checked under require, as libpq.
    for (line, role) in logins(&checked).iter().zip(["writer", "reader"]) {
        assert!(
            line.contains(&format!("{role}: logged in as \"postgres\" to \"postgres\" over TLS (TLSv1.3, sslmode=require), select 1 answered")),
            "{line}"
        );
    }
    let log = lab.pg.log();
    assert_eq!(tls_logins(&log), 2, "{log}");
    assert_no_secret(&lab, &checked);
}

#[test]
fn sslmode_require_against_a_server_without_tls_fails_before_the_password_is_asked_for() {
    let Some(mut lab) = support::lab() else {
        return;
    };
    // `password`: had check gone on without TLS, the server would have asked for the password
    // in clear, and logged the login.
    lab.pg.configure(&ServerTls {
        ssl: false,
        names: &[],
        hba: &["host all all 127.0.0.0/8 password"],
    });
    // What the restart's wait for the port left is not the check's.
    let before = lab.pg.log().len();
    let checked = check(&with_query(&lab, "sslmode=require").vars, &["--login"]);
    assert_eq!(checked.code, 1);
    assert_eq!(checked.steps(), EVERY_STEP_WITH_LOGIN[..9]);
    assert!(checked
        .line("✓", "postgres")
        .contains("writer: PostgreSQL answered (no TLS)"));
    let line = checked.line("✗", "login");
    assert!(line.contains(&format!("writer: sslmode=require (DATABASE_URL) requires TLS, and the server at 127.0.0.1:{} offers none: the login was not attempted, so no password was sent", lab.pg.port)), "{line}");
    assert!(checked
        .stdout
        .contains("what to do: the app's client, with the same sslmode, cannot log in either"));
    // The check's two connections (the postgres step's and the login's) reached the server,
    // and neither got as far as a user name.
    let log = lab.pg.log().split_off(before);
    assert_eq!(log.matches("connection received").count(), 2, "{log}");
    for never in [
        "connection authorized",
        "authenticat",
        "password",
        "user=postgres",
    ] {
        assert!(
            !log.contains(never),
            "{never:?} in the server's log:\n{log}"
        );
    }
    assert_no_secret(&lab, &checked);
}

#[test]
fn a_user_admitted_only_over_tls_is_logged_in_over_tls_by_default_and_with_allow() {
    let Some(mut lab) = support::lab() else {
        return;
    };
    lab.pg.configure(&ServerTls {
        ssl: true,
        names: &["localhost"],
        hba: TLS_ONLY,
    });
    // No sslmode: libpq's prefer, TLS since the server offers it.
    let checked = check(&lab.attachment("DATABASE").vars, &["--login"]);
    assert_eq!(checked.code, 0);
    assert!(checked
        .line("✓", "postgres")
        .contains("writer: PostgreSQL answered (TLS offered)"));
    for (line, role) in logins(&checked).iter().zip(["writer", "reader"]) {
        assert!(
            line.contains(&format!("{role}: logged in as \"postgres\" to \"postgres\" over TLS (TLSv1.3, sslmode=prefer), select 1 answered")),
            "{line}"
        );
    }
    assert_eq!(tls_logins(&lab.pg.log()), 2);
    assert_no_secret(&lab, &checked);
    // allow: without TLS first, refused, then over TLS.
    let checked = check(&with_query(&lab, "sslmode=allow").vars, &["--login"]);
    assert_eq!(checked.code, 0);
    for line in logins(&checked) {
        assert!(line.contains("over TLS (TLSv1.3, sslmode=allow)"), "{line}");
    }
    let log = lab.pg.log();
    assert_eq!(tls_logins(&log), 4, "{log}");
    assert_no_secret(&lab, &checked);
}

#[test]
fn sslmode_disable_for_a_user_admitted_only_over_tls_fails_at_login_saying_so() {
    let Some(mut lab) = support::lab() else {
        return;
    };
    lab.pg.configure(&ServerTls {
        ssl: true,
        names: &["localhost"],
        hba: TLS_ONLY,
    });
    let checked = check(&with_query(&lab, "sslmode=disable").vars, &["--login"]);
    assert_eq!(checked.code, 1);
    assert!(checked
        .line("✓", "postgres")
        .contains("writer: PostgreSQL answered (TLS offered)"));
    let line = checked.line("✗", "login");
    assert!(
        line.contains("writer: the server demands TLS for this login as \"postgres\" to \"postgres\", and sslmode=disable (DATABASE_URL) forbids it: "),
        "{line}"
    );
    assert!(line.contains("no encryption (SQLSTATE 28000)"), "{line}");
    assert!(checked.stdout.contains(
        "what to do: the server accepts \"postgres\" only over TLS, and the app's client, with the same sslmode=disable, is refused too: remove sslmode=disable from DATABASE_URL"
    ));
    assert_eq!(tls_logins(&lab.pg.log()), 0);
    assert_no_secret(&lab, &checked);
}

#[test]
fn verify_ca_checks_the_chain_and_verify_full_the_urls_host_too() {
    let Some(mut lab) = support::lab() else {
        return;
    };
    let ca = lab
        .pg
        .configure(&ServerTls {
            ssl: true,
            names: &["pg-tunnel.borealis-data.com"],
            hba: TLS_ONLY,
        })
        .unwrap();
    let ca = support::percent_encode(&ca.display().to_string());
    // The reader's URL names the listener by address, which the certificate is not for.
    let with = |query: &str| {
        let mut db = with_query(&lab, query);
        let reader =
            db.vars["DATABASE_READONLY_URL"].replace("pg-tunnel.borealis-data.com", "127.0.0.1");
        db.set("DATABASE_READONLY_URL", reader);
        db
    };

    let checked = check(
        &with(&format!("sslmode=verify-ca&sslrootcert={ca}")).vars,
        &["--login"],
    );
    assert_eq!(checked.code, 0);
    for line in logins(&checked) {
        assert!(
            line.contains("over TLS (TLSv1.3, sslmode=verify-ca)"),
            "{line}"
        );
    }

    let checked = check(
        &with(&format!("sslmode=verify-full&sslrootcert={ca}")).vars,
        &["--login"],
    );
    assert_eq!(checked.code, 1);
    assert!(checked.line("✓", "login").contains(
        "writer: logged in as \"postgres\" to \"postgres\" over TLS (TLSv1.3, sslmode=verify-full)"
    ));
    let line = checked.line("✗", "login");
    assert!(
        line.contains(&format!(
            "reader: the TLS handshake with 127.0.0.2:{} failed (sslmode=verify-full): ",
            lab.pg.port
        )),
        "{line}"
    );
    assert!(line.contains("not valid for name"), "{line}");
    assert!(checked
        .stdout
        .contains("made out to \"127.0.0.1\" (the URL's host)"));

    // No sslrootcert: the built-in roots, which never signed the lab's CA.
    let checked = check(&with("sslmode=verify-full").vars, &["--login"]);
    assert_eq!(checked.code, 1);
    let line = checked.line("✗", "login");
    assert!(line.contains("writer: the TLS handshake"), "{line}");
    assert!(line.contains("UnknownIssuer"), "{line}");
    assert!(checked.stdout.contains("the built-in Mozilla roots"));
    assert_no_secret(&lab, &checked);
}

#[test]
fn json_says_the_same_for_scripts() {
    let Some(lab) = support::lab() else { return };
    let mut db = lab.attachment("DATABASE");
    let impostor = lab.sshd.new_client_key(KeyKind::Ed25519);
    db.set_conn_info("SSH_PUBLIC_HOST_KEY", &impostor.public);
    for (vars, ok) in [(lab.attachment("DATABASE").vars, true), (db.vars, false)] {
        let checked = check(&vars, &["--json"]);
        let report = checked.json();
        assert_eq!(report["ok"], ok);
        assert_eq!(checked.code, if ok { 0 } else { 1 });
        let addon = &report["addons"][0];
        assert_eq!(addon["addon"], "DATABASE");
        assert_eq!(addon["var"], "DATABASE_TUNNEL_BPG_CONN_INFO");
        assert_eq!(addon["mode"], "ssh-tunnel");
        let steps = addon["steps"].as_array().unwrap();
        let last = steps.last().unwrap();
        if ok {
            assert_eq!(steps.len(), EVERY_STEP.len());
            assert!(steps
                .iter()
                .all(|step| step["ok"] == true && step["advice"].is_null()));
            assert!(steps[2]["ms"].is_u64());
        } else {
            assert_eq!(last["step"], "host-key");
            assert_eq!(last["ok"], false);
            assert!(last["advice"]
                .as_str()
                .unwrap()
                .contains("SSH_PUBLIC_HOST_KEY"));
        }
        assert_no_secret(&lab, &checked);
    }
}

#[test]
fn json_with_login_has_a_login_step_per_forward() {
    let Some(lab) = support::lab() else { return };
    let checked = check(
        &with_writer_password(&lab, "wrong").vars,
        &["--json", "--login"],
    );
    let report = checked.json();
    assert_eq!(report["ok"], false);
    let steps = report["addons"][0]["steps"].as_array().unwrap();
    let failed = steps.last().unwrap();
    assert_eq!(failed["step"], "login");
    assert_eq!(failed["ok"], false);
    assert!(failed["ms"].is_u64());
    assert!(failed["advice"].as_str().unwrap().contains("DATABASE_URL"));

    let checked = check(&lab.attachment("DATABASE").vars, &["--json", "--login"]);
    assert_eq!(checked.code, 0);
    let report = checked.json();
    assert_eq!(report["ok"], true);
    let steps = report["addons"][0]["steps"].as_array().unwrap();
    let names: Vec<&str> = steps
        .iter()
        .map(|step| step["step"].as_str().unwrap())
        .collect();
    assert_eq!(names, EVERY_STEP_WITH_LOGIN);
    let login = &steps[8];
    assert_eq!(login["ok"], true);
    assert!(login["ms"].is_u64());
    assert!(login["detail"]
        .as_str()
        .unwrap()
        .contains("writer: logged in as \"postgres\" to \"postgres\" without TLS"));
    assert_no_secret(&lab, &checked);
}

#[test]
fn it_runs_beside_a_tunnel_serving_the_same_ports() {
    let Some(lab) = support::lab() else { return };
    let db = lab.attachment("DATABASE");
    let tunnel = Tunnel::spawn(db.vars.iter(), &[]);
    tunnel.wait_for(&["event=ssh-connected"], std::time::Duration::from_secs(30));
    let checked = check(&db.vars, &[]);
    assert_eq!(checked.code, 0);
    // And the tunnel still serves.
    let status = support::psql(&db, &["select 1"]).output().unwrap().status;
    assert!(status.success());
}

#[test]
fn a_wrong_host_key_stops_at_host_key_with_both_fingerprints_and_never_offers_the_key() {
    let Some(lab) = support::lab() else { return };
    let mut db = lab.attachment("DATABASE");
    let impostor = lab.sshd.new_client_key(KeyKind::Ed25519);
    db.set_conn_info("SSH_PUBLIC_HOST_KEY", &impostor.public);
    let checked = check(&db.vars, &[]);
    assert_eq!(checked.code, 1);
    assert_eq!(
        checked.steps(),
        ["config", "dns", "tcp", "handshake", "host-key"]
    );
    let line = checked.line("✗", "host-key");
    assert_eq!(line.matches("SHA256:").count(), 2, "{line}");
    assert!(checked
        .stdout
        .contains("what to do: the server's host key is not SSH_PUBLIC_HOST_KEY"));
    assert!(checked.stdout.ends_with("1 of 1 add-ons fail\n"));
    assert!(!lab.sshd.log().contains("Accepted publickey"));
    assert_no_secret(&lab, &checked);
}

#[test]
fn a_rejected_key_stops_at_key_accepted() {
    let Some(lab) = support::lab() else { return };
    let mut db = lab.attachment("DATABASE");
    let stranger = lab.sshd.new_client_key(KeyKind::Ed25519);
    db.set_conn_info("SSH_USER_PRIVATE_KEY", &stranger.private);
    let checked = check(&db.vars, &[]);
    assert_eq!(checked.code, 1);
    assert_eq!(checked.steps().last().unwrap(), "key-accepted");
    assert!(checked
        .line("✗", "key-accepted")
        .contains("rejected SSH_USER_PRIVATE_KEY (ssh-ed25519)"));
    assert!(checked.line("✓", "host-key").contains("matches"));
    let key_body: Vec<&str> = stranger.private.lines().skip(1).take(3).collect();
    for secret in key_body {
        assert!(!checked.stdout.contains(secret));
    }
}

#[test]
fn sshd_down_stops_at_tcp_connection_refused() {
    let Some(mut lab) = support::lab() else {
        return;
    };
    lab.sshd.stop();
    let db = lab.attachment("DATABASE");
    let checked = check(&db.vars, &[]);
    assert_eq!(checked.code, 1);
    assert_eq!(checked.steps(), ["config", "dns", "tcp"]);
    let line = checked.line("✗", "tcp");
    assert!(
        line.contains(&format!("127.0.0.1:{}", lab.sshd.port)),
        "{line}"
    );
    assert!(line.to_lowercase().contains("refused"), "{line}");
}

#[test]
fn a_database_port_closed_behind_the_server_stops_at_channel_naming_it() {
    let Some(mut lab) = support::lab() else {
        return;
    };
    lab.pg.stop();
    let db = lab.attachment("DATABASE");
    let checked = check(&db.vars, &[]);
    assert_eq!(checked.code, 1);
    assert_eq!(checked.steps().last().unwrap(), "channel");
    let line = checked.line("✗", "channel");
    assert!(
        line.contains(&format!(
            "writer: the SSH server refused to open a channel to 127.0.0.1:{}",
            lab.pg.port
        )),
        "{line}"
    );
    assert!(checked.stdout.contains("the database may be down"));
}

#[test]
fn a_broken_config_fails_at_config_naming_the_variable_and_the_others_are_still_checked() {
    let Some(lab) = support::lab() else { return };
    let mut db = lab.attachment("DATABASE");
    db.set(
        "BROKEN_TUNNEL_BPG_CONN_INFO",
        format!(
            "SSH_HOST:=127.0.0.1|SSH_USER_PRIVATE_KEY:={}",
            "x".repeat(10)
        ),
    );
    db.set(
        "BROKEN_URL",
        "postgres://u:hunter2-secret@pg-tunnel.borealis-data.com:1/db",
    );
    db.set("BPG_TUNNEL_CONNECT_TIMEOUT", "soon");
    let checked = check(&db.vars, &[]);
    assert_eq!(checked.code, 1);
    assert!(checked
        .stdout
        .contains("BROKEN (BROKEN_TUNNEL_BPG_CONN_INFO, unusable)\n"));
    let line = checked.line("✗", "config");
    assert!(line.contains("BROKEN_TUNNEL_BPG_CONN_INFO"), "{line}");
    assert!(checked
        .stdout
        .contains("what to do: the add-on sets BROKEN_TUNNEL_BPG_CONN_INFO"));
    // The working add-on is checked all the same.
    assert!(checked
        .stdout
        .contains("DATABASE (DATABASE_TUNNEL_BPG_CONN_INFO, ssh-tunnel)"));
    assert!(checked.stdout.ends_with("1 of 2 add-ons fail\n"));
    // The bad setting is said on stderr, beside the report, and the default used.
    assert!(checked
        .stderr
        .contains("event=setting-invalid var=BPG_TUNNEL_CONNECT_TIMEOUT"));
    for secret in ["xxxxxxxxxx", "hunter2-secret"] {
        assert!(!checked.stdout.contains(secret) && !checked.stderr.contains(secret));
    }
}

#[test]
fn nothing_attached_says_so_and_fails() {
    let checked = check(&BTreeMap::new(), &[]);
    assert_eq!(checked.code, 1);
    assert_eq!(
        checked.stdout,
        "no *_TUNNEL_BPG_CONN_INFO variable is set: nothing to check\n"
    );
}
