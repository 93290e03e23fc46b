#!/usr/bin/env bash
# Records a release in buildpack/bpg-tunnel.pin, which the git-tree buildpack installs, and in
# Dockerfile.example's defaults (tests/buildpack.rs checks that the two agree):
#   scripts/pin.sh VERSION DIR [BASE]
# VERSION: the release; DIR: where its tarballs' .sha256 files are (dist/ after scripts/dist.sh,
# or the release's downloads); BASE: the address releases are downloaded from, which replaces
# the pin's when given. A target without a .sha256 in DIR keeps what the pin says of it.
set -euo pipefail
[ $# -ge 2 ] && [ $# -le 3 ] || { echo "usage: scripts/pin.sh VERSION DIR [BASE]" >&2; exit 2; }
version=$1 base=${3:-}
dir=$(cd "$2" && pwd)
cd "$(dirname "$0")/.."

pin=buildpack/bpg-tunnel.pin
previous=$(sed -n 's/^version=//p' "$pin")
# Every checksum is read before anything is written: a refused pin leaves both files as they were.
declare -A sha
for target in x86_64-unknown-linux-musl aarch64-unknown-linux-musl; do
  sums="$dir/bpg-tunnel-$version-$target.tar.gz.sha256"
  if [ -f "$sums" ]; then
    sha[$target]=$(cut -d' ' -f1 "$sums")
    if [[ ! "${sha[$target]}" =~ ^[0-9a-f]{64}$ ]]; then
      echo "error: $sums holds no SHA-256" >&2
      exit 1
    fi
  elif [ "$previous" = "$version" ]; then
    sha[$target]=$(sed -n "s/^sha256\.$target=//p" "$pin")
  else
    # Another version's checksum would only make every install of this target fail.
    echo "error: no $sums: a new version is pinned for every target at once" >&2
    exit 1
  fi
done

sed -i "s|^version=.*|version=$version|" "$pin"
[ -z "$base" ] || sed -i "s|^base=.*|base=$base|" "$pin"
sed -i -e "s|^ARG BPG_TUNNEL_VERSION=.*|ARG BPG_TUNNEL_VERSION=$version|" \
  -e "s|^ARG BPG_TUNNEL_RELEASES=.*|ARG BPG_TUNNEL_RELEASES=$(sed -n 's/^base=//p' "$pin")|" Dockerfile.example
for target in "${!sha[@]}"; do
  sed -i "s|^sha256\.$target=.*|sha256.$target=${sha[$target]}|" "$pin"
  arch=${target%%-*}
  sed -i "s|^ARG BPG_TUNNEL_SHA256_${arch^^}=.*|ARG BPG_TUNNEL_SHA256_${arch^^}=${sha[$target]}|" Dockerfile.example
done
echo "pinned bpg-tunnel $version in $pin and Dockerfile.example:"
grep -v '^#' "$pin" | sed 's/^/  /'
