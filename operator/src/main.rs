use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use kube::api::{Api, ListParams};
use tiproxy_operator::api::TiProxy;
use tiproxy_operator::controller::{self, Context};
use tiproxy_operator::resources::Defaults;
use tiproxy_operator::topology::{Topology, TopologyConfig};

/// Kubernetes operator for tiproxy.
#[derive(Parser, Debug)]
#[command(name = "tiproxy-operator", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the TiProxy CustomResourceDefinition (YAML) to stdout.
    Crd,
    /// Run the operator (in-cluster, or with the current kubeconfig).
    Run(RunArgs),
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Address of the HTTP endpoint serving /healthz, /readyz and /metrics.
    #[arg(long, default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    /// Proxy image for TiProxies that do not set spec.image.
    #[arg(long, default_value = concat!("ghcr.io/tidb-tiproxy/tiproxy:", env!("CARGO_PKG_VERSION")))]
    proxy_image: String,
    /// Watch only this namespace (default: all namespaces).
    #[arg(long)]
    namespace: Option<String>,
    /// Seconds between checks that every proxy still has the current backend set.
    #[arg(long, default_value_t = 30)]
    resync_seconds: u64,
    /// Seconds each push to a proxy may take.
    #[arg(long, default_value_t = 2)]
    push_timeout_seconds: u64,
    /// error, warn, info, debug or trace (RUST_LOG wins when set).
    #[arg(long, default_value = "info")]
    log_level: String,
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd => {
            let yaml = tiproxy_operator::crd_yaml()?;
            std::io::stdout().lock().write_all(yaml.as_bytes())?;
            Ok(())
        }
        Command::Run(args) => {
            init_logging(&args);
            // kube and the pusher must agree on one rustls provider; install it before either.
            let _ = rustls::crypto::ring::default_provider().install_default();
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(run(args))
        }
    }
}

fn init_logging(args: &RunArgs) {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&args.log_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match args.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let client = kube::Client::try_default()
        .await
        .context("cannot configure a Kubernetes client (in-cluster or kubeconfig)")?;

    let ready = Arc::new(AtomicBool::new(false));
    let listener = tokio::net::TcpListener::bind(args.metrics_addr)
        .await
        .with_context(|| format!("cannot listen on {}", args.metrics_addr))?;
    let server = tokio::spawn(tiproxy_operator::server::serve(listener, ready.clone()));

    // Fail early and clearly when the CRD is missing, instead of watch errors forever.
    let tiproxies: Api<TiProxy> = tiproxy_operator::scoped_api(&client, args.namespace.as_deref());
    tiproxies
        .list_metadata(&ListParams::default().limit(1))
        .await
        .context(
            "cannot list TiProxies: is the CRD installed (helm install, or \
         kubectl apply --server-side --force-conflicts -f crds/tiproxy.yaml) and may this \
         service account list them?",
        )?;

    let topology = Topology::new(
        client.clone(),
        TopologyConfig {
            namespace: args.namespace.clone(),
            resync: Duration::from_secs(args.resync_seconds.max(1)),
            push_timeout: Duration::from_secs(args.push_timeout_seconds.max(1)),
        },
    );
    let topology_task = tokio::spawn(topology.clone().run());
    let ctx = Arc::new(Context::new(
        client,
        Defaults {
            proxy_image: args.proxy_image,
        },
        topology,
    ));
    tracing::info!(
        namespace = args.namespace.as_deref().unwrap_or("<all>"),
        metrics_addr = %args.metrics_addr,
        "tiproxy-operator started"
    );
    ready.store(true, Ordering::Relaxed);
    controller::run(ctx, args.namespace).await;
    ready.store(false, Ordering::Relaxed);
    topology_task.abort();
    server.abort();
    tracing::info!("tiproxy-operator stopped");
    Ok(())
}
