//! Test harness: a loopback copy of the add-on's setup with real servers, one file per part.
//!
//! - [`postgres`]: PostgreSQL listening on 127.0.0.1 (the "writer") and 127.0.0.2 (the
//!   "reader") on one random port, so a query can tell which host the tunnel reached; on
//!   request, restarted with TLS on or off and `pg_hba.conf` lines of the test's choosing.
//! - [`sshd`]: OpenSSH sshd configured like the add-on's: public key only, no shell, no TTY,
//!   local forwarding only and `PermitOpen` to the database only; client keys of every kind.
//! - [`lab`]: both together, and the config vars of an attachment, as Heroku would set them
//!   (written with bpg-tunnel's own `ConnInfo`).
//! - [`tunnel`]: bpg-tunnel (or a dyno's shell around it) as a child process, with its logfmt
//!   output captured for assertions; the release binary and tarball under test.
//! - [`client`]: database clients through the tunnel (`tokio-postgres`, `psql`).
//! - [`process`]: looking at processes through /proc.
//! - [`relay`]: a relay between bpg-tunnel and sshd that adds latency or blackholes.
//! - [`loss`]: packet loss on a loopback port, with nftables.
//! - [`old_tunnel`]: autossh + `ssh -L` as the old buildpack ran them, the yardstick.
//! - [`api`]: a fake of the add-on's HTTP API, for private-app-tunnel mode.
//! - [`rogue`]: an SSH server that breaks the protocol on purpose (russh's, patched for it).
//! - [`fail2ban`]: what the add-on's fail2ban would find in the lab sshd's log.
//!
//! Under `CI=true` a missing server binary fails the test; elsewhere the test is skipped with a
//! message.
#![allow(dead_code)]
#![allow(
    clippy::disallowed_methods,
    reason = "the harness reads the lab's settings (CI, BPG_TUNNEL_BIN, PATH) from the environment"
)]

pub mod api;
pub mod client;
pub mod fail2ban;
pub mod lab;
pub mod loss;
pub mod old_tunnel;
pub mod postgres;
pub mod process;
pub mod relay;
pub mod rogue;
pub mod sshd;
pub mod tunnel;

// Each test target uses a different part of the harness.
#[allow(unused_imports)]
pub use {
    client::*, lab::*, loss::*, old_tunnel::*, postgres::*, process::*, relay::*, sshd::*,
    tunnel::*,
};

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

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

/// A port nobody listens on right now (bound and released; the window for a race is tiny), and
/// never one this process handed out before: the kernel may give a released port again at
/// once, and a test running beside this one would then probe the other's listener (its health
/// port on the other's writer, counting a connection the other never made).
pub fn free_port() -> u16 {
    static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut handed_out = HANDED_OUT
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if !handed_out.contains(&port) {
            handed_out.push(port);
            return port;
        }
    }
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
