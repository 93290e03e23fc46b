//! `bpg-tunnel run [--] CMD [ARGS...]`: the tunnels around a child, for a Docker ENTRYPOINT
//! prefix or a Procfile wrapper.
//!
//! As PID 1 in a container this process must do what init does: forward signals to the child,
//! reap every zombie (orphans are re-parented to it), and exit with the child's status. The
//! child is reaped with `waitpid(-1)` on SIGCHLD, which also collects the orphans.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitCode};
use std::time::Duration;

use tokio::signal::unix::{signal, Signal, SignalKind};
use tracing::{error, info, warn};

use super::LifecycleSettings;
use crate::config;
use crate::engine::{self, EngineSettings, Running, Stop, Trigger};

const FORWARDED: [(SignalKind, i32, &str); 6] = [
    (SignalKind::terminate(), libc::SIGTERM, "SIGTERM"),
    (SignalKind::interrupt(), libc::SIGINT, "SIGINT"),
    (SignalKind::hangup(), libc::SIGHUP, "SIGHUP"),
    (SignalKind::quit(), libc::SIGQUIT, "SIGQUIT"),
    (SignalKind::user_defined1(), libc::SIGUSR1, "SIGUSR1"),
    (SignalKind::user_defined2(), libc::SIGUSR2, "SIGUSR2"),
];

pub async fn run(
    engine: &EngineSettings,
    lifecycle: &LifecycleSettings,
    command: Vec<OsString>,
    scrub_env: bool,
) -> ExitCode {
    // Subscribed before anything else so no signal or child exit is lost.
    let Some(mut child) = Child::subscribe(lifecycle.grace) else {
        return ExitCode::FAILURE;
    };
    // Nothing else runs yet, so this short blocking wait holds nothing up.
    super::daemon::replace_own(lifecycle);
    // A broken tunnel config must not keep the app from starting: run it regardless.
    let running = if lifecycle.disabled {
        info!(
            event = "disabled",
            var = "BPG_TUNNEL_DISABLE",
            "the command runs without a tunnel"
        );
        None
    } else {
        engine::start(config::discover_env(), engine).await
    };
    if let Some(running) = &running {
        // Whatever is not up yet is logged; the command starts either way, its connections wait.
        // A stop signal meanwhile means the command is not wanted any more: it is not started.
        tokio::select! {
            _ = running.ready(lifecycle.ready_timeout) => {}
            (number, name) = child.next_stop_signal() => {
                info!(event = "signal", signal = name, "stopping before the command started");
                child.code = Some(128u8.saturating_add(number as u8));
            }
        }
    }
    if child.code.is_none() {
        child.spawn(&command, scrub_env);
    }
    match running {
        Some(running) => {
            running.serve(&mut child).await;
        }
        None => child.exited().await,
    }
    ExitCode::from(child.code.unwrap_or(1))
}

/// The command, the signals passed on to it, and its exit: the tunnels stop once it is gone.
struct Child {
    signals: Vec<(Signal, i32, &'static str)>,
    children: Signal,
    pid: Option<i32>,
    /// The exit code to leave with, once known.
    code: Option<u8>,
    grace: Duration,
}

impl Child {
    fn subscribe(grace: Duration) -> Option<Child> {
        let mut signals = Vec::new();
        for (kind, number, name) in FORWARDED {
            match signal(kind) {
                Ok(stream) => signals.push((stream, number, name)),
                Err(signal_error) => {
                    warn!(event = "signal-setup-failed", signal = name, error = %signal_error)
                }
            }
        }
        let children = match signal(SignalKind::child()) {
            Ok(stream) => stream,
            Err(signal_error) => {
                error!(event = "signal-setup-failed", signal = "SIGCHLD", error = %signal_error);
                return None;
            }
        };
        Some(Child {
            signals,
            children,
            pid: None,
            code: None,
            grace,
        })
    }

    fn spawn(&mut self, command: &[OsString], scrub_env: bool) {
        match build_command(command, scrub_env).spawn() {
            Ok(child) => {
                let pid = child.id() as i32;
                info!(event = "command-started", pid);
                self.pid = Some(pid);
            }
            Err(spawn_error) => {
                error!(event = "command-failed", program = %program_name(command), error = %spawn_error);
                self.code = Some(if spawn_error.kind() == std::io::ErrorKind::NotFound {
                    127
                } else {
                    126
                });
            }
        }
    }

    /// The next SIGTERM, SIGINT, SIGHUP or SIGQUIT, before there is a command to pass it to.
    /// Only those are waited for: any other (SIGUSR1, SIGUSR2) stays queued for the command.
    async fn next_stop_signal(&mut self) -> (i32, &'static str) {
        let is_stop = |number: i32| {
            matches!(
                number,
                libc::SIGTERM | libc::SIGINT | libc::SIGHUP | libc::SIGQUIT
            )
        };
        let index = next_signal(&mut self.signals, is_stop).await;
        let (_, number, name) = self.signals[index];
        (number, name)
    }

    /// Passes signals on until the command exits (at once if it never started).
    async fn exited(&mut self) {
        let Some(pid) = self.pid else { return };
        let status = 'wait: loop {
            // A signal's arrival, by index into `signals`, or a child event.
            let event = tokio::select! {
                index = next_signal(&mut self.signals, |_| true) => Some(index),
                _ = self.children.recv() => None,
            };
            match event {
                Some(index) => {
                    let (_, number, name) = self.signals[index];
                    // SAFETY: plain kill(2) to our own child.
                    unsafe { libc::kill(pid, number) };
                    info!(event = "signal-forwarded", signal = name, pid);
                }
                None => {
                    for (reaped, status) in reap() {
                        if reaped == pid {
                            break 'wait status;
                        }
                    }
                }
            }
        };
        let code = exit_code(status);
        info!(event = "command-exited", pid, status = code);
        self.code = Some(code);
    }
}

impl Trigger for Child {
    async fn stop(&mut self, _: &Running) -> Stop {
        self.exited().await;
        Stop::Gracefully { grace: self.grace }
    }
}

/// The index into `signals` of the next `wanted` one to arrive.
async fn next_signal(
    signals: &mut [(Signal, i32, &'static str)],
    wanted: impl Fn(i32) -> bool,
) -> usize {
    let waits = signals
        .iter_mut()
        .enumerate()
        .filter(|(_, (_, number, _))| wanted(*number))
        .map(|(index, (stream, _, _))| {
            Box::pin(async move {
                stream.recv().await;
                index
            })
        });
    let waits: Vec<_> = waits.collect();
    // None to wait for (none could be subscribed to): never, rather than select_all's panic.
    if waits.is_empty() {
        return std::future::pending().await;
    }
    futures_util::future::select_all(waits).await.0
}

/// Collects every exited child: ours and any orphan handed to us as PID 1.
fn reap() -> Vec<(i32, i32)> {
    let mut reaped = Vec::new();
    loop {
        let mut status = 0;
        // SAFETY: waitpid with WNOHANG never blocks.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid <= 0 {
            return reaped;
        }
        reaped.push((pid, status));
    }
}

fn exit_code(status: i32) -> u8 {
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status) as u8
    } else if libc::WIFSIGNALED(status) {
        128u8.saturating_add(libc::WTERMSIG(status) as u8)
    } else {
        1
    }
}

/// Heroku passes a string CMD as one argument: run that through the shell, as it would.
fn build_command(command: &[OsString], scrub_env: bool) -> Command {
    let mut built = match command {
        [single] if single.to_string_lossy().contains(char::is_whitespace) => {
            let mut sh = Command::new("/bin/sh");
            sh.arg("-c").arg(single);
            sh
        }
        [program, args @ ..] => {
            let mut direct = Command::new(program);
            direct.args(args);
            direct
        }
        [] => unreachable!("clap requires a command"),
    };
    let limit = super::CORE_LIMIT.get().copied();
    // SAFETY: between fork and exec, only async-signal-safe work: setrlimit, and moving the
    // pointers of the child's own `environ` (no allocation, no lock).
    unsafe {
        built.pre_exec(move || {
            if let Some(limit) = limit {
                libc::setrlimit(libc::RLIMIT_CORE, &limit);
            }
            if scrub_env {
                scrub_environ();
            }
            Ok(())
        });
    }
    built
}

unsafe extern "C" {
    static mut environ: *mut *mut libc::c_char;
}

/// Removes the conn-info variables from this process's `environ`, in place. Run in the child,
/// just before exec: the command's environment is this one, and no copy of any of it is made
/// (through `Command::env_remove`, std would copy every variable, secrets included, into
/// memory freed without being wiped, in a process that lives as long as the app).
///
/// # Safety
/// Only between fork and exec, when nothing else can read `environ`.
unsafe fn scrub_environ() {
    // SAFETY: `environ` is a null-terminated array of C strings; entries are only moved within
    // it, towards its start.
    unsafe {
        let start = environ;
        if start.is_null() {
            return;
        }
        let mut read = start;
        let mut write = start;
        while !(*read).is_null() {
            let entry = std::ffi::CStr::from_ptr(*read).to_bytes();
            if !is_conn_info_entry(entry) {
                *write = *read;
                write = write.add(1);
            }
            read = read.add(1);
        }
        *write = std::ptr::null_mut();
    }
}

/// Whether a `NAME=value` entry is a conn-info variable, on the name's bytes as they are.
fn is_conn_info_entry(entry: &[u8]) -> bool {
    let name = entry
        .iter()
        .position(|b| *b == b'=')
        .map_or(entry, |end| &entry[..end]);
    config::CONN_INFO_SUFFIXES
        .iter()
        .any(|suffix| name.ends_with(suffix.as_bytes()))
}

/// The program's name only, for a log line: the arguments may hold secrets (`--password=…`),
/// as may the rest of a string run through the shell.
fn program_name(command: &[OsString]) -> String {
    let first = command
        .first()
        .map(|program| program.to_string_lossy())
        .unwrap_or_default();
    // Not even a leading `NAME=value` of a shell string: the value may be a secret.
    let word = first.split_whitespace().next().unwrap_or_default();
    let word = word.split('=').next().unwrap_or_default();
    let mut name: String = word.chars().take(64).collect();
    if word.chars().nth(64).is_some() {
        name.push('…');
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_shell_convention() {
        assert_eq!(exit_code(3 << 8), 3);
        assert_eq!(exit_code(libc::SIGTERM), 128 + 15);
    }

    #[test]
    fn a_single_argument_with_spaces_runs_through_the_shell() {
        let command = build_command(&["echo hi there".into()], false);
        assert_eq!(command.get_program(), "/bin/sh");
        let command = build_command(&["gunicorn".into(), "app:app".into()], false);
        assert_eq!(command.get_program(), "gunicorn");
    }

    #[test]
    fn only_the_program_is_named_in_a_log_line() {
        assert_eq!(
            program_name(&["app".into(), "--password=hunter2".into()]),
            "app"
        );
        assert_eq!(
            program_name(&["app --password hunter2 && more".into()]),
            "app"
        );
        assert_eq!(program_name(&["x".repeat(100).into()]).chars().count(), 65);
        assert_eq!(program_name(&["TOKEN=hunter2 app".into()]), "TOKEN");
    }

    #[test]
    fn scrubbing_removes_every_conn_info_variable_and_nothing_else() {
        for (entry, scrubbed) in [
            (&b"DATABASE_TUNNEL_BPG_CONN_INFO=SSH_HOST:=h"[..], true),
            (
                b"HEROKU_POSTGRESQL_RED_SSH_TUNNEL_BPG_CONNECTION_INFO=x",
                true,
            ),
            (b"_TUNNEL_BPG_CONN_INFO=", true),
            // Matched on the name as it is: one that is not UTF-8 is scrubbed too.
            (b"DB\xff_TUNNEL_BPG_CONN_INFO=x", true),
            (b"DATABASE_URL=postgres://u:p@h/db", false),
            (b"DATABASE_TUNNEL_BPG_CONN_INFO_BACKUP=x", false),
            (b"A=B_TUNNEL_BPG_CONN_INFO", false),
        ] {
            assert_eq!(
                is_conn_info_entry(entry),
                scrubbed,
                "{}",
                String::from_utf8_lossy(entry)
            );
        }
    }
}
