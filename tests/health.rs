//! The optional HTTP health endpoint under abuse: whoever else connects to it, a probe is
//! answered, and what the abusers cost the dyno stays bounded. A test binary of its own, so
//! that its flood does not slow the timing-sensitive tests of other binaries.

mod support;

use std::collections::BTreeMap;
use std::io::{ErrorKind, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::Tunnel;

const START: Duration = Duration::from_secs(20);

/// Kernel memory of the TCP sockets `ss` finds with `filter`, summing the skmem fields named
/// (`r`: received and unread; `w`: queued to send).
fn socket_memory(filter: &str, fields: &[&str]) -> u64 {
    let out = std::process::Command::new("ss")
        .args(["-tmnH", filter])
        .output()
        .expect("ss (iproute2)");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut total = 0;
    for skmem in text.split("skmem:(").skip(1) {
        let skmem = skmem.split(')').next().unwrap_or_default();
        for item in skmem.split(',') {
            let split = item
                .find(|c: char| c.is_ascii_digit())
                .unwrap_or(item.len());
            let (name, value) = item.split_at(split);
            if fields.contains(&name) {
                total += value.parse::<u64>().unwrap_or(0);
            }
        }
    }
    total
}

/// One probe as a prober makes it: a new connection, `GET path`, the whole answer read.
fn probe(port: u16, path: &str) -> Result<String, String> {
    use std::io::Read;
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1))
        .map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .map_err(|e| format!("send: {e}"))?;
    let mut answer = Vec::new();
    stream
        .read_to_end(&mut answer)
        .map_err(|e| format!("read: {e}"))?;
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

/// A flood of clients on the endpoint, each a thread running `client` until told to stop.
struct Flood {
    stop: Arc<AtomicBool>,
    connections: Arc<AtomicU64>,
    clients: Vec<std::thread::JoinHandle<()>>,
}

impl Flood {
    /// `threads` threads, each calling `client(port, &stop, &connections)` until `stop`.
    fn start(threads: usize, port: u16, client: fn(u16, &AtomicBool, &AtomicU64)) -> Flood {
        let stop = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(AtomicU64::new(0));
        let clients = (0..threads)
            .map(|_| {
                let (stop, connections) = (stop.clone(), connections.clone());
                std::thread::spawn(move || client(port, &stop, &connections))
            })
            .collect();
        Flood {
            stop,
            connections,
            clients,
        }
    }

    /// Stops the clients; how many connections they made.
    fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        for client in self.clients {
            client.join().unwrap();
        }
        self.connections.load(Ordering::Relaxed)
    }
}

/// Sends request after request on one connection and reads nothing; connects again whenever
/// the endpoint lets the connection go.
fn pipeline_and_never_read(port: u16, stop: &AtomicBool, connections: &AtomicU64) {
    let batch = b"GET /liveness HTTP/1.1\r\nHost: flood\r\n\r\n".repeat(64);
    while !stop.load(Ordering::Relaxed) {
        let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
            std::thread::sleep(Duration::from_millis(10));
            continue;
        };
        connections.fetch_add(1, Ordering::Relaxed);
        stream
            .set_write_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        // Whole requests only: the stream stays a valid pipeline however a write is cut short.
        let mut at = 0;
        while !stop.load(Ordering::Relaxed) {
            match stream.write(&batch[at..]) {
                Ok(0) => break,
                Ok(n) => at = (at + n) % batch.len(),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(_) => break,
            }
        }
    }
}

/// Opens bursts of 256 connections as fast as it can, 10 bursts a second, and sends nothing
/// on them, holding the newest 256: a probe arrives among hundreds of queued connections, each
/// of which would push it out as the oldest once accepted.
fn connect_in_bursts_and_stay_silent(port: u16, stop: &AtomicBool, connections: &AtomicU64) {
    let mut held = std::collections::VecDeque::new();
    while !stop.load(Ordering::Relaxed) {
        for _ in 0..256 {
            if let Ok(stream) = TcpStream::connect(("127.0.0.1", port)) {
                connections.fetch_add(1, Ordering::Relaxed);
                held.push_back(stream);
            }
        }
        while held.len() > 256 {
            held.pop_front();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Probes `/liveness` on a new connection every 100 ms for 10 s, during `flood`, and requires
/// every answer within a second, the daemon's RSS and the kernel memory of the endpoint's
/// sockets (and of what is queued for the flood to read) to stay within 16 MB of where they
/// were, and the tunnel to be ready afterwards.
fn probes_are_answered_during(threads: usize, client: fn(u16, &AtomicBool, &AtomicU64)) {
    // One flood at a time: two at once on two cores would measure each other.
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(lab) = support::lab() else { return };
    let db = lab.attachment("DATABASE");
    let mut vars: BTreeMap<String, String> = db.vars.clone();
    let port = support::free_port();
    vars.insert("BPG_TUNNEL_HEALTH_ADDR".into(), format!("127.0.0.1:{port}"));
    vars.insert("BPG_TUNNEL_LOG".into(), "info".into());
    let tunnel = Tunnel::spawn(&vars, &[]);
    tunnel.wait_for(&["event=ready"], START);
    let ours = format!("( sport = :{port} )");
    let theirs = format!("( dport = :{port} )");
    let sockets = || socket_memory(&ours, &["r", "w"]) + socket_memory(&theirs, &["r"]);
    let rss_before = support::rss_bytes(tunnel.pid());
    let sockets_before = sockets();

    let flood = Flood::start(threads, port, client);
    let started = Instant::now();
    let (mut answered, mut failures) = (Vec::new(), Vec::new());
    let (mut rss_peak, mut sockets_peak) = (rss_before, sockets_before);
    while started.elapsed() < Duration::from_secs(10) {
        let asked = Instant::now();
        let answer = probe(port, "/liveness");
        let took = asked.elapsed();
        match answer {
            Ok(text) if text.starts_with("HTTP/1.1 200") && took <= Duration::from_secs(1) => {
                answered.push(took)
            }
            Ok(text) => failures.push(format!(
                "after {:.1?}: {took:.2?}: {}",
                started.elapsed(),
                text.lines().next().unwrap_or("(nothing)")
            )),
            Err(error) => failures.push(format!(
                "after {:.1?}: {took:.2?}: {error}",
                started.elapsed()
            )),
        }
        rss_peak = rss_peak.max(support::rss_bytes(tunnel.pid()));
        sockets_peak = sockets_peak.max(sockets());
        std::thread::sleep(Duration::from_millis(100));
    }
    let connections = flood.stop();
    answered.sort();
    let quantile = |q: f64| {
        answered
            .get(((answered.len() as f64 - 1.0) * q) as usize)
            .copied()
            .unwrap_or_default()
    };
    let mb = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
    eprintln!(
        "{} probes answered (median {:.1?}, worst {:.1?}), {} failed; {connections} flood \
         connections; daemon RSS {:.1} -> {:.1} MB; socket memory (ours, and replies queued to \
         the flood) {:.1} -> {:.1} MB",
        answered.len(),
        quantile(0.5),
        quantile(1.0),
        failures.len(),
        mb(rss_before),
        mb(rss_peak),
        mb(sockets_before),
        mb(sockets_peak),
    );
    assert!(
        failures.is_empty(),
        "{} of {} probes failed: {failures:#?}",
        failures.len(),
        failures.len() + answered.len()
    );
    assert!(
        rss_peak < rss_before + 16 * 1024 * 1024,
        "RSS grew from {:.1} to {:.1} MB",
        mb(rss_before),
        mb(rss_peak)
    );
    assert!(
        sockets_peak < sockets_before + 16 * 1024 * 1024,
        "socket memory grew from {:.1} to {:.1} MB",
        mb(sockets_before),
        mb(sockets_peak)
    );
    // And the tunnel itself still serves.
    assert!(probe(port, "/readiness")
        .unwrap()
        .starts_with("HTTP/1.1 200"));
}

#[test]
fn liveness_answers_within_a_second_while_64_clients_pipeline_requests_and_never_read() {
    probes_are_answered_during(64, pipeline_and_never_read);
}

#[test]
fn liveness_answers_within_a_second_while_bursts_of_connections_arrive_and_stay_silent() {
    probes_are_answered_during(4, connect_in_bursts_and_stay_silent);
}
