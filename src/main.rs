use std::ffi::OsString;
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

use bpg_tunnel::check::{self, CheckSettings};
use bpg_tunnel::lifecycle::{self, daemon, exec_d, foreground, run};
use bpg_tunnel::logfmt::{self, Output};
use bpg_tunnel::options::{self, Options};
use bpg_tunnel::status::{self, StatusSettings};

// musl's allocator hands freed pages back to the kernel at once, and russh allocates a buffer
// per SSH packet: a bulk COPY spent over a quarter of its time in page faults. mimalloc keeps
// them; it is built without transparent huge pages (which tripled idle memory) and told below
// to return freed memory without delay.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc.h (the Rust bindings have no name for it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Keeps Borealis Isolated Postgres reachable on 127.0.0.1 through the add-on's SSH server.
///
/// Reads every *_TUNNEL_BPG_CONN_INFO (and legacy *_SSH_TUNNEL_BPG_CONNECTION_INFO) variable
/// with its *_URL / *_READONLY_URL, listens where those URLs point, and forwards each
/// connection to the database over a supervised SSH session. Without a subcommand it serves in
/// the foreground until SIGTERM or SIGINT.
#[derive(Debug, Parser)]
#[command(name = "bpg-tunnel", version, about, long_about)]
struct Cli {
    #[command(flatten)]
    options: Options,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start the tunnels as a detached daemon and return once they are ready (profile.d, exec.d).
    Start {
        /// The process whose exit means the app is gone (`$$` in a profile.d script).
        #[arg(long, value_parser = clap::value_parser!(i32).range(1..))]
        owner_pid: i32,
    },
    /// Start the tunnels, run CMD, keep the tunnels until it exits, and exit with its status.
    Run {
        /// Do not pass the *_TUNNEL_BPG_CONN_INFO secrets on to CMD.
        #[arg(long)]
        scrub_env: bool,
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<OsString>,
    },
    /// Stop the daemon that `start` left running.
    Stop,
    /// What a Cloud Native Buildpack launcher runs from exec.d (a link to this binary named
    /// exec.d/bpg-tunnel runs it too): `start`, owned by the process being launched.
    #[command(name = "exec-d")]
    ExecD,
    /// Check each add-on step by step (config, DNS, TCP, SSH, host key, key, database) and say
    /// what to do about the first step that fails; exit 0 only if every add-on passes.
    Check {
        /// One JSON document instead of lines for people.
        #[arg(long)]
        json: bool,
        /// Also log in to each database with the user, password and database of its *_URL or
        /// *_READONLY_URL, and run `select 1` (the password is read then, and never printed).
        #[arg(long)]
        login: bool,
    },
    /// Ask the running tunnel how each add-on is doing: session, connections, bytes, last
    /// error; exit 0 if everything is up, 1 if no tunnel runs, 2 if something is down.
    Status {
        /// One JSON document instead of lines for people.
        #[arg(long)]
        json: bool,
    },
    #[command(name = "__daemon", hide = true)]
    Daemon {
        #[arg(long, value_parser = clap::value_parser!(i32).range(1..))]
        owner_pid: i32,
    },
}

fn main() -> ExitCode {
    lifecycle::forbid_core_dumps();
    // SAFETY: sets a plain integer option; mimalloc reads options on every purge decision.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0) };
    let mut args: Vec<OsString> = std::env::args_os().collect();
    if exec_d::invoked_as_exec_d(&args) {
        args.push("exec-d".into());
    }
    let matches = Cli::command().get_matches_from(args);
    let cli = Cli::from_arg_matches(&matches)
        .map_err(|error| error.format(&mut Cli::command()))
        .unwrap_or_else(|error| error.exit());
    let (settings, invalid) = cli.options.settings(&matches);
    // `check` and `status` answer on stdout; their log lines (a bad setting, say) go beside it.
    let output = match cli.command {
        Some(Command::Check { .. } | Command::Status { .. }) => Output::Stderr,
        _ => Output::Stdout,
    };
    logfmt::init(&settings.log, output, &settings.engine.dyno.name);
    // The process that serves says what it replaced. `start` says it only of its flags (it does
    // not pass bad ones on); the daemon it starts reads the same variables and speaks for them.
    match cli.command {
        Some(Command::Start { .. } | Command::ExecD) => {
            let flags: Vec<_> = invalid
                .into_iter()
                .filter(|setting| setting.name.starts_with("--"))
                .collect();
            options::report(&flags);
        }
        Some(Command::Stop | Command::Status { .. }) => {}
        _ => options::report(&invalid),
    }
    let (engine, lifecycle) = (&settings.engine, &settings.lifecycle);
    match cli.command {
        Some(Command::Start { owner_pid }) => daemon::start(lifecycle, owner_pid),
        Some(Command::Stop) => daemon::stop(lifecycle),
        Some(Command::ExecD) => exec_d::run(lifecycle),
        Some(Command::Daemon { owner_pid }) => daemon::daemon(engine, lifecycle, owner_pid),
        Some(Command::Check { json, login }) => {
            let settings = CheckSettings {
                session: engine.supervisor.session.clone(),
                registration: engine.registration.clone(),
                dyno: engine.dyno.clone(),
                json,
                login,
            };
            with_runtime(|| check::run(&settings))
        }
        Some(Command::Status { json }) => status::run(&StatusSettings {
            state_dir: lifecycle.state_dir.clone(),
            json,
        }),
        Some(Command::Run { scrub_env, command }) => {
            with_runtime(|| run::run(engine, lifecycle, command, scrub_env))
        }
        None => with_runtime(|| foreground::run(engine, lifecycle)),
    }
}

fn with_runtime<F: std::future::Future<Output = ExitCode>>(future: impl FnOnce() -> F) -> ExitCode {
    match bpg_tunnel::runtime() {
        Ok(runtime) => runtime.block_on(future()),
        Err(error) => {
            eprintln!("bpg-tunnel: cannot start the async runtime: {error}");
            ExitCode::FAILURE
        }
    }
}
