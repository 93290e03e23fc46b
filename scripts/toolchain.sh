#!/usr/bin/env bash
# Installs what building the release needs, and nothing when it is already there:
#   scripts/toolchain.sh [TARGET...]   (default: x86_64- and aarch64-unknown-linux-musl)
# - the Rust toolchain rust-toolchain.toml pins, with the targets' standard libraries;
# - for x86_64 musl: musl's gcc wrapper (ring and mimalloc compile C);
# - for aarch64 musl, cross-compiled on any Debian machine: clang and llvm-ar, Debian's arm64
#   musl headers, and qemu-user-static to run the result in the tests;
# - `file`, which dist.sh uses to check that a binary is static.
set -euo pipefail
cd "$(dirname "$0")/.."

targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(x86_64-unknown-linux-musl aarch64-unknown-linux-musl)

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
apt_install() {
  echo "-----> installing $*"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

command -v rustup >/dev/null || { echo "error: rustup is required (https://rustup.rs)" >&2; exit 1; }
pinned=$(sed -n 's/^channel = "\(.*\)"/\1/p' rust-toolchain.toml)
if ! rustup toolchain list | grep -q "^$pinned-"; then
  # The pinned release may already be here as "stable" (machines that cannot download another
  # toolchain): link it under its version if it is that very release; else let rustup fetch it.
  stable=$(rustup run stable rustc --version 2>/dev/null | awk '{print $2}' || true)
  if [ "$stable" = "$pinned" ]; then
    host=$(rustup run stable rustc -vV | sed -n 's/^host: //p')
    ln -s "$(rustup run stable rustc --print sysroot)" "${RUSTUP_HOME:-$HOME/.rustup}/toolchains/$pinned-$host"
  else
    rustup toolchain install "$pinned" --profile minimal --component rustfmt,clippy
  fi
fi
installed=$(rustup target list --installed)
for target in "${targets[@]}"; do
  grep -qx "$target" <<<"$installed" || rustup target add "$target"
done

need=()
command -v file >/dev/null || need+=(file)
for target in "${targets[@]}"; do
  case "$target" in
    x86_64-unknown-linux-musl)
      command -v musl-gcc >/dev/null || need+=(musl-tools)
      ;;
    aarch64-unknown-linux-musl)
      if [ ! -f /usr/include/aarch64-linux-musl/stdlib.h ]; then
        dpkg --print-foreign-architectures | grep -qx arm64 || $sudo dpkg --add-architecture arm64
        need+=(musl-dev:arm64)
      fi
      command -v clang >/dev/null || need+=(clang)
      command -v llvm-ar >/dev/null || need+=(llvm)
      command -v qemu-aarch64-static >/dev/null || need+=(qemu-user-static)
      ;;
    *) echo "error: scripts/toolchain.sh knows no way to build $target" >&2; exit 1 ;;
  esac
done
[ ${#need[@]} -eq 0 ] || apt_install "${need[@]}"
