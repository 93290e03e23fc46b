//! The lab: PostgreSQL behind sshd, and the config vars of an attachment to them.

use std::collections::BTreeMap;

use bpg_tunnel::ConnInfo;

use super::{free_port, KeyKind, KeyPair, Postgres, Sshd, Tools, DB_PASSWORD};

/// Returns the lab, or `None` (after saying why) when its servers are not installed and this is
/// not CI. Use as `let Some(lab) = support::lab() else { return };`.
pub fn lab() -> Option<Lab> {
    tools().map(Lab::start)
}

/// The lab's server binaries, or `None` as for [`lab`], for a test that starts its own servers.
pub fn tools() -> Option<Tools> {
    match Tools::find() {
        Ok(tools) => Some(tools),
        Err(missing) => {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("CI=true but the test lab cannot run: {missing}");
            }
            eprintln!("SKIPPED: {missing} (run the README's test command, which installs it)");
            None
        }
    }
}

/// An attachment whose one forward (the writer, on a fresh local port) goes through `sshd` to
/// 127.0.0.1:`port`, whatever listens there; `sshd` must permit it.
pub fn attachment_to(sshd: &Sshd, client_key: &KeyPair, prefix: &str, port: u16) -> Attachment {
    let writer_port = free_port();
    let conn_info = [
        ("SSH_HOST", "127.0.0.1".to_owned()),
        ("SSH_PORT", sshd.port.to_string()),
        ("SSH_USERNAME", sshd.user.clone()),
        ("SSH_USER_PRIVATE_KEY", client_key.private.clone()),
        ("SSH_PUBLIC_HOST_KEY", sshd.host_key.public.clone()),
        ("POSTGRES_WRITER_HOST", "127.0.0.1".to_owned()),
        ("POSTGRES_PORT", port.to_string()),
        ("POSTGRES_DB_NAME", "postgres".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let mut vars = BTreeMap::new();
    vars.insert(
        format!("{prefix}_URL"),
        format!("postgres://postgres:unused@127.0.0.1:{writer_port}/postgres"),
    );
    let mut attachment = Attachment {
        prefix: prefix.to_owned(),
        writer_port,
        reader_port: None,
        vars,
        conn_info,
    };
    attachment.render_conn_info();
    attachment
}

pub struct Lab {
    pub tools: Tools,
    pub sshd: Sshd,
    pub pg: Postgres,
    pub client_key: KeyPair,
}

impl Lab {
    /// The add-on's secrets, to look for where none may be: the database password (as typed,
    /// and as the URL holds it) and lines of the client's key.
    pub fn secrets(&self) -> Vec<String> {
        let mut secrets = vec![DB_PASSWORD.to_owned(), percent_encode(DB_PASSWORD)];
        secrets.extend(
            self.client_key
                .private
                .lines()
                .skip(1)
                .take(3)
                .map(str::to_owned),
        );
        secrets
    }
}

/// The config vars of one add-on attachment, as Heroku would set them.
#[derive(Clone, Debug)]
pub struct Attachment {
    pub prefix: String,
    pub writer_port: u16,
    pub reader_port: Option<u16>,
    pub vars: BTreeMap<String, String>,
    /// The items of `<prefix>_TUNNEL_BPG_CONN_INFO`, in the add-on's order.
    conn_info: Vec<(String, String)>,
}

impl Attachment {
    pub fn set(&mut self, var: &str, value: impl Into<String>) -> &mut Self {
        self.vars.insert(var.to_owned(), value.into());
        self
    }

    /// Replaces one conn-info key, and renders the value again as the add-on would.
    pub fn set_conn_info(&mut self, key: &str, value: &str) -> &mut Self {
        self.conn_info.retain(|(k, _)| k != key);
        self.conn_info.push((key.to_owned(), value.to_owned()));
        self.render_conn_info();
        self
    }

    fn render_conn_info(&mut self) {
        let rendered =
            ConnInfo::render(self.conn_info.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        self.vars
            .insert(format!("{}_TUNNEL_BPG_CONN_INFO", self.prefix), rendered);
    }
}

impl Lab {
    fn start(tools: Tools) -> Lab {
        let pg = Postgres::start(&tools);
        let sshd = Sshd::start(&tools, pg.port);
        let client_key = sshd.new_client_key(KeyKind::Ed25519);
        sshd.authorize(&client_key.public);
        Lab {
            tools,
            sshd,
            pg,
            client_key,
        }
    }

    /// An attachment with writer and reader forwards on fresh local ports.
    pub fn attachment(&self, prefix: &str) -> Attachment {
        let writer_port = free_port();
        let reader_port = free_port();
        let conn_info = [
            ("SSH_HOST", "127.0.0.1".to_owned()),
            ("SSH_PORT", self.sshd.port.to_string()),
            ("SSH_USERNAME", self.sshd.user.clone()),
            ("SSH_USER_PRIVATE_KEY", self.client_key.private.clone()),
            ("SSH_PUBLIC_HOST_KEY", self.sshd.host_key.public.clone()),
            ("POSTGRES_WRITER_HOST", "127.0.0.1".to_owned()),
            ("POSTGRES_READER_HOST", "127.0.0.2".to_owned()),
            ("POSTGRES_PORT", self.pg.port.to_string()),
            ("POSTGRES_DB_NAME", "postgres".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let password = percent_encode(DB_PASSWORD);
        let mut vars = BTreeMap::new();
        vars.insert(
            format!("{prefix}_URL"),
            format!(
                "postgres://postgres:{password}@pg-tunnel.borealis-data.com:{writer_port}/postgres"
            ),
        );
        vars.insert(
            format!("{prefix}_READONLY_URL"),
            format!("postgresql://postgres:{password}@pg-tunnel.borealis-data.com:{reader_port}/postgres"),
        );
        let mut attachment = Attachment {
            prefix: prefix.to_owned(),
            writer_port,
            reader_port: Some(reader_port),
            vars,
            conn_info,
        };
        attachment.render_conn_info();
        attachment
    }
}

pub fn percent_encode(raw: &str) -> String {
    raw.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}
