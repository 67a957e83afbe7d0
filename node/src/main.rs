//! The `granary` binary: parses the command line, loads the configuration, runs the node,
//! and maps errors to an exit code.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use granary_node::Config;

/// jemalloc serves every allocation of the process: Rust's through this allocator, and
/// RocksDB's C++ through `malloc`, which the crate's `unprefixed` feature replaces. glibc
/// returned each upload's buffers to the kernel and faulted fresh zeroed pages in for the
/// next; with jemalloc a publish costs about 5 % less CPU (docs/BENCHMARKS.md).
#[cfg(target_os = "linux")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Granary: a self-hosted artifact repository service in the shape of AWS CodeArtifact.
#[derive(Parser)]
#[command(name = "granary", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node. With no options: one node, data in ./granary-data, HTTP on
    /// 127.0.0.1:8080, gRPC on 127.0.0.1:8081.
    Server(ServerArgs),
    /// Operate a cluster: status, add-node, promote, remove-node (SigV4 with the AWS
    /// credentials of an admin principal).
    #[command(subcommand)]
    Cluster(granary_node::cli::ClusterCommand),
}

#[derive(clap::Args)]
struct ServerArgs {
    /// TOML configuration file (see configs/single.toml for every key and its default).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Data directory (overrides `data_dir`).
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// HTTP listen address (overrides `http_addr`).
    #[arg(long, value_name = "ADDR")]
    http: Option<SocketAddr>,
    /// gRPC listen address (overrides `grpc_addr`).
    #[arg(long, value_name = "ADDR")]
    grpc: Option<SocketAddr>,
    /// Public URL clients use (overrides `public_url`).
    #[arg(long, value_name = "URL")]
    public_url: Option<String>,
    /// This node's id, unique in the cluster (overrides `node_id`).
    #[arg(long, value_name = "N")]
    node_id: Option<u64>,
    /// This node's region label (overrides `region`).
    #[arg(long)]
    region: Option<String>,
    /// Join the cluster through this member's gRPC address (repeatable; overrides `join`).
    /// Only on first start; a member restarts without it.
    #[arg(long, value_name = "ADDR")]
    join: Vec<String>,
    /// Join as a learner and stay one (overrides `learner`).
    #[arg(long)]
    learner: bool,
}

fn load(args: ServerArgs) -> anyhow::Result<Config> {
    let mut config = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    if let Some(d) = args.data_dir {
        config.data_dir = d;
    }
    if let Some(a) = args.http {
        config.http_addr = a;
    }
    if let Some(a) = args.grpc {
        config.grpc_addr = a;
    }
    if let Some(u) = args.public_url {
        config.public_url = Some(u);
    }
    if let Some(n) = args.node_id {
        config.node_id = n;
    }
    if let Some(r) = args.region {
        config.region = r;
    }
    if !args.join.is_empty() {
        config.join = args.join;
    }
    if args.learner {
        config.learner = true;
    }
    config.validate()?;
    Ok(config)
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

fn main() -> ExitCode {
    granary_node::logging::init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Server(args) => load(args).and_then(|config| {
            match granary_node::limits::raise_open_files_limit() {
                Ok(l) if l.after < 4096 => tracing::warn!(
                    limit = l.after,
                    "the open files limit is low for a node (every segment file, RocksDB table and \
                     connection takes one); raise its hard limit (`ulimit -Hn`, or systemd's \
                     LimitNOFILE)"
                ),
                Ok(l) if l.before != l.after => {
                    tracing::info!(from = l.before, to = l.after, "raised the open files limit")
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "could not raise the open files limit"),
            }
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            runtime.block_on(granary_node::run(config, shutdown_signal()))?;
            Ok(())
        }),
        Command::Cluster(cmd) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(granary_node::cli::run_cluster_command(cmd))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("granary: {e:#}");
            ExitCode::FAILURE
        }
    }
}
