#!/usr/bin/env bash
# Benchmarks bpg-tunnel (the static release binary) against OpenSSH `ssh -L` under autossh, the
# way the old buildpack script ran it, through the same sshd to the same PostgreSQL, both started
# on loopback like the tests' lab. Prints a table of medians with bpg-tunnel / ssh ratios.
#   scripts/bench.sh            full run: 5 rounds, about 5 minutes
#   scripts/bench.sh --smoke    one short round that checks every figure is measured (CI)
# The full run ends with a 10-minute soak (tests/faults.rs; CI runs 60 s of it).
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
  echo "-----> soak: 10 minutes of load with the server session killed every 20 s"
  BPG_TUNNEL_BIN="$PWD/target/x86_64-unknown-linux-musl/release/bpg-tunnel" BPG_TUNNEL_SOAK_SECS=600 \
    cargo test --locked --test faults soak -- --nocapture
fi
