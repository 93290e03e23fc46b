#!/usr/bin/env bash
# Brings up a loopback lab (real sshd + PostgreSQL), starts bpg-tunnel against it with the
# config vars the add-on would set, runs queries through the writer and the reader with psql,
# and tears everything down.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --quiet --bin bpg-tunnel
BPG_TUNNEL_BIN="$PWD/target/debug/bpg-tunnel" cargo run --quiet --example demo
