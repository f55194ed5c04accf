//! The `esq` binary: parses the command line and hands over to the library.

use clap::{Parser, Subcommand};
use esq_cli::dev::{DevConfig, DevStack};
use esq_runtime::LogFormat;
use std::net::SocketAddr;
use std::path::PathBuf;

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
        #[command(flatten)]
        server: esq_runtime::config::ServerArgs,
        /// Where to serve Prometheus metrics (GET /metrics); `off` serves none.
        #[arg(long, env = "ESQ_METRICS_ADDR", default_value = "127.0.0.1:9464", value_parser = parse_metrics_addr)]
        metrics_addr: MetricsAddr,
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
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    esq_runtime::init_telemetry(&cli.log, cli.log_format);
    match cli.command {
        Command::Dev {
            data_dir,
            write_addr,
            read_addr,
            server,
            metrics_addr,
        } => {
            let shutdown = esq_runtime::shutdown_on_signals();
            let mut config = DevConfig::new(data_dir);
            config.write_addr = write_addr;
            config.read_addr = read_addr;
            config.shutdown_grace = server.shutdown_grace;
            config.metrics_addr = metrics_addr.0;
            let stack = DevStack::start(config, shutdown).await?;
            println!("esq dev is running (Ctrl-C to stop)");
            println!("  write-svc  {}  (esq.v1.EventStore, esq.cart.v1.CartCommands, esq.bookshop.v1.BookCommands)", stack.write_addr);
            println!("  read-svc   {}  (esq.cart.v1.CartQueries, esq.bookshop.v1.BookQueries, esq.v1.StateQueries)", stack.read_addr);
            if let Some(addr) = stack.metrics_addr {
                println!("  metrics    {addr}  (Prometheus, GET /metrics)");
            }
            println!("try:");
            println!(
                "  grpcurl -plaintext -d '{{\"cart_id\":\"c1\",\"sku\":\"apple\",\"quantity\":2,\"unit_price_cents\":150}}' {} esq.cart.v1.CartCommands/AddItem",
                stack.write_addr
            );
            stack.wait().await
        }
    }
}
