#!/usr/bin/env bash
# Installs what the tests and the demo need, and nothing when it is already there:
# OpenSSH's sshd, ssh and ssh-keygen, autossh, PostgreSQL's server binaries, psql and pgbench,
# nftables, iproute2's ss, strace, fail2ban (its fail2ban-regex);
# then the toolchain and targets of the release build (scripts/toolchain.sh), the patched
# russh the build needs (scripts/patch-russh.sh), and cargo-deny, which checks the dependency
# tree's licenses, sources and bans (deny.toml).
set -euo pipefail

need=()
[ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v ssh-keygen >/dev/null || need+=(openssh-client)
command -v ssh >/dev/null || need+=(openssh-client)
ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || need+=(postgresql)
command -v psql >/dev/null || need+=(postgresql-client)
command -v pgbench >/dev/null || need+=(postgresql-contrib)
# The fault tests' packet loss.
[ -x /usr/sbin/nft ] || need+=(nftables)
# The health endpoint's test reads socket memory with ss.
command -v ss >/dev/null || need+=(iproute2)
# The profile.d test records the dyno shell's reads and writes.
command -v strace >/dev/null || need+=(strace)
# The benchmark's baseline is the old buildpack's autossh + ssh -L.
command -v autossh >/dev/null || need+=(autossh)
# The fleet tests run fail2ban's sshd filter over the lab sshd's log, as the add-on's server does.
command -v fail2ban-regex >/dev/null || need+=(fail2ban)

if [ ${#need[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "-----> installing ${need[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# Debian's postgresql package starts a cluster of its own; the lab starts private ones instead.
"$(dirname "$0")/toolchain.sh"
"$(dirname "$0")/patch-russh.sh"

# Pinned, and built from its own lock file, so that a new release of it cannot fail a run;
# kept under target/ like the script linters, and built only when that version is not there.
cargo_deny_version=0.20.2
cargo_deny="$(dirname "$0")/../target/tools/bin/cargo-deny"
if [ "$("$cargo_deny" --version 2>/dev/null)" != "cargo-deny $cargo_deny_version" ]; then
  echo "-----> installing cargo-deny $cargo_deny_version in target/tools"
  cargo install --quiet --locked cargo-deny --version "$cargo_deny_version" \
    --root "$(dirname "$0")/../target/tools"
fi
