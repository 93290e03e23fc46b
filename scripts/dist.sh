#!/usr/bin/env bash
# Builds the release artifact: a static, stripped x86_64 musl binary, packed as
#   dist/bpg-tunnel-<version>-x86_64-unknown-linux-musl.tar.gz (+ .sha256)
# with fixed owners and timestamps so the tarball depends only on the binary.
#   --pin   also records the tarball's SHA-256 in buildpack/bpg-tunnel.pin (at release time)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/patch-russh.sh

target=x86_64-unknown-linux-musl
pin=false
for arg in "$@"; do
  case "$arg" in
    --pin) pin=true ;;
    *) echo "usage: scripts/dist.sh [--pin]" >&2; exit 2 ;;
  esac
done

# ring compiles C and assembly for the target: it needs musl's gcc wrapper.
if ! command -v musl-gcc >/dev/null; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "-----> installing musl-tools"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends musl-tools >/dev/null
fi
rustup target list --installed | grep -qx "$target" || rustup target add "$target"

version=$(cargo metadata --no-deps --format-version 1 --locked |
  python3 -c 'import json,sys; print(next(p["version"] for p in json.load(sys.stdin)["packages"] if p["name"] == "bpg-tunnel"))')
# Paths of this machine must not end up in the binary (panic locations name source files).
export RUSTFLAGS="${RUSTFLAGS:-} --remap-path-prefix=$PWD=bpg-tunnel --remap-path-prefix=${CARGO_HOME:-$HOME/.cargo}=cargo"
cargo build --release --locked --target "$target"

binary="target/$target/release/bpg-tunnel"
if ! file "$binary" | grep -q "static"; then
  echo "error: $binary is not statically linked: $(file -b "$binary")" >&2
  exit 1
fi

name="bpg-tunnel-$version-$target"
mkdir -p dist
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
install -m 0755 "$binary" "$stage/bpg-tunnel"
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -C "$stage" -cf - bpg-tunnel |
  gzip -n -9 >"dist/$name.tar.gz"
(cd dist && sha256sum "$name.tar.gz" >"$name.tar.gz.sha256")
sha=$(cut -d' ' -f1 "dist/$name.tar.gz.sha256")
echo "dist/$name.tar.gz  $(stat -c %s "dist/$name.tar.gz") bytes (binary $(stat -c %s "$binary") bytes)  sha256 $sha"

if $pin; then
  sed -i -e "s/^version=.*/version=$version/" -e "s/^sha256=.*/sha256=$sha/" buildpack/bpg-tunnel.pin
  echo "pinned $version $sha in buildpack/bpg-tunnel.pin"
fi
