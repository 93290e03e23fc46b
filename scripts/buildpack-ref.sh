#!/usr/bin/env bash
# Makes the git ref that Heroku installs the buildpack from. The buildpack registry
# (`heroku buildpacks:publish borealis/postgres-tunnel buildpack-v<version>`) and git URLs
# (`https://github.com/<owner>/<repo>#buildpack-v<version>`) take a repository at a ref and run
# bin/detect and bin/compile from the root of its tree; main keeps the buildpack in buildpack/.
#
#   scripts/buildpack-ref.sh
#
# From HEAD's buildpack/ (committed, with a published release pinned in bpg-tunnel.pin, as the
# release workflow's pin commit has it), makes a commit whose tree is that folder, whose parent
# is the previous tip of the `buildpack` branch, and whose dates are HEAD's (so the same HEAD
# and parent always give the same commit); points the branch `buildpack` (the latest) and the
# tag `buildpack-v<version>` (that release, for users who pin one) at it, and prints it. Run
# again, it changes nothing; a tag already made is never moved. Nothing is pushed: the release
# workflow pushes both refs.
set -euo pipefail
cd "$(dirname "$0")/.."

fail() {
  echo "error: $*" >&2
  exit 1
}

git rev-parse -q --verify HEAD >/dev/null || fail "no commit to make the buildpack's ref from"
git diff --quiet HEAD -- buildpack ||
  fail "buildpack/ has changes that are not committed: the ref is made from HEAD's buildpack/"
head=$(git rev-parse HEAD)
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
descriptor=$(git show "$head:buildpack/buildpack.toml" | sed -n 's/^version = "\(.*\)"/\1/p' | head -n 1)
[ "$descriptor" = "$version" ] ||
  fail "buildpack/buildpack.toml says version $descriptor, but bpg-tunnel.pin installs $version"
for program in bin/detect bin/compile bin/build; do
  mode=$(git ls-tree "$head" "buildpack/$program" | cut -d' ' -f1)
  [ "$mode" = 100755 ] || fail "buildpack/$program is not committed as an executable file"
done

tree=$(git rev-parse "$head:buildpack")
tag="buildpack-v$version"
parent=$(git rev-parse -q --verify refs/heads/buildpack || true)
if existing=$(git rev-parse -q --verify "refs/tags/$tag^{commit}"); then
  [ "$(git rev-parse "$existing^{tree}")" = "$tree" ] ||
    fail "the tag $tag already names another buildpack: a published version is never changed"
  echo "$existing"
  exit 0
fi
if [ -n "$parent" ] && [ "$(git rev-parse "$parent^{tree}")" = "$tree" ]; then
  commit=$parent
else
  # The commit's identity and dates are HEAD's committer's: the same inputs, the same commit.
  IFS=$'\t' read -r name email date < <(git show -s --format=$'%cn\t%ce\t%cI' "$head")
  commit=$(GIT_AUTHOR_NAME=$name GIT_AUTHOR_EMAIL=$email GIT_AUTHOR_DATE=$date \
    GIT_COMMITTER_NAME=$name GIT_COMMITTER_EMAIL=$email GIT_COMMITTER_DATE=$date \
    git commit-tree "$tree" ${parent:+-p "$parent"} \
    -m "Buildpack for bpg-tunnel $version" \
    -m "The buildpack/ folder of $head, at the root of the tree, for the buildpack registry and git URLs.")
  # A child of the branch's tip: the branch only moves forward.
  git update-ref refs/heads/buildpack "$commit" ${parent:+"$parent"}
fi
git update-ref "refs/tags/$tag" "$commit"
echo "$commit"
