//! An add-on server that breaks the SSH protocol, by bug or on purpose, costs the dyno neither
//! memory nor data: we trust its host key, and nothing else it sends. The server is russh's,
//! made to misbehave (tests/support/rogue.rs); the tunnel is the real binary; the app is a plain
//! TCP client that checks every byte. Each test runs alone (see `SERIAL`): they measure memory.

mod support;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use support::rogue::{pattern, Misbehaviour, RogueServer, CHANNEL_WINDOW};
use support::{rss_bytes, Attachment, Lab, Tunnel};

const START: Duration = Duration::from_secs(20);

static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A server that misbehaves so, an attachment to it (the lab's own sshd and PostgreSQL stand
/// by) and the tunnel, its session up.
fn serve(lab: &Lab, misbehaviour: Misbehaviour) -> (RogueServer, Attachment, Tunnel) {
    let rogue = RogueServer::start(&lab.tools, misbehaviour);
    let mut db = lab.attachment("DATABASE");
    db.set_conn_info("SSH_PORT", &rogue.port.to_string())
        .set_conn_info("SSH_PUBLIC_HOST_KEY", &rogue.host_key);
    db.set("BPG_TUNNEL_METRICS_INTERVAL", "1s");
    let tunnel = Tunnel::spawn(&db.vars, &[]);
    tunnel.wait_for(&["event=ssh-connected"], START);
    (rogue, db, tunnel)
}

/// The app's connection through the tunnel, with a receive buffer so small that what it does
/// not read stays in the tunnel, where a server's misbehaviour would cost memory; its first
/// bytes set the server off.
fn app(db: &Attachment) -> TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let address = std::net::SocketAddr::from(([127, 0, 0, 1], db.writer_port));
    socket.connect(&address.into()).unwrap();
    let mut stream = TcpStream::from(socket);
    stream.write_all(b"go").unwrap();
    stream
}

/// Reads the app's connection to its end, checking each byte against the server's pattern: a
/// byte lost or out of place fails the test. Returns how many bytes came, and how it ended.
fn read_to_end(mut stream: TcpStream) -> (usize, std::io::Result<()>) {
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut received = 0;
    let mut buffer = vec![0; 64 * 1024];
    loop {
        match stream.read(&mut buffer) {
            Ok(0) => return (received, Ok(())),
            Ok(n) => {
                for (i, byte) in buffer[..n].iter().enumerate() {
                    assert_eq!(
                        *byte,
                        pattern(received + i),
                        "byte {} of the stream is not the server's: data was lost",
                        received + i
                    );
                }
                received += n;
            }
            Err(error) => return (received, Err(error)),
        }
    }
}

fn metrics_sum(tunnel: &Tunnel, key: &str) -> u64 {
    tunnel
        .lines()
        .iter()
        .filter(|line| line.contains("event=metrics"))
        .map(|line| {
            let pairs: BTreeMap<&str, &str> = line
                .split_whitespace()
                .filter_map(|pair| pair.split_once('='))
                .collect();
            pairs[key].parse::<u64>().unwrap()
        })
        .sum()
}

/// Waits for the metrics lines to add up to `expected` under `key`.
fn wait_for_metric(tunnel: &Tunnel, key: &str, expected: u64) {
    let deadline = Instant::now() + START;
    while metrics_sum(tunnel, key) != expected {
        assert!(
            Instant::now() < deadline,
            "{key} adds up to {} in the metrics lines, not {expected}",
            metrics_sum(tunnel, key)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Lets the server send what it will while the app reads nothing.
fn stall() {
    std::thread::sleep(Duration::from_millis(1500));
}

#[test]
fn data_far_beyond_the_window_ends_the_session_loudly_and_the_app_sees_an_error_never_a_gap() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(lab) = support::lab() else { return };
    // The tunnel may hand what it has received to the kernel, up to a socket buffer's worth
    // (4 MB at most), and grant that much window again while the excess is on its way: four
    // windows beyond leave more than a tenth of one whatever it managed.
    let total = 6 * CHANNEL_WINDOW;
    let (_rogue, db, tunnel) = serve(
        &lab,
        Misbehaviour::Overrun {
            total,
            excess: 4 * CHANNEL_WINDOW,
        },
    );

    let stream = app(&db);
    // Read only once the session has ended: window the tunnel gave back meanwhile would let
    // some of the excess in.
    let line = tunnel.wait_for(&["event=protocol-violation"], START);
    let (received, end) = read_to_end(stream);
    eprintln!("the app read {received} bytes, then {end:?}");
    assert!(received < total, "the whole stream arrived");
    let error = end.expect_err("a stream cut short ended like a whole one");
    assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset);

    assert!(line.contains("level=error"), "{line}");
    assert!(line.contains("addon=DATABASE"), "{line}");
    assert!(line.contains("beyond"), "{line}");
    // And then back, as after any session lost.
    tunnel.wait_for_nth(&["event=ssh-connected"], 2, START);
    wait_for_metric(&tunnel, "count#bpg-tunnel.protocol-violations", 1);
}

#[test]
fn data_a_little_beyond_the_window_is_kept_as_openssh_keeps_it() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(lab) = support::lab() else { return };
    let total = 4 * CHANNEL_WINDOW;
    // OpenSSH's tolerance is a tenth of the window. What the tunnel may grant again while
    // the excess is on its way only makes the excess it sees smaller.
    let (_rogue, db, tunnel) = serve(
        &lab,
        Misbehaviour::Overrun {
            total,
            excess: CHANNEL_WINDOW / 10,
        },
    );

    let stream = app(&db);
    stall();
    let (received, end) = read_to_end(stream);
    end.unwrap();
    assert_eq!(received, total);
    assert_eq!(tunnel.count("event=protocol-violation"), 0);
    assert_eq!(tunnel.count("event=ssh-connected"), 1);
}

#[test]
fn tiny_messages_mixed_with_extended_data_cost_no_memory() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(lab) = support::lab() else { return };
    // Within the window: a client that queued each for its stalled reader would hold 1.2 M
    // messages, ~100 bytes each.
    let pairs = 600_000;
    let (_rogue, db, tunnel) = serve(&lab, Misbehaviour::TinyMixed { pairs });
    let before = rss_bytes(tunnel.pid());
    // Bounded by the window, never by the count of messages.
    let bound = 2 * CHANNEL_WINDOW as u64;

    let _stream = app(&db);
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut peak = 0;
    // Until the session ends, or memory passes the bound while the tunnel reads the flood.
    while tunnel.count("event=protocol-violation") == 0 {
        peak = peak.max(rss_bytes(tunnel.pid()).saturating_sub(before));
        assert!(
            peak < bound,
            "RSS grew by {peak} bytes for one stalled channel"
        );
        assert!(Instant::now() < deadline, "the session went on");
        std::thread::sleep(Duration::from_millis(100));
    }
    stall();
    peak = peak.max(rss_bytes(tunnel.pid()).saturating_sub(before));
    eprintln!("RSS grew by {} kB at most", peak / 1024);
    assert!(
        peak < bound,
        "RSS grew by {peak} bytes for one stalled channel"
    );
    let line = tunnel.wait_for(&["event=protocol-violation"], START);
    assert!(line.contains("extended data"), "{line}");
    assert!(line.contains("addon=DATABASE"), "{line}");
}

#[test]
fn channels_the_server_opens_are_refused_and_counted() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(lab) = support::lab() else { return };
    let count = 10_000;
    let (rogue, db, tunnel) = serve(&lab, Misbehaviour::OpenChannels { count });
    let before = rss_bytes(tunnel.pid());

    let mut stream = app(&db);
    stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    // The server says so once every open has been answered, on the same session.
    let mut said = [0; 7];
    stream.read_exact(&mut said).unwrap();
    assert_eq!(&said, b"opened\n");
    let grown = rss_bytes(tunnel.pid()).saturating_sub(before);
    eprintln!("RSS grew by {} kB", grown / 1024);

    assert_eq!(rogue.report.opens_accepted.load(Ordering::SeqCst), 0);
    assert_eq!(rogue.report.opens_refused.load(Ordering::SeqCst), count);
    wait_for_metric(
        &tunnel,
        "count#bpg-tunnel.server-channels.refused",
        count as u64,
    );
    assert_eq!(tunnel.count("event=ssh-connected"), 1);
    assert!(grown < 2 * 1024 * 1024, "RSS grew by {grown} bytes");
}
