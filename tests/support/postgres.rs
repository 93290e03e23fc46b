//! PostgreSQL for the lab: one cluster made per test binary, copied per server.

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use super::{die_with_parent, free_port, is_root, run, wait_for_port, Tools};

/// The `postgres` user's password (with characters a URL must escape).
pub const DB_PASSWORD: &str = "s3cr/t p@ss|word";

/// How [`Postgres::configure`] sets the server up.
pub struct ServerTls {
    pub ssl: bool,
    /// The names (or addresses) the server's certificate is made out to.
    pub names: &'static [&'static str],
    /// `pg_hba.conf`'s lines for TCP logins (`host`, `hostssl`, `hostnossl`).
    pub hba: &'static [&'static str],
}

pub struct Postgres {
    pub port: u16,
    _dir: tempfile::TempDir,
    child: Child,
    pg_bin: PathBuf,
}

/// initdb is the slow part (about a second); do it once per test binary and copy the result.
fn template_cluster(tools: &Tools) -> &'static Path {
    static TEMPLATE: OnceLock<PathBuf> = OnceLock::new();
    TEMPLATE.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("bpg-pg-template-")
            .tempdir()
            .unwrap()
            .keep();
        give_to_postgres(&dir);
        let pwfile = dir.join("pw");
        std::fs::write(&pwfile, DB_PASSWORD).unwrap();
        give_to_postgres(&pwfile);
        let mut initdb = Command::new(tools.pg_bin.join("initdb"));
        initdb
            .arg("-D")
            .arg(dir.join("data"))
            .args([
                "-U",
                "postgres",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--no-sync",
                "-E",
                "UTF8",
            ])
            .arg(format!("--pwfile={}", pwfile.display()));
        as_postgres(&mut initdb);
        run(&mut initdb);
        dir.join("data")
    })
}

fn postgres_ids() -> Option<(u32, u32)> {
    if !is_root() {
        return None;
    }
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap();
    passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        (fields.first() == Some(&"postgres"))
            .then(|| (fields[2].parse().unwrap(), fields[3].parse().unwrap()))
    })
}

fn as_postgres(command: &mut Command) {
    if let Some((uid, gid)) = postgres_ids() {
        command.uid(uid).gid(gid);
    }
}

fn give_to_postgres(path: &Path) {
    if let Some((uid, gid)) = postgres_ids() {
        std::os::unix::fs::chown(path, Some(uid), Some(gid)).unwrap();
    }
}

impl Postgres {
    pub fn start(tools: &Tools) -> Postgres {
        let template = template_cluster(tools);
        let dir = tempfile::Builder::new()
            .prefix("bpg-pg-")
            .tempdir()
            .unwrap();
        give_to_postgres(dir.path());
        let data = dir.path().join("data");
        let mut copy = Command::new("cp");
        copy.arg("-a").arg(template).arg(&data);
        run(&mut copy);
        let port = free_port();
        let child = launch(&tools.pg_bin, dir.path(), port);
        let pg = Postgres {
            port,
            _dir: dir,
            child,
            pg_bin: tools.pg_bin.clone(),
        };
        pg.wait_accepting();
        pg
    }

    fn wait_accepting(&self) {
        assert!(
            wait_for_port(
                SocketAddr::from(([127, 0, 0, 1], self.port)),
                Duration::from_secs(20)
            ),
            "postgres did not start: {}",
            std::fs::read_to_string(self._dir.path().join("postgres.log")).unwrap_or_default()
        );
    }

    /// Stops the server as an operator's restart would (fast shutdown: sessions are ended).
    pub fn stop(&mut self) {
        super::signal(self.child.id() as i32, libc::SIGINT);
        let _ = self.child.wait();
    }

    /// Restarts the server as `tls` says: TLS on or off, the `pg_hba.conf` lines for TCP
    /// logins, and every connection and authentication in its log ([`Postgres::log`]). With
    /// TLS on, the server's certificate is made out to `tls.names` and signed by a CA of its
    /// own, whose certificate is returned (a PEM file), for `sslrootcert`.
    pub fn configure(&mut self, tls: &ServerTls) -> Option<PathBuf> {
        let data = self._dir.path().join("data");
        let mut ca_file = None;
        if tls.ssl {
            let ca_key = rcgen::KeyPair::generate().unwrap();
            let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            ca_params
                .distinguished_name
                .push(rcgen::DnType::CommonName, "bpg-tunnel lab PostgreSQL CA");
            let ca_cert = ca_params.self_signed(&ca_key).unwrap();
            let ca = rcgen::Issuer::new(ca_params, ca_key);
            let key = rcgen::KeyPair::generate().unwrap();
            let names: Vec<String> = tls.names.iter().map(|name| name.to_string()).collect();
            let cert = rcgen::CertificateParams::new(names)
                .unwrap()
                .signed_by(&key, &ca)
                .unwrap();
            std::fs::write(data.join("server.crt"), cert.pem()).unwrap();
            std::fs::write(data.join("server.key"), key.serialize_pem()).unwrap();
            // PostgreSQL refuses a key file that others can read.
            std::fs::set_permissions(
                data.join("server.key"),
                std::os::unix::fs::PermissionsExt::from_mode(0o600),
            )
            .unwrap();
            for file in ["server.crt", "server.key"] {
                give_to_postgres(&data.join(file));
            }
            let path = self._dir.path().join("ca.crt");
            std::fs::write(&path, ca_cert.pem()).unwrap();
            ca_file = Some(path);
        }
        let mut conf = std::fs::read_to_string(data.join("postgresql.conf")).unwrap();
        // The last setting of a name wins: a second call overrides the first.
        conf.push_str(&format!(
            "\nssl = {}\nlog_connections = on\n",
            if tls.ssl { "on" } else { "off" }
        ));
        std::fs::write(data.join("postgresql.conf"), conf).unwrap();
        std::fs::write(
            data.join("pg_hba.conf"),
            format!("local all all trust\n{}\n", tls.hba.join("\n")),
        )
        .unwrap();
        // A restart rather than a reload: once it accepts again, every setting is in force.
        self.stop();
        let restarted = self.log().len();
        self.start_again();
        // The wait's own connection is logged by its backend a moment later; once it is, what
        // the log says next is the test's doing.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !self.log()[restarted..].contains("connection received") {
            assert!(
                std::time::Instant::now() < deadline,
                "no connection logged: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        ca_file
    }

    /// What the server has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("postgres.log")).unwrap_or_default()
    }

    /// Starts it again, on the same port with the same data, and waits until it accepts.
    pub fn start_again(&mut self) {
        self.child = launch(&self.pg_bin, self._dir.path(), self.port);
        self.wait_accepting();
    }
}

fn launch(pg_bin: &Path, dir: &Path, port: u16) -> Child {
    let mut command = Command::new(pg_bin.join("postgres"));
    command
        .arg("-D")
        .arg(dir.join("data"))
        .args(["-p", &port.to_string()])
        .args(["-c", "listen_addresses=127.0.0.1,127.0.0.2"])
        .arg("-c")
        .arg(format!("unix_socket_directories={}", dir.display()))
        .args([
            "-c",
            "fsync=off",
            "-c",
            "max_connections=300",
            "-c",
            "shared_buffers=32MB",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::from(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.join("postgres.log"))
                .unwrap(),
        ));
    as_postgres(&mut command);
    die_with_parent(&mut command);
    command.spawn().expect("start postgres")
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // SIGQUIT: immediate shutdown, no checkpoint; the data is thrown away anyway.
        super::signal(self.child.id() as i32, libc::SIGQUIT);
        let _ = self.child.wait();
    }
}
