//! bpg-tunnel against the tunnel it replaces, OpenSSH `ssh -L` under autossh, both through the
//! same sshd to the same PostgreSQL, with a direct connection as the physical limit.
//!
//! Each contender is measured on four routes: plain on loopback (every figure, memory and start
//! included), then with TLS inside the tunnel as the add-on's databases require it (the server
//! with `ssl=on`, every client with `sslmode=require`), on loopback, and through a relay that
//! delays each direction by 1 ms and by 20 ms. The relay sits where the network does in
//! production: between the tunnel and sshd, or between the client and PostgreSQL for the direct
//! connection.
//!
//! Run it with `make bench` (full: about 20 minutes) or `make bench-smoke` (what CI runs, so
//! the benchmark cannot rot). Contenders take turns within each round (A/B, then B/A) so drift
//! on a shared machine hits both alike, and the tables show medians over the rounds.
//!
//! Options (after `--`): `--smoke`, `--rounds N`, `--seconds S` (per pgbench run),
//! `--copy-mb M`, `--idle N` (connections held open for the memory figure), and `--lab`, which
//! prepares the data, starts both tunnels, prints their ports and pids and waits: for profiling.

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{Lab, Relay, ServerTls, SshForward, Tunnel, DB_PASSWORD};

struct Options {
    lab: bool,
    smoke: bool,
    rounds: usize,
    seconds: u32,
    copy_mb: u64,
    idle: usize,
    pgbench_scale: u32,
}

impl Options {
    fn parse() -> Options {
        let mut args = std::env::args().skip(1);
        let mut options = Options {
            lab: false,
            smoke: false,
            rounds: 5,
            seconds: 6,
            copy_mb: 300,
            idle: 200,
            pgbench_scale: 10,
        };
        let number = |flag: &str, value: Option<String>| -> u64 {
            value
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{flag} needs a whole number"))
        };
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--smoke" => {
                    options = Options {
                        lab: options.lab,
                        smoke: true,
                        rounds: 1,
                        seconds: 1,
                        copy_mb: 5,
                        idle: 20,
                        pgbench_scale: 1,
                    }
                }
                "--lab" => options.lab = true,
                "--rounds" => options.rounds = number(&arg, args.next()) as usize,
                "--seconds" => options.seconds = number(&arg, args.next()) as u32,
                "--copy-mb" => options.copy_mb = number(&arg, args.next()),
                "--idle" => options.idle = number(&arg, args.next()) as usize,
                // cargo bench passes this to every bench target.
                "--bench" => {}
                other => panic!("unknown option {other}"),
            }
        }
        options
    }
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Contender {
    Direct,
    Ssh,
    Bpg,
}

impl Contender {
    fn label(self) -> &'static str {
        match self {
            Contender::Direct => "direct",
            Contender::Ssh => "ssh -L",
            Contender::Bpg => "bpg-tunnel",
        }
    }
}

/// How the client reaches the database.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Route {
    Plain,
    Tls,
    Tls1ms,
    Tls20ms,
}

impl Route {
    const ALL: [Route; 4] = [Route::Plain, Route::Tls, Route::Tls1ms, Route::Tls20ms];

    fn label(self) -> &'static str {
        match self {
            Route::Plain => "plain, loopback",
            Route::Tls => "TLS inside (sslmode=require), loopback",
            Route::Tls1ms => "TLS inside, 1 ms each way (2 ms round trip)",
            Route::Tls20ms => "TLS inside, 20 ms each way (40 ms round trip)",
        }
    }

    fn tls(self) -> bool {
        self != Route::Plain
    }

    /// Added to each direction by the relay.
    fn delay(self) -> Duration {
        match self {
            Route::Plain | Route::Tls => Duration::ZERO,
            Route::Tls1ms => Duration::from_millis(1),
            Route::Tls20ms => Duration::from_millis(20),
        }
    }

    /// What is measured on this route: the data path on every one, the rest on loopback.
    fn metrics(self) -> &'static [Metric] {
        match self {
            Route::Plain => &Metric::ALL,
            _ => &Metric::ALL[..Metric::DATA_PATH],
        }
    }

    /// The goal for bpg-tunnel's figure, and whether higher is better.
    fn target(self, metric: Metric) -> Option<Target> {
        let ssh = |goal, higher| {
            Some(Target {
                goal,
                higher,
                against: Against::Ssh,
            })
        };
        match (self, metric) {
            (Route::Tls1ms, Metric::CopyMbps) => Some(Target {
                goal: 0.9,
                higher: true,
                against: Against::Direct,
            }),
            (Route::Plain, Metric::RssPerConn) => Some(Target {
                goal: 10.0,
                higher: false,
                against: Against::Nothing,
            }),
            (_, Metric::SelectTps) => ssh(1.2, true),
            (_, Metric::SelectP99) => ssh(0.8, false),
            (_, Metric::CopyMbps) => ssh(1.5, true),
            (_, Metric::CpuPerGb) => ssh(0.5, false),
            (Route::Plain, Metric::ConnectTps) => ssh(2.5, true),
            (Route::Plain, Metric::StalledProbeMs) => ssh(1.5, false),
            (Route::Plain, Metric::IdleRss) => ssh(0.4, false),
            _ => None,
        }
    }
}

struct Target {
    goal: f64,
    higher: bool,
    against: Against,
}

/// What a goal divides bpg-tunnel's figure by.
#[derive(PartialEq, Eq)]
enum Against {
    Ssh,
    Direct,
    /// The goal is for the figure itself.
    Nothing,
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Metric {
    SelectTps,
    SelectP50,
    SelectP99,
    ConnectTps,
    ConnectMs,
    CopyMbps,
    CpuPerGb,
    StalledProbeMs,
    IdleRss,
    ConnsRss,
    RssPerConn,
    FirstQuery,
}

impl Metric {
    const ALL: [Metric; 12] = [
        Metric::SelectTps,
        Metric::SelectP50,
        Metric::SelectP99,
        Metric::ConnectTps,
        Metric::ConnectMs,
        Metric::CopyMbps,
        Metric::CpuPerGb,
        Metric::StalledProbeMs,
        Metric::IdleRss,
        Metric::ConnsRss,
        Metric::RssPerConn,
        Metric::FirstQuery,
    ];

    /// What every route measures, the first of `ALL`: throughput and latency of the data path,
    /// and its CPU cost.
    const DATA_PATH: usize = 7;

    fn label(self, options: &Options) -> String {
        match self {
            Metric::SelectTps => "select-only, 8 clients: tps".into(),
            Metric::SelectP50 => "select-only: p50 latency ms".into(),
            Metric::SelectP99 => "select-only: p99 latency ms".into(),
            Metric::ConnectTps => "new connection (SCRAM) per tx (-C): tps".into(),
            Metric::ConnectMs => "-C: average connect ms".into(),
            Metric::CopyMbps => format!("COPY TO STDOUT ~{} MB: MB/s", options.copy_mb),
            Metric::CpuPerGb => "tunnel CPU s per GB (COPY)".into(),
            Metric::StalledProbeMs => "worst probe ms, another client stalled".into(),
            Metric::IdleRss => "tunnel RSS idle, MB".into(),
            Metric::ConnsRss => format!("tunnel RSS, {} open conns, MB", options.idle),
            Metric::RssPerConn => "tunnel RSS per open conn, kB".into(),
            Metric::FirstQuery => "process start to first query, ms".into(),
        }
    }
}

type Results = BTreeMap<(Route, Metric, Contender), Vec<f64>>;

fn main() {
    let options = Options::parse();
    let started = Instant::now();
    let Some(mut lab) = support::lab() else {
        std::process::exit(1);
    };
    for tool in ["autossh", "ssh", "pgbench", "psql"] {
        assert!(
            support::which(tool).is_some(),
            "{tool} not found: run scripts/bench.sh (it installs what the benchmark needs)"
        );
    }
    let tunnel = support::tunnel_binary();
    println!(
        "bpg-tunnel {} ({}), {}, PostgreSQL on 127.0.0.1:{}, sshd on 127.0.0.1:{}",
        version(&tunnel, "--version"),
        tunnel.display(),
        version(Path::new("ssh"), "-V"),
        lab.pg.port,
        lab.sshd.port
    );
    let dir = tempfile::Builder::new()
        .prefix("bpg-bench-")
        .tempdir()
        .unwrap();
    let copy_bytes = prepare_database(&lab, &options);
    println!(
        "data: pgbench scale {}, COPY of {:.0} MB; {} rounds, {} s per pgbench run",
        options.pgbench_scale,
        copy_bytes as f64 / 1e6,
        options.rounds,
        options.seconds
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();

    // TLS on for the routes that ask for it; the plain route's clients say sslmode=disable.
    lab.pg.configure(&ServerTls {
        ssl: true,
        names: &["127.0.0.1"],
        hba: &["host all all 127.0.0.0/8 scram-sha-256"],
    });
    // Where the network is in production: between the tunnel and sshd, and between a direct
    // client and PostgreSQL.
    let relays: BTreeMap<Route, (Relay, Relay)> = Route::ALL
        .into_iter()
        .filter(|route| !route.delay().is_zero())
        .map(|route| {
            let to_sshd = Relay::start(([127, 0, 0, 1], lab.sshd.port).into());
            let to_pg = Relay::start(([127, 0, 0, 1], lab.pg.port).into());
            to_sshd.set_delay(route.delay());
            to_pg.set_delay(route.delay());
            (route, (to_sshd, to_pg))
        })
        .collect();
    // Where a route's tunnels find sshd, and its direct clients PostgreSQL.
    let ports = |route: Route| match relays.get(&route) {
        Some((to_sshd, to_pg)) => (to_sshd.port, to_pg.port),
        None => (lab.sshd.port, lab.pg.port),
    };
    if options.lab {
        // Both tunnels on loopback and through each delaying relay, left running.
        let mut running = Vec::new();
        for route in [Route::Tls, Route::Tls1ms, Route::Tls20ms] {
            let (ssh_port, pg_port) = ports(route);
            let ssh = Running::ssh(&lab, ssh_port);
            let bpg = Running::bpg(&lab, ssh_port);
            for started in [&ssh, &bpg] {
                runtime.block_on(first_query(started.port(), Instant::now()));
            }
            println!(
                "{:?} each way (PGPASSWORD={DB_PASSWORD:?}): direct 127.0.0.1:{pg_port}, ssh -L 127.0.0.1:{} pids {:?}, bpg-tunnel 127.0.0.1:{} pid {:?}",
                route.delay(),
                ssh.port(),
                ssh.pids(),
                bpg.port(),
                bpg.pids()
            );
            running.push((ssh, bpg));
        }
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    let mut results = Results::new();
    for round in 0..options.rounds {
        for route in Route::ALL {
            let (ssh_port, pg_port) = ports(route);
            let order = if round % 2 == 0 {
                [Contender::Direct, Contender::Ssh, Contender::Bpg]
            } else {
                [Contender::Direct, Contender::Bpg, Contender::Ssh]
            };
            for contender in order {
                let running = match contender {
                    Contender::Direct => Running::direct(pg_port),
                    Contender::Ssh => Running::ssh(&lab, ssh_port),
                    Contender::Bpg => Running::bpg(&lab, ssh_port),
                };
                measure(
                    route,
                    contender,
                    &running,
                    &options,
                    dir.path(),
                    copy_bytes,
                    &runtime,
                    &mut results,
                );
            }
        }
        println!(
            "round {}/{} done at {:.0} s",
            round + 1,
            options.rounds,
            started.elapsed().as_secs_f64()
        );
    }
    print_table(&results, &options);
    println!("total time: {:.0} s", started.elapsed().as_secs_f64());
}

/// Every figure of `route` for one contender, added to `results`.
#[allow(clippy::too_many_arguments)]
fn measure(
    route: Route,
    contender: Contender,
    running: &Running,
    options: &Options,
    dir: &Path,
    copy_bytes: u64,
    runtime: &tokio::runtime::Runtime,
    results: &mut Results,
) {
    let mut record = |metric: Metric, value: f64| {
        assert!(
            route.metrics().contains(&metric),
            "{metric:?} is not measured on {route:?}"
        );
        assert!(
            value.is_finite() && value > 0.0,
            "{} {route:?} {metric:?}: measured {value}",
            contender.label()
        );
        results
            .entry((route, metric, contender))
            .or_default()
            .push(value);
    };
    let tls = route.tls();
    let port = running.port();
    let first = runtime.block_on(first_query(port, running.spawned));
    let tunnel = contender != Contender::Direct;
    let mut idle_rss = None;
    if route == Route::Plain && tunnel {
        record(Metric::FirstQuery, first.as_secs_f64() * 1e3);
        std::thread::sleep(Duration::from_millis(300));
        let rss = rss_mb(&running.pids());
        idle_rss = Some(rss);
        record(Metric::IdleRss, rss);
    }

    // pgbench opens its clients one after another before it counts transactions, each
    // connection a dozen round trips with TLS and SCRAM: half a second at 20 ms, which a smoke
    // run's one second cannot spare.
    let seconds = options.seconds
        + if route.delay() >= Duration::from_millis(20) {
            2
        } else {
            0
        };
    let select = pgbench(port, tls, &["-S", "-c", "8", "-j", "2"], seconds, dir);
    record(Metric::SelectTps, select.tps);
    record(Metric::SelectP50, select.p50_ms);
    record(Metric::SelectP99, select.p99_ms);

    let connect = pgbench(port, tls, &["-S", "-C", "-c", "8", "-j", "2"], seconds, dir);
    record(Metric::ConnectTps, connect.tps);
    record(Metric::ConnectMs, connect.connect_ms);

    let cpu_before = cpu_seconds(&running.pids());
    let copy_started = Instant::now();
    let copied = copy_out(port, tls);
    let copy_time = copy_started.elapsed();
    let cpu = cpu_seconds(&running.pids()) - cpu_before;
    assert_eq!(copied, copy_bytes, "{}: COPY came short", contender.label());
    record(
        Metric::CopyMbps,
        copied as f64 / 1e6 / copy_time.as_secs_f64(),
    );
    if tunnel {
        // Clock ticks are 10 ms: a smoke-sized copy may use less than one.
        record(
            Metric::CpuPerGb,
            (cpu / (copied as f64 / 1e9)).max(f64::MIN_POSITIVE),
        );
    }
    if route != Route::Plain {
        return;
    }
    if let Some(idle) = idle_rss {
        let rss = runtime.block_on(hold_connections(port, options.idle, running));
        record(Metric::ConnsRss, rss);
        // What each open connection adds; a tunnel that gave memory back since it was idle
        // (the allocator's doing) counts as adding next to nothing.
        let per_conn = (rss - idle) * 1024.0 / options.idle as f64;
        record(Metric::RssPerConn, per_conn.max(0.001));
    }
    let worst = runtime.block_on(probe_beside_a_stalled_client(port, options));
    record(Metric::StalledProbeMs, worst.as_secs_f64() * 1e3);
}

fn version(program: &Path, flag: &str) -> String {
    let output = Command::new(program).arg(flag).output().unwrap();
    let text = [output.stdout, output.stderr].concat();
    String::from_utf8_lossy(&text).trim().to_owned()
}

/// pgbench's tables, and a table whose text COPY is `copy_mb` megabytes; returns its exact size.
fn prepare_database(lab: &Lab, options: &Options) -> u64 {
    let output = client("pgbench", lab.pg.port, false)
        .args(["-i", "-q", "-s", &options.pgbench_scale.to_string()])
        .arg("postgres")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "pgbench -i failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    // Each row prints as about 250 bytes; generated once, so COPY measures the tunnel rather
    // than the generator.
    let rows = options.copy_mb * 1_000_000 / 250;
    psql(
        lab.pg.port,
        &format!(
            "create unlogged table bulk as select g as id, md5(g::text) as tag, repeat('x', 200) as body \
             from generate_series(1, {rows}) g"
        ),
    );
    psql(lab.pg.port, "vacuum analyze bulk");
    copy_out(lab.pg.port, false)
}

/// `program` (psql or pgbench) pointed at 127.0.0.1:`port` as the lab's database user, with
/// TLS required or refused.
fn client(program: &str, port: u16, tls: bool) -> Command {
    let mut command = Command::new(program);
    command
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"])
        .env("PGPASSWORD", DB_PASSWORD)
        .env("PGSSLMODE", if tls { "require" } else { "disable" });
    command
}

fn psql(port: u16, sql: &str) {
    let output = client("psql", port, false)
        .args([
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            "postgres",
            "-c",
            sql,
        ])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "psql: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Runs `COPY bulk TO STDOUT` with psql, the way an app's libpq would, and counts the bytes.
fn copy_out(port: u16, tls: bool) -> u64 {
    let mut child = client("psql", port, tls)
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", "postgres"])
        .args(["-c", "copy bulk to stdout"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut buffer = vec![0; 1 << 20];
    let mut total = 0u64;
    loop {
        match stdout.read(&mut buffer).unwrap() {
            0 => break,
            n => total += n as u64,
        }
    }
    assert!(
        child.wait().unwrap().success(),
        "COPY through {port} failed"
    );
    total
}

struct Pgbench {
    tps: f64,
    p50_ms: f64,
    p99_ms: f64,
    connect_ms: f64,
}

fn pgbench(port: u16, tls: bool, args: &[&str], seconds: u32, dir: &Path) -> Pgbench {
    let logs = tempfile::tempdir_in(dir).unwrap();
    let output = client("pgbench", port, tls)
        .args(["-n", "-T", &seconds.to_string(), "-l"])
        .arg(format!("--log-prefix={}/tx", logs.path().display()))
        .args(args)
        .arg("postgres")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "pgbench {args:?} through {port} failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let after = |prefix: &str| -> f64 {
        stdout
            .lines()
            .find_map(|line| line.strip_prefix(prefix))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no {prefix:?} in pgbench's output:\n{stdout}"))
    };
    // One line per transaction: client, number, latency in µs, script, epoch s, epoch µs.
    let mut latencies: Vec<u64> = Vec::new();
    for entry in std::fs::read_dir(logs.path()).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        latencies.extend(
            text.lines()
                .filter_map(|line| line.split_whitespace().nth(2)?.parse::<u64>().ok()),
        );
    }
    latencies.sort_unstable();
    assert!(
        !latencies.is_empty(),
        "pgbench {args:?} through {port} logged no transactions: {stdout}"
    );
    let percentile = |p: f64| {
        let index = ((latencies.len() - 1) as f64 * p).round() as usize;
        latencies[index] as f64 / 1e3
    };
    Pgbench {
        tps: after("tps = "),
        p50_ms: percentile(0.50),
        p99_ms: percentile(0.99),
        connect_ms: if args.contains(&"-C") {
            after("average connection time = ")
        } else {
            f64::NAN
        },
    }
}

/// Connects and queries until it works: the first query an app booting at once could make.
async fn first_query(port: u16, spawned: Instant) -> Duration {
    let deadline = spawned + Duration::from_secs(30);
    loop {
        let attempt = async {
            let client = support::connect(port).await?;
            client.simple_query("select 1").await
        };
        if tokio::time::timeout(Duration::from_secs(10), attempt)
            .await
            .is_ok_and(|r| r.is_ok())
        {
            return spawned.elapsed();
        }
        assert!(Instant::now() < deadline, "no query through {port} in 30 s");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// While one client runs a ~400 MB `COPY TO STDOUT` into a pipe nobody reads, opens a new
/// connection and runs `select 1` every 200 ms, as the app's other requests would; returns the
/// slowest of those probes. A tunnel whose connections share one flow-control window makes them
/// wait for the stalled client.
async fn probe_beside_a_stalled_client(port: u16, options: &Options) -> Duration {
    let mut stalled = client("psql", port, false)
        .args(["-X", "-q", "-d", "postgres", "-c"])
        .arg("copy (select repeat('x', 200) || g from generate_series(1, 2000000) g) to stdout")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Time for the result to fill every buffer on its way, up to the tunnel's window.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let until = Instant::now() + Duration::from_secs(u64::from(options.seconds));
    let mut worst = Duration::ZERO;
    while Instant::now() < until {
        let started = Instant::now();
        let probe = async {
            let client = support::connect(port).await?;
            client.simple_query("select 1").await
        };
        // A probe that fails counts with the time it took to fail: that is what the app saw.
        match tokio::time::timeout(Duration::from_secs(60), probe).await {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => println!("a probe failed after {:?}: {error}", started.elapsed()),
            Err(_) => println!("a probe got no answer in 60 s"),
        }
        worst = worst.max(started.elapsed());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = stalled.kill();
    let _ = stalled.wait();
    worst
}

/// Opens `count` connections through the tunnel, checks each answers, and returns the
/// tunnel's resident memory while they are all open.
async fn hold_connections(port: u16, count: usize, running: &Running) -> f64 {
    let mut clients = Vec::with_capacity(count);
    // In batches: hundreds of simultaneous SCRAM handshakes would time out on two cores.
    while clients.len() < count {
        let mut batch = tokio::task::JoinSet::new();
        for _ in 0..(count - clients.len()).min(16) {
            batch.spawn(support::connect(port));
        }
        while let Some(opened) = batch.join_next().await {
            clients.push(opened.unwrap().expect("connect through the tunnel"));
        }
    }
    for client in &clients {
        client.simple_query("select 1").await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss = rss_mb(&running.pids());
    drop(clients);
    rss
}

/// A contender, started.
struct Running {
    spawned: Instant,
    tunnel: Contended,
}

enum Contended {
    Direct(u16),
    Ssh(SshForward),
    Bpg { port: u16, tunnel: Tunnel },
}

impl Running {
    fn direct(port: u16) -> Running {
        Running {
            spawned: Instant::now(),
            tunnel: Contended::Direct(port),
        }
    }

    /// autossh + ssh exactly as the old script ran them, to sshd at 127.0.0.1:`ssh_port`.
    fn ssh(lab: &Lab, ssh_port: u16) -> Running {
        Running {
            spawned: Instant::now(),
            tunnel: Contended::Ssh(SshForward::start(lab, ssh_port)),
        }
    }

    fn bpg(lab: &Lab, ssh_port: u16) -> Running {
        let spawned = Instant::now();
        let mut attachment = lab.attachment("DATABASE");
        attachment.set("BPG_TUNNEL_LOG", "info");
        attachment.set_conn_info("SSH_PORT", &ssh_port.to_string());
        let port = attachment.writer_port;
        let tunnel = Tunnel::spawn(attachment.vars.iter(), &[]);
        Running {
            spawned,
            tunnel: Contended::Bpg { port, tunnel },
        }
    }

    fn port(&self) -> u16 {
        match &self.tunnel {
            Contended::Direct(port) | Contended::Bpg { port, .. } => *port,
            Contended::Ssh(forward) => forward.port,
        }
    }

    /// Every process the tunnel consists of (autossh and its ssh, or bpg-tunnel).
    fn pids(&self) -> Vec<i32> {
        match &self.tunnel {
            Contended::Direct(_) => vec![],
            Contended::Ssh(forward) => forward.pids(),
            Contended::Bpg { tunnel, .. } => vec![tunnel.pid()],
        }
    }
}

fn rss_mb(pids: &[i32]) -> f64 {
    pids.iter().map(|pid| support::rss_bytes(*pid)).sum::<u64>() as f64 / (1024.0 * 1024.0)
}

fn cpu_seconds(pids: &[i32]) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    pids.iter()
        .map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // utime and stime are fields 14 and 15; count after the command name's ')'.
            let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
            rest.split_whitespace()
                .skip(11)
                .take(2)
                .filter_map(|f| f.parse::<f64>().ok())
                .sum::<f64>()
        })
        .sum::<f64>()
        / ticks
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    if sorted.len().is_multiple_of(2) {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    } else {
        sorted[mid]
    }
}

fn print_table(results: &Results, options: &Options) {
    let width = Metric::ALL
        .iter()
        .map(|m| m.label(options).len())
        .max()
        .unwrap_or(0);
    println!(
        "\nmedians over {} round(s); bpg/ssh is bpg-tunnel divided by ssh -L; a goal marked \
         \"of direct\" divides by the direct connection, one in kB is for the figure itself",
        options.rounds
    );
    for route in Route::ALL {
        println!("\n{}\n", route.label());
        println!(
            "| {:width$} | {:>9} | {:>9} | {:>10} | {:>7} | {:>16} |",
            "metric", "direct", "ssh -L", "bpg-tunnel", "bpg/ssh", "goal"
        );
        println!(
            "|{}|{}|{}|{}|{}|{}|",
            "-".repeat(width + 2),
            "-".repeat(11),
            "-".repeat(11),
            "-".repeat(12),
            "-".repeat(9),
            "-".repeat(18)
        );
        for &metric in route.metrics() {
            let cell = |contender| {
                results
                    .get(&(route, metric, contender))
                    .map(|values| median(values))
            };
            let show = |value: Option<f64>| match value {
                Some(v) if v >= 100.0 => format!("{v:.0}"),
                Some(v) if v >= 10.0 => format!("{v:.1}"),
                Some(v) => format!("{v:.2}"),
                None => "-".into(),
            };
            let (direct, ssh, bpg) = (
                cell(Contender::Direct),
                cell(Contender::Ssh),
                cell(Contender::Bpg),
            );
            // A smoke run's few MB can cost ssh under one clock tick of CPU: no ratio to 0.
            // A figure under one clock tick is recorded as the smallest positive number.
            let over = |base: Option<f64>| {
                base.filter(|base| *base > f64::MIN_POSITIVE)
                    .zip(bpg)
                    .map(|(base, b)| b / base)
            };
            let ratio = over(ssh);
            let goal = route.target(metric).and_then(|target| {
                let (value, unit) = match target.against {
                    Against::Ssh => (ratio?, "x"),
                    Against::Direct => (over(direct)?, "x of direct"),
                    Against::Nothing => (bpg?, " kB"),
                };
                let met = if target.higher {
                    value >= target.goal
                } else {
                    value <= target.goal
                };
                Some(format!(
                    "{}{}{unit} {}",
                    if target.higher { "≥" } else { "≤" },
                    target.goal,
                    if met {
                        "ok".to_owned()
                    } else if target.against == Against::Direct {
                        format!("MISS ({value:.2}x)")
                    } else {
                        "MISS".to_owned()
                    }
                ))
            });
            println!(
                "| {:width$} | {:>9} | {:>9} | {:>10} | {:>7} | {:>16} |",
                metric.label(options),
                show(direct),
                show(ssh),
                show(bpg),
                ratio.map(|r| format!("{r:.2}x")).unwrap_or_default(),
                goal.unwrap_or_default()
            );
        }
    }
    if !options.smoke {
        return;
    }
    // The smoke run checks that every row was measured, not how fast anything was.
    for route in Route::ALL {
        for &metric in route.metrics() {
            for contender in [Contender::Ssh, Contender::Bpg] {
                assert!(
                    results.contains_key(&(route, metric, contender)),
                    "no {metric:?} on {route:?} for {}",
                    contender.label()
                );
            }
        }
    }
}
