use super::conn_info::ConnInfo;
use super::keys::{parse_host_key, parse_private_key};
use super::*;
use proptest::prelude::*;

// Throwaway keys made for these tests only; they protect nothing.
const CLIENT_KEY: &str = "-----BEGIN OPENSSH PRIVATE KEY-----
b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW
QyNTUxOQAAACC5DA+X5/9OdyDPdVmNmtvUeKWVp3kIfaw6FhvUq41t/wAAAIhagA+gWoAP
oAAAAAtzc2gtZWQyNTUxOQAAACC5DA+X5/9OdyDPdVmNmtvUeKWVp3kIfaw6FhvUq41t/w
AAAEBqCUJB45aa37Ttgneq3qYqXGIsfdq6QJr3matKS+vJf7kMD5fn/053IM91WY2a29R4
pZWneQh9rDoWG9SrjW3/AAAAAAECAwQF
-----END OPENSSH PRIVATE KEY-----
";
const HOST_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDfR3+XSNlrSzI4i0Of4DNFSjb/gzoUkkOE3jhf0yZ49";
const OTHER_HOST_KEY: &str = "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBOyRdN5UgeN5+GFwqM36FUjkuaxmI+S9fSuvVqallR1xTClBM4HaYSWssgWJ76NrIzPH62a7awt265JujsLC+18=";
const KEY_SECRET_LINE: &str = "AAAEBqCUJB45aa37Ttgneq3qYqXGIsfdq6QJr3matKS+vJf7kMD5fn";

fn conn_info(overrides: &[(&str, &str)]) -> String {
    let mut items: BTreeMap<&str, &str> = [
        ("SSH_HOST", "ssh.example.com"),
        ("SSH_USERNAME", "app"),
        ("SSH_USER_PRIVATE_KEY", CLIENT_KEY),
        ("SSH_PUBLIC_HOST_KEY", HOST_KEY),
        ("POSTGRES_WRITER_HOST", "writer.internal"),
        ("POSTGRES_READER_HOST", "reader.internal"),
        ("POSTGRES_DB_NAME", "db"),
        ("POSTGRES_WRITER_PASSWORD", "writer-password-secret"),
    ]
    .into_iter()
    .collect();
    for (k, v) in overrides {
        items.insert(k, v);
    }
    ConnInfo::render(items)
}

fn url(port: u16) -> String {
    format!("postgres://u:pa%7Css@pg-tunnel.borealis-data.com:{port}/db")
}

fn env(vars: &[(&str, String)]) -> Discovery {
    discover(vars.iter().map(|(k, v)| (k.to_string(), v.clone())))
}

/// One add-on, `DATABASE`, whose SSH server is at 127.0.0.1:`ssh_port` and whose writer
/// listens on 127.0.0.1:`listen_port`: for other modules' tests, which need an add-on the
/// engine can bind and a server that is not there.
pub(crate) fn local_addon(ssh_port: u16, listen_port: u16) -> Discovery {
    let ssh_port = ssh_port.to_string();
    let info = conn_info(&[("SSH_HOST", "127.0.0.1"), ("SSH_PORT", &ssh_port)]);
    let discovery = env(&[
        ("DATABASE_TUNNEL_BPG_CONN_INFO", info),
        ("DATABASE_URL", url(listen_port)),
    ]);
    assert_eq!(errors(&discovery), Vec::<String>::new());
    discovery
}

fn errors_of(d: &Discovery) -> impl Iterator<Item = &Problem> {
    d.problems.iter().filter(|p| p.severity == Severity::Error)
}

fn errors(d: &Discovery) -> Vec<String> {
    errors_of(d).map(ToString::to_string).collect()
}

fn all_text(d: &Discovery) -> String {
    d.problems
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
        + &format!("{:?}", d.addons)
}

#[test]
fn a_complete_addon_gives_writer_and_reader() {
    let d = env(&[
        ("DATABASE_TUNNEL_BPG_CONN_INFO", conn_info(&[])),
        ("DATABASE_URL", url(5432)),
        ("DATABASE_READONLY_URL", url(5433)),
    ]);
    assert_eq!(errors(&d), Vec::<String>::new());
    let addon = &d.addons[0];
    assert_eq!(addon.name, "DATABASE");
    assert_eq!(addon.ssh.host, "ssh.example.com");
    assert_eq!(addon.ssh.port, 22);
    assert_eq!(addon.ssh.username, "app");
    assert_eq!(
        addon.forwards,
        vec![
            Forward {
                role: Role::Writer,
                listen: "127.0.0.1:5432".parse().unwrap(),
                url_var: "DATABASE_URL".into(),
                remote_host: "writer.internal".into(),
                remote_port: 5432,
            },
            Forward {
                role: Role::Reader,
                listen: "127.0.0.1:5433".parse().unwrap(),
                url_var: "DATABASE_READONLY_URL".into(),
                remote_host: "reader.internal".into(),
                remote_port: 5432,
            }
        ]
    );
}

#[test]
fn reader_needs_both_host_and_url() {
    let no_url = env(&[
        ("DATABASE_TUNNEL_BPG_CONN_INFO", conn_info(&[])),
        ("DATABASE_URL", url(5432)),
    ]);
    assert_eq!(no_url.addons[0].forwards.len(), 1);
    let no_host = env(&[
        (
            "DATABASE_TUNNEL_BPG_CONN_INFO",
            conn_info(&[("POSTGRES_READER_HOST", "")]),
        ),
        ("DATABASE_URL", url(5432)),
        ("DATABASE_READONLY_URL", url(5433)),
    ]);
    assert_eq!(no_host.addons[0].forwards.len(), 1);
    assert!(errors(&no_host).is_empty());
    let notice = no_host
        .problems
        .iter()
        .find(|p| p.key == Some("POSTGRES_READER_HOST"))
        .expect("a notice says why the reader URL is not served");
    assert_eq!(notice.severity, Severity::Notice);
    assert_eq!(notice.var, "DATABASE_TUNNEL_BPG_CONN_INFO");
    assert!(notice.message.contains("DATABASE_READONLY_URL"));
}

#[test]
fn any_prefix_and_the_legacy_name_are_found() {
    let d = env(&[
        (
            "BOREALIS_PG_RED_SSH_TUNNEL_BPG_CONNECTION_INFO",
            conn_info(&[]),
        ),
        ("BOREALIS_PG_RED_URL", url(6000)),
        ("MY_DB_TUNNEL_BPG_CONN_INFO", conn_info(&[])),
        ("MY_DB_URL", url(6001)),
        ("_TUNNEL_BPG_CONN_INFO", conn_info(&[])),
    ]);
    let names: Vec<_> = d.addons.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(names, ["BOREALIS_PG_RED", "MY_DB"]);
    assert_eq!(
        d.addons[0].conn_info_var,
        "BOREALIS_PG_RED_SSH_TUNNEL_BPG_CONNECTION_INFO"
    );
}

#[test]
fn current_name_wins_over_legacy_with_a_notice() {
    let d = env(&[
        ("DATABASE_TUNNEL_BPG_CONN_INFO", conn_info(&[])),
        (
            "DATABASE_SSH_TUNNEL_BPG_CONNECTION_INFO",
            conn_info(&[("SSH_HOST", "old.example.com")]),
        ),
        ("DATABASE_URL", url(5432)),
    ]);
    assert_eq!(d.addons.len(), 1);
    assert_eq!(d.addons[0].ssh.host, "ssh.example.com");
    assert!(d
        .problems
        .iter()
        .any(|p| p.severity == Severity::Notice
            && p.var == "DATABASE_SSH_TUNNEL_BPG_CONNECTION_INFO"));
}

#[test]
fn duplicate_attachment_is_served_once() {
    let info = conn_info(&[]);
    let d = env(&[
        ("DATABASE_TUNNEL_BPG_CONN_INFO", info.clone()),
        ("DATABASE_URL", url(5432)),
        ("BOREALIS_PG_RED_TUNNEL_BPG_CONN_INFO", info),
        ("BOREALIS_PG_RED_URL", url(5432)),
    ]);
    assert_eq!(d.addons.len(), 1);
    assert_eq!(d.addons[0].name, "DATABASE");
    assert!(errors(&d).is_empty());
    assert!(d
        .problems
        .iter()
        .any(|p| p.var == "BOREALIS_PG_RED_URL" && p.message.contains("served once")));
}

#[test]
fn dedupe_is_exact_not_by_substring() {
    // The old script skipped `/db` after seeing `/db2` because it matched substrings.
    let d = env(&[
        ("A_TUNNEL_BPG_CONN_INFO", conn_info(&[])),
        (
            "A_URL",
            "postgres://u:p@pg-tunnel.borealis-data.com:5432/db2".into(),
        ),
        (
            "B_TUNNEL_BPG_CONN_INFO",
            conn_info(&[("POSTGRES_WRITER_HOST", "other.internal")]),
        ),
        (
            "B_URL",
            "postgres://u:p@pg-tunnel.borealis-data.com:54320/db".into(),
        ),
    ]);
    assert_eq!(d.addons.len(), 2);
}

#[test]
fn two_addons_on_one_port_is_a_clear_error_and_the_first_still_runs() {
    let d = env(&[
        ("A_TUNNEL_BPG_CONN_INFO", conn_info(&[])),
        ("A_URL", url(5432)),
        (
            "B_TUNNEL_BPG_CONN_INFO",
            conn_info(&[("POSTGRES_WRITER_HOST", "other.internal")]),
        ),
        ("B_URL", url(5432)),
    ]);
    assert_eq!(d.addons.len(), 1);
    assert_eq!(
        errors(&d),
        ["B_URL: local address 127.0.0.1:5432 is already used by A_URL for a different database; expected each add-on to have its own port"]
    );
}

#[test]
fn writer_and_reader_on_the_same_port_is_an_error_but_the_writer_runs() {
    let d = env(&[
        ("DATABASE_TUNNEL_BPG_CONN_INFO", conn_info(&[])),
        ("DATABASE_URL", url(5432)),
        ("DATABASE_READONLY_URL", url(5432)),
    ]);
    assert_eq!(d.addons[0].forwards.len(), 1);
    let errors = errors(&d);
    assert_eq!(errors.len(), 1);
    assert!(errors[0]
        .starts_with("DATABASE_READONLY_URL: names the same local port 5432 as DATABASE_URL"));
}

#[test]
fn defaults_and_explicit_ports() {
    let d = env(&[
        (
            "DATABASE_TUNNEL_BPG_CONN_INFO",
            conn_info(&[("SSH_PORT", "2222"), ("POSTGRES_PORT", "6432")]),
        ),
        ("DATABASE_URL", url(5432)),
    ]);
    assert_eq!(d.addons[0].ssh.port, 2222);
    assert_eq!(d.addons[0].forwards[0].remote_port, 6432);
}

#[test]
fn every_bad_key_is_named_with_what_was_expected() {
    let d = env(&[
        (
            "DATABASE_TUNNEL_BPG_CONN_INFO",
            conn_info(&[
                ("SSH_HOST", ""),
                ("SSH_PORT", "ssh"),
                ("SSH_USER_PRIVATE_KEY", "-----BEGIN OPENSSH PRIVATE KEY-----\\nAAAAnotakey\\n-----END OPENSSH PRIVATE KEY-----"),
                ("SSH_PUBLIC_HOST_KEY", "ssh-rsa AAAAC3NzaC1lZDI1NTE5AAAAIDfR3+XSNlrSzI4i0Of4DNFSjb/gzoUkkOE3jhf0yZ49"),
                ("POSTGRES_PORT", "70000"),
            ]),
        ),
        ("DATABASE_URL", url(5432)),
    ]);
    assert!(d.addons.is_empty());
    let errors = errors(&d);
    let expect = [
        "DATABASE_TUNNEL_BPG_CONN_INFO: SSH_HOST: is missing; expected the SSH server's host name or IP address",
        "DATABASE_TUNNEL_BPG_CONN_INFO: SSH_PORT: is not a port number; expected 1 to 65535",
        "DATABASE_TUNNEL_BPG_CONN_INFO: SSH_USER_PRIVATE_KEY: could not be read; expected",
        "DATABASE_TUNNEL_BPG_CONN_INFO: SSH_PUBLIC_HOST_KEY: says \"ssh-rsa\" but the key is ssh-ed25519",
        "DATABASE_TUNNEL_BPG_CONN_INFO: POSTGRES_PORT: is not a port number; expected 1 to 65535",
    ];
    for prefix in expect {
        assert!(
            errors.iter().any(|e| e.starts_with(prefix)),
            "no error starting with {prefix:?} in {errors:#?}"
        );
    }
}

#[test]
fn missing_url_and_bad_url_are_named() {
    let d = env(&[("DATABASE_TUNNEL_BPG_CONN_INFO", conn_info(&[]))]);
    assert_eq!(
        errors(&d),
        ["DATABASE_URL: is not set; expected the database URL that goes with DATABASE_TUNNEL_BPG_CONN_INFO"]
    );
    let d = env(&[
        ("DATABASE_TUNNEL_BPG_CONN_INFO", conn_info(&[])),
        (
            "DATABASE_URL",
            "postgres://u:hunter2@pg-tunnel.borealis-data.com:port/db".into(),
        ),
    ]);
    let errors = errors(&d);
    assert_eq!(
        errors,
        ["DATABASE_URL: expected a port number from 1 to 65535 after the host; this add-on is not served"]
    );
}

const JWT: &str = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhcHAifQ.c2VjcmV0LXNpZ25hdHVyZQ";

fn private_app_env(overrides: &[(&str, &str)]) -> Discovery {
    let mut items: BTreeMap<&str, &str> = [
        ("API_BASE_URL", "https://api.example.com/v1/"),
        ("ADDON_ID", "addon-123"),
        ("CLIENT_APP_JWT", JWT),
    ]
    .into_iter()
    .collect();
    for (k, v) in overrides {
        items.insert(k, v);
    }
    env(&[
        ("DATABASE_TUNNEL_BPG_CONN_INFO", ConnInfo::render(items)),
        (
            "DATABASE_URL",
            "postgres://u:p@db.internal.example:5432/db".into(),
        ),
    ])
}

#[test]
fn a_remote_url_host_means_private_app_tunnel_mode() {
    let d = private_app_env(&[]);
    assert!(d.addons.is_empty());
    assert!(errors(&d).is_empty(), "{:?}", errors(&d));
    let app = &d.private_apps[0];
    assert_eq!(app.name, "DATABASE");
    assert_eq!(app.addon_id, "addon-123");
    // The trailing slash goes, so paths join cleanly.
    assert_eq!(app.api_base_url.as_str(), "https://api.example.com/v1");
    assert_eq!(app.jwt.0.as_str(), JWT);
    assert!(
        !format!("{app:?}").contains(JWT),
        "Debug never shows the token"
    );
}

#[test]
fn private_app_mode_names_each_missing_or_bad_key_and_never_the_token() {
    for (overrides, key, expected) in [
        (vec![("API_BASE_URL", "")], "API_BASE_URL", "is missing"),
        (
            vec![("API_BASE_URL", "http://api.example.com")],
            "API_BASE_URL",
            "expected an https:// URL",
        ),
        (
            vec![("API_BASE_URL", "https://api.example.com/?x=1")],
            "API_BASE_URL",
            "has a query",
        ),
        (vec![("ADDON_ID", "")], "ADDON_ID", "is missing"),
        (vec![("CLIENT_APP_JWT", "")], "CLIENT_APP_JWT", "is missing"),
    ] {
        let d = private_app_env(&overrides);
        assert!(d.private_apps.is_empty(), "{key}");
        let problem = errors_of(&d).next().expect(key);
        assert_eq!(problem.key, Some(key));
        assert_eq!(problem.var, "DATABASE_TUNNEL_BPG_CONN_INFO");
        assert!(problem.message.contains(expected), "{}", problem.message);
        assert!(!problem.message.contains(JWT));
    }
}

#[test]
fn the_same_private_app_addon_attached_twice_registers_once() {
    let info = private_app_env(&[]);
    assert_eq!(info.private_apps.len(), 1);
    let conn_info = ConnInfo::render(
        [
            ("API_BASE_URL", "https://api.example.com/v1"),
            ("ADDON_ID", "addon-123"),
            ("CLIENT_APP_JWT", JWT),
        ]
        .into_iter()
        .collect::<BTreeMap<_, _>>(),
    );
    let d = env(&[
        ("DATABASE_TUNNEL_BPG_CONN_INFO", conn_info.clone()),
        (
            "DATABASE_URL",
            "postgres://u:p@db.internal.example:5432/db".into(),
        ),
        ("BOREALIS_PG_RED_TUNNEL_BPG_CONN_INFO", conn_info),
        (
            "BOREALIS_PG_RED_URL",
            "postgres://u:p@db.internal.example:5432/db".into(),
        ),
    ]);
    assert_eq!(d.private_apps.len(), 1);
    assert_eq!(d.private_apps[0].name, "DATABASE");
    assert!(d
        .problems
        .iter()
        .any(|p| p.addon == "BOREALIS_PG_RED" && p.message.contains("registers with it once")));
}

#[test]
fn one_broken_addon_does_not_stop_the_others() {
    let d = env(&[
        ("BROKEN_TUNNEL_BPG_CONN_INFO", "garbage".into()),
        ("BROKEN_URL", url(5000)),
        ("DATABASE_TUNNEL_BPG_CONN_INFO", conn_info(&[])),
        ("DATABASE_URL", url(5432)),
    ]);
    assert_eq!(d.addons.len(), 1);
    assert_eq!(d.addons[0].name, "DATABASE");
    assert!(errors(&d).iter().all(|e| e.starts_with("BROKEN_")));
}

#[test]
fn ipv6_loopback_url_listens_on_ipv6() {
    let d = env(&[
        ("DATABASE_TUNNEL_BPG_CONN_INFO", conn_info(&[])),
        ("DATABASE_URL", "postgres://u:p@[::1]:5432/db".into()),
    ]);
    assert_eq!(
        d.addons[0].forwards[0].listen,
        "[::1]:5432".parse().unwrap()
    );
}

#[test]
fn private_key_tolerates_crlf_and_indentation() {
    let crlf = CLIENT_KEY.replace('\n', "\r\n");
    assert!(parse_private_key(&crlf).is_ok());
    let indented = CLIENT_KEY.replace('\n', "\n  ");
    assert!(parse_private_key(&indented).is_ok());
    let escaped = conn_info(&[("SSH_USER_PRIVATE_KEY", &crlf)]);
    let d = env(&[
        ("DATABASE_TUNNEL_BPG_CONN_INFO", escaped),
        ("DATABASE_URL", url(5432)),
    ]);
    assert!(errors(&d).is_empty(), "{:?}", errors(&d));
}

#[test]
fn host_key_comparison_is_exact() {
    let expected = parse_host_key(HOST_KEY).unwrap();
    let same = russh::keys::parse_public_key_base64(HOST_KEY.split(' ').nth(1).unwrap()).unwrap();
    let other =
        russh::keys::parse_public_key_base64(OTHER_HOST_KEY.split(' ').nth(1).unwrap()).unwrap();
    assert!(expected.matches(&same));
    assert!(!expected.matches(&other));
    // A bare blob and a trailing comment are accepted too.
    assert!(parse_host_key(HOST_KEY.split(' ').nth(1).unwrap()).is_ok());
    assert!(parse_host_key(&format!("{HOST_KEY} root@host")).is_ok());
}

#[test]
fn values_that_may_carry_a_secret_are_never_quoted_back() {
    let long_host = "h".repeat(10_000);
    for (key, value, secret) in [
        // A '|' missing between two items runs the next one into this value.
        (
            "SSH_PORT",
            "22SSH_USER_PRIVATE_KEY:=AAAEBqCUJB45",
            "AAAEBqCUJB45",
        ),
        (
            "POSTGRES_WRITER_HOST",
            "db.internalPOSTGRES_WRITER_PASSWORD:=hunter2-secret",
            "hunter2",
        ),
        ("SSH_HOST", long_host.as_str(), "hhhhhhhhhhhhhhhh"),
        (
            "POSTGRES_READER_HOST",
            "r.internal x:=hunter2-secret",
            "hunter2",
        ),
    ] {
        let d = env(&[
            ("DATABASE_TUNNEL_BPG_CONN_INFO", conn_info(&[(key, value)])),
            ("DATABASE_URL", url(5432)),
            ("DATABASE_READONLY_URL", url(5433)),
        ]);
        let text = all_text(&d);
        assert!(text.contains(key), "{key}: {text}");
        assert!(!text.contains(secret), "{key}: {text}");
        assert!(text.len() < 1000, "{key}: {text}");
    }
    // A URL without a scheme: its password would read as one.
    let d = env(&[
        ("DATABASE_TUNNEL_BPG_CONN_INFO", conn_info(&[])),
        ("DATABASE_URL", "S3cretPW:x@h/db".to_owned()),
    ]);
    let text = all_text(&d).to_ascii_lowercase();
    assert!(text.contains("database_url"), "{text}");
    assert!(!text.contains("s3cretpw"), "{text}");
}

#[test]
fn an_ipv6_host_is_taken_with_or_without_brackets() {
    let d = env(&[
        (
            "DATABASE_TUNNEL_BPG_CONN_INFO",
            conn_info(&[("SSH_HOST", "[::1]"), ("POSTGRES_WRITER_HOST", "[fd00::5]")]),
        ),
        ("DATABASE_URL", url(5432)),
    ]);
    assert_eq!(errors(&d), Vec::<String>::new());
    let addon = &d.addons[0];
    assert_eq!(addon.ssh.host, "::1");
    assert_eq!(addon.ssh.address(), "[::1]:22");
    assert_eq!(addon.forwards[0].remote_host, "fd00::5");
    // A name in brackets is not an address: kept as written, for the connect to report.
    let d = env(&[
        (
            "DATABASE_TUNNEL_BPG_CONN_INFO",
            conn_info(&[("SSH_HOST", "[ssh.example.com]")]),
        ),
        ("DATABASE_URL", url(5432)),
    ]);
    assert_eq!(d.addons[0].ssh.host, "[ssh.example.com]");
}

#[test]
fn malformed_environments_are_each_named() {
    // The variables, the variable and key named, the words of the message.
    type Case<'a> = (Vec<(&'a str, String)>, &'a str, &'a str);
    let big = "x".repeat(100 * 1024);
    let cases: Vec<Case> = vec![
        (
            vec![
                ("DATABASE_TUNNEL_BPG_CONN_INFO", String::new()),
                ("DATABASE_URL", url(5432)),
            ],
            "DATABASE_TUNNEL_BPG_CONN_INFO: SSH_HOST",
            "is missing",
        ),
        (
            vec![
                (
                    "DATABASE_TUNNEL_BPG_CONN_INFO",
                    conn_info(&[("SSH_PORT", "0")]),
                ),
                ("DATABASE_URL", url(5432)),
            ],
            "DATABASE_TUNNEL_BPG_CONN_INFO: SSH_PORT",
            "is not a port number",
        ),
        (
            vec![
                (
                    "DATABASE_TUNNEL_BPG_CONN_INFO",
                    conn_info(&[("SSH_USER_PRIVATE_KEY", &big)]),
                ),
                ("DATABASE_URL", url(5432)),
            ],
            "DATABASE_TUNNEL_BPG_CONN_INFO: SSH_USER_PRIVATE_KEY",
            "could not be read",
        ),
        (
            vec![
                ("DATABASE_TUNNEL_BPG_CONN_INFO", big.clone()),
                ("DATABASE_URL", url(5432)),
            ],
            "DATABASE_TUNNEL_BPG_CONN_INFO",
            "ignored: expected KEY:=VALUE",
        ),
        (
            vec![
                ("DATABASE_TUNNEL_BPG_CONN_INFO", conn_info(&[])),
                (
                    "DATABASE_URL",
                    "postgres://u:p@pg-tunnel.borealis-data.com:0/db".into(),
                ),
            ],
            "DATABASE_URL",
            "expected a port number from 1 to 65535",
        ),
        (
            vec![
                ("DATABASE_TUNNEL_BPG_CONN_INFO", conn_info(&[])),
                ("DATABASE_URL", big.clone()),
            ],
            "DATABASE_URL",
            "expected a URL of the form postgres://",
        ),
    ];
    for (vars, named, words) in cases {
        let d = env(&vars);
        let text = d
            .problems
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n");
        assert!(
            text.lines()
                .any(|line| line.starts_with(named) && line.contains(words)),
            "{named} / {words}: {text}"
        );
        assert!(text.len() < 2000, "{named}: {} characters", text.len());
    }
}

#[test]
fn secrets_never_appear_in_problems_or_debug_output() {
    let broken_key = CLIENT_KEY.replace("b3Blbn", "XXXX");
    let d = env(&[
        (
            "DATABASE_TUNNEL_BPG_CONN_INFO",
            conn_info(&[("SSH_USER_PRIVATE_KEY", &broken_key), ("SSH_HOST", "")]),
        ),
        ("DATABASE_URL", url(5432)),
        ("GOOD_TUNNEL_BPG_CONN_INFO", conn_info(&[])),
        ("GOOD_URL", url(6000)),
    ]);
    let text = all_text(&d);
    assert!(!text.contains(KEY_SECRET_LINE), "{text}");
    assert!(!text.contains("writer-password-secret"));
    assert!(!text.contains("pa%7Css") && !text.contains("pa|ss"));
    assert!(text.contains("SSH_USER_PRIVATE_KEY"));
}

proptest! {
    #[test]
    fn discovery_never_panics(
        info in any::<String>(),
        url in any::<String>(),
        reader in proptest::option::of(any::<String>()),
    ) {
        let mut vars = vec![
            ("X_TUNNEL_BPG_CONN_INFO".to_string(), info),
            ("X_URL".to_string(), url),
        ];
        if let Some(reader) = reader {
            vars.push(("X_READONLY_URL".to_string(), reader));
        }
        let _ = discover(vars);
    }

    #[test]
    fn discovery_never_panics_on_structured_garbage(
        port in "[0-9a-z]{0,6}",
        key in "[A-Za-z0-9+/=\\\\n-]{0,80}",
        host_key in "[a-z0-9 +/=-]{0,60}",
    ) {
        let info = conn_info(&[("SSH_PORT", &port), ("SSH_USER_PRIVATE_KEY", &key), ("SSH_PUBLIC_HOST_KEY", &host_key)]);
        let _ = discover([("X_TUNNEL_BPG_CONN_INFO".to_string(), info), ("X_URL".to_string(), url(5432))]);
    }
}

/// Discovery over conn-info mutated from a real one (deleted, inserted, repeated, re-cased
/// pieces, stray separators). `BPG_TUNNEL_FUZZ_CASES` sets how many cases run (`make fuzz`
/// runs 100,000; the default is a quick slice for every test run).
mod fuzz {
    use super::*;
    use proptest::sample::Index;

    const PASSWORD: &str = "Zq8xT4vLp2Rw";

    /// Every 8 characters in a row of every secret, lower-cased.
    fn fragments() -> Vec<String> {
        let mut secrets: Vec<&str> = CLIENT_KEY
            .lines()
            .filter(|line| !line.starts_with("-----"))
            .collect();
        secrets.extend([PASSWORD, JWT]);
        let mut fragments = Vec::new();
        for secret in secrets {
            let chars: Vec<char> = secret.to_ascii_lowercase().chars().collect();
            for window in chars.windows(8) {
                let fragment: String = window.iter().collect();
                // Runs of one letter (the key's zero padding in base64) say nothing.
                if fragment.chars().any(|c| c != window[0]) {
                    fragments.push(fragment);
                }
            }
        }
        fragments
    }

    #[derive(Debug, Clone)]
    enum Mutation {
        /// Two neighbouring items run into one: a lost `|`.
        Merge(Index),
        /// An item without its `KEY:=`.
        StripKey(Index),
        Swap(Index, Index),
        Delete(Index, usize),
        Insert(Index, String),
        Repeat(Index, usize),
        Upper(Index, usize),
    }

    fn mutation() -> impl Strategy<Value = Mutation> {
        prop_oneof![
            any::<Index>().prop_map(Mutation::Merge),
            any::<Index>().prop_map(Mutation::StripKey),
            (any::<Index>(), any::<Index>()).prop_map(|(a, b)| Mutation::Swap(a, b)),
            (any::<Index>(), 1..200usize).prop_map(|(at, n)| Mutation::Delete(at, n)),
            (
                any::<Index>(),
                "(\\||:=|\\\\n| |\\r|=|@|:|/|[a-z0-9]{1,8}|.{1,4})"
            )
                .prop_map(|(at, text)| Mutation::Insert(at, text)),
            (any::<Index>(), 1..80usize).prop_map(|(at, n)| Mutation::Repeat(at, n)),
            (any::<Index>(), 1..40usize).prop_map(|(at, n)| Mutation::Upper(at, n)),
        ]
    }

    fn apply(text: &str, mutations: &[Mutation]) -> String {
        let mut items: Vec<String> = text.split('|').map(str::to_owned).collect();
        for mutation in mutations {
            let n = items.len();
            match mutation {
                Mutation::Merge(at) if n > 1 => {
                    let at = at.index(n - 1);
                    let next = items.remove(at + 1);
                    items[at].push_str(&next);
                }
                Mutation::StripKey(at) => {
                    let item = &mut items[at.index(n)];
                    if let Some((_, value)) = item.split_once(":=") {
                        *item = value.to_owned();
                    }
                }
                Mutation::Swap(a, b) => items.swap(a.index(n), b.index(n)),
                _ => {}
            }
        }
        let mut chars: Vec<char> = items.join("|").chars().collect();
        for mutation in mutations {
            let len = chars.len().max(1);
            match mutation {
                Mutation::Merge(_) | Mutation::StripKey(_) | Mutation::Swap(..) => {}
                Mutation::Delete(at, n) => {
                    let start = at.index(len).min(chars.len());
                    let end = (start + n).min(chars.len());
                    chars.drain(start..end);
                }
                Mutation::Insert(at, inserted) => {
                    let at = at.index(len + 1).min(chars.len());
                    chars.splice(at..at, inserted.chars());
                }
                Mutation::Repeat(at, n) => {
                    let start = at.index(len).min(chars.len());
                    let end = (start + n).min(chars.len());
                    let piece: Vec<char> = chars[start..end].to_vec();
                    chars.splice(end..end, piece);
                }
                Mutation::Upper(at, n) => {
                    let start = at.index(len).min(chars.len());
                    for c in chars.iter_mut().skip(start).take(*n) {
                        *c = c.to_ascii_uppercase();
                    }
                }
            }
        }
        chars.into_iter().collect()
    }

    fn ssh_conn_info() -> String {
        conn_info(&[
            ("POSTGRES_WRITER_PASSWORD", PASSWORD),
            ("SSH_PORT", "22"),
            ("POSTGRES_PORT", "5432"),
        ])
    }

    fn private_conn_info() -> String {
        ConnInfo::render([
            ("API_BASE_URL", "https://api.example.com"),
            ("ADDON_ID", "addon-1"),
            ("CLIENT_APP_JWT", JWT),
        ])
    }

    fn problems_text(d: &Discovery) -> String {
        d.problems
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n")
            .to_ascii_lowercase()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(crate::fuzz_cases()))]

        #[test]
        fn a_mutated_config_never_panics_and_no_message_quotes_a_secret(
            private in any::<bool>(),
            info_mutations in proptest::collection::vec(mutation(), 1..6),
            url_mutations in proptest::collection::vec(mutation(), 0..3),
        ) {
            let (info, url) = if private {
                (private_conn_info(), format!("postgres://u:{PASSWORD}@db.example.com:5432/db"))
            } else {
                (ssh_conn_info(), format!("postgres://u:{PASSWORD}@pg-tunnel.borealis-data.com:5432/db"))
            };
            let d = discover([
                ("DATABASE_TUNNEL_BPG_CONN_INFO".to_owned(), apply(&info, &info_mutations)),
                ("DATABASE_URL".to_owned(), apply(&url, &url_mutations)),
                ("DATABASE_READONLY_URL".to_owned(), apply(&url, &info_mutations)),
            ]);
            let text = problems_text(&d);
            for fragment in fragments() {
                prop_assert!(!text.contains(&fragment), "{:?} in {}", fragment, text);
            }
        }

        #[test]
        fn a_broken_addon_never_changes_what_a_good_one_gets(
            prefix in "[A-Z][A-Z_]{0,7}",
            private in any::<bool>(),
            mutations in proptest::collection::vec(mutation(), 1..6),
            port in prop_oneof![Just(5432u16), 5433..5440u16],
        ) {
            prop_assume!(prefix != "DATABASE");
            let good = vec![
                ("DATABASE_TUNNEL_BPG_CONN_INFO".to_owned(), ssh_conn_info()),
                ("DATABASE_URL".to_owned(), url(5432)),
            ];
            let alone = discover(good.clone());
            let broken_info = if private { private_conn_info() } else { ssh_conn_info() };
            let mut both = good;
            both.push((format!("{prefix}_TUNNEL_BPG_CONN_INFO"), apply(&broken_info, &mutations)));
            both.push((format!("{prefix}_URL"), url(port)));
            let with_broken = discover(both);
            let database = |d: &Discovery| {
                format!("{:?}", d.addons.iter().find(|a| a.name == "DATABASE"))
            };
            prop_assert_eq!(database(&alone), database(&with_broken));
            prop_assert!(alone.addons.len() == 1);
        }

        #[test]
        fn a_mutated_key_never_panics_and_its_error_quotes_none_of_it(
            mutations in proptest::collection::vec(mutation(), 1..6),
        ) {
            let mutated = apply(CLIENT_KEY, &mutations);
            if let Err(message) = parse_private_key(&mutated) {
                let message = message.to_ascii_lowercase();
                for fragment in fragments() {
                    prop_assert!(!message.contains(&fragment), "{}", message);
                }
            }
            let _ = parse_host_key(&apply(HOST_KEY, &mutations));
        }

        #[test]
        fn names_and_values_that_are_not_utf8_never_panic(
            name in proptest::collection::vec(any::<u8>(), 0..24),
            value in proptest::collection::vec(any::<u8>(), 0..200),
        ) {
            use std::os::unix::ffi::OsStringExt;
            let name = std::ffi::OsString::from_vec([name, b"_TUNNEL_BPG_CONN_INFO".to_vec()].concat());
            let value = std::ffi::OsString::from_vec(value);
            let _ = discover([(
                name.to_string_lossy().into_owned(),
                secret_text(value),
            )]);
        }
    }
}
