//! Looking at processes through /proc.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// All processes below `root`, found through /proc.
pub fn descendants(root: i32) -> Vec<i32> {
    let mut parents: BTreeMap<i32, Vec<i32>> = BTreeMap::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // The command name may hold spaces and parentheses: parse after the last ')'.
        let Some(rest) = stat.rsplit_once(')').map(|(_, rest)| rest) else {
            continue;
        };
        let ppid: i32 = rest
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        parents.entry(ppid).or_default().push(pid);
    }
    let mut found = Vec::new();
    let mut queue = vec![root];
    while let Some(pid) = queue.pop() {
        for &child in parents.get(&pid).into_iter().flatten() {
            found.push(child);
            queue.push(child);
        }
    }
    found
}

/// How long `pid` took to exit, or `None` if it is still there after `timeout`.
pub fn wait_gone(pid: i32, timeout: Duration) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < timeout {
        if !process_alive(pid) {
            return Some(started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

/// Sends `signal` to `pid` (a negative pid: its process group), as `kill(1)` would.
pub fn signal(pid: i32, signal: i32) {
    // SAFETY: kill only sends a signal; the tests signal only processes they started.
    unsafe { libc::kill(pid, signal) };
}

/// This process's effective user id.
pub fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

pub fn process_alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
    })
}

/// A process's resident memory in bytes (0 once it is gone).
pub fn rss_bytes(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|kb| kb.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Where in `pid`'s memory `needle` occurs: the name of each writable mapping holding it
/// (`[heap]`, `[stack]`, or `anon` for the allocator's own), once per occurrence. Only pages
/// present in memory are read (the allocator reserves far more than it touches). Needs root
/// (bpg-tunnel is not dumpable, so only CAP_SYS_PTRACE may read its memory).
pub fn memory_hits(pid: i32, needle: &[u8]) -> Vec<String> {
    use std::os::unix::fs::FileExt;
    const PAGE: u64 = 4096;
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    let pagemap = std::fs::File::open(format!("/proc/{pid}/pagemap")).unwrap();
    let mut hits = Vec::new();
    for line in maps.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (range, perms) = (fields[0], fields[1]);
        // Only memory the process wrote: file-backed read-only pages hold no copies of ours.
        if !perms.starts_with("rw") {
            continue;
        }
        let name = fields.get(5).copied().unwrap_or("anon").to_owned();
        let (start, end) = range.split_once('-').unwrap();
        let start = u64::from_str_radix(start, 16).unwrap();
        let end = u64::from_str_radix(end, 16).unwrap();
        let pages = ((end - start) / PAGE) as usize;
        let mut entries = vec![0u8; pages * 8];
        if pagemap
            .read_exact_at(&mut entries, start / PAGE * 8)
            .is_err()
        {
            continue;
        }
        let present = |page: usize| {
            let entry = u64::from_le_bytes(entries[page * 8..page * 8 + 8].try_into().unwrap());
            entry & (1 << 63) != 0
        };
        // Each run of present pages, read and searched as one piece.
        let mut page = 0;
        while page < pages {
            if !present(page) {
                page += 1;
                continue;
            }
            let first = page;
            while page < pages && present(page) {
                page += 1;
            }
            let mut run = vec![0u8; (page - first) * PAGE as usize];
            if mem
                .read_exact_at(&mut run, start + first as u64 * PAGE)
                .is_err()
            {
                continue;
            }
            let count = run
                .windows(needle.len())
                .filter(|window| *window == needle)
                .count();
            hits.extend(std::iter::repeat_n(name.clone(), count));
        }
    }
    hits
}
