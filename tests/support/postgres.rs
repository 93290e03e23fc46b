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
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let _ = self.child.wait();
    }

    /// Makes the server admit TCP logins only over TLS (a self-signed certificate, `hostssl`
    /// lines only), as a server that demands TLS does, and waits until a login without TLS is
    /// refused.
    pub fn require_tls(&self) {
        let data = self._dir.path().join("data");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        std::fs::write(data.join("server.crt"), cert.pem()).unwrap();
        // PostgreSQL refuses a key file that others can read.
        std::fs::write(data.join("server.key"), key.serialize_pem()).unwrap();
        std::fs::set_permissions(
            data.join("server.key"),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
        for file in ["server.crt", "server.key"] {
            give_to_postgres(&data.join(file));
        }
        let mut conf = std::fs::read_to_string(data.join("postgresql.conf")).unwrap();
        conf.push_str("\nssl = on\n");
        std::fs::write(data.join("postgresql.conf"), conf).unwrap();
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\nhostssl all all 127.0.0.0/8 scram-sha-256\n",
        )
        .unwrap();
        unsafe { libc::kill(self.child.id() as i32, libc::SIGHUP) };
        // The reload is asynchronous: wait until a login without TLS is turned away.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let output = Command::new("psql")
                .args(["-X", "-h", "127.0.0.1", "-p", &self.port.to_string()])
                .args(["-U", "postgres", "-d", "postgres", "-c", "select 1"])
                .env("PGPASSWORD", DB_PASSWORD)
                .env("PGSSLMODE", "disable")
                .output()
                .expect("run psql");
            if String::from_utf8_lossy(&output.stderr).contains("no encryption") {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the server still admits logins without TLS: {}",
                std::fs::read_to_string(self._dir.path().join("postgres.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
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
        unsafe { libc::kill(self.child.id() as i32, libc::SIGQUIT) };
        let _ = self.child.wait();
    }
}
