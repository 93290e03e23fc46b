//! The daemon's pid file, locked with `flock` for the daemon's whole life: the kernel drops the
//! lock when the process dies, so a stale file left by a killed daemon is recognised as such,
//! and PID reuse cannot fool it.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// Where the daemon's pid file is: in `state_dir` if given, else `$XDG_RUNTIME_DIR`, else
/// `$HOME/.borealis-pg`.
pub fn pid_path(state_dir: Option<&Path>) -> PathBuf {
    let dir = state_dir
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from))
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".borealis-pg")))
        .unwrap_or_else(|| std::env::temp_dir().join("borealis-pg"));
    dir.join("bpg-tunnel.pid")
}

/// The pid of the daemon holding `path`'s lock, if one is alive.
pub fn running_daemon(path: &Path) -> Option<i32> {
    let mut file = File::open(path).ok()?;
    // SAFETY: flock on a descriptor we own.
    let free = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) } == 0;
    if free {
        // Stale: whoever wrote it is gone (the kernel released its lock).
        return None;
    }
    let mut text = String::new();
    file.read_to_string(&mut text).ok()?;
    text.trim().parse().ok().or(Some(0))
}

/// The daemon's locked pid file; removed when dropped.
pub struct PidFile {
    file: File,
    path: PathBuf,
}

impl PidFile {
    /// `Ok(None)` when another live daemon holds it.
    pub fn acquire(path: &Path) -> std::io::Result<Option<PidFile>> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(path)?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let error = std::io::Error::last_os_error();
            return if error.kind() == std::io::ErrorKind::WouldBlock {
                Ok(None)
            } else {
                Err(error)
            };
        }
        file.set_len(0)?;
        (&file).write_all(format!("{}\n", std::process::id()).as_bytes())?;
        Ok(Some(PidFile {
            file,
            path: path.to_owned(),
        }))
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        // Removed while still locked, so no newcomer can lock the old file and lose it to us.
        let _ = std::fs::remove_file(&self.path);
        let _ = self.file.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pid_file_is_exclusive_and_a_stale_one_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("bpg-tunnel.pid");
        assert_eq!(running_daemon(&path), None);
        let held = PidFile::acquire(&path).unwrap().unwrap();
        assert_eq!(running_daemon(&path), Some(std::process::id() as i32));
        assert!(PidFile::acquire(&path).unwrap().is_none());
        drop(held);
        assert!(!path.exists());

        // A file left by a killed daemon: present, unlocked.
        std::fs::write(&path, "999999\n").unwrap();
        assert_eq!(running_daemon(&path), None);
        assert!(PidFile::acquire(&path).unwrap().is_some());
    }
}
