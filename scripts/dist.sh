#!/usr/bin/env bash
# Builds the release artifacts, the same bytes from the same commit wherever and whenever it runs
# (scripts/reproducible.sh checks that): for each target, a static, stripped musl binary packed as
#   dist/bpg-tunnel-<version>-<target>.tar.gz (+ .sha256)
# and the self-contained buildpack holding them,
#   dist/bpg-tunnel-buildpack-<version>.tgz (+ .sha256), unpacked in dist/buildpack/
# which installs with no download (Heroku takes the .tgz's URL as a buildpack; `pack buildpack
# package` makes the CNB package from dist/buildpack/).
#   --target T   build only T (repeatable); default: x86_64- and aarch64-unknown-linux-musl
#   --pin        also record the version and checksums in buildpack/bpg-tunnel.pin and
#                Dockerfile.example (scripts/pin.sh), with BPG_TUNNEL_RELEASE_BASE, if set, as
#                the address releases are downloaded from
set -euo pipefail
cd "$(dirname "$0")/.."

targets=()
pin=false
while [ $# -gt 0 ]; do
  case "$1" in
    --pin) pin=true ;;
    --target)
      [ $# -ge 2 ] || { echo "usage: scripts/dist.sh [--target T]... [--pin]" >&2; exit 2; }
      targets+=("$2")
      shift
      ;;
    *) echo "usage: scripts/dist.sh [--target T]... [--pin]" >&2; exit 2 ;;
  esac
  shift
done
[ ${#targets[@]} -gt 0 ] || targets=(x86_64-unknown-linux-musl aarch64-unknown-linux-musl)

scripts/toolchain.sh "${targets[@]}"
scripts/patch-russh.sh
pinned=$(sed -n 's/^channel = "\(.*\)"/\1/p' rust-toolchain.toml)
compiler=$(rustc --version | awk '{print $2}')
if [ "$compiler" != "$pinned" ]; then
  echo "error: rustc is $compiler, but rust-toolchain.toml pins $pinned: a release is built with the pinned one" >&2
  exit 1
fi
# The flags below are all a release is built with: flags from the environment would make it
# differ from the same commit built elsewhere (and RUSTFLAGS would override the remaps).
for var in RUSTFLAGS CARGO_ENCODED_RUSTFLAGS CARGO_BUILD_RUSTFLAGS; do
  if [ -n "${!var:-}" ]; then
    echo "warning: $var is ignored by scripts/dist.sh" >&2
    unset "$var"
  fi
done

version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)

# What makes two builds of one commit differ, and what pins it:
# - the checkout's path, CARGO_HOME and the target directory end up in panic locations and in C
#   objects' __FILE__ strings: remapped to fixed names, for rustc and for the C compilers;
# - mimalloc prints the time it was compiled (__DATE__, __TIME__): fixed for both C compilers
#   (clang 14 does not read SOURCE_DATE_EPOCH);
# - the toolchain: rust-toolchain.toml; the C compilers and musl: Debian's packages;
# - archive metadata: sorted names, fixed owners, modes and times, gzip without name or time.
# Debug info and symbols are stripped (Cargo.toml's release profile).
cargo_home=${CARGO_HOME:-$HOME/.cargo}
target_dir=${CARGO_TARGET_DIR:-$PWD/target}
remaps=("$PWD=/bpg-tunnel" "$cargo_home=/cargo" "$target_dir=/target")
rustflags=""
cflags="-Wno-builtin-macro-redefined -D__DATE__=\"Jan_01_1970\" -D__TIME__=\"00:00:00\""
for remap in "${remaps[@]}"; do
  rustflags+=" --remap-path-prefix=$remap"
  cflags+=" -ffile-prefix-map=$remap"
done

# ring and mimalloc compile C for the target. x86_64: musl's gcc wrapper. aarch64: clang (the cc
# crate gives it the target) against Debian's arm64 musl headers, linked by the rust-lld that
# ships with the toolchain (the musl target brings its own crt objects and libc.a).
export CC_x86_64_unknown_linux_musl=musl-gcc
export CFLAGS_x86_64_unknown_linux_musl="$cflags"
if [[ " ${targets[*]} " == *" aarch64-unknown-linux-musl "* ]]; then
  export CC_aarch64_unknown_linux_musl=clang
  export AR_aarch64_unknown_linux_musl=llvm-ar
  # -nostdinc: clang would otherwise read this machine's glibc headers.
  clang_include="$(clang -print-resource-dir)/include"
  export CFLAGS_aarch64_unknown_linux_musl="-nostdinc -isystem /usr/include/aarch64-linux-musl -isystem $clang_include $cflags"
  export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_LINKER=rust-lld
fi
export CARGO_TARGET_X86_64_UNKNOWN_LINUX_MUSL_RUSTFLAGS="$rustflags"
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_RUSTFLAGS="$rustflags"

# tar and gzip with nothing of this machine or this moment in the archive.
pack() { # pack ARCHIVE DIR ENTRY...
  local archive=$1 dir=$2
  shift 2
  tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 --mode=u=rwX,go=rX \
    --format=gnu -C "$dir" -cf - "$@" | gzip -n -9 >"$archive"
  (cd "$(dirname "$archive")" && sha256sum "$(basename "$archive")" >"$(basename "$archive").sha256")
}

mkdir -p dist
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
declare -A sha
for target in "${targets[@]}"; do
  echo "-----> building bpg-tunnel $version for $target"
  cargo build --release --locked --target "$target"
  binary="$target_dir/$target/release/bpg-tunnel"
  if ! file "$binary" | grep -q "static"; then
    echo "error: $binary is not statically linked: $(file -b "$binary")" >&2
    exit 1
  fi
  name="bpg-tunnel-$version-$target"
  mkdir -p "$stage/$target"
  install -m 0755 "$binary" "$stage/$target/bpg-tunnel"
  pack "dist/$name.tar.gz" "$stage/$target" bpg-tunnel
  sha[$target]=$(cut -d' ' -f1 "dist/$name.tar.gz.sha256")
  echo "dist/$name.tar.gz  $(stat -c %s "dist/$name.tar.gz") bytes (binary $(stat -c %s "$binary") bytes)  sha256 ${sha[$target]}"
done


# The self-contained buildpack: the buildpack's files, the tarballs in vendor/, and a pin naming
# their checksums (and none for a target not built here: the buildpack refuses that one).
rm -rf dist/buildpack
cp -R buildpack dist/buildpack
mkdir -p dist/buildpack/vendor
sed -i -e "s/^version=.*/version=$version/" -e "s/^\(sha256\.[^=]*\)=.*/\1=/" dist/buildpack/bpg-tunnel.pin
for target in "${targets[@]}"; do
  cp "dist/bpg-tunnel-$version-$target.tar.gz" dist/buildpack/vendor/
  sed -i "s/^sha256\.$target=.*/sha256.$target=${sha[$target]}/" dist/buildpack/bpg-tunnel.pin
done
mapfile -t entries < <(cd dist/buildpack && find . -mindepth 1 -maxdepth 1 -printf '%P\n' | sort)
pack "dist/bpg-tunnel-buildpack-$version.tgz" dist/buildpack "${entries[@]}"
echo "dist/bpg-tunnel-buildpack-$version.tgz  $(stat -c %s "dist/bpg-tunnel-buildpack-$version.tgz") bytes  sha256 $(cut -d' ' -f1 "dist/bpg-tunnel-buildpack-$version.tgz.sha256")"

if $pin; then
  scripts/pin.sh "$version" dist "${BPG_TUNNEL_RELEASE_BASE:-}"
fi
