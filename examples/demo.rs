//! The README's demo: a loopback copy of the add-on's setup, bpg-tunnel in front of it, and psql
//! queries through the writer and the reader. Run it with `scripts/demo.sh`.

#[path = "../tests/support/mod.rs"]
mod support;

use std::process::Command;
use std::time::Duration;

fn psql(url: &str, sql: &str) {
    // The lab has no DNS: libpq's hostaddr keeps the add-on's host name in the URL while
    // connecting to the address it stands for (pg-tunnel.borealis-data.com is 127.0.0.1).
    let url = format!("{url}?hostaddr=127.0.0.1&connect_timeout=30");
    let output = Command::new("psql")
        .args([url.as_str(), "-X", "-A", "-t", "-F", " | ", "-c", sql])
        .output()
        .expect("psql");
    print!("{}", String::from_utf8_lossy(&output.stdout));
    eprint!("{}", String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "psql failed");
}

fn main() {
    let Some(lab) = support::lab() else {
        std::process::exit(1);
    };
    println!(
        "== lab: sshd on 127.0.0.1:{}, PostgreSQL on 127.0.0.1 and 127.0.0.2 port {}",
        lab.sshd.port, lab.pg.port
    );
    let mut db = lab.attachment("DATABASE");
    db.set("BPG_TUNNEL_LOG", "info");
    for (name, value) in &db.vars {
        let shown = if name.ends_with("_CONN_INFO") {
            "SSH_HOST:=127.0.0.1|...(secrets)...".to_owned()
        } else {
            value.clone()
        };
        println!("   {name}={shown}");
    }

    println!("\n== starting bpg-tunnel");
    let tunnel = support::Tunnel::spawn(db.vars.iter(), &[]);
    tunnel.wait_for(&["event=ssh-connected"], Duration::from_secs(20));
    for line in tunnel.lines() {
        println!("   {line}");
    }

    let writer = &db.vars["DATABASE_URL"];
    let reader = &db.vars["DATABASE_READONLY_URL"];
    println!("\n== psql \"$DATABASE_URL\" (writer)");
    psql(
        writer,
        "select 'writer' as via, host(inet_server_addr()) as db_host, version()",
    );
    psql(writer, "create table if not exists demo(n int); insert into demo select generate_series(1, 1000); select count(*) as rows_written from demo");
    println!("\n== psql \"$DATABASE_READONLY_URL\" (reader)");
    psql(reader, "select 'reader' as via, host(inet_server_addr()) as db_host, count(*) as rows_seen from demo");

    println!("\n== killing the SSH session on the server side; the next query just works");
    lab.sshd.signal_sessions(libc::SIGKILL);
    psql(writer, "select 'after reconnect' as via, now()");
    let seen = tunnel.lines().len();
    std::thread::sleep(Duration::from_millis(200));
    for line in tunnel.lines().iter().skip(seen.saturating_sub(6)) {
        println!("   {line}");
    }
    println!("\n== done; tearing down");
}
