//! Packet loss on one TCP port of the loopback, with nftables: `numgen random` drops a share of
//! the packets to and from the port, both ways, so TCP itself must retransmit (what a lossy link
//! does, which a relay above TCP cannot imitate). The rules live in a table of their own, named
//! for this process and port, and go with it.

use std::process::Command;

pub struct PacketLoss {
    table: String,
}

impl PacketLoss {
    /// Drops `percent` % of the packets to and from 127.0.0.1:`port`, from now until dropped.
    pub fn start(port: u16, percent: u8) -> PacketLoss {
        remove_orphans();
        let table = format!("bpg_tunnel_loss_{}_{port}", std::process::id());
        let rules = format!(
            "table inet {table} {{
                chain out {{
                    type filter hook output priority 0; policy accept;
                    tcp dport {port} numgen random mod 100 < {percent} counter drop
                    tcp sport {port} numgen random mod 100 < {percent} counter drop
                }}
            }}"
        );
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), rules).unwrap();
        super::run(Command::new(nft()).arg("-f").arg(file.path()));
        PacketLoss { table }
    }
}

impl PacketLoss {
    /// How many packets the rules have dropped so far.
    pub fn dropped(&self) -> u64 {
        let listing = Command::new(nft())
            .args(["list", "table", "inet", &self.table])
            .output()
            .unwrap();
        String::from_utf8_lossy(&listing.stdout)
            .split_whitespace()
            .collect::<Vec<_>>()
            .windows(2)
            .filter(|pair| pair[0] == "packets")
            .filter_map(|pair| pair[1].parse::<u64>().ok())
            .sum()
    }
}

impl Drop for PacketLoss {
    fn drop(&mut self) {
        let deleted = Command::new(nft())
            .args(["delete", "table", "inet", &self.table])
            .status();
        if !deleted.as_ref().is_ok_and(|status| status.success()) {
            eprintln!("could not delete nft table {}: {deleted:?}", self.table);
        }
    }
}

/// Tables left by a test process that was killed before it could drop them: they would go on
/// dropping packets on a port a later test may be given.
fn remove_orphans() {
    let Ok(listing) = Command::new(nft()).args(["list", "tables"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&listing.stdout).lines() {
        let Some(table) = line.strip_prefix("table inet ") else {
            continue;
        };
        let Some(pid) = table
            .strip_prefix("bpg_tunnel_loss_")
            .and_then(|rest| rest.split('_').next())
            .and_then(|pid| pid.parse::<i32>().ok())
        else {
            continue;
        };
        if !super::process_alive(pid) {
            let _ = Command::new(nft())
                .args(["delete", "table", "inet", table])
                .status();
        }
    }
}

fn nft() -> std::path::PathBuf {
    let usual = std::path::PathBuf::from("/usr/sbin/nft");
    super::which("nft")
        .or(usual.exists().then_some(usual))
        .expect("nft not found (scripts/setup.sh installs nftables)")
}
