# shellcheck shell=bash
# borealis/postgres-tunnel: starts bpg-tunnel before the app, with this shell ($$, the process
# that becomes or runs the app) as its owner, so it drains with the app and leaves after it.
# Sourced by the dyno's bash: it must never exit, never leave shell options, traps or variables
# behind, and start nothing in `heroku ps:exec` sessions (SSH_CLIENT) or when
# BPG_TUNNEL_DISABLE is set.
# Whether an add-on is attached is decided on the variables' names alone (compgen -e): their
# values hold the add-on's private key and token, which must not be copied again through a
# pipe into this shell (as `$(env)` did) nor shown by a trace of it.
export PATH="$HOME/.borealis-pg/bin:$PATH"
if [ -z "${SSH_CLIENT:-}" ] && [ -z "${BPG_TUNNEL_DISABLE:-}" ] && [ -x "$HOME/.borealis-pg/bin/bpg-tunnel" ]; then
  case $'\n'"$(compgen -e)"$'\n' in
    *$'_TUNNEL_BPG_CONN_INFO\n'* | *$'_SSH_TUNNEL_BPG_CONNECTION_INFO\n'*)
      "$HOME/.borealis-pg/bin/bpg-tunnel" start --owner-pid "$$" || true
      ;;
  esac
fi
