//! `bpg-tunnel exec-d`: the program a Cloud Native Buildpack's launcher runs from the layer's
//! `exec.d/` before every process. The buildpack links `exec.d/bpg-tunnel` to the binary, and a
//! binary started under that name with no arguments takes this path, so a run image needs no
//! shell.
//!
//! The launcher's contract: it runs the program with descriptor 3 open on a pipe for TOML lines
//! of variables to set, reads that pipe to its end, waits for the program, and then execs the
//! process in its own place (so the program's parent PID is the app's). A non-zero exit would
//! stop the app. So this writes nothing, closes descriptor 3 at once (the daemon never gets it:
//! see `daemon.rs`), starts the daemon owned by its parent, and always exits 0.

use std::process::ExitCode;

use super::daemon;
use super::LifecycleSettings;

/// The descriptor the launcher reads variables from.
const LAUNCHER_FD: i32 = 3;

/// Whether `args` (this process's, `argv[0]` first) are a launcher's call of exec.d: no
/// argument, and the program is in a directory named `exec.d`, or in one of its per-process
/// directories (`exec.d/web/`).
pub fn invoked_as_exec_d(args: &[std::ffi::OsString]) -> bool {
    let [program] = args else { return false };
    std::path::Path::new(program)
        .ancestors()
        .skip(1)
        .take(2)
        .any(|dir| dir.file_name().is_some_and(|name| name == "exec.d"))
}

pub fn run(lifecycle: &LifecycleSettings) -> ExitCode {
    // A non-zero exit, or death by a signal, would keep the app from starting; nothing here
    // should panic, but if it ever does, leave as if all went well (release builds abort on a
    // panic, after this hook).
    std::panic::set_hook(Box::new(|info| {
        // Where, not what: a message could quote a value that holds a secret.
        let at = info.location().map(ToString::to_string).unwrap_or_default();
        println!("source=bpg-tunnel level=error event=exec-d-failed at={at:?} msg=\"the app starts without the tunnel\"");
        // SAFETY: _exit ends the process at once, which is all that is left to do.
        unsafe { libc::_exit(0) }
    }));
    close_launcher_pipe();
    // `heroku ps:exec` sessions start nothing, as in the profile.d script.
    if lifecycle.in_ps_exec {
        return ExitCode::SUCCESS;
    }
    // SAFETY: getppid has no preconditions.
    let owner = unsafe { libc::getppid() };
    daemon::start(lifecycle, owner);
    ExitCode::SUCCESS
}

/// Closes descriptor 3 if it is a pipe (the launcher's): anything else there was not given to
/// us by a launcher and is left alone.
fn close_launcher_pipe() {
    // SAFETY: fstat fills a plain struct; close is called only on a descriptor just checked.
    unsafe {
        let mut stat: libc::stat = std::mem::zeroed();
        if libc::fstat(LAUNCHER_FD, &mut stat) == 0 && stat.st_mode & libc::S_IFMT == libc::S_IFIFO
        {
            libc::close(LAUNCHER_FD);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::invoked_as_exec_d;
    use std::ffi::OsString;

    fn args(list: &[&str]) -> Vec<OsString> {
        list.iter().map(OsString::from).collect()
    }

    #[test]
    fn only_a_program_in_an_exec_d_directory_without_arguments_is_the_launchers_call() {
        assert!(invoked_as_exec_d(&args(&[
            "/layers/bp/bpg-tunnel/exec.d/bpg-tunnel"
        ])));
        assert!(invoked_as_exec_d(&args(&["exec.d/anything"])));
        assert!(invoked_as_exec_d(&args(&[
            "/layers/bp/l/exec.d/web/bpg-tunnel"
        ])));
        assert!(!invoked_as_exec_d(&args(&[
            "/layers/exec.d/l/bin/bpg-tunnel"
        ])));
        assert!(!invoked_as_exec_d(&args(&[
            "/layers/bp/bpg-tunnel/bin/bpg-tunnel"
        ])));
        assert!(!invoked_as_exec_d(&args(&["bpg-tunnel"])));
        assert!(!invoked_as_exec_d(&args(&[
            "/x/exec.d/bpg-tunnel",
            "status"
        ])));
        assert!(!invoked_as_exec_d(&args(&["/x/exec.d.old/bpg-tunnel"])));
        assert!(!invoked_as_exec_d(&args(&[])));
    }
}
