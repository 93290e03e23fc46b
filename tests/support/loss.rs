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
        let table = format!("bpg_tunnel_loss_{}_{port}", std::process::id());
        let rules = format!(
            "table inet {table} {{
                chain out {{
                    type filter hook output priority 0; policy accept;
                    tcp dport {port} numgen random mod 100 < {percent} drop
                    tcp sport {port} numgen random mod 100 < {percent} drop
                }}
            }}"
        );
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), rules).unwrap();
        super::run(Command::new(nft()).arg("-f").arg(file.path()));
        PacketLoss { table }
    }
}

impl Drop for PacketLoss {
    fn drop(&mut self) {
        let _ = Command::new(nft())
            .args(["delete", "table", "inet", &self.table])
            .status();
    }
}

fn nft() -> std::path::PathBuf {
    let usual = std::path::PathBuf::from("/usr/sbin/nft");
    super::which("nft")
        .or(usual.exists().then_some(usual))
        .expect("nft not found (scripts/setup.sh installs nftables)")
}
