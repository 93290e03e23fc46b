//! Watching the owner: the process whose exit means the app is gone.
//!
//! A pidfd becomes readable when its process exits, without polling and without being fooled
//! by PID reuse. Kernels without `pidfd_open` (before 5.3) fall back to polling `kill(pid, 0)`.

use std::os::fd::{FromRawFd, OwnedFd};
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

pub struct Owner {
    pid: i32,
    pidfd: Option<AsyncFd<OwnedFd>>,
}

impl Owner {
    /// Starts watching `pid` now, so that an exit between now and the first await is not missed.
    pub fn watch(pid: i32) -> Owner {
        // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        let pidfd = (fd >= 0)
            // SAFETY: the kernel just handed us this descriptor; nothing else owns it.
            .then(|| unsafe { OwnedFd::from_raw_fd(fd as i32) })
            // SAFETY: the OwnedFd moves into the AsyncFd, which keeps it open until dropped.
            .and_then(|fd| unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }.ok());
        Owner { pid, pidfd }
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Resolves once the owner has exited.
    pub async fn exited(&self) {
        match &self.pidfd {
            Some(pidfd) => {
                let _ = pidfd.readable().await;
            }
            None => {
                while is_alive(self.pid) {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

fn is_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    let result = unsafe { libc::kill(pid, 0) };
    result == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}
