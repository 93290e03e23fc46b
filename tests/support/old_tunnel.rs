//! The tunnel bpg-tunnel replaces: autossh keeping an OpenSSH `ssh -L` up, with the options the
//! old buildpack's script gave them (minus `-f`, so the test keeps the pid). The yardstick every
//! benchmark and fault figure is measured against, in the same run.

use std::os::unix::fs::PermissionsExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{descendants, die_with_parent, free_port, which, KeyPair, Lab, Sshd};

pub struct SshForward {
    /// The local end of `-L`, on 127.0.0.1.
    pub port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl SshForward {
    /// Forwards a fresh local port to the lab's PostgreSQL through the SSH server at
    /// 127.0.0.1:`ssh_port` (the lab's sshd, or a fault relay in front of it).
    pub fn start(lab: &Lab, ssh_port: u16) -> SshForward {
        SshForward::start_to(&lab.sshd, &lab.client_key, ssh_port, lab.pg.port)
    }

    /// Forwards a fresh local port to 127.0.0.1:`target` (whatever listens there) through
    /// `sshd`, reached at 127.0.0.1:`ssh_port`, logging in with `client_key`.
    pub fn start_to(sshd: &Sshd, client_key: &KeyPair, ssh_port: u16, target: u16) -> SshForward {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("id");
        std::fs::write(&key, &client_key.private).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let known_hosts = dir.path().join("known_hosts");
        std::fs::write(
            &known_hosts,
            format!("[127.0.0.1]:{ssh_port} {}\n", sshd.host_key.public),
        )
        .unwrap();
        let port = free_port();
        let mut command = Command::new("autossh");
        die_with_parent(&mut command);
        let child = command
            .args(["-M", "0", "-N", "-F", "/dev/null"])
            .args(["-o", "TCPKeepAlive=no", "-o", "ServerAliveInterval=15"])
            .args(["-o", "ServerAliveCountMax=3"])
            .args(["-o", "ExitOnForwardFailure=yes"])
            .args(["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes"])
            .arg("-o")
            .arg(format!("UserKnownHostsFile={}", known_hosts.display()))
            .args(["-p", &ssh_port.to_string()])
            .arg("-i")
            .arg(&key)
            .args(["-L", &format!("127.0.0.1:{port}:127.0.0.1:{target}")])
            .arg(format!("{}@127.0.0.1", sshd.user))
            .env("AUTOSSH_PATH", which("ssh").expect("ssh is installed"))
            // The script's `-f` set autossh's starting gate to 0: an ssh that fails at its
            // first start is retried too, rather than ending autossh.
            .env("AUTOSSH_GATETIME", "0")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start autossh (scripts/setup.sh installs it)");
        SshForward {
            port,
            child,
            _dir: dir,
        }
    }

    /// Waits until the local end accepts (ssh binds it once the session is up).
    pub fn wait_listening(&self, timeout: Duration) {
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(started.elapsed() < timeout, "ssh -L never listened");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// autossh and the ssh it runs.
    pub fn pids(&self) -> Vec<i32> {
        let root = self.child.id() as i32;
        let mut pids = vec![root];
        pids.extend(descendants(root));
        pids
    }
}

impl Drop for SshForward {
    fn drop(&mut self) {
        for pid in self.pids() {
            super::signal(pid, libc::SIGKILL);
        }
        let _ = self.child.wait();
    }
}
