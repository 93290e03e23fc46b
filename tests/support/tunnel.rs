//! bpg-tunnel under test: the binary (debug, or the release build CI names), its tarball, a
//! running process whose output the test reads, and `bpg-tunnel check` run to its end.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use super::die_with_parent;

pub fn tunnel_binary() -> PathBuf {
    std::env::var_os("BPG_TUNNEL_BIN")
        .map(PathBuf::from)
        .or_else(|| option_env!("CARGO_BIN_EXE_bpg-tunnel").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("target/debug/bpg-tunnel"))
}

/// Whether the binary under test is the release build (`BPG_TUNNEL_BIN`, as `scripts/test.sh`
/// sets it), whose memory figures are the ones users see.
pub fn is_release_binary() -> bool {
    std::env::var_os("BPG_TUNNEL_BIN").is_some()
}

/// The release tarball the buildpacks install: `BPG_TUNNEL_DIST` (set by `scripts/test.sh` to
/// what `scripts/dist.sh` built), or, outside CI, one packed here the same way from the binary
/// under test.
pub fn release_tarball() -> PathBuf {
    static PACKED: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    if let Some(dist) = std::env::var_os("BPG_TUNNEL_DIST") {
        return PathBuf::from(dist);
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("CI=true: set BPG_TUNNEL_DIST to the tarball scripts/dist.sh built");
    }
    let (_, tarball) = PACKED.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let stage = dir.path().join("stage");
        std::fs::create_dir(&stage).unwrap();
        std::fs::copy(tunnel_binary(), stage.join("bpg-tunnel")).unwrap();
        let tarball = dir
            .path()
            .join("bpg-tunnel-test-x86_64-unknown-linux-musl.tar.gz");
        let status = Command::new("tar")
            .arg("-czf")
            .arg(&tarball)
            .arg("-C")
            .arg(&stage)
            .arg("bpg-tunnel")
            .status()
            .unwrap();
        assert!(status.success());
        let sums = Command::new("sha256sum").arg(&tarball).output().unwrap();
        let mut sidecar = tarball.clone().into_os_string();
        sidecar.push(".sha256");
        std::fs::write(sidecar, sums.stdout).unwrap();
        (dir, tarball)
    });
    tarball.clone()
}

#[derive(Default)]
struct Output {
    lines: Mutex<Vec<String>>,
    changed: Condvar,
    /// How many of the two pipes have reached their end.
    ended: std::sync::atomic::AtomicUsize,
}

pub struct Tunnel {
    child: Child,
    output: Arc<Output>,
    /// When `wait_exit` first saw the process gone.
    exited_at: Option<Instant>,
}

impl Tunnel {
    /// Starts `bpg-tunnel` with a clean environment holding only `vars` (and PATH).
    pub fn spawn<'a>(
        vars: impl IntoIterator<Item = (&'a String, &'a String)>,
        args: &[&str],
    ) -> Tunnel {
        let mut command = Command::new(tunnel_binary());
        command.args(args);
        Tunnel::spawn_command(command, vars)
    }

    /// Runs `script` with bash as a dyno would (profile.d style), with bpg-tunnel on PATH, in a
    /// process group of its own so the test can signal "every process" of the app.
    pub fn bash<'a>(
        vars: impl IntoIterator<Item = (&'a String, &'a String)>,
        script: &str,
    ) -> Tunnel {
        let mut command = Command::new("bash");
        command.arg("-c").arg(script).process_group(0);
        Tunnel::spawn_command(command, vars)
    }

    /// Runs any command the way [`Tunnel::bash`] does: clean environment, own process group.
    pub fn command<'a>(
        mut command: Command,
        vars: impl IntoIterator<Item = (&'a String, &'a String)>,
    ) -> Tunnel {
        command.process_group(0);
        Tunnel::spawn_command(command, vars)
    }

    fn spawn_command<'a>(
        mut command: Command,
        vars: impl IntoIterator<Item = (&'a String, &'a String)>,
    ) -> Tunnel {
        let bin_dir = tunnel_binary().parent().unwrap().to_owned();
        let mut path = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
            .collect::<Vec<_>>();
        path.insert(0, bin_dir);
        command
            .env_clear()
            .env("PATH", std::env::join_paths(path).unwrap())
            .env("BPG_TUNNEL_LOG", "debug")
            .envs(vars)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        die_with_parent(&mut command);
        let mut child = command.spawn().expect("start bpg-tunnel");
        let output = Arc::new(Output::default());
        for pipe in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let output = output.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    output.lines.lock().unwrap().push(line);
                    output.changed.notify_all();
                }
                let _held = output.lines.lock().unwrap();
                output
                    .ended
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                output.changed.notify_all();
            });
        }
        Tunnel {
            child,
            output,
            exited_at: None,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn lines(&self) -> Vec<String> {
        self.output.lines.lock().unwrap().clone()
    }

    pub fn count(&self, needle: &str) -> usize {
        self.lines().iter().filter(|l| l.contains(needle)).count()
    }

    /// Waits until `done` holds of the output read so far, or `timeout`; returns the output
    /// and whether it held.
    fn wait_output(
        &self,
        timeout: Duration,
        done: impl Fn(&[String]) -> bool,
    ) -> (std::sync::MutexGuard<'_, Vec<String>>, bool) {
        let deadline = Instant::now() + timeout;
        let mut lines = self.output.lines.lock().unwrap();
        loop {
            if done(&lines) {
                return (lines, true);
            }
            let now = Instant::now();
            if now >= deadline {
                return (lines, false);
            }
            lines = self
                .output
                .changed
                .wait_timeout(lines, deadline - now)
                .unwrap()
                .0;
        }
    }

    /// Waits until `n` lines contain every needle; returns the last such line.
    pub fn wait_for_nth(&self, needles: &[&str], n: usize, timeout: Duration) -> String {
        let matching = |lines: &[String]| -> Vec<String> {
            lines
                .iter()
                .filter(|l| needles.iter().all(|needle| l.contains(needle)))
                .cloned()
                .collect()
        };
        let (lines, found) = self.wait_output(timeout, |lines| matching(lines).len() >= n);
        if !found {
            panic!(
                "no line #{n} with {needles:?} within {timeout:?}; output:\n{}",
                lines.join("\n")
            );
        }
        matching(&lines).swap_remove(n - 1)
    }

    pub fn wait_for(&self, needles: &[&str], timeout: Duration) -> String {
        self.wait_for_nth(needles, 1, timeout)
    }

    pub fn signal(&self, signal: i32) {
        super::signal(self.pid(), signal);
    }

    /// Waits for the process to exit, and then for what it wrote to be read: a test that
    /// looks at the output right after must see all of it. (A daemon it left behind may hold the
    /// pipes: that wait is bounded.)
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                self.exited_at.get_or_insert_with(Instant::now);
                self.wait_output_read(Duration::from_millis(500));
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// When the process was first seen gone (by `wait_exit`).
    pub fn exited_at(&self) -> Option<Instant> {
        self.exited_at
    }

    fn wait_output_read(&self, timeout: Duration) {
        let ended = |_: &[String]| self.output.ended.load(std::sync::atomic::Ordering::SeqCst) >= 2;
        let _ = self.wait_output(timeout, ended);
    }
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        // The whole group: a bash "dyno" and everything it started.
        super::signal(-self.pid(), libc::SIGKILL);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a `bpg-tunnel check` or `status` printed, and how it exited.
pub struct Checked {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Checked {
    fn from(output: std::process::Output) -> Checked {
        Checked {
            code: output.status.code().unwrap_or(-1),
            stdout: String::from_utf8(output.stdout).unwrap(),
            stderr: String::from_utf8(output.stderr).unwrap(),
        }
    }

    /// The `--json` document on stdout, or a panic showing what was printed instead.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not one JSON document ({e}): {}", self.stdout))
    }

    /// The report's line for `step` with its mark (`✓` or `✗`), or a panic showing the report.
    pub fn line(&self, mark: &str, step: &str) -> &str {
        self.stdout
            .lines()
            .find(|line| line.trim_start().starts_with(&format!("{mark} {step} ")))
            .unwrap_or_else(|| panic!("no {mark} {step} line in:\n{}", self.stdout))
    }

    /// The steps of the report, in order.
    pub fn steps(&self) -> Vec<String> {
        self.stdout
            .lines()
            .filter_map(|line| {
                let line = line.trim_start();
                let rest = line.strip_prefix("✓ ").or(line.strip_prefix("✗ "))?;
                Some(rest.split_whitespace().next()?.to_owned())
            })
            .collect()
    }
}

/// `bpg-tunnel check ARGS` with `vars` as its whole environment (and PATH); what it printed is
/// echoed into the test's output.
pub fn check(vars: &BTreeMap<String, String>, args: &[&str]) -> Checked {
    let output = Command::new(tunnel_binary())
        .arg("check")
        .args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(vars)
        .output()
        .expect("run bpg-tunnel check");
    let checked = Checked::from(output);
    eprintln!("{}{}", checked.stdout, checked.stderr);
    checked
}

/// `bpg-tunnel status ARGS`, looking in `state` only; it never writes to stderr.
pub fn status(state: &Path, args: &[&str]) -> Checked {
    let output = Command::new(tunnel_binary())
        .arg("status")
        .args(args)
        .env_clear()
        .env("BPG_TUNNEL_STATE_DIR", state)
        .output()
        .expect("run bpg-tunnel status");
    let answer = Checked::from(output);
    assert!(
        answer.stderr.is_empty(),
        "status wrote to stderr: {}",
        answer.stderr
    );
    answer
}

/// `bpg-tunnel status --json`, looking in `state` only: its exit code and its document.
pub fn status_json(state: &Path) -> (i32, serde_json::Value) {
    let answer = status(state, &["--json"]);
    (answer.code, answer.json())
}

/// The pid the daemon wrote into its pid file under `state` (its `BPG_TUNNEL_STATE_DIR`).
pub fn daemon_pid(state: &Path) -> Option<i32> {
    std::fs::read_to_string(state.join("bpg-tunnel.pid"))
        .ok()
        .and_then(|text| text.trim().parse().ok())
}

/// The value of `key` in a logfmt-style line.
pub fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|pair| pair.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key} in {line}"))
}

/// For a test binary whose tests time what they measure: holds the others off while held, and
/// says which binary is under test.
pub fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    eprintln!("binary under test: {}", tunnel_binary().display());
    ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
