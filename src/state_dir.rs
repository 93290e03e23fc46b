//! Where the daemon keeps its state (the pid file, the status socket and its lock): an order of
//! directories, and the rule that only a directory no other user can write to is used. A leaf:
//! both the launch forms (the pid file) and the status socket depend on it, and it on nothing of
//! ours, so neither reaches the other through it.

use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

/// Where state may live, in order: `state_dir` alone when given; otherwise `$XDG_RUNTIME_DIR`,
/// `$HOME/.borealis-pg`, and a directory of this user's own under the temporary directory
/// (`$TMPDIR`, else `/tmp`). The pid file and the status socket use the same order.
#[expect(
    clippy::disallowed_methods,
    reason = "where state may live is this module's to read"
)]
pub fn state_dirs(state_dir: Option<&Path>) -> Vec<PathBuf> {
    if let Some(dir) = state_dir {
        return vec![dir.to_owned()];
    }
    let mut dirs = Vec::new();
    dirs.extend(std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from));
    dirs.extend(std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".borealis-pg")));
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    dirs.push(std::env::temp_dir().join(format!("borealis-pg-{uid}")));
    dirs.into_iter().filter(|dir| dir.is_absolute()).collect()
}

/// Creates `dir` (owner only) if it is missing, and checks it as [`check_private`] does.
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    // Whatever is there already (a symbolic link included) is judged below, never created
    // through.
    let missing = std::fs::symlink_metadata(dir)
        .is_err_and(|error| error.kind() == std::io::ErrorKind::NotFound);
    if missing {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    check_private(dir)
}

/// Why a state directory is not used.
#[derive(Debug, thiserror::Error)]
pub enum NotPrivate {
    #[error("{} is a symbolic link, which is never followed (another user may have planted it): remove it, or name the directory itself", dir.display())]
    Symlink { dir: PathBuf },
    #[error("expected a directory of this user's that no other user can write to")]
    OpenToOthers,
}

/// Refuses a directory another user could write to (or one owned by another user who is not
/// root): they could replace the pid file, or plant one that points `stop` elsewhere. Refuses a
/// symbolic link too, whatever it points to: in a shared temporary directory anyone can plant
/// one where ours would be, aimed at a directory of root's, for a root daemon to create and
/// remove its files in.
pub fn check_private(dir: &Path) -> std::io::Result<()> {
    let meta = std::fs::symlink_metadata(dir)?;
    if meta.file_type().is_symlink() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            NotPrivate::Symlink {
                dir: dir.to_owned(),
            },
        ));
    }
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    let others_write = meta.mode() & 0o002 != 0;
    let group_writes = meta.mode() & 0o020 != 0;
    let owner_ok = meta.uid() == uid || (meta.uid() == 0 && !group_writes);
    if !meta.is_dir() || others_write || !owner_ok {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            NotPrivate::OpenToOthers,
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_places_are_the_state_dir_alone_or_end_in_one_of_this_users_own_under_tmp() {
        assert_eq!(
            state_dirs(Some(Path::new("/srv/state"))),
            [PathBuf::from("/srv/state")]
        );
        let order = state_dirs(None);
        let last = order.last().unwrap();
        assert!(last.starts_with(std::env::temp_dir()), "{last:?}");
        assert!(last
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("borealis-pg-"));
        assert!(order.iter().all(|dir| dir.is_absolute()));
    }

    #[test]
    fn a_symlink_is_never_private_and_never_created_through() {
        let victim = tempfile::tempdir().unwrap();
        let shared = tempfile::tempdir().unwrap();
        let planted = shared.path().join("borealis-pg-0");
        std::os::unix::fs::symlink(victim.path(), &planted).unwrap();
        let error = check_private(&planted).unwrap_err();
        assert!(error.to_string().contains("symbolic link"), "{error}");
        assert!(private_dir(&planted).is_err());
        assert!(std::fs::symlink_metadata(&planted)
            .unwrap()
            .file_type()
            .is_symlink());
    }

    #[test]
    fn a_directory_others_can_write_to_is_not_private() {
        let dir = tempfile::tempdir().unwrap();
        let mode = |mode| {
            std::fs::set_permissions(
                dir.path(),
                std::os::unix::fs::PermissionsExt::from_mode(mode),
            )
            .unwrap()
        };
        mode(0o777);
        assert!(check_private(dir.path()).is_err());
        mode(0o700);
        assert!(check_private(dir.path()).is_ok());
        let missing = dir.path().join("a").join("b");
        private_dir(&missing).unwrap();
        assert_eq!(std::fs::metadata(&missing).unwrap().mode() & 0o777, 0o700);
    }
}
