//! The `esq` binary: parses the command line and hands over to the library.

use clap::{Parser, Subcommand};
use esq_cli::dev::{DevConfig, DevStack};
use esq_cli::ops;
use esq_runtime::LogFormat;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

/// esq: an event store with CQRS read models, served over gRPC.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Log filter, RUST_LOG syntax.
    #[arg(long, env = "RUST_LOG", default_value = "info", global = true)]
    log: String,
    /// Log format: plain or json.
    #[arg(long, env = "LOG_FORMAT", default_value = "plain", global = true)]
    log_format: LogFormat,
    /// Machine-readable output (JSON) for the operator commands.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs write-svc, the projector and read-svc in one process on embedded storage.
    Dev {
        /// Folder of the embedded event store.
        #[arg(long, env = "ESQ_DATA_DIR", default_value = ".esq-data")]
        data_dir: PathBuf,
        /// write-svc listen address.
        #[arg(long, env = "ESQ_WRITE_ADDR", default_value = "127.0.0.1:50051")]
        write_addr: SocketAddr,
        /// read-svc listen address.
        #[arg(long, env = "ESQ_READ_ADDR", default_value = "127.0.0.1:50052")]
        read_addr: SocketAddr,
        /// Most appends the embedded store commits in one transaction, with one fsync (group
        /// commit); 1 commits every append on its own.
        #[arg(long, env = "ESQ_GROUP_COMMIT_MAX", default_value_t = esq_eventstore::embedded::GROUP_MAX_APPENDS as u32, value_parser = clap::value_parser!(u32).range(1..))]
        group_commit_max: u32,
        #[command(flatten)]
        server: esq_runtime::config::ServerArgs,
        #[command(flatten)]
        snapshots: esq_write_svc::SnapshotArgs,
        /// Where to serve Prometheus metrics (GET /metrics); `off` serves none.
        #[arg(long, env = "ESQ_METRICS_ADDR", default_value = "127.0.0.1:9464", value_parser = parse_metrics_addr)]
        metrics_addr: MetricsAddr,
    },
    /// Operates the projections: status, rebuild, verify, parked streams (esq.v1.Projections).
    Projections(ops::ProjectionsArgs),
    /// Reads streams of the event store (esq.v1.EventStore on write-svc).
    Streams(ops::StreamsArgs),
    /// TLS helpers.
    #[command(subcommand)]
    Tls(TlsCommand),
}

#[derive(Subcommand)]
enum TlsCommand {
    /// Writes a throwaway PKI for loopback and development use to DIR: ca.pem, server.pem and
    /// server-key.pem (for localhost, 127.0.0.1 and ::1), client.pem and client-key.pem.
    /// Not for production: the certificates never expire.
    Generate {
        /// Folder to write the files to (created if missing; existing files are replaced).
        #[arg(long)]
        dir: PathBuf,
    },
}

/// `--metrics-addr` of `esq dev`: an address, or none (`off`).
#[derive(Debug, Clone, Copy)]
struct MetricsAddr(Option<SocketAddr>);

fn parse_metrics_addr(s: &str) -> Result<MetricsAddr, String> {
    if s.eq_ignore_ascii_case("off") {
        return Ok(MetricsAddr(None));
    }
    s.parse()
        .map(|a| MetricsAddr(Some(a)))
        .map_err(|e| format!("{s:?} is not an address (host:port) nor `off`: {e}"))
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    esq_runtime::init_telemetry(&cli.log, cli.log_format);
    let json = cli.json;
    let outcome = match cli.command {
        Command::Projections(args) => ops::projections(args, json).await,
        Command::Streams(args) => ops::streams(args, json).await,
        Command::Tls(TlsCommand::Generate { dir }) => {
            tls_generate(&dir).map(|()| ExitCode::SUCCESS)
        }
        Command::Dev {
            data_dir,
            write_addr,
            read_addr,
            group_commit_max,
            server,
            snapshots,
            metrics_addr,
        } => {
            let store = esq_eventstore::embedded::Options {
                group_max_appends: group_commit_max as usize,
            };
            dev(
                data_dir,
                write_addr,
                read_addr,
                store,
                server,
                snapshots,
                metrics_addr,
            )
            .await
            .map(|()| ExitCode::SUCCESS)
        }
    };
    outcome.unwrap_or_else(|e| {
        eprintln!("error: {e:#}");
        ExitCode::from(ops::EXIT_ERROR)
    })
}

fn tls_generate(dir: &std::path::Path) -> anyhow::Result<()> {
    let files = esq_runtime::pki::LoopbackPki::generate()?.write(dir)?;
    println!("wrote a loopback PKI to {}:", dir.display());
    for (path, what) in [
        (
            &files.ca,
            "CA certificate (clients: --ca-cert; servers: --tls-client-ca for mTLS)",
        ),
        (&files.server_cert, "server certificate (--tls-cert)"),
        (&files.server_key, "server key (--tls-key)"),
        (&files.client_cert, "client certificate (--client-cert)"),
        (&files.client_key, "client key (--client-key)"),
    ] {
        println!("  {}  {what}", path.display());
    }
    Ok(())
}

async fn dev(
    data_dir: PathBuf,
    write_addr: SocketAddr,
    read_addr: SocketAddr,
    store: esq_eventstore::embedded::Options,
    server: esq_runtime::config::ServerArgs,
    snapshots: esq_write_svc::SnapshotArgs,
    metrics_addr: MetricsAddr,
) -> anyhow::Result<()> {
    // Zero-config: plaintext unless TLS files are given (then they must load).
    let tls = match server.tls.tls_cert {
        Some(_) => server.tls.load(write_addr).await?,
        None => None,
    };
    let shutdown = esq_runtime::shutdown_on_signals();
    let mut config = DevConfig::new(data_dir);
    let secure = tls.is_some();
    config.tls = tls;
    config.limits = server.limits.limits();
    config.write_addr = write_addr;
    config.read_addr = read_addr;
    config.store = store;
    config.shutdown_grace = server.shutdown_grace;
    config.snapshot_every = snapshots.snapshot_every;
    config.metrics_addr = metrics_addr.0;
    let stack = DevStack::start(config, shutdown).await?;
    if secure {
        println!("esq dev is running with TLS (Ctrl-C to stop)");
    } else {
        println!(
            "esq dev is running in insecure mode: plaintext, no authentication — for local \
             development only (Ctrl-C to stop)"
        );
    }
    println!(
        "  write-svc  {}  ({})",
        stack.write_addr,
        esq_write_svc::SERVICES.join(", ")
    );
    println!(
        "  read-svc   {}  ({})",
        stack.read_addr,
        esq_cli::dev::read_services().join(", ")
    );
    if let Some(addr) = stack.metrics_addr {
        println!("  metrics    {addr}  (Prometheus, GET /metrics)");
    }
    println!("try:");
    println!(
        "  grpcurl {} -d '{{\"cart_id\":\"c1\",\"sku\":\"apple\",\"quantity\":2,\"unit_price_cents\":150}}' {} esq.cart.v1.CartCommands/AddItem",
        if secure { "-cacert ca.pem" } else { "-plaintext" },
        stack.write_addr
    );
    stack.wait().await
}
