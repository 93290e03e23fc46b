#!/usr/bin/env bash
# Checks the GitHub Actions workflows with actionlint, which also runs shellcheck on every
# `run:` script; both come as wheels from Python's package index, pinned by hash
# (scripts/lint-workflows.requirements.txt), into a virtualenv of their own under target/.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=target/lint-workflows
if [ ! -x "$venv/bin/actionlint" ] || [ ! -x "$venv/bin/shellcheck" ]; then
  echo "-----> installing actionlint and shellcheck (Python wheels) in $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check --only-binary=:all: \
    --require-hashes -r scripts/lint-workflows.requirements.txt
fi
PATH="$PWD/$venv/bin:$PATH" actionlint .github/workflows/*.yml
