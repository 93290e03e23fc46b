//! What the add-on's fail2ban would make of the lab sshd's log: Debian's `fail2ban-regex` with
//! the stock `sshd` filter.

use std::path::PathBuf;
use std::process::Command;

use super::which;

/// fail2ban's default jail: this many failures within [`FINDTIME_SECS`] ban the address.
pub const MAXRETRY: usize = 5;
pub const FINDTIME_SECS: u64 = 600;

/// The stock filter's modes worth asking: `normal` (the jail's default) and `aggressive` (every
/// other mode's expressions together).
pub const MODES: [&str; 2] = ["normal", "aggressive"];

/// `fail2ban-regex`, or `None` (after saying so) outside CI when it is not installed.
pub fn fail2ban_regex() -> Option<PathBuf> {
    if let Some(path) = which("fail2ban-regex") {
        return Some(path);
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("CI=true but fail2ban-regex is missing (apt-get install fail2ban; scripts/setup.sh does)");
    }
    eprintln!("SKIPPED: fail2ban-regex not found (apt-get install fail2ban)");
    None
}

/// The failures the `sshd` filter in `mode` finds in `log` (sshd's own `-E`/`-e` lines), each
/// as the log line that made it.
///
/// sshd's stderr log lacks syslog's prefix, which the filter needs, so each line gets one. All
/// lines get the same process id: the filter then lends a line that names no address (such as
/// `kex_exchange_identification: ...`) the address of an earlier line from any connection, where
/// syslog would have used its own connection's. Every client here is 127.0.0.1, so this can only
/// find more failures than the real server would, never fewer.
pub fn failures(tool: &std::path::Path, log: &str, mode: &str) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("auth.log");
    let prefixed: String = log
        .lines()
        .map(|line| format!("Dec  3 12:00:00 lab sshd[4242]: {line}\n"))
        .collect();
    std::fs::write(&file, prefixed).unwrap();
    let output = Command::new(tool)
        .args([
            "--print-all-matched",
            "--print-no-missed",
            "--print-no-ignored",
        ])
        .arg(&file)
        .arg(format!("sshd[mode={mode}]"))
        .output()
        .expect("run fail2ban-regex");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "fail2ban-regex failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // "Lines: 15 lines, 3 ignored, 2 matched, 10 missed": ignored lines are the filter's
    // no-failure helpers, matched ones its failures.
    let summary = stdout
        .lines()
        .find(|line| line.starts_with("Lines: "))
        .unwrap_or_else(|| panic!("no summary from fail2ban-regex: {stdout}"));
    let matched: usize = summary
        .split(", ")
        .find_map(|part| part.strip_suffix(" matched"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("cannot read {summary:?}"));
    // The matched lines follow "|- Matched line(s):", one per "|  " line.
    let lines: Vec<String> = stdout
        .lines()
        .skip_while(|line| !line.starts_with("|- Matched line(s):"))
        .skip(1)
        .take_while(|line| line.starts_with("|  "))
        .map(|line| line.trim_start_matches("|  ").to_owned())
        .collect();
    assert_eq!(
        lines.len(),
        matched,
        "fail2ban-regex's matched lines and count disagree: {stdout}"
    );
    lines
}
