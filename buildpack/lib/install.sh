# Sourced by bin/compile (classic) and bin/build (CNB): downloads the pinned bpg-tunnel release,
# verifies its SHA-256, caches it, and installs the binary.
#
# bpg_install DEST_BIN_DIR CACHE_DIR URL_OVERRIDE SHA256_OVERRIDE
#   URL_OVERRIDE (BPG_TUNNEL_BINARY_URL) replaces the pinned download source; file:// works.
#   SHA256_OVERRIDE (BPG_TUNNEL_BINARY_SHA256) is the checksum to expect; without it an
#   overridden URL is checked against the .sha256 file published next to it, which catches a
#   corrupt or truncated download but not a hostile mirror: set both to pin a mirror.
# Sets BPG_INSTALLED_VERSION and BPG_INSTALLED_SHA256.

bpg_step() { echo "-----> $*"; }
bpg_info() { echo "       $*"; }
bpg_fail() {
  local line
  for line in "$@"; do echo " !     $line" >&2; done
  exit 1
}

# A presigned URL carries its credentials in the query string: never print it.
bpg_redact() { echo "${1%%\?*}"; }

bpg_pin() {
  sed -n "s/^$1=//p" "$(dirname "${BASH_SOURCE[0]}")/../bpg-tunnel.pin" | head -n 1
}

bpg_fetch() {
  curl --fail --silent --show-error --location --retry 3 --retry-connrefused \
    --connect-timeout 10 --max-time 300 --output "$2" "$1"
}

bpg_install() {
  local dest=$1 cache=$2 url=$3 sha=$4 version sha_source="BPG_TUNNEL_BINARY_SHA256"
  version=$(bpg_pin version)
  if [ -z "$url" ]; then
    url=$(bpg_pin url)
    url=${url//\{version\}/$version}
    if [ -z "$sha" ]; then
      sha=$(bpg_pin sha256)
      sha_source="the sha256 in bpg-tunnel.pin"
    fi
  else
    version="from $(bpg_redact "$url")"
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
    bpg_step "Using cached bpg-tunnel $version"
  else
    bpg_step "Downloading bpg-tunnel $version"
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
  local said
  said=$("$dest/bpg-tunnel" --version 2>&1) ||
    bpg_fail "The installed bpg-tunnel does not run on this stack: $said"
  bpg_info "Installed $said (sha256 $sha)"
  BPG_INSTALLED_VERSION=${said#bpg-tunnel }
  BPG_INSTALLED_SHA256=$sha
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
