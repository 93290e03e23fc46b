#!/usr/bin/env bash
# Benchmarks bpg-tunnel (the static release binary) against OpenSSH `ssh -L` under autossh, the
# way the old buildpack script ran it, through the same sshd to the same PostgreSQL, both started
# on loopback like the tests' lab. Prints a table of medians with bpg-tunnel / ssh ratios.
#   scripts/bench.sh            full run: 5 rounds on four routes (about 20 minutes), then the
#                               fleet and the long fault rows
#   scripts/bench.sh --smoke    one short round that checks every figure is measured (CI)
# The full run ends with a fleet of 100 tunnels beside 100 of the old script's (tests/fleet.rs),
# and the long versions of the fault rows (tests/faults.rs): a 60 s blackhole,
# 60 s of 5 % loss, sshd down for 60 s, and a 10-minute pgbench soak (CI runs them for seconds).
# Other options: --rounds N, --seconds S (per pgbench run), --copy-mb M, --idle N, --lab.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/dist.sh
# The harness drives psql and pgbench; its own code needs no optimisation (the SCRAM crates are
# optimised in every profile, see Cargo.toml), so it reuses the test build.
BPG_TUNNEL_BIN="$PWD/target/x86_64-unknown-linux-musl/release/bpg-tunnel" \
  cargo bench --locked --profile dev --bench tunnel -- "$@"
if [[ " $* " != *" --smoke "* ]]; then
  echo "-----> fleet: 100 tunnels against one sshd (default MaxStartups), beside the old script's autossh"
  BPG_TUNNEL_BIN="$PWD/target/x86_64-unknown-linux-musl/release/bpg-tunnel" \
    cargo test --locked --test fleet -- --ignored --nocapture fleet_beside_the_old_script
  echo "-----> faults, long versions: blackhole, 5 % loss and sshd down for 60 s each"
  BPG_TUNNEL_BIN="$PWD/target/x86_64-unknown-linux-musl/release/bpg-tunnel" BPG_TUNNEL_FAULT_SECS=60 \
    cargo test --locked --test faults -- --nocapture blackhole_is_detected loss_both_ways sshd_down
  echo "-----> soak: 10 minutes of pgbench with the server session killed every 30 s"
  BPG_TUNNEL_BIN="$PWD/target/x86_64-unknown-linux-musl/release/bpg-tunnel" BPG_TUNNEL_SOAK_SECS=600 \
    cargo test --locked --test faults soak -- --nocapture
fi
