//! `bpg-tunnel start`: the detached daemon of the profile.d and exec.d launch forms, what stops
//! it, and `bpg-tunnel stop`.
//!
//! `start` re-executes this binary as a daemon in its own session (so a one-off dyno's terminal
//! does not signal it), with stdin on /dev/null, stdout/stderr kept for the dyno's log stream,
//! and no other inherited descriptor: a CNB launcher waits for exec.d's fd 3 to close. The
//! daemon reports readiness through a pipe; `start` returns once it has, or at the ready
//! timeout, so the app boots in either case.
//!
//! A second `start` finds the daemon through its pid file (see `pidfile.rs`) and does nothing.

use std::ffi::OsString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use tracing::{debug, error, info, warn};

use super::owner::Owner;
use super::pidfile::{self, candidates, running_daemon, Acquired};
use super::signals::Signals;
use super::LifecycleSettings;
use crate::config;
use crate::engine::{self, EngineSettings, NotReady, Running, Stop, Stopped, Trigger};

/// The descriptor the daemon reports readiness on.
const READY_FD: i32 = 3;

/// `bpg-tunnel start --owner-pid PID`. Always succeeds: a tunnel problem is logged, never
/// allowed to stop the app from booting.
pub fn start(lifecycle: &LifecycleSettings, owner_pid: i32) -> ExitCode {
    // Silent, as the profile.d script is: a one-off dyno's terminal shows this.
    if lifecycle.disabled {
        return ExitCode::SUCCESS;
    }
    if config::discover_env().is_empty() {
        // No add-on attached: nothing to do, and nothing to say on a one-off dyno's terminal.
        return ExitCode::SUCCESS;
    }
    let places = candidates(lifecycle.state_dir.as_deref());
    if let Some(found) = running_daemon(&places) {
        info!(event = "already-running", pid = found.pid.unwrap_or(0), pidfile = %found.path.display());
        return ExitCode::SUCCESS;
    }
    let started = Instant::now();
    let report = match spawn_daemon(&lifecycle.flags_env, owner_pid) {
        Ok(read) => wait_for_report(read, lifecycle.ready_timeout + Duration::from_secs(2)),
        Err(spawn_error) => {
            error!(event = "daemon-failed", error = %spawn_error, "could not start the tunnel daemon; the app starts without it");
            return ExitCode::SUCCESS;
        }
    };
    let ms = started.elapsed().as_millis() as u64;
    match report.as_deref().map(str::trim) {
        Some("ready") => debug!(event = "start-returned", ms, "every tunnel is up"),
        Some("already-running") => info!(event = "already-running"),
        Some(other) if other.starts_with("not-ready") => warn!(
            event = "start-returned",
            ms,
            not_ready = other.trim_start_matches("not-ready").trim(),
            "some tunnels are not up yet; their connections wait for them"
        ),
        Some("stopping") => info!(
            event = "start-returned",
            ms, "the dyno is stopping; so is the tunnel"
        ),
        Some("failed") => {
            error!(
                event = "start-returned",
                ms, "no tunnel could be started; see the errors above"
            )
        }
        _ => warn!(
            event = "start-returned",
            ms, "the tunnel daemon did not report readiness in time; connections wait for it"
        ),
    }
    ExitCode::SUCCESS
}

/// Re-executes this binary as the daemon, with the options given as flags passed on as the
/// variables they stand for.
fn spawn_daemon(flags_env: &[(String, OsString)], owner_pid: i32) -> std::io::Result<File> {
    // Both ends close on exec; the child's copy of the write end is moved to READY_FD below.
    let (read, write) = std::io::pipe()?;
    let write_fd = write.as_raw_fd();
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/proc/self/exe"));
    let mut command = Command::new(exe);
    command
        .arg("__daemon")
        .arg("--owner-pid")
        .arg(owner_pid.to_string())
        .envs(flags_env.iter().map(|(var, value)| (var, value)))
        .stdin(Stdio::null());
    // SAFETY: only async-signal-safe calls (setsid, dup2, fcntl, close_range/close) run between
    // fork and exec.
    unsafe {
        command.pre_exec(move || {
            libc::setsid();
            if write_fd == READY_FD {
                libc::fcntl(READY_FD, libc::F_SETFD, 0);
            } else if libc::dup2(write_fd, READY_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            close_from(READY_FD + 1);
            Ok(())
        });
    }
    command.spawn()?;
    drop(write);
    Ok(File::from(OwnedFd::from(read)))
}

/// Closes every descriptor from `first` up, so nothing the launcher left open (exec.d's fd 3
/// above all) is held by the daemon.
fn close_from(first: i32) {
    // SAFETY: close_range only closes descriptors; the fallback closes them one by one.
    let done = unsafe { libc::syscall(libc::SYS_close_range, first as u32, u32::MAX, 0) } == 0;
    if !done {
        for fd in first..1024 {
            // SAFETY: closing a descriptor this process may hold; nothing of ours uses them.
            unsafe { libc::close(fd) };
        }
    }
}

/// Reads the daemon's one-line report, or `None` at `timeout` or if it died without one.
fn wait_for_report(mut read: File, timeout: Duration) -> Option<String> {
    let deadline = Instant::now() + timeout;
    let mut report = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        let mut poll = libc::pollfd {
            fd: read.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let ready =
            unsafe { libc::poll(&mut poll, 1, left.as_millis().min(i32::MAX as u128) as i32) };
        if ready < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return None;
        }
        if ready == 0 {
            return None;
        }
        let mut buf = [0u8; 512];
        match read.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                report.extend_from_slice(&buf[..n]);
                if report.contains(&b'\n') {
                    break;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    (!report.is_empty()).then(|| String::from_utf8_lossy(&report).into_owned())
}

/// The hidden `__daemon` entry: what `start` re-executes.
pub fn daemon(engine: &EngineSettings, lifecycle: &LifecycleSettings, owner_pid: i32) -> ExitCode {
    // SAFETY: `start` put the write end of the report pipe on this descriptor.
    let mut ready = Some(unsafe { File::from_raw_fd(READY_FD) });
    let mut say = |line: &str| {
        if let Some(mut pipe) = ready.take() {
            let _ = writeln!(pipe, "{line}");
        }
    };
    let pidfile = match pidfile::acquire(&candidates(lifecycle.state_dir.as_deref())) {
        Acquired::Held(pidfile) => Some(pidfile),
        Acquired::AlreadyRunning => {
            say("already-running");
            return ExitCode::SUCCESS;
        }
        Acquired::Failed(failures) => {
            // Serving matters more than being findable by `stop`.
            for (path, pidfile_error) in failures {
                warn!(event = "pidfile-failed", pidfile = %path.display(), error = %pidfile_error);
            }
            None
        }
    };
    let runtime = match engine::runtime() {
        Ok(runtime) => runtime,
        Err(runtime_error) => {
            error!(event = "daemon-failed", error = %runtime_error);
            say("failed");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(async {
        let owner = Owner::watch(owner_pid);
        let signals = match Signals::new() {
            Ok(signals) => signals,
            Err(signal_error) => {
                error!(event = "signal-setup-failed", error = %signal_error);
                say("failed");
                return ExitCode::FAILURE;
            }
        };
        let Some(running) = engine::start(config::discover_env(), engine).await else {
            say("failed");
            return ExitCode::FAILURE;
        };
        let mut trigger = OwnerGone {
            events: Heard { owner, signals },
            grace: lifecycle.grace,
            drain_timeout: lifecycle.drain_timeout,
            early: None,
        };
        // Watched while waiting, so that a SIGTERM's drain deadline counts from the signal.
        tokio::select! {
            ready = running.ready(lifecycle.ready_timeout) => match ready {
                Ok(()) => say("ready"),
                Err(NotReady(addons)) => say(&format!("not-ready {}", addons.join(","))),
            },
            event = trigger.events.next_event() => {
                say("stopping");
                trigger.early = Some((event, tokio::time::Instant::now()));
            }
        }
        match running.serve(&mut trigger).await {
            Stopped::Gracefully => ExitCode::SUCCESS,
            Stopped::Aborted => ExitCode::from(130),
        }
    });
    // The pid file's lock is what tells `stop` (and `run` replacing this daemon) that it is
    // gone: release it only once the listeners and the status socket's lock are closed too.
    runtime.shutdown_timeout(Duration::from_secs(1));
    drop(pidfile);
    code
}

/// The daemon stops when the owner is gone. On SIGTERM it keeps serving (the app is draining
/// too) until the owner exits or the drain timeout; repeated SIGTERMs change nothing; SIGINT
/// during the drain leaves at once; SIGHUP (`bpg-tunnel stop`) stops after the grace.
struct OwnerGone<E> {
    events: E,
    grace: Duration,
    drain_timeout: Duration,
    /// What happened before serving began (during the ready wait), and when.
    early: Option<(Event, tokio::time::Instant)>,
}

#[derive(Debug, Clone, Copy)]
enum Event {
    OwnerExited,
    Signal(&'static str),
}

/// What the daemon hears, as events. A trait so that the drain's timing can be tested in paused
/// time with events played from a script.
trait Events {
    fn next_event(&mut self) -> impl std::future::Future<Output = Event>;
    /// The owner's pid, for the log.
    fn owner(&self) -> i32;
}

/// The owner's exit and the stop signals.
struct Heard {
    owner: Owner,
    signals: Signals,
}

impl Events for Heard {
    async fn next_event(&mut self) -> Event {
        tokio::select! {
            () = self.owner.exited() => Event::OwnerExited,
            name = self.signals.next_stop() => Event::Signal(name),
        }
    }

    fn owner(&self) -> i32 {
        self.owner.pid()
    }
}

impl<E: Events> OwnerGone<E> {
    fn say_owner_exited(&self, running: &Running) {
        info!(
            event = "owner-exited",
            owner = self.events.owner(),
            open_connections = running.open_connections()
        );
    }
}

impl<E: Events> Trigger for OwnerGone<E> {
    async fn stop(&mut self, running: &Running) -> Stop {
        let grace = self.grace;
        let (first, at) = match self.early.take() {
            Some(early) => early,
            None => (self.events.next_event().await, tokio::time::Instant::now()),
        };
        let first = match first {
            Event::OwnerExited => {
                self.say_owner_exited(running);
                return Stop::Gracefully { grace };
            }
            Event::Signal("SIGHUP") => {
                info!(event = "signal", signal = "SIGHUP", "stopping");
                return Stop::Gracefully { grace };
            }
            Event::Signal(name) => name,
        };
        let deadline_at = at + self.drain_timeout;
        // Never past the drain deadline: what follows it must fit before the SIGKILL.
        let grace_left = || Stop::Gracefully {
            grace: grace.min(deadline_at.saturating_duration_since(tokio::time::Instant::now())),
        };
        info!(
            event = "drain-started",
            signal = first,
            open_connections = running.open_connections(),
            deadline_ms = deadline_at
                .saturating_duration_since(tokio::time::Instant::now())
                .as_millis() as u64,
            "serving until the app exits"
        );
        let deadline = tokio::time::sleep_until(deadline_at);
        tokio::pin!(deadline);
        loop {
            let event = tokio::select! {
                event = self.events.next_event() => event,
                () = &mut deadline => {
                    warn!(event = "drain-deadline", open_connections = running.open_connections(), "the app is still running; leaving before the platform's SIGKILL");
                    return Stop::Gracefully { grace: Duration::ZERO };
                }
            };
            match event {
                Event::OwnerExited => {
                    self.say_owner_exited(running);
                    return grace_left();
                }
                Event::Signal("SIGTERM") => debug!(event = "signal-ignored", signal = "SIGTERM"),
                Event::Signal("SIGINT") => {
                    warn!(
                        event = "signal",
                        signal = "SIGINT",
                        "interrupted while draining; exiting at once"
                    );
                    return Stop::Now;
                }
                Event::Signal(name) => {
                    info!(event = "signal", signal = name, "stopping");
                    return grace_left();
                }
            }
        }
    }
}

/// `bpg-tunnel stop`: asks a running daemon to stop and waits for it. Signals nothing but a
/// bpg-tunnel daemon: a pid file without a usable pid is waited for briefly, then reported.
pub fn stop(lifecycle: &LifecycleSettings) -> ExitCode {
    let places = candidates(lifecycle.state_dir.as_deref());
    let started = Instant::now();
    let found = loop {
        match running_daemon(&places) {
            None => {
                info!(event = "not-running");
                return ExitCode::SUCCESS;
            }
            Some(found) if found.pid.is_some_and(pidfile::is_daemon) => break found,
            // Just started: its pid is written right after it takes the lock.
            Some(_) if started.elapsed() < Duration::from_secs(1) => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Some(found) => {
                error!(
                    event = "stop-failed",
                    pidfile = %found.path.display(),
                    "a process holds the pid file, but it names no bpg-tunnel daemon; nothing was signalled"
                );
                return ExitCode::FAILURE;
            }
        }
    };
    let pid = found.pid.expect("checked above");
    if hang_up_and_wait(&places, pid, lifecycle.grace + Duration::from_secs(5)) {
        info!(event = "daemon-stopped", pid);
        return ExitCode::SUCCESS;
    }
    error!(
        event = "stop-failed",
        pid, "the daemon did not stop in time"
    );
    ExitCode::FAILURE
}

/// SIGHUP (stop after the grace) to `pid`, a process just checked to be our daemon; `true` once
/// no daemon holds any of `places`, `false` if one still does at `timeout`.
fn hang_up_and_wait(places: &[PathBuf], pid: i32, timeout: Duration) -> bool {
    // SAFETY: plain kill(2).
    unsafe { libc::kill(pid, libc::SIGHUP) };
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if running_daemon(places).is_none() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// For `run`: stops the daemon that a CNB launcher's exec.d started for this very process.
///
/// The launcher runs exec.d programs before the process it launches, and then execs that
/// process in its own place, so exec.d's `start --owner-pid` names this process's PID. When the
/// process is `bpg-tunnel run -- CMD` (the form that drains on platforms where only PID 1 is
/// signalled), that daemon would hold the listeners, and die with PID 1 instead of draining and
/// deregistering: `run` stops it (nothing uses it yet: the command has not started) and serves
/// in its place. A daemon started for any other owner is left alone.
pub fn replace_own(lifecycle: &LifecycleSettings) {
    let places = candidates(lifecycle.state_dir.as_deref());
    let Some(pid) = running_daemon(&places).and_then(|found| found.pid) else {
        return;
    };
    if pidfile::daemon_owner(pid) != Some(std::process::id() as i32) {
        return;
    }
    info!(
        event = "replacing-daemon",
        pid, "exec.d started a daemon for this process; run serves in its place, to drain with the command"
    );
    if !hang_up_and_wait(&places, pid, lifecycle.grace + Duration::from_secs(5)) {
        warn!(
            event = "replacing-daemon",
            pid, "the daemon did not stop in time; its listeners may be taken"
        );
    }
}

/// The drain's arithmetic in paused time, with the owner's exit and the signals played from a
/// script.
#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use tokio::time::Instant;

    /// Each event after its delay from the one before; then nothing more, ever.
    struct Script(VecDeque<(u64, Event)>);

    impl Events for Script {
        async fn next_event(&mut self) -> Event {
            match self.0.pop_front() {
                Some((after, event)) => {
                    tokio::time::sleep(Duration::from_secs(after)).await;
                    event
                }
                None => std::future::pending().await,
            }
        }

        fn owner(&self) -> i32 {
            4242
        }
    }

    const GRACE: Duration = Duration::from_secs(15);
    const DRAIN: Duration = Duration::from_secs(30);

    fn owner_gone(script: &[(u64, Event)]) -> OwnerGone<Script> {
        OwnerGone {
            events: Script(script.iter().copied().collect()),
            grace: GRACE,
            drain_timeout: DRAIN,
            early: None,
        }
    }

    /// How the trigger says to stop, and how long after serving began.
    async fn stop_of(mut trigger: OwnerGone<Script>) -> (Stop, Duration) {
        let began = Instant::now();
        let stop = trigger.stop(&Running::idle()).await;
        (stop, began.elapsed())
    }

    fn secs(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    fn gracefully(grace: u64) -> Stop {
        Stop::Gracefully { grace: secs(grace) }
    }

    const TERM: Event = Event::Signal("SIGTERM");

    #[tokio::test(start_paused = true)]
    async fn the_owner_gone_or_a_stop_request_gives_the_whole_grace() {
        let owner = stop_of(owner_gone(&[(7, Event::OwnerExited)])).await;
        assert_eq!(owner, (Stop::Gracefully { grace: GRACE }, secs(7)));
        let hang_up = stop_of(owner_gone(&[(3, Event::Signal("SIGHUP"))])).await;
        assert_eq!(hang_up, (Stop::Gracefully { grace: GRACE }, secs(3)));
    }

    #[tokio::test(start_paused = true)]
    async fn after_sigterm_the_owner_exit_gets_what_is_left_of_the_drain_at_most_the_grace() {
        // SIGTERM at 5 s: the deadline is at 35 s. The owner leaves at 25 s: 10 s are left,
        // less than the grace.
        let late = stop_of(owner_gone(&[(5, TERM), (20, Event::OwnerExited)])).await;
        assert_eq!(late, (gracefully(10), secs(25)));
        // The owner leaves at 10 s: the whole grace fits before the deadline.
        let early = stop_of(owner_gone(&[(5, TERM), (5, Event::OwnerExited)])).await;
        assert_eq!(early, (Stop::Gracefully { grace: GRACE }, secs(10)));
    }

    #[tokio::test(start_paused = true)]
    async fn more_sigterms_change_nothing_and_the_deadline_ends_the_drain_without_grace() {
        let script = [(5, TERM), (10, TERM), (10, TERM)];
        let stop = stop_of(owner_gone(&script)).await;
        assert_eq!(stop, (gracefully(0), secs(5) + DRAIN));
    }

    #[tokio::test(start_paused = true)]
    async fn sigint_while_draining_leaves_at_once_and_sighup_after_what_is_left() {
        let int = stop_of(owner_gone(&[(1, TERM), (2, Event::Signal("SIGINT"))])).await;
        assert_eq!(int, (Stop::Now, secs(3)));
        let hup = stop_of(owner_gone(&[(1, TERM), (27, Event::Signal("SIGHUP"))])).await;
        assert_eq!(hup, (gracefully(3), secs(28)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_sigterm_during_the_ready_wait_starts_the_drain_when_it_came() {
        let mut trigger = owner_gone(&[(10, Event::OwnerExited)]);
        // Heard 20 s before serving began (while waiting for readiness).
        let heard_at = Instant::now();
        tokio::time::advance(secs(20)).await;
        trigger.early = Some((TERM, heard_at));
        // The owner leaves 10 s into serving, 30 s after the signal: the deadline.
        assert_eq!(stop_of(trigger).await, (gracefully(0), secs(10)));
    }
}
