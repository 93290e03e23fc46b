use std::process::ExitCode;

use clap::Parser;

use bpg_tunnel::{lifecycle, logfmt, options::Options};

/// Keeps Borealis Isolated Postgres reachable on 127.0.0.1 through the add-on's SSH server.
///
/// Reads every *_TUNNEL_BPG_CONN_INFO (and legacy *_SSH_TUNNEL_BPG_CONNECTION_INFO) variable
/// with its *_URL / *_READONLY_URL, listens where those URLs point, and forwards each
/// connection to the database over a supervised SSH session.
#[derive(Debug, Parser)]
#[command(name = "bpg-tunnel", version, about, long_about)]
struct Cli {
    #[command(flatten)]
    options: Options,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    logfmt::init(&cli.options.log_filter());
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("bpg-tunnel: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(lifecycle::run_foreground(cli.options))
}
