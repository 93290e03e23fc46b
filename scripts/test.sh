#!/usr/bin/env bash
# Runs every test: formatting, lints (the code, and the release workflow), the dependency
# tree's licenses, sources and duplicates (cargo-deny, deny.toml), our russh patch (it still applies to the pinned release;
# russh's own tests and the patch's pass), unit and property tests, and the end-to-end tests
# against a real OpenSSH sshd and PostgreSQL (started on loopback by the test harness), first
# with the debug build, then with the static release binaries (x86_64, and aarch64 under qemu)
# and the self-contained buildpack, which the buildpack tests install the way a user's build
# does. The release is built a second time elsewhere to check that it is reproducible.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
cargo clippy --all-targets --locked --features test-api-ca -- -D warnings
scripts/lint-scripts.sh
# Without the advisories check, which needs a database fetched from GitHub (deny.toml). The
# inclusion graphs are left out of the output: `cargo tree -i CRATE` draws one when needed.
target/tools/bin/cargo-deny --locked check --hide-inclusion-graph bans licenses sources
echo "-----> the x86_64 release, built here and again from another directory: the same bytes?"
scripts/reproducible.sh --target x86_64-unknown-linux-musl
# Both targets and the buildpack holding them.
scripts/dist.sh
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
release_bin="$PWD/target/x86_64-unknown-linux-musl/release/bpg-tunnel"
release_tarball="$PWD/dist/bpg-tunnel-$version-x86_64-unknown-linux-musl.tar.gz"
arm64_tarball="$PWD/dist/bpg-tunnel-$version-aarch64-unknown-linux-musl.tar.gz"
buildpack_tgz="$PWD/dist/bpg-tunnel-buildpack-$version.tgz"

log=$(mktemp)
trap 'rm -f "$log"' EXIT
echo "-----> russh as patched (patches/russh): russh's own tests and the patch's"
scripts/patch-russh.sh --check
# The crate's own lock file, and a target directory of its own: its dev-dependencies are not ours.
cargo test --locked --manifest-path build/russh-from-scripts-patch-russh.sh/Cargo.toml --target-dir target/russh --features misbehave --lib --tests 2>&1 | tee "$log"
echo "-----> unit, property and end-to-end tests (debug build)"
# The `test-api-ca` feature lets the private-app tests' fake API be trusted; release builds lack it.
cargo test --locked --features test-api-ca --lib --bins --test architecture --test tunnel --test check --test flow_control --test lifecycle --test private_app --test secrets --test operability --test health --test hostile_server --test faults 2>&1 | tee -a "$log"
echo "-----> end-to-end and install tests (static release binary: $release_bin)"
BPG_TUNNEL_BIN="$release_bin" BPG_TUNNEL_DIST="$release_tarball" \
  BPG_TUNNEL_DIST_AARCH64="$arm64_tarball" BPG_TUNNEL_BUILDPACK="$buildpack_tgz" \
  cargo test --locked --test tunnel --test check --test flow_control --test lifecycle --test secrets --test operability --test health --test hostile_server --test faults --test fleet --test buildpack 2>&1 | tee -a "$log"
# Of the private-app tests, the one about the release build itself: it must not trust the tests' CA.
BPG_TUNNEL_BIN="$release_bin" \
  cargo test --locked --test private_app -- --exact the_tests_api_ca_is_trusted_by_test_builds_only 2>&1 | tee -a "$log"
echo "-----> benchmark smoke run: one short round against ssh -L, so the benchmark cannot rot"
BPG_TUNNEL_BIN="$release_bin" cargo bench --locked --profile dev --bench tunnel -- --smoke
# One closing line for the whole run, whatever order cargo printed its targets in.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed/) p += $(i-1); if ($i ~ /^failed/) f += $(i-1) } }
     END { printf "total: %d passed, %d failed\n", p, f }' "$log"
