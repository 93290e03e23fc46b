//! Test harness: a loopback copy of the add-on's setup with real servers.
//!
//! - PostgreSQL 15 listening on 127.0.0.1 (the "writer") and 127.0.0.2 (the "reader") on one
//!   random port, so a query can tell which host the tunnel reached.
//! - OpenSSH sshd configured like the add-on's: public key only, no shell, no TTY, local
//!   forwarding only and `PermitOpen` to the database only.
//! - bpg-tunnel as a child process, with its logfmt stdout captured for assertions.
//!
//! Under `CI=true` a missing server binary fails the test; elsewhere the test is skipped with a
//! message.
#![allow(dead_code)]

pub mod api;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

pub const DB_PASSWORD: &str = "s3cr/t p@ss|word";
pub const SSH_USER_WHEN_ROOT: &str = "bpgtunnel";

/// Returns the lab, or `None` (after saying why) when its servers are not installed and this is
/// not CI. Use as `let Some(lab) = support::lab() else { return };`.
pub fn lab() -> Option<Lab> {
    match Tools::find() {
        Ok(tools) => Some(Lab::start(tools)),
        Err(missing) => {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("CI=true but the test lab cannot run: {missing}");
            }
            eprintln!("SKIPPED: {missing} (run the README's test command, which installs it)");
            None
        }
    }
}

#[derive(Clone)]
pub struct Tools {
    pub sshd: PathBuf,
    pub ssh_keygen: PathBuf,
    pub pg_bin: PathBuf,
}

impl Tools {
    fn find() -> Result<Tools, String> {
        let sshd = ["/usr/sbin/sshd", "/usr/bin/sshd"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .ok_or("sshd not found (apt-get install openssh-server)")?;
        let ssh_keygen = which("ssh-keygen").ok_or("ssh-keygen not found")?;
        let pg_bin = std::env::var_os("PG_BIN")
            .map(PathBuf::from)
            .or_else(|| {
                ["17", "16", "15", "14", "13"]
                    .iter()
                    .map(|v| PathBuf::from(format!("/usr/lib/postgresql/{v}/bin")))
                    .find(|p| p.join("postgres").exists())
            })
            .ok_or("PostgreSQL server binaries not found under /usr/lib/postgresql")?;
        Ok(Tools {
            sshd,
            ssh_keygen,
            pg_bin,
        })
    }
}

pub fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    })
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// For tests that need a new PID namespace: false (after saying so) when not root, outside CI.
pub fn can_unshare_pid() -> bool {
    if is_root() {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("CI=true: this test needs root for unshare --pid");
    }
    eprintln!("SKIPPED: needs root for unshare --pid");
    false
}

/// A port nobody listens on right now (bound and released; the window for a race is tiny).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn die_with_parent(command: &mut Command) {
    // SAFETY: prctl is async-signal-safe; the closure only calls it.
    unsafe {
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

fn wait_for_port(addr: SocketAddr, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

fn run(command: &mut Command) {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    assert!(
        output.status.success(),
        "{command:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL

pub struct Postgres {
    pub port: u16,
    _dir: tempfile::TempDir,
    child: Child,
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
        let mut command = Command::new(tools.pg_bin.join("postgres"));
        command
            .arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1,127.0.0.2"])
            .arg("-c")
            .arg(format!("unix_socket_directories={}", dir.path().display()))
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
                std::fs::File::create(dir.path().join("postgres.log")).unwrap(),
            ));
        as_postgres(&mut command);
        die_with_parent(&mut command);
        let child = command.spawn().expect("start postgres");
        let pg = Postgres {
            port,
            _dir: dir,
            child,
        };
        assert!(
            wait_for_port(
                SocketAddr::from(([127, 0, 0, 1], port)),
                Duration::from_secs(20)
            ),
            "postgres did not start: {}",
            std::fs::read_to_string(pg._dir.path().join("postgres.log")).unwrap_or_default()
        );
        pg
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // SIGQUIT: immediate shutdown, no checkpoint; the data is thrown away anyway.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGQUIT) };
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// sshd

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind {
    Ed25519,
    RsaOpenssh,
    RsaPkcs1,
    RsaPkcs8,
    EcdsaP256Openssh,
    EcdsaP384Sec1,
    EcdsaP521Pkcs8,
}

impl KeyKind {
    pub const ALL: [KeyKind; 7] = [
        KeyKind::Ed25519,
        KeyKind::RsaOpenssh,
        KeyKind::RsaPkcs1,
        KeyKind::RsaPkcs8,
        KeyKind::EcdsaP256Openssh,
        KeyKind::EcdsaP384Sec1,
        KeyKind::EcdsaP521Pkcs8,
    ];

    fn keygen_args(self) -> &'static [&'static str] {
        match self {
            KeyKind::Ed25519 => &["-t", "ed25519"],
            KeyKind::RsaOpenssh => &["-t", "rsa", "-b", "2048"],
            KeyKind::RsaPkcs1 => &["-t", "rsa", "-b", "2048", "-m", "PEM"],
            KeyKind::RsaPkcs8 => &["-t", "rsa", "-b", "3072", "-m", "PKCS8"],
            KeyKind::EcdsaP256Openssh => &["-t", "ecdsa", "-b", "256"],
            KeyKind::EcdsaP384Sec1 => &["-t", "ecdsa", "-b", "384", "-m", "PEM"],
            KeyKind::EcdsaP521Pkcs8 => &["-t", "ecdsa", "-b", "521", "-m", "PKCS8"],
        }
    }

    /// The PEM header ssh-keygen must have produced, checked so the test really covers the format.
    pub fn header(self) -> &'static str {
        match self {
            KeyKind::Ed25519 | KeyKind::RsaOpenssh | KeyKind::EcdsaP256Openssh => {
                "-----BEGIN OPENSSH PRIVATE KEY-----"
            }
            KeyKind::RsaPkcs1 => "-----BEGIN RSA PRIVATE KEY-----",
            KeyKind::EcdsaP384Sec1 => "-----BEGIN EC PRIVATE KEY-----",
            KeyKind::RsaPkcs8 | KeyKind::EcdsaP521Pkcs8 => "-----BEGIN PRIVATE KEY-----",
        }
    }
}

pub struct KeyPair {
    pub private: String,
    pub public: String,
}

pub fn keygen(tools: &Tools, dir: &Path, name: &str, args: &[&str]) -> KeyPair {
    let path = dir.join(name);
    let mut command = Command::new(&tools.ssh_keygen);
    command
        .args(["-q", "-N", "", "-C", ""])
        .args(args)
        .arg("-f")
        .arg(&path);
    run(&mut command);
    KeyPair {
        private: std::fs::read_to_string(&path).unwrap(),
        public: std::fs::read_to_string(path.with_extension("pub"))
            .unwrap()
            .trim()
            .to_owned(),
    }
}

pub struct Sshd {
    pub port: u16,
    pub user: String,
    pub host_key: KeyPair,
    dir: tempfile::TempDir,
    tools: Tools,
    pg_port: u16,
    child: Option<Child>,
}

fn ssh_login_user() -> String {
    if !is_root() {
        return std::env::var("USER")
            .ok()
            .or_else(|| {
                Command::new("id")
                    .arg("-un")
                    .output()
                    .ok()
                    .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            })
            .expect("current user name");
    }
    static ENSURED: OnceLock<()> = OnceLock::new();
    ENSURED.get_or_init(|| {
        let exists = Command::new("id")
            .arg(SSH_USER_WHEN_ROOT)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !exists {
            // Like the add-on's tunnel users: no password, no usable shell.
            let status = Command::new("useradd")
                .args(["--system", "--no-create-home", "--home-dir", "/nonexistent"])
                .args(["--shell", "/usr/sbin/nologin", SSH_USER_WHEN_ROOT])
                .status()
                .expect("useradd");
            // 9: created meanwhile by a parallel test binary.
            assert!(
                status.success() || status.code() == Some(9),
                "useradd failed"
            );
        }
        // useradd leaves the password "!", which sshd without PAM treats as a locked account;
        // "*" means "no password" without locking public-key logins.
        let status = Command::new("usermod")
            .args(["-p", "*", SSH_USER_WHEN_ROOT])
            .status()
            .expect("usermod");
        assert!(status.success(), "usermod failed");
        std::fs::create_dir_all("/run/sshd").unwrap();
    });
    SSH_USER_WHEN_ROOT.to_owned()
}

impl Sshd {
    pub fn start(tools: &Tools, pg_port: u16) -> Sshd {
        let dir = tempfile::Builder::new()
            .prefix("bpg-sshd-")
            .tempdir()
            .unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let host_key = keygen(tools, dir.path(), "host_ed25519", &["-t", "ed25519"]);
        std::fs::write(dir.path().join("authorized_keys"), "").unwrap();
        std::fs::set_permissions(
            dir.path().join("authorized_keys"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        let mut sshd = Sshd {
            port: free_port(),
            user: ssh_login_user(),
            host_key,
            dir,
            tools: tools.clone(),
            pg_port,
            child: None,
        };
        sshd.write_config();
        sshd.restart();
        sshd
    }

    fn write_config(&self) {
        let dir = self.dir.path().display();
        let pg = self.pg_port;
        let config = format!(
            "Port {port}
ListenAddress 127.0.0.1
HostKey {dir}/host_ed25519
PidFile {dir}/sshd.pid
AuthorizedKeysFile {dir}/authorized_keys
StrictModes no
UsePAM no
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin no
AllowUsers {user}
AllowTcpForwarding local
PermitOpen 127.0.0.1:{pg} 127.0.0.2:{pg}
AllowAgentForwarding no
AllowStreamLocalForwarding no
X11Forwarding no
PermitTTY no
PermitTunnel no
ForceCommand /bin/false
MaxStartups 200
MaxSessions 1000
LogLevel VERBOSE
",
            port = self.port,
            user = self.user,
        );
        std::fs::write(self.dir.path().join("sshd_config"), config).unwrap();
    }

    pub fn authorize(&self, public_key: &str) {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(self.dir.path().join("authorized_keys"))
            .unwrap();
        writeln!(file, "{public_key}").unwrap();
    }

    pub fn new_client_key(&self, kind: KeyKind) -> KeyPair {
        let name = format!("client_{:?}_{}", kind, free_port());
        let pair = keygen(&self.tools, self.dir.path(), &name, kind.keygen_args());
        assert!(
            pair.private.starts_with(kind.header()),
            "ssh-keygen did not produce {kind:?} as expected"
        );
        pair
    }

    /// Starts (again) on the same port with the same host key.
    pub fn restart(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("sshd.log"))
            .unwrap();
        let mut command = Command::new(&self.tools.sshd);
        command
            .arg("-D")
            .arg("-e")
            .arg("-f")
            .arg(self.dir.path().join("sshd_config"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log));
        die_with_parent(&mut command);
        let child = command.spawn().expect("start sshd");
        self.child = Some(child);
        assert!(
            wait_for_port(
                SocketAddr::from(([127, 0, 0, 1], self.port)),
                Duration::from_secs(10)
            ),
            "sshd did not start: {}",
            self.log()
        );
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sshd.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The per-connection processes sshd forked (privileged monitor and network child).
    pub fn session_pids(&self) -> Vec<i32> {
        self.pid()
            .map(|pid| descendants(pid as i32))
            .unwrap_or_default()
    }

    pub fn signal_sessions(&self, signal: i32) -> usize {
        let pids = self.session_pids();
        for pid in &pids {
            unsafe { libc::kill(*pid, signal) };
        }
        pids.len()
    }

    /// Stops the listener and every session: the server is down.
    pub fn stop(&mut self) {
        let sessions = self.session_pids();
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        for pid in sessions {
            unsafe {
                libc::kill(pid, libc::SIGCONT);
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// All processes below `root`, found through /proc.
pub fn descendants(root: i32) -> Vec<i32> {
    let mut parents: BTreeMap<i32, Vec<i32>> = BTreeMap::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // The command name may hold spaces and parentheses: parse after the last ')'.
        let Some(rest) = stat.rsplit_once(')').map(|(_, rest)| rest) else {
            continue;
        };
        let ppid: i32 = rest
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        parents.entry(ppid).or_default().push(pid);
    }
    let mut found = Vec::new();
    let mut queue = vec![root];
    while let Some(pid) = queue.pop() {
        for &child in parents.get(&pid).into_iter().flatten() {
            found.push(child);
            queue.push(child);
        }
    }
    found
}

// ---------------------------------------------------------------------------------------------
// The lab

pub struct Lab {
    pub tools: Tools,
    pub sshd: Sshd,
    pub pg: Postgres,
    pub client_key: KeyPair,
}

/// The config vars of one add-on attachment, as Heroku would set them.
#[derive(Clone, Debug)]
pub struct Attachment {
    pub prefix: String,
    pub writer_port: u16,
    pub reader_port: Option<u16>,
    pub vars: BTreeMap<String, String>,
}

impl Attachment {
    pub fn set(&mut self, var: &str, value: impl Into<String>) -> &mut Self {
        self.vars.insert(var.to_owned(), value.into());
        self
    }

    /// Replaces one conn-info key (re-rendering the value as the add-on would).
    pub fn set_conn_info(&mut self, key: &str, value: &str) -> &mut Self {
        let var = format!("{}_TUNNEL_BPG_CONN_INFO", self.prefix);
        let mut items: Vec<(String, String)> = self.vars[&var]
            .split('|')
            .filter_map(|item| item.split_once(":="))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .filter(|(k, _)| k != key)
            .collect();
        items.push((key.to_owned(), value.replace('\n', "\\n")));
        let rendered = items
            .iter()
            .map(|(k, v)| format!("{k}:={v}"))
            .collect::<Vec<_>>()
            .join("|");
        self.vars.insert(var, rendered);
        self
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
            (
                "SSH_USER_PRIVATE_KEY",
                self.client_key.private.replace('\n', "\\n"),
            ),
            ("SSH_PUBLIC_HOST_KEY", self.sshd.host_key.public.clone()),
            ("POSTGRES_WRITER_HOST", "127.0.0.1".to_owned()),
            ("POSTGRES_READER_HOST", "127.0.0.2".to_owned()),
            ("POSTGRES_PORT", self.pg.port.to_string()),
            ("POSTGRES_DB_NAME", "postgres".to_owned()),
        ]
        .iter()
        .map(|(k, v)| format!("{k}:={v}"))
        .collect::<Vec<_>>()
        .join("|");
        let password = percent_encode(DB_PASSWORD);
        let mut vars = BTreeMap::new();
        vars.insert(format!("{prefix}_TUNNEL_BPG_CONN_INFO"), conn_info);
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
        Attachment {
            prefix: prefix.to_owned(),
            writer_port,
            reader_port: Some(reader_port),
            vars,
        }
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

// ---------------------------------------------------------------------------------------------
// bpg-tunnel under test

pub fn tunnel_binary() -> PathBuf {
    std::env::var_os("BPG_TUNNEL_BIN")
        .map(PathBuf::from)
        .or_else(|| option_env!("CARGO_BIN_EXE_bpg-tunnel").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("target/debug/bpg-tunnel"))
}

/// Whether the binary under test is the release build (`BPG_TUNNEL_BIN`, as `scripts/test.sh`
/// sets it), whose memory figures are the ones users see.
pub fn is_release_binary() -> bool {
    std::env::var_os("BPG_TUNNEL_BIN").is_some()
}

/// The release tarball the buildpacks install: `BPG_TUNNEL_DIST` (set by `scripts/test.sh` to
/// what `scripts/dist.sh` built), or, outside CI, one packed here the same way from the binary
/// under test.
pub fn release_tarball() -> PathBuf {
    static PACKED: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    if let Some(dist) = std::env::var_os("BPG_TUNNEL_DIST") {
        return PathBuf::from(dist);
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("CI=true: set BPG_TUNNEL_DIST to the tarball scripts/dist.sh built");
    }
    let (_, tarball) = PACKED.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let stage = dir.path().join("stage");
        std::fs::create_dir(&stage).unwrap();
        std::fs::copy(tunnel_binary(), stage.join("bpg-tunnel")).unwrap();
        let tarball = dir
            .path()
            .join("bpg-tunnel-test-x86_64-unknown-linux-musl.tar.gz");
        let status = Command::new("tar")
            .arg("-czf")
            .arg(&tarball)
            .arg("-C")
            .arg(&stage)
            .arg("bpg-tunnel")
            .status()
            .unwrap();
        assert!(status.success());
        let sums = Command::new("sha256sum").arg(&tarball).output().unwrap();
        let mut sidecar = tarball.clone().into_os_string();
        sidecar.push(".sha256");
        std::fs::write(sidecar, sums.stdout).unwrap();
        (dir, tarball)
    });
    tarball.clone()
}

#[derive(Default)]
struct Output {
    lines: Mutex<Vec<String>>,
    changed: Condvar,
}

pub struct Tunnel {
    child: Child,
    output: Arc<Output>,
}

impl Tunnel {
    /// Starts `bpg-tunnel` with a clean environment holding only `vars` (and PATH).
    pub fn spawn<'a>(
        vars: impl IntoIterator<Item = (&'a String, &'a String)>,
        args: &[&str],
    ) -> Tunnel {
        let mut command = Command::new(tunnel_binary());
        command.args(args);
        Tunnel::spawn_command(command, vars)
    }

    /// Runs `script` with bash as a dyno would (profile.d style), with bpg-tunnel on PATH, in a
    /// process group of its own so the test can signal "every process" of the app.
    pub fn bash<'a>(
        vars: impl IntoIterator<Item = (&'a String, &'a String)>,
        script: &str,
    ) -> Tunnel {
        let mut command = Command::new("bash");
        command.arg("-c").arg(script).process_group(0);
        Tunnel::spawn_command(command, vars)
    }

    /// Runs any command the way [`Tunnel::bash`] does: clean environment, own process group.
    pub fn command<'a>(
        mut command: Command,
        vars: impl IntoIterator<Item = (&'a String, &'a String)>,
    ) -> Tunnel {
        command.process_group(0);
        Tunnel::spawn_command(command, vars)
    }

    fn spawn_command<'a>(
        mut command: Command,
        vars: impl IntoIterator<Item = (&'a String, &'a String)>,
    ) -> Tunnel {
        let bin_dir = tunnel_binary().parent().unwrap().to_owned();
        let mut path = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
            .collect::<Vec<_>>();
        path.insert(0, bin_dir);
        command
            .env_clear()
            .env("PATH", std::env::join_paths(path).unwrap())
            .env("BPG_TUNNEL_LOG", "debug")
            .envs(vars)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        die_with_parent(&mut command);
        let mut child = command.spawn().expect("start bpg-tunnel");
        let output = Arc::new(Output::default());
        for pipe in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let output = output.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    output.lines.lock().unwrap().push(line);
                    output.changed.notify_all();
                }
            });
        }
        Tunnel { child, output }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn lines(&self) -> Vec<String> {
        self.output.lines.lock().unwrap().clone()
    }

    pub fn count(&self, needle: &str) -> usize {
        self.lines().iter().filter(|l| l.contains(needle)).count()
    }

    /// Waits until `n` lines contain every needle; returns the last such line.
    pub fn wait_for_nth(&self, needles: &[&str], n: usize, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        let mut lines = self.output.lines.lock().unwrap();
        loop {
            let matching: Vec<&String> = lines
                .iter()
                .filter(|l| needles.iter().all(|n| l.contains(n)))
                .collect();
            if matching.len() >= n {
                return matching[n - 1].clone();
            }
            let now = Instant::now();
            if now >= deadline {
                panic!(
                    "no line #{n} with {needles:?} within {timeout:?}; output:\n{}",
                    lines.join("\n")
                );
            }
            lines = self
                .output
                .changed
                .wait_timeout(lines, deadline - now)
                .unwrap()
                .0;
        }
    }

    pub fn wait_for(&self, needles: &[&str], timeout: Duration) -> String {
        self.wait_for_nth(needles, 1, timeout)
    }

    pub fn signal(&self, signal: i32) {
        unsafe { libc::kill(self.pid(), signal) };
    }

    /// Waits for the process to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        // The whole group: a bash "dyno" and everything it started.
        unsafe { libc::kill(-self.pid(), libc::SIGKILL) };
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// Clients

pub async fn connect(port: u16) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(port)
        .user("postgres")
        .password(DB_PASSWORD)
        .dbname("postgres")
        .connect_timeout(Duration::from_secs(60));
    let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

/// psql through the attachment's writer forward, running each command in turn.
pub fn psql(db: &Attachment, commands: &[&str]) -> Command {
    let mut psql = Command::new("psql");
    psql.arg(psql_url(&db.vars[&format!("{}_URL", db.prefix)]))
        .arg("-X");
    for command in commands {
        psql.args(["-c", command]);
    }
    psql
}

/// Reads a client's piped stdout to its end in a thread, then requires the client to succeed;
/// returns the bytes and lines read.
pub fn read_output(mut client: Child) -> std::thread::JoinHandle<(u64, u64)> {
    let mut out = client.stdout.take().unwrap();
    std::thread::spawn(move || {
        let (mut bytes, mut lines) = (0u64, 0u64);
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = std::io::Read::read(&mut out, &mut buf).unwrap();
            if n == 0 {
                break;
            }
            bytes += n as u64;
            lines += buf[..n].iter().filter(|b| **b == b'\n').count() as u64;
        }
        assert!(client.wait().unwrap().success(), "the client failed");
        (bytes, lines)
    })
}

/// A process's resident memory in bytes (0 once it is gone).
pub fn rss_bytes(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|kb| kb.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// A libpq URL usable in the lab (which has no DNS for the add-on's host name).
pub fn psql_url(url: &str) -> String {
    format!("{url}?hostaddr=127.0.0.1")
}

/// The pid the daemon wrote into its pid file under `state` (its `BPG_TUNNEL_STATE_DIR`).
pub fn daemon_pid(state: &Path) -> Option<i32> {
    std::fs::read_to_string(state.join("bpg-tunnel.pid"))
        .ok()
        .and_then(|text| text.trim().parse().ok())
}

/// How long `pid` took to exit, or `None` if it is still there after `timeout`.
pub fn wait_gone(pid: i32, timeout: Duration) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < timeout {
        if !process_alive(pid) {
            return Some(started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

/// The value of `key` in a logfmt-style line.
pub fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|pair| pair.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key} in {line}"))
}

pub fn process_alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
    })
}

/// Connects and returns the address PostgreSQL saw the connection arrive on (127.0.0.1 for the
/// writer host, 127.0.0.2 for the reader host).
pub async fn server_addr(port: u16) -> Result<String, tokio_postgres::Error> {
    let client = connect(port).await?;
    let row = client
        .query_one("select host(inet_server_addr())", &[])
        .await?;
    Ok(row.get(0))
}
