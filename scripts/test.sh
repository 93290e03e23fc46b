#!/usr/bin/env bash
# Runs every test: formatting, lints, unit tests and the end-to-end tests against a real
# OpenSSH sshd and PostgreSQL (started on loopback by the test harness).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
cargo test --all-targets --locked
