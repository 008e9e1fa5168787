//! The `claude-peers` binary: parses arguments and hands each verb to the library.

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;

use claude_peers::broker::{self, BrokerOptions};
use claude_peers::cli::{self, Cli, Command};
use claude_peers::paths::Paths;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.command);
    match run(cli) {
        Ok(code) => code,
        // The reader of our output went away (`claude-peers log | head`): end quietly.
        Err(e) if cli::is_closed_stdout(&e) => ExitCode::SUCCESS,
        Err(e) if e.downcast_ref::<broker::AlreadyRunning>().is_some() => {
            let _ = writeln!(std::io::stderr(), "claude-peers: error: {e}");
            ExitCode::from(claude_peers::protocol::EXIT_ALREADY_RUNNING)
        }
        Err(e) => {
            let msg = format!("{e:#}").replace('\n', " ");
            // Not eprintln!: it panics when stderr cannot be written (the broker's stderr
            // is its log file, which may sit on a full disk).
            let _ = writeln!(std::io::stderr(), "claude-peers: error: {msg}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let paths = Paths::resolve(cli.home(), cli.db())?;
    let pc = claude_peers::peer_channel::Sessions::resolve(cli.peer_channel);
    match cli.command {
        Command::Broker(args) => {
            let network = args.network()?;
            let mut opts = BrokerOptions::new(paths, args.limits);
            opts.protocol = args.protocol_version;
            opts.network = network;
            broker::run(opts)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::InboxRelay { session_socket } => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(claude_peers::serve::run_relay(&session_socket))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Hook { kind } => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let code = rt.block_on(claude_peers::hook::run(&paths, kind));
            std::process::exit(code)
        }
        Command::Serve(args) => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(claude_peers::serve::run(
                paths,
                args.name.as_deref(),
                args.push,
                args.bypass_inbox,
                pc,
            ))?;
            // Do not wait for background tasks (the broker connection): the session is over.
            std::process::exit(0)
        }
        command => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(cli::run(command, paths, pc))
        }
    }
}

/// Logs go to stderr (the broker's stderr is its log file when started on demand); the
/// level comes from `CLAUDE_PEERS_LOG`, default `info` for the broker, `warn` for what
/// agents run (`serve`, hooks) and `error` for the verbs people run, whose one error line
/// says what went wrong (a warning beside it would say it twice).
fn init_logging(command: &Command) {
    let default = match command {
        Command::Broker(_) => "info",
        Command::Serve(_) | Command::Hook { .. } | Command::InboxRelay { .. } => "warn",
        _ => "error",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("CLAUDE_PEERS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        // A log line that cannot be written (the log's disk is full) is dropped: the
        // default reports it with eprintln!, which panics on that same stderr.
        .log_internal_errors(false)
        .init();
}
