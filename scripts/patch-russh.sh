#!/usr/bin/env bash
# Prepares the russh that Cargo.toml's [patch.crates-io] points at: russh as published on
# crates.io, with our patches (patches/russh/*.patch) applied, in build/ (ignored by git).
# Every script under scripts/ runs it first; run it yourself before a plain `cargo build`.
#   scripts/patch-russh.sh           prepare (nothing to do when it is up to date)
#   scripts/patch-russh.sh --check   only check that the patches apply to the pinned release
# Cargo fetches the crate; its SHA-256 must be the one pinned here (Cargo.lock records a patched
# crate as a path dependency, without a checksum, so this is where the check happens).
set -euo pipefail
cd "$(dirname "$0")/.."

version=0.65.1
sha256=94be3d86c71b9ed220a675c405e35c7a02565a009bf8da2e9cc13a700320a5c5
dest=build/russh-from-scripts-patch-russh.sh

check_only=false
case "${1:-}" in
  "") ;;
  --check) check_only=true ;;
  *) echo "usage: scripts/patch-russh.sh [--check]" >&2; exit 2 ;;
esac

patches=(patches/russh/*.patch)

# The locked russh must be this release, taken from our patched copy (a path dependency, which
# Cargo.lock records without a source); otherwise the build would use another russh.
locked=$(awk '/^name = "russh"$/ { getline; gsub(/[^0-9.]/, ""); print }' Cargo.lock)
locked_source=$(awk '/^name = "russh"$/ { getline; getline; if ($1 == "source") print $3 }' Cargo.lock)
if [ "$locked" != "$version" ] || [ -n "$locked_source" ]; then
  echo "error: Cargo.lock has russh $locked ${locked_source:+from $locked_source }but scripts/patch-russh.sh prepares $version as a path dependency (Cargo.toml pins =$version)" >&2
  exit 1
fi

# What the prepared copy was made from: the release, this script and every patch (kept in full,
# so that build.rs can tell a plain `cargo build` that the copy is stale).
stamp_of() { cat scripts/patch-russh.sh "${patches[@]}" | sha256sum | cut -d' ' -f1; }
stamp="$version $sha256 $(stamp_of)"
if ! $check_only && [ -f "$dest/.bpg-tunnel-patched" ] && [ "$(cat "$dest/.bpg-tunnel-patched")" = "$stamp" ]; then
  exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# A throwaway package that depends on exactly this release: `cargo fetch` puts the published
# .crate in cargo's cache (downloading it only if it is not there yet).
mkdir -p "$work/fetch/src"
touch "$work/fetch/src/lib.rs"
cat >"$work/fetch/Cargo.toml" <<TOML
[package]
name = "bpg-tunnel-fetch-russh"
version = "0.0.0"
edition = "2021"
publish = false
[dependencies]
russh = { version = "=$version", default-features = false }
TOML
cargo fetch --quiet --manifest-path "$work/fetch/Cargo.toml"
# Cargo keeps one cache per registry index; the published crate is the one with the pinned digest.
crate=""
for candidate in "${CARGO_HOME:-${HOME:-}/.cargo}"/registry/cache/*/"russh-$version.crate"; do
  [ -f "$candidate" ] || continue
  if [ "$(sha256sum "$candidate" | cut -d' ' -f1)" = "$sha256" ]; then
    crate=$candidate
    break
  fi
  echo "warning: $candidate has SHA-256 $(sha256sum "$candidate" | cut -d' ' -f1), not the published $sha256; skipped" >&2
done
if [ -z "$crate" ]; then
  echo "error: cargo fetched russh $version, but no copy in cargo's cache (${CARGO_HOME:-${HOME:-}/.cargo}/registry/cache) has the published SHA-256 $sha256" >&2
  exit 1
fi

# Unpacked from the verified archive, not from cargo's unpacked copy, which is not checked.
tar -xzf "$crate" -C "$work"
src="$work/russh-$version"
# Its own repository, so that `git apply` patches it like GNU patch would, and no other tree.
git -C "$src" init -q
for patch in "${patches[@]}"; do
  if ! git -C "$src" apply --check "$PWD/$patch" 2>"$work/apply.log"; then
    echo "error: $patch does not apply to russh $version:" >&2
    cat "$work/apply.log" >&2
    exit 1
  fi
  git -C "$src" apply "$PWD/$patch"
done
rm -rf "$src/.git"
if $check_only; then
  echo "patches/russh applies cleanly to russh $version (sha256 $sha256)"
  exit 0
fi

echo "$stamp" >"$src/.bpg-tunnel-patched"
cat "${patches[@]}" >"$src/.bpg-tunnel-patches"
mkdir -p "$(dirname "$dest")"
rm -rf "$dest"
# -T: fail rather than land inside a copy another run has just put there.
mv -T "$src" "$dest"
echo "-----> russh $version patched in $dest (${#patches[@]} patch(es) from patches/russh)"
