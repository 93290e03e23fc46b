#!/usr/bin/env bash
# Makes the git ref that Heroku installs the buildpack from. The buildpack registry
# (`heroku buildpacks:publish borealis/postgres-tunnel buildpack-v<version>`) and git URLs
# (`https://github.com/<owner>/<repo>#buildpack-v<version>`) take a repository at a ref and run
# bin/detect and bin/compile from the root of its tree; main keeps the buildpack in buildpack/.
#
#   scripts/buildpack-ref.sh [--from REV]
#
# Makes a commit whose tree is REV's buildpack/ (the released one; default HEAD) with HEAD's
# buildpack/bpg-tunnel.pin (the release pinned, as the release workflow's pin commit has it),
# whose parent is the tip of the `buildpack` branch, and whose identity and dates are HEAD's
# committer's (the same inputs give the same commit). Points the branch `buildpack` (the
# newest) and the tag `buildpack-v<version>` (that release, for users who pin one) at it, and
# prints it. Run again, it changes nothing but to bring the branch up to the tag; a tag once
# made is never moved. Nothing is pushed: the release workflow pushes both refs.
set -euo pipefail
cd "$(dirname "$0")/.."

fail() {
  echo "error: $*" >&2
  exit 1
}

from=HEAD
while [ $# -gt 0 ]; do
  case "$1" in
    --from)
      [ $# -ge 2 ] || fail "usage: scripts/buildpack-ref.sh [--from REV]"
      from=$2
      shift
      ;;
    *) fail "usage: scripts/buildpack-ref.sh [--from REV]" ;;
  esac
  shift
done

git rev-parse -q --verify HEAD >/dev/null || fail "no commit to make the buildpack's ref from"
git diff --quiet HEAD -- buildpack ||
  fail "buildpack/ has changes that are not committed: the ref is made from commits only"
head=$(git rev-parse HEAD)
source=$(git rev-parse -q --verify "$from^{commit}") || fail "$from is not a commit here"
pin() { git show "$head:buildpack/bpg-tunnel.pin" | sed -n "s/^$1=//p" | head -n 1; }
version=$(pin version)
[ -n "$version" ] || fail "buildpack/bpg-tunnel.pin names no version"
# What the registry and git URLs install downloads the pinned release: without a pin it could
# only stop every build.
[ -n "$(pin base)" ] ||
  fail "buildpack/bpg-tunnel.pin names no published release (base is empty): pin one first (scripts/pin.sh, as the release workflow does)"
for target in x86_64-unknown-linux-musl aarch64-unknown-linux-musl; do
  [[ "$(pin "sha256.$target")" =~ ^[0-9a-f]{64}$ ]] ||
    fail "buildpack/bpg-tunnel.pin has no SHA-256 for $target: every target of a release is pinned at once"
done
for file in buildpack.toml bin/detect bin/compile bin/build lib/install.sh; do
  git cat-file -e "$source:buildpack/$file" 2>/dev/null || fail "$from has no buildpack/$file"
done
descriptor=$(git show "$source:buildpack/buildpack.toml" | sed -n 's/^version = "\(.*\)"/\1/p' | head -n 1)
[ "$descriptor" = "$version" ] ||
  fail "buildpack/buildpack.toml of $from says version $descriptor, but bpg-tunnel.pin installs $version"
for program in bin/detect bin/compile bin/build; do
  mode=$(git ls-tree "$source" "buildpack/$program" | cut -d' ' -f1)
  [ "$mode" = 100755 ] || fail "buildpack/$program of $from is not an executable file"
done

# REV's buildpack/ with HEAD's pin, as a tree: built in an index of its own.
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
export GIT_INDEX_FILE="$scratch/index"
git read-tree "$source:buildpack"
git update-index --cacheinfo "100644,$(git rev-parse "$head:buildpack/bpg-tunnel.pin"),bpg-tunnel.pin"
tree=$(git write-tree)
unset GIT_INDEX_FILE

tag="buildpack-v$version"
parent=$(git rev-parse -q --verify refs/heads/buildpack || true)
tagged=false
if commit=$(git rev-parse -q --verify "refs/tags/$tag^{commit}"); then
  [ "$(git rev-parse "$commit^{tree}")" = "$tree" ] ||
    fail "the tag $tag already names another buildpack: a published version is never changed"
  tagged=true
elif [ -n "$parent" ] && [ "$(git rev-parse "$parent^{tree}")" = "$tree" ]; then
  commit=$parent
else
  IFS=$'\t' read -r name email date < <(git show -s --format=$'%cn\t%ce\t%cI' "$head")
  commit=$(GIT_AUTHOR_NAME=$name GIT_AUTHOR_EMAIL=$email GIT_AUTHOR_DATE=$date \
    GIT_COMMITTER_NAME=$name GIT_COMMITTER_EMAIL=$email GIT_COMMITTER_DATE=$date \
    git commit-tree "$tree" ${parent:+-p "$parent"} \
    -m "Buildpack for bpg-tunnel $version" \
    -m "The buildpack/ folder of $source with the release pinned in $head, at the root of the tree, for the buildpack registry and git URLs.")
fi
# The branch only moves forward: to a child of its tip (or, on a re-run whose first push of
# the branch failed, to the tag made then). An empty old value means "must not exist yet".
if [ "$commit" != "$parent" ] &&
  { [ -z "$parent" ] || git merge-base --is-ancestor "$parent" "$commit"; }; then
  git update-ref refs/heads/buildpack "$commit" "$parent"
fi
# A tag is written once, and only where there is none (never rewritten, annotated or not).
$tagged || git update-ref "refs/tags/$tag" "$commit" ""
echo "$commit"
