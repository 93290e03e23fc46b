# borealis/postgres-tunnel: starts bpg-tunnel before the app, with this shell ($$, the process
# that becomes or runs the app) as its owner, so it drains with the app and leaves after it.
# Sourced by the dyno's bash: it must never exit, never leave shell options or traps behind,
# and start nothing in `heroku ps:exec` sessions (SSH_CLIENT) or when BPG_TUNNEL_DISABLE is set.
export PATH="$HOME/.borealis-pg/bin:$PATH"
if [ -z "${SSH_CLIENT:-}" ] && [ -z "${BPG_TUNNEL_DISABLE:-}" ] && [ -x "$HOME/.borealis-pg/bin/bpg-tunnel" ]; then
  case "$(env)" in
    *_TUNNEL_BPG_CONN_INFO=* | *_SSH_TUNNEL_BPG_CONNECTION_INFO=*)
      "$HOME/.borealis-pg/bin/bpg-tunnel" start --owner-pid "$$" || true
      ;;
  esac
fi
