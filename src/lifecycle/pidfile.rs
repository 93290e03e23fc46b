//! The daemon's pid file, locked with `flock` for the daemon's whole life: the kernel drops the
//! lock when the process dies, so a stale file left by a killed daemon is recognised as such,
//! and PID reuse cannot fool it.
//!
//! It lives in the first usable place of a fixed order (see [`candidates`]), and `start` and
//! `stop` look in all of them, so a read-only `$HOME` neither loses the daemon nor lets a second
//! one start. A place is usable only in a directory no other user can write to, and neither the
//! directory nor the file is ever reached through a symbolic link: a pid file under a shared
//! temporary directory cannot be turned against another file or directory.

use std::fs::{File, TryLockError};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::state_dir::{check_private, private_dir, state_dirs};

const FILE_NAME: &str = "bpg-tunnel.pid";

/// Where the pid file may be, in order: one in each of [`state_dirs`].
pub fn candidates(state_dir: Option<&Path>) -> Vec<PathBuf> {
    state_dirs(state_dir)
        .into_iter()
        .map(|dir| dir.join(FILE_NAME))
        .collect()
}

/// A live daemon found through its pid file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub path: PathBuf,
    /// `None` while the daemon has locked the file but not yet written its pid (or the file
    /// holds something else).
    pub pid: Option<i32>,
}

/// The live daemon holding one of `paths`, if there is one.
pub fn running_daemon(paths: &[PathBuf]) -> Option<Found> {
    paths.iter().find_map(|path| {
        holder(path).map(|pid| Found {
            path: path.clone(),
            pid,
        })
    })
}

/// `Some` when a live process holds `path`'s lock, with the pid it wrote if that is a plausible
/// daemon's. Only a file of this user's in a usable place counts: another user's locked file in
/// a shared directory must not make `start` believe a daemon runs.
fn holder(path: &Path) -> Option<Option<i32>> {
    check_private(path.parent()?).ok()?;
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .ok()?;
    // SAFETY: geteuid has no preconditions.
    if file.metadata().ok()?.uid() != unsafe { libc::geteuid() } {
        return None;
    }
    // std's file locks are flock(2) on Linux: the same lock the daemon holds.
    if file.try_lock_shared().is_ok() {
        // Stale: whoever wrote it is gone (the kernel released its lock).
        return None;
    }
    let mut text = String::new();
    let pid = file
        .read_to_string(&mut text)
        .ok()
        .and_then(|_| text.trim().parse::<i32>().ok())
        .filter(|pid| *pid > 1);
    Some(pid)
}

/// Whether `pid` is a bpg-tunnel daemon (our hidden `__daemon` entry), so that a pid file with
/// the wrong number in it never makes `stop` signal another process.
pub fn is_daemon(pid: i32) -> bool {
    if pid <= 1 {
        return false;
    }
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|cmdline| cmdline.split(|b| *b == 0).nth(1) == Some(b"__daemon"))
}

/// The `--owner-pid` a bpg-tunnel daemon was started with (`start` passes it on the command line
/// of the hidden `__daemon` entry), or `None` if `pid` is no daemon of ours.
pub fn daemon_owner(pid: i32) -> Option<i32> {
    if !is_daemon(pid) {
        return None;
    }
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let mut args = cmdline.split(|b| *b == 0);
    args.find(|arg| *arg == b"--owner-pid")?;
    std::str::from_utf8(args.next()?).ok()?.parse().ok()
}

/// What [`acquire`] found.
pub enum Acquired {
    Held(PidFile),
    /// Another live daemon holds one of the places.
    AlreadyRunning,
    /// No place was usable; why, for each.
    Failed(Vec<(PathBuf, std::io::Error)>),
}

/// Takes the first usable place of `paths`, unless a live daemon holds one of them.
pub fn acquire(paths: &[PathBuf]) -> Acquired {
    // A daemon may hold a later place, when an earlier one was not usable at its start.
    if running_daemon(paths).is_some() {
        return Acquired::AlreadyRunning;
    }
    let mut failures = Vec::new();
    for path in paths {
        match PidFile::acquire(path) {
            Ok(Some(pidfile)) => return Acquired::Held(pidfile),
            Ok(None) => return Acquired::AlreadyRunning,
            Err(error) => failures.push((path.clone(), error)),
        }
    }
    Acquired::Failed(failures)
}

/// How many times a pid file that was replaced between opening and locking is opened again: each
/// time means another daemon stopped just then, which does not happen over and over.
const LOCK_ATTEMPTS: usize = 5;

#[derive(Debug, thiserror::Error)]
#[error("{} was removed or replaced each time it was locked ({LOCK_ATTEMPTS} times): other bpg-tunnel daemons are starting and stopping there; run `bpg-tunnel start` again once they have", path.display())]
struct KeptReplaced {
    path: PathBuf,
}

#[cfg(test)]
thread_local! {
    /// Runs once between opening the pid file and locking it, where another daemon's exit may
    /// unlink it.
    static BETWEEN_OPEN_AND_LOCK: std::cell::Cell<Option<Box<dyn FnOnce()>>> =
        const { std::cell::Cell::new(None) };
}

/// `false` when another live daemon holds `file`'s lock.
fn lock_exclusive(file: &File) -> std::io::Result<bool> {
    // A `start` or `stop` looking for a daemon holds a shared lock for an instant: only a lock
    // still held after a while is another daemon's.
    for tries in 1..=10 {
        match file.try_lock() {
            Ok(()) => return Ok(true),
            Err(TryLockError::WouldBlock) if tries < 10 => {
                std::thread::sleep(std::time::Duration::from_millis(10))
            }
            Err(TryLockError::WouldBlock) => return Ok(false),
            Err(TryLockError::Error(error)) => return Err(error),
        }
    }
    Ok(false)
}

/// Whether `file` is the file at `path` (not one unlinked or replaced since it was opened).
fn is_at(file: &File, path: &Path) -> std::io::Result<bool> {
    let open = file.metadata()?;
    match std::fs::symlink_metadata(path) {
        Ok(there) => Ok((there.dev(), there.ino()) == (open.dev(), open.ino())),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(error) => Err(error),
    }
}

/// The daemon's locked pid file; removed when dropped.
pub struct PidFile {
    file: File,
    path: PathBuf,
}

impl PidFile {
    /// `Ok(None)` when another live daemon holds it.
    fn acquire(path: &Path) -> std::io::Result<Option<PidFile>> {
        if let Some(dir) = path.parent() {
            private_dir(dir)?;
        }
        for _ in 0..LOCK_ATTEMPTS {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .read(true)
                .write(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(path)?;
            #[cfg(test)]
            if let Some(hook) = BETWEEN_OPEN_AND_LOCK.take() {
                hook();
            }
            if !lock_exclusive(&file)? {
                return Ok(None);
            }
            // A daemon that stops unlinks its file while still holding the lock, so what was
            // opened just before may be that file, now nameless: a lock on it would hide this
            // daemon from `start`, `stop` and `status`. Only the file still at the path counts.
            if !is_at(&file, path)? {
                continue;
            }
            file.set_len(0)?;
            (&file).write_all(format!("{}\n", std::process::id()).as_bytes())?;
            return Ok(Some(PidFile {
                file,
                path: path.to_owned(),
            }));
        }
        Err(std::io::Error::other(KeptReplaced {
            path: path.to_owned(),
        }))
    }

    #[cfg(test)]
    fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        // Removed while still locked, so that the file at the path is never one we have let go
        // of; a newcomer that opened it just before and locks it just after sees it gone from
        // the path, and opens the path again.
        let _ = std::fs::remove_file(&self.path);
        let _ = self.file.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir_with_mode(mode: u32) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(mode),
        )
        .unwrap();
        dir
    }

    fn private_dir() -> tempfile::TempDir {
        dir_with_mode(0o700)
    }

    /// A directory anyone may write to, like /tmp without its sticky bit.
    fn shared_dir() -> tempfile::TempDir {
        dir_with_mode(0o777)
    }

    #[test]
    fn pid_file_is_exclusive_and_a_stale_one_is_ignored() {
        let dir = private_dir();
        let path = dir.path().join("sub").join(FILE_NAME);
        let paths = [path.clone()];
        assert_eq!(running_daemon(&paths), None);
        let Acquired::Held(held) = acquire(&paths) else {
            panic!("not acquired")
        };
        let me = std::process::id() as i32;
        assert_eq!(running_daemon(&paths).unwrap().pid, Some(me));
        assert!(matches!(acquire(&paths), Acquired::AlreadyRunning));
        drop(held);
        assert!(!path.exists());

        // A file left by a killed daemon: present, unlocked.
        std::fs::write(&path, "999999\n").unwrap();
        assert_eq!(running_daemon(&paths), None);
        assert!(matches!(acquire(&paths), Acquired::Held(_)));
    }

    #[test]
    fn a_locked_file_without_a_pid_names_no_process() {
        let dir = private_dir();
        let path = dir.path().join(FILE_NAME);
        // A daemon between taking the lock and writing its pid; or a file with junk in it.
        for content in ["", "0\n", "1\n", "-1\n", "junk\n"] {
            std::fs::write(&path, content).unwrap();
            let file = File::open(&path).unwrap();
            file.lock().unwrap();
            let found = running_daemon(std::slice::from_ref(&path)).unwrap();
            assert_eq!(found.pid, None, "{content:?}");
        }
        assert!(!is_daemon(0) && !is_daemon(1) && !is_daemon(-1));
        assert!(!is_daemon(std::process::id() as i32), "a test is no daemon");
    }

    #[test]
    fn a_locked_file_in_a_directory_others_can_write_to_is_no_daemon() {
        let shared = shared_dir();
        let path = shared.path().join(FILE_NAME);
        std::fs::write(&path, "4000000\n").unwrap();
        let file = File::open(&path).unwrap();
        file.lock().unwrap();
        assert_eq!(running_daemon(std::slice::from_ref(&path)), None);
    }

    #[test]
    fn a_planted_symlink_is_never_followed() {
        let dir = private_dir();
        let target = dir.path().join("precious");
        std::fs::write(&target, "precious\n").unwrap();
        let path = dir.path().join(FILE_NAME);
        std::os::unix::fs::symlink(&target, &path).unwrap();
        assert!(matches!(
            acquire(std::slice::from_ref(&path)),
            Acquired::Failed(_)
        ));
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "precious\n");
    }

    #[test]
    fn a_symlink_in_place_of_the_directory_is_refused_and_the_next_place_used() {
        // A directory of root's (or of this user's) that someone else aimed a link at.
        let victim = private_dir();
        std::fs::write(victim.path().join(FILE_NAME), "victim\n").unwrap();
        let shared = private_dir();
        let planted = shared.path().join("borealis-pg-0");
        std::os::unix::fs::symlink(victim.path(), &planted).unwrap();
        let private = private_dir();
        let paths = [planted.join(FILE_NAME), private.path().join(FILE_NAME)];
        let Acquired::Held(held) = acquire(&paths) else {
            panic!("not acquired")
        };
        assert_eq!(held.path(), paths[1]);
        drop(held);
        assert!(std::fs::symlink_metadata(&planted)
            .unwrap()
            .file_type()
            .is_symlink());
        let left: Vec<_> = std::fs::read_dir(victim.path())
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .collect();
        assert_eq!(left, [FILE_NAME]);
        assert_eq!(
            std::fs::read_to_string(victim.path().join(FILE_NAME)).unwrap(),
            "victim\n"
        );
    }

    #[test]
    fn a_file_unlinked_between_opening_and_locking_is_not_the_one_kept() {
        let dir = private_dir();
        let path = dir.path().join(FILE_NAME);
        // The daemon before this one, still holding its file.
        let old = PidFile::acquire(&path)
            .unwrap()
            .expect("the old daemon's lock");
        // It stops (unlinking its file, then letting go of the lock) just after the newcomer
        // opened that file, and before the newcomer locks it.
        BETWEEN_OPEN_AND_LOCK.set(Some(Box::new(move || drop(old))));
        let new = PidFile::acquire(&path)
            .unwrap()
            .expect("the newcomer's lock");
        let held = new.file.metadata().unwrap();
        let there =
            std::fs::symlink_metadata(&path).expect("the newcomer's pid file is at the path");
        assert_eq!((held.dev(), held.ino()), (there.dev(), there.ino()));
        let me = std::process::id() as i32;
        let found = running_daemon(std::slice::from_ref(&path));
        assert_eq!(found.map(|found| found.pid), Some(Some(me)));
    }

    #[test]
    fn a_directory_others_can_write_to_is_refused_and_the_next_place_used() {
        let shared = shared_dir();
        let private = private_dir();
        let paths = [
            shared.path().join(FILE_NAME),
            private.path().join(FILE_NAME),
        ];
        let Acquired::Held(held) = acquire(&paths) else {
            panic!("not acquired")
        };
        assert_eq!(held.path(), paths[1]);
        assert!(!paths[0].exists());
        // Found wherever it is.
        assert_eq!(running_daemon(&paths).unwrap().path, paths[1]);
    }

    #[test]
    fn the_places_are_the_state_dir_alone_or_a_fixed_order() {
        let given = candidates(Some(Path::new("/srv/state")));
        assert_eq!(given, [PathBuf::from("/srv/state/bpg-tunnel.pid")]);
        let order = candidates(None);
        let last = order.last().unwrap();
        assert!(last.starts_with(std::env::temp_dir()), "{last:?}");
        assert!(last
            .parent()
            .unwrap()
            .to_string_lossy()
            .contains("borealis-pg-"));
    }
}
