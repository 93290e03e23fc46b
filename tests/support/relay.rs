//! A fault relay between bpg-tunnel and sshd, for the faults this kernel cannot make (it has no
//! `netem`): latency, and a blackhole (nothing goes through either way, nothing is refused; TCP
//! itself still connects and acknowledges, so it is the SSH layer that must notice). The idea
//! of toxiproxy, in a few threads.
//!
//! Its sockets carry segments of a real network's size (`NETWORK_MSS`), not loopback's 64 KiB:
//! sshd leaves Nagle's algorithm on, which holds back a write smaller than a segment while one
//! is unacknowledged, and at loopback's size each 32 KiB SSH packet is such a write, which a
//! network path never sees. Without the clamp the relay would throttle sshd by itself.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// What a host on Ethernet advertises: the 1500-byte MTU less the IPv4 and TCP headers (with
/// timestamps on, segments then carry 1448 bytes).
const NETWORK_MSS: u32 = 1460;

/// A TCP socket whose connections carry segments of at most `NETWORK_MSS` bytes (set on a
/// listener, its connections inherit it).
fn network_socket() -> socket2::Socket {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_reuse_address(true).unwrap();
    socket.set_tcp_mss(NETWORK_MSS).unwrap();
    socket
}

#[derive(Default)]
struct Faults {
    /// Added to each direction, in milliseconds.
    delay_ms: AtomicU64,
    /// Nothing is read or written while set: the peers hear nothing, and nothing is refused.
    paused: AtomicBool,
    /// The relay is gone: every thread ends.
    closed: AtomicBool,
}

pub struct Relay {
    pub port: u16,
    faults: Arc<Faults>,
}

impl Relay {
    /// Listens on a fresh 127.0.0.1 port and relays each connection to `target`.
    pub fn start(target: SocketAddr) -> Relay {
        let listener = network_socket();
        listener
            .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .unwrap();
        listener.listen(128).unwrap();
        let listener: TcpListener = listener.into();
        let port = listener.local_addr().unwrap().port();
        let faults = Arc::new(Faults::default());
        let shared = faults.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if shared.closed.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(client) = client else { continue };
                let server = network_socket();
                if server.connect(&target.into()).is_err() {
                    continue;
                }
                let server: TcpStream = server.into();
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                pipe(
                    client.try_clone().unwrap(),
                    server.try_clone().unwrap(),
                    &shared,
                );
                pipe(server, client, &shared);
            }
        });
        Relay { port, faults }
    }

    /// Latency added to each direction from now on.
    pub fn set_delay(&self, delay: Duration) {
        self.faults
            .delay_ms
            .store(delay.as_millis() as u64, Ordering::Relaxed);
    }

    /// A blackhole: from now on nothing passes either way, and nothing is refused or reset.
    pub fn pause(&self) {
        self.faults.paused.store(true, Ordering::Relaxed);
    }

    /// Lets through again what waited, and what comes.
    pub fn resume(&self) {
        self.faults.paused.store(false, Ordering::Relaxed);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.faults.closed.store(true, Ordering::Relaxed);
        self.faults.paused.store(false, Ordering::Relaxed);
        // Wakes the accept loop so it sees `closed`.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// One direction: a reader that stamps each chunk with its arrival, and a writer that sends it
/// once its delay has passed, so that latency does not cut throughput.
fn pipe(mut from: TcpStream, mut to: TcpStream, faults: &Arc<Faults>) {
    let queue = Arc::new((
        Mutex::new(VecDeque::<(Instant, Vec<u8>)>::new()),
        Condvar::new(),
    ));
    let (reader_faults, writer_faults) = (faults.clone(), faults.clone());
    let reader_queue = queue.clone();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            if reader_faults.closed.load(Ordering::Relaxed) {
                let _ = from.shutdown(Shutdown::Both);
                return;
            }
            if reader_faults.paused.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            let chunk = match from.read(&mut buf) {
                Ok(0) | Err(_) => None,
                Ok(n) => Some(buf[..n].to_vec()),
            };
            let (lock, ready) = &*reader_queue;
            let mut queued = lock.lock().unwrap();
            match chunk {
                Some(chunk) => queued.push_back((Instant::now(), chunk)),
                // An empty chunk stands for the end.
                None => queued.push_back((Instant::now(), Vec::new())),
            }
            ready.notify_one();
            if queued.back().is_some_and(|(_, chunk)| chunk.is_empty()) {
                return;
            }
        }
    });
    // Writes, at once, every chunk whose time has come: a sleep per chunk would cap the relay
    // at a chunk per timer wake-up, well below what a bulk transfer needs.
    std::thread::spawn(move || {
        let mut batch = Vec::new();
        loop {
            let mut ended = false;
            {
                let (lock, ready) = &*queue;
                let mut queued = lock.lock().unwrap();
                while queued.is_empty() {
                    queued = ready.wait(queued).unwrap();
                }
                let delay = Duration::from_millis(writer_faults.delay_ms.load(Ordering::Relaxed));
                let due = queued.front().unwrap().0 + delay;
                let now = Instant::now();
                if due > now {
                    drop(queued);
                    std::thread::sleep(due - now);
                    continue;
                }
                while let Some((at, _)) = queued.front() {
                    if *at + delay > now || batch.len() >= 1 << 20 {
                        break;
                    }
                    let (_, chunk) = queued.pop_front().unwrap();
                    if chunk.is_empty() {
                        ended = true;
                        break;
                    }
                    batch.extend_from_slice(&chunk);
                }
            }
            while writer_faults.paused.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(5));
            }
            if writer_faults.closed.load(Ordering::Relaxed) {
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
            if to.write_all(&batch).is_err() {
                return;
            }
            batch.clear();
            if ended {
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
        }
    });
}
