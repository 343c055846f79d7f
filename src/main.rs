//! The `flotilla` binary: `server`, `dev`, `cert`, `kv`, `admin`, `restore` and `bench`.
//!
//! The commands live in `cli/`, one file per family; this file parses the command line, sets
//! up logging and the runtime, and dispatches.

mod cli;

use anyhow::{anyhow, Result};
use clap::{Parser, Subcommand, ValueEnum};
use std::time::Duration;

#[derive(Parser)]
#[command(name = "flotilla", version, about = "Flotilla: a multi-Raft sharded key-value store")]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
    /// Log level or filter (also RUST_LOG); defaults to info for server, warn otherwise.
    #[arg(long, global = true)]
    log: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run one node from a TOML config file (flags override the file).
    Server(Box<cli::server::ServerArgs>),
    /// Start a local cluster on loopback with fresh certificates (Ctrl-C stops it).
    Dev(cli::dev::DevArgs),
    /// Create a cluster CA and node or client certificates.
    #[command(subcommand)]
    Cert(cli::cert::CertCommand),
    /// Read and write keys.
    Kv(cli::kv::KvArgs),
    /// Inspect and operate the cluster.
    Admin(cli::admin::AdminArgs),
    /// Build a new node's data directory from a backup (`flotilla admin backup`), before the
    /// node first starts; run it for every node of the new cluster's [bootstrap].
    Restore(cli::backup::RestoreArgs),
    /// Load generator: puts, gets or a mix, with latency percentiles.
    Bench(cli::bench::BenchArgs),
}

fn main() {
    let cli = Cli::parse();
    let quiet_default = !matches!(cli.command, Command::Server(_));
    if let Err(e) = init_logs(&cli, quiet_default) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
    if let Err(e) = flotilla::allocator::tune() {
        tracing::warn!(error = %e, "allocator settings not applied; freed memory is given back later");
    }
    // The server's configuration may set the runtime's threads, so it is read first.
    let (threads, job) = match cli.command {
        Command::Server(a) => {
            let loaded = cli::server::Loaded::read(&a).unwrap_or_else(|e| fail(e));
            (loaded.runtime_threads().unwrap_or_else(|e| fail(e)), Job::Server(Box::new(loaded)))
        }
        Command::Bench(a) => (Some(a.threads()), Job::Other(Command::Bench(a))),
        Command::Dev(a) => (a.runtime_threads(), Job::Other(Command::Dev(a))),
        other => (None, Job::Other(other)),
    };
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = threads {
        builder.worker_threads(n);
    }
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = match rt.block_on(run(job)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            1
        }
    };
    rt.shutdown_timeout(Duration::from_secs(2));
    std::process::exit(code);
}

/// Ends the process on an error found before the runtime starts, as one found after would.
fn fail(e: anyhow::Error) -> ! {
    eprintln!("error: {e:#}");
    std::process::exit(1)
}

fn init_logs(cli: &Cli, quiet: bool) -> Result<()> {
    use tracing_subscriber::EnvFilter;
    let filter = match (&cli.log, std::env::var("RUST_LOG")) {
        (Some(f), _) => EnvFilter::try_new(f).map_err(|e| anyhow!("--log {f:?}: {e}"))?,
        (None, Ok(f)) if !f.is_empty() => EnvFilter::try_new(&f).map_err(|e| anyhow!("RUST_LOG {f:?}: {e}"))?,
        _ => EnvFilter::new(if quiet { "warn" } else { "info" }),
    };
    // `dev` logs to a file in its data directory instead (set up there).
    if matches!(cli.command, Command::Dev(_)) {
        return Ok(());
    }
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match cli.log_format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    Ok(())
}

/// What the runtime runs: a server with its configuration already read, or another command.
enum Job {
    Server(Box<cli::server::Loaded>),
    Other(Command),
}

async fn run(job: Job) -> Result<i32> {
    let command = match job {
        Job::Server(loaded) => return cli::server::run(*loaded).await,
        Job::Other(command) => command,
    };
    match command {
        // Not taken: `main` reads a server's configuration before the runtime starts.
        Command::Server(a) => cli::server::run(cli::server::Loaded::read(&a)?).await,
        Command::Dev(a) => cli::dev::run(a).await,
        Command::Cert(c) => cli::cert::run(c),
        Command::Kv(a) => cli::kv::run(a).await,
        Command::Admin(a) => cli::admin::run(a).await,
        Command::Restore(a) => cli::backup::run_restore(a).await,
        Command::Bench(a) => cli::bench::run(a).await,
    }
}
