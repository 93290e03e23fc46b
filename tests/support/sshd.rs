//! OpenSSH's sshd configured like the add-on's, and client keys of every kind it accepts.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::{descendants, die_with_parent, free_port, is_root, run, Tools};

/// The login sshd accepts when the tests run as root (sshd refuses root itself).
pub const SSH_USER_WHEN_ROOT: &str = "bpgtunnel";

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

/// How the lab's sshd differs from the add-on's defaults where a test needs the defaults. sshd
/// takes the first occurrence of a keyword, so these cannot be appended with `configure`.
#[derive(Clone, Copy, Debug)]
pub struct SshdOptions {
    /// `MaxStartups`, or `None` for OpenSSH's default (10:30:100), as the add-on's server has.
    pub max_startups: Option<&'static str>,
    /// `LogLevel`: VERBOSE logs each connection, which fail2ban's sshd filter expects; INFO is
    /// OpenSSH's default.
    pub log_level: &'static str,
}

impl Default for SshdOptions {
    /// Room for every test's concurrent handshakes, and each connection logged.
    fn default() -> SshdOptions {
        SshdOptions {
            max_startups: Some("200"),
            log_level: "VERBOSE",
        }
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
    /// Host keys beyond the ed25519 one, by file name.
    more_host_keys: Vec<String>,
    /// Lines appended to the configuration.
    extra_config: String,
    /// Forwarding targets allowed beyond the database's.
    more_targets: Vec<String>,
    options: SshdOptions,
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
        Sshd::start_with(tools, pg_port, SshdOptions::default())
    }

    pub fn start_with(tools: &Tools, pg_port: u16, options: SshdOptions) -> Sshd {
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
            more_host_keys: Vec::new(),
            extra_config: String::new(),
            more_targets: Vec::new(),
            options,
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
PermitOpen 127.0.0.1:{pg} 127.0.0.2:{pg}{more_targets}
AllowAgentForwarding no
AllowStreamLocalForwarding no
X11Forwarding no
PermitTTY no
PermitTunnel no
ForceCommand /bin/false
{max_startups}MaxSessions 1000
LogLevel {log_level}
",
            port = self.port,
            max_startups = self
                .options
                .max_startups
                .map(|value| format!("MaxStartups {value}\n"))
                .unwrap_or_default(),
            log_level = self.options.log_level,
            user = self.user,
            more_targets = self
                .more_targets
                .iter()
                .map(|target| format!(" {target}"))
                .collect::<String>(),
        );
        let more: String = self
            .more_host_keys
            .iter()
            .map(|name| format!("HostKey {dir}/{name}\n"))
            .collect();
        let config = format!("{config}{more}{}", self.extra_config);
        std::fs::write(self.dir.path().join("sshd_config"), config).unwrap();
    }

    /// Gives the server another host key, which it then offers too, and restarts it.
    pub fn add_host_key(&mut self, kind: KeyKind) -> KeyPair {
        let name = format!("host_{kind:?}");
        let pair = keygen(&self.tools, self.dir.path(), &name, kind.keygen_args());
        self.more_host_keys.push(name);
        self.reconfigure();
        pair
    }

    /// Allows forwarding to `target` (`host:port`) too, and restarts the server.
    pub fn permit_open(&mut self, target: &str) {
        self.more_targets.push(target.to_owned());
        self.reconfigure();
    }

    /// Appends `lines` to the server's configuration and restarts it.
    pub fn configure(&mut self, lines: &str) {
        self.extra_config.push_str(lines);
        self.extra_config.push('\n');
        self.reconfigure();
    }

    /// Writes the configuration again and restarts the server with it.
    fn reconfigure(&mut self) {
        self.write_config();
        self.stop();
        self.restart();
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
        // A port number is no name: the kernel hands the same free port out again.
        static KEYS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = KEYS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("client_{kind:?}_{n}");
        let pair = keygen(&self.tools, self.dir.path(), &name, kind.keygen_args());
        assert!(
            pair.private.starts_with(kind.header()),
            "ssh-keygen did not produce {kind:?} as expected"
        );
        pair
    }

    /// Starts (again) on the same port with the same host key, and returns once it listens.
    pub fn restart(&mut self) {
        let listening_before = self.times_listening();
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
        // Its own line says when it listens. A test connection would say so too, but sshd logs
        // one that sends nothing as a failure fail2ban counts, which tests/fleet.rs looks for.
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.times_listening() == listening_before {
            assert!(
                Instant::now() < deadline,
                "sshd did not start: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// How many times the log says sshd started listening (it logs this at INFO and above).
    fn times_listening(&self) -> usize {
        self.log()
            .matches(&format!(
                "Server listening on 127.0.0.1 port {}.",
                self.port
            ))
            .count()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sshd.log")).unwrap_or_default()
    }

    /// The log from byte `from` on (an earlier `log().len()`).
    pub fn log_since(&self, from: usize) -> String {
        self.log().get(from..).unwrap_or_default().to_owned()
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
            super::signal(*pid, signal);
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
            super::signal(pid, libc::SIGCONT);
            super::signal(pid, libc::SIGKILL);
        }
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        self.stop();
    }
}
