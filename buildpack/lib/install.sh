# shellcheck shell=bash
# Sourced by bin/compile (classic) and bin/build (CNB): installs the bpg-tunnel binary for the
# build machine's architecture, verified against a SHA-256, from the first of:
#   1. BPG_TUNNEL_BINARY_URL (file:// works), checked against BPG_TUNNEL_BINARY_SHA256, or
#      without it against the .sha256 file published next to it (which catches a corrupt or
#      truncated download but not a hostile mirror: set both to pin a mirror);
#   2. the tarball in this buildpack's vendor/ (the self-contained buildpack: no download);
#   3. the release pinned in bpg-tunnel.pin, downloaded and kept in the cache.
#
# bpg_install DEST_BIN_DIR CACHE_DIR URL_OVERRIDE SHA256_OVERRIDE
# Sets BPG_INSTALLED_VERSION, BPG_INSTALLED_SHA256 and BPG_INSTALLED_TARGET, which bin/build reads.
# shellcheck disable=SC2034

bpg_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

bpg_step() { echo "-----> $*"; }
bpg_info() { echo "       $*"; }
bpg_fail() {
  local line
  for line in "$@"; do echo " !     $line" >&2; done
  exit 1
}

# A URL may carry credentials, in its query string (presigned) or before its host
# (user:token@): never print them.
bpg_redact() {
  local url=${1%%\?*} scheme rest authority
  case "$url" in
    *://*)
      scheme=${url%%://*}
      rest=${url#*://}
      authority=${rest%%/*}
      rest=${rest#"$authority"}
      echo "$scheme://${authority##*@}$rest"
      ;;
    *) echo "$url" ;;
  esac
}

# The ELF machine of FILE, as a target's architecture: x86_64, aarch64, or what it is not.
bpg_elf_arch() {
  case "$(od -An -tx1 -j18 -N2 "$1" 2>/dev/null | tr -d ' \n')" in
    3e00) echo x86_64 ;;
    b700) echo aarch64 ;;
    *) echo "neither x86_64 nor aarch64" ;;
  esac
}

bpg_pin() {
  sed -n "s/^$1=//p" "$bpg_dir/bpg-tunnel.pin" | head -n 1
}

# The Rust target of the machine the app will run on: CNB_TARGET_ARCH (set by CNB platforms
# for the image being built), else this machine's.
bpg_target() {
  local arch=${CNB_TARGET_ARCH:-$(uname -m)}
  case "$arch" in
    amd64 | x86_64) echo x86_64-unknown-linux-musl ;;
    arm64 | aarch64) echo aarch64-unknown-linux-musl ;;
    *) return 1 ;;
  esac
}

bpg_fetch() {
  curl --fail --silent --show-error --location --retry 3 --retry-connrefused \
    --connect-timeout 10 --max-time 300 --output "$2" "$1"
}

bpg_install() {
  local dest=$1 cache=$2 url=$3 sha=$4 target version from pinned=true sha_source="BPG_TUNNEL_BINARY_SHA256"
  target=$(bpg_target) ||
    bpg_fail "bpg-tunnel is built for x86_64 (amd64) and aarch64 (arm64) Linux; this build is for ${CNB_TARGET_ARCH:-$(uname -m)}."
  version=$(bpg_pin version)
  local vendored="$bpg_dir/vendor/bpg-tunnel-$version-$target.tar.gz"
  if [ -n "$url" ]; then
    pinned=false
    from="from $(bpg_redact "$url")"
  elif [ -f "$vendored" ]; then
    url="file://$vendored"
    from="$version ($target) from this buildpack"
  else
    local base
    base=$(bpg_pin base)
    if [ -z "$base" ] || [ -z "$(bpg_pin "sha256.$target")" ]; then
      bpg_fail "This buildpack pins no published bpg-tunnel $version release for $target yet." \
        "Install the self-contained buildpack (bpg-tunnel-buildpack-<version>.tgz, from the project's" \
        "releases or scripts/dist.sh), or set BPG_TUNNEL_BINARY_URL and BPG_TUNNEL_BINARY_SHA256."
    fi
    url="$base/v$version/bpg-tunnel-$version-$target.tar.gz"
    from="$version ($target)"
  fi
  if $pinned && [ -z "$sha" ]; then
    sha=$(bpg_pin "sha256.$target")
    sha_source="the sha256.$target in bpg-tunnel.pin"
  fi
  if [ -z "$sha" ]; then
    case "$url" in
      *\?*) bpg_fail "BPG_TUNNEL_BINARY_URL has a query string, so no .sha256 can be fetched next to it." \
        "Set BPG_TUNNEL_BINARY_SHA256 to the SHA-256 of the tarball." ;;
    esac
    sha_source="$(bpg_redact "$url").sha256"
    local sums
    sums=$(mktemp)
    if ! bpg_fetch "$url.sha256" "$sums"; then
      rm -f "$sums"
      bpg_fail "Could not download $(bpg_redact "$url").sha256 to check BPG_TUNNEL_BINARY_URL against." \
        "Set BPG_TUNNEL_BINARY_SHA256 to the SHA-256 of the tarball, or publish the .sha256 file next to it."
    fi
    sha=$(cut -d' ' -f1 <"$sums")
    rm -f "$sums"
  fi
  sha=$(echo "$sha" | tr 'A-F' 'a-f')
  case "$sha" in
    *[!0-9a-f]* | "") bpg_fail "$sha_source is not a SHA-256: expected 64 hex digits." ;;
  esac
  [ ${#sha} -eq 64 ] || bpg_fail "$sha_source is not a SHA-256: expected 64 hex digits, got ${#sha}."

  mkdir -p "$cache/bpg-tunnel" "$dest"
  local tarball="$cache/bpg-tunnel/$sha.tar.gz"
  if [ -f "$tarball" ] && echo "$sha  $tarball" | sha256sum --check --status; then
    bpg_step "Using cached bpg-tunnel $from"
  else
    case "$url" in
      "file://$vendored") bpg_step "Installing bpg-tunnel $from" ;;
      *) bpg_step "Downloading bpg-tunnel $from" ;;
    esac
    local partial="$tarball.partial"
    if ! bpg_fetch "$url" "$partial"; then
      rm -f "$partial"
      bpg_fail "Could not download bpg-tunnel from $(bpg_redact "$url")." \
        "Check BPG_TUNNEL_BINARY_URL if you set it, or retry the build."
    fi
    local got
    got=$(sha256sum "$partial" | cut -d' ' -f1)
    if [ "$got" != "$sha" ]; then
      rm -f "$partial"
      bpg_fail "Checksum mismatch for $(bpg_redact "$url"):" \
        "expected SHA-256 $sha" \
        "     got SHA-256 $got" \
        "The download is corrupt or is not the release this build expects; stopping so that an" \
        "unverified binary never runs beside your app."
    fi
    # Older versions are no longer wanted: keep the cache to the one in use.
    find "$cache/bpg-tunnel" -name '*.tar.gz' ! -name "$sha.tar.gz" -delete
    mv "$partial" "$tarball"
  fi

  tar -xzf "$tarball" -C "$dest" bpg-tunnel ||
    bpg_fail "The bpg-tunnel tarball has no bpg-tunnel binary at its top level."
  chmod 0755 "$dest/bpg-tunnel"
  # A binary of another architecture would keep every process from starting (exec.d runs it).
  local arch
  arch=$(bpg_elf_arch "$dest/bpg-tunnel")
  if [ "$arch" != "${target%%-*}" ]; then
    rm -f "$dest/bpg-tunnel"
    bpg_fail "The bpg-tunnel binary from $(bpg_redact "$url") is for $arch, but this build is for $target."
  fi
  BPG_INSTALLED_TARGET=$target
  BPG_INSTALLED_SHA256=$sha
  if [ "$target" = "$(CNB_TARGET_ARCH='' bpg_target)" ]; then
    local said
    said=$("$dest/bpg-tunnel" --version 2>&1) ||
      bpg_fail "The installed bpg-tunnel does not run on this stack: $said"
    bpg_info "Installed $said for $target (sha256 $sha)"
    BPG_INSTALLED_VERSION=${said#bpg-tunnel }
  else
    # An image for another architecture: the binary cannot run on this machine to say so.
    bpg_info "Installed bpg-tunnel for $target, not run on this $(uname -m) machine (sha256 $sha)"
    BPG_INSTALLED_VERSION=$version
  fi
}

# bpg_setting NAME ENV_DIR: a config var from ENV_DIR (classic) or a platform env dir (CNB),
# else the environment.
bpg_setting() {
  if [ -n "${2:-}" ] && [ -f "$2/$1" ]; then
    cat "$2/$1"
  else
    printenv "$1" || true
  fi
}
