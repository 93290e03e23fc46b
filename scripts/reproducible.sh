#!/usr/bin/env bash
# Checks that a release is reproducible: builds it a second time from a copy of this checkout
# at another path, with another CARGO_HOME, target directory, user name, umask and time zone, at
# another time, and compares every tarball's SHA-256 with the first build's (scripts/dist.sh,
# here, first). Prints both, and fails on any difference.
#   scripts/reproducible.sh [--target T]...   (the targets to compare; default: both)
set -euo pipefail
cd "$(dirname "$0")/.."

args=("$@")
targets=()
while [ $# -gt 0 ]; do
  case "$1" in
    --target) targets+=("$2"); shift 2 ;;
    *) echo "usage: scripts/reproducible.sh [--target T]..." >&2; exit 2 ;;
  esac
done
[ ${#targets[@]} -gt 0 ] || targets=(x86_64-unknown-linux-musl aarch64-unknown-linux-musl)
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)

# The first build, here (quick when cargo's output is up to date): never an older dist/.
scripts/dist.sh "${args[@]}"

work=$(mktemp -d /tmp/bpg-tunnel-second-build.XXXXXX)
trap 'rm -rf "$work"' EXIT
# The files a clean checkout has (tracked and new, not ignored), at another path.
copy="$work/elsewhere/src"
mkdir -p "$copy"
git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' file; do
  if [ -e "$file" ]; then cp --parents -P "$file" "$copy/"; fi
done
# Another CARGO_HOME, seeded with the crate archives and index so nothing is downloaded again;
# cargo unpacks the sources there, under the new path.
cargo_home=${CARGO_HOME:-$HOME/.cargo}
mkdir -p "$work/cargo-home/registry" "$work/home"
for part in cache index; do
  [ -d "$cargo_home/registry/$part" ] && cp -R "$cargo_home/registry/$part" "$work/cargo-home/registry/"
done

echo "-----> second build in $copy (CARGO_HOME=$work/cargo-home)"
(
  cd "$copy"
  umask 0002
  env CARGO_HOME="$work/cargo-home" CARGO_TARGET_DIR="$work/target" \
    RUSTUP_HOME="${RUSTUP_HOME:-$HOME/.rustup}" PATH="$cargo_home/bin:$PATH" \
    HOME="$work/home" USER=second-builder LOGNAME=second-builder TZ=Pacific/Kiritimati \
    scripts/dist.sh "${args[@]}"
)

status=0
compare() { # compare NAME: the same file in both dist/ directories
  local first second
  first=$(sha256sum "dist/$1" | cut -d' ' -f1)
  second=$(sha256sum "$copy/dist/$1" | cut -d' ' -f1)
  if [ "$first" = "$second" ]; then
    echo "reproducible: $1  sha256 $first (both builds)"
  else
    echo "NOT reproducible: $1  first build $first, second build $second" >&2
    status=1
  fi
}
for target in "${targets[@]}"; do
  compare "bpg-tunnel-$version-$target.tar.gz"
done
# The buildpack holds every target's tarball: comparable when both builds made all of them.
[ ${#args[@]} -gt 0 ] || compare "bpg-tunnel-buildpack-$version.tgz"
exit $status
