#!/usr/bin/env bash
# Benchmarks bpg-tunnel (the static release binary) against OpenSSH `ssh -L` under autossh, the
# way the old buildpack script ran it, through the same sshd to the same PostgreSQL, both started
# on loopback like the tests' lab. Prints a table of medians with bpg-tunnel / ssh ratios.
#   scripts/bench.sh            full run: 5 rounds, about 5 minutes
#   scripts/bench.sh --smoke    one short round that checks every figure is measured (CI)
# Other options: --rounds N, --seconds S (per pgbench run), --copy-mb M, --idle N, --lab.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/dist.sh
# The harness drives psql and pgbench; its own code needs no optimisation (the SCRAM crates are
# optimised in every profile, see Cargo.toml), so it reuses the test build.
BPG_TUNNEL_BIN="$PWD/target/x86_64-unknown-linux-musl/release/bpg-tunnel" \
  cargo bench --locked --profile dev --bench tunnel -- "$@"
