//! `tiproxy`: command line, logging, start-up and the shutdown sequence.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio::sync::watch;

use tiproxy::api::{self, ApiSettings, ApiState};
use tiproxy::backend::{run_balancer, BackendSpec, BalanceConfig, Registry, Source};
use tiproxy::config::Config;
use tiproxy::net::tls;
use tiproxy::server::{SqlServer, Workers};
use tiproxy::session::SessionContext;

#[derive(Parser)]
#[command(
    name = "tiproxy",
    version,
    about = "A MySQL-protocol proxy for TiDB that keeps sessions alive"
)]
struct Cli {
    /// Path of the TOML config file.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate a config file and exit (0 when valid).
    CheckConfig {
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::CheckConfig { file }) = &cli.command {
        // The token file is checked too: a deployment whose Secret is not mounted should fail
        // here, not when the proxy starts.
        return match Config::load(file).and_then(|c| c.api.load_token()) {
            Ok(_) => {
                println!("{}: ok", file.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        };
    }
    let config = match cli
        .config
        .as_deref()
        .map(Config::load)
        .unwrap_or_else(|| Ok(Config::default()))
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let set_log_level = init_logging(&config);
    // The control plane (accepting, admin API, health checks, balancing, discovery) is light and
    // runs on this thread; sessions run on their own threads (`server::Workers`).
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config, cli.config.as_deref(), set_log_level)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("tiproxy: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Changes the log filter at run time (config reload); an error says why it was refused.
type SetLogLevel = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

fn init_logging(config: &Config) -> SetLogLevel {
    use tracing_subscriber::EnvFilter;
    // RUST_LOG, when set, wins over the config file, also on reload.
    let from_env = std::env::var("RUST_LOG").is_ok();
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.log.level));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    macro_rules! install {
        ($builder:expr) => {{
            let builder = $builder.with_filter_reloading();
            let handle = builder.reload_handle();
            builder.init();
            Box::new(move |level: &str| {
                if from_env {
                    return Err("RUST_LOG is set".into());
                }
                handle
                    .reload(EnvFilter::new(level))
                    .map_err(|e| e.to_string())
            })
        }};
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    if config.log.format == "json" {
        install!(builder.json())
    } else {
        install!(builder)
    }
}

/// What a config reload changes while the proxy runs: the static backends, the connection
/// limit, the log level, and the `[api]` token and readiness rule.
struct LiveSettings {
    registry: Arc<Registry>,
    connections: Arc<tiproxy::server::ConnectionCounter>,
    set_log_level: SetLogLevel,
    api: Arc<ApiSettings>,
}

impl tiproxy::config::reload::ReloadTarget for LiveSettings {
    fn apply(&mut self, old: &Config, new: &Config) {
        if old.proxy.backends != new.proxy.backends {
            self.registry.apply(Source::Static, &static_backends(new));
        }
        self.connections.set_max(new.proxy.max_connections);
        if old.log.level != new.log.level {
            if let Err(e) = (self.set_log_level)(&new.log.level) {
                tracing::warn!(error = %e, "log.level not changed");
            }
        }
    }

    /// Every poll, not only on change: the token file can be rotated under an unchanged config.
    fn tick(&mut self, current: &Config) {
        self.api.reload(&current.api);
    }
}

fn static_backends(config: &Config) -> Vec<BackendSpec> {
    config
        .proxy
        .backends
        .iter()
        .map(|b| BackendSpec {
            status_addr: b.status_addr.clone(),
            ..BackendSpec::new(b.addr.clone())
        })
        .collect()
}

async fn run(
    config: Config,
    path: Option<&Path>,
    set_log_level: SetLogLevel,
) -> anyhow::Result<()> {
    tls::install_crypto_provider();
    let config = Arc::new(config);
    let server_tls =
        tls::server_config(&config.security.server_tls).context("[security.server-tls]")?;
    let sql_tls = tls::client_config(&config.security.sql_tls).context("[security.sql-tls]")?;
    let api_settings = ApiSettings::from_config(&config.api)?;
    let registry = Registry::new();
    registry.apply(Source::Static, &static_backends(&config));
    if config.proxy.backends.is_empty() && config.proxy.pd_endpoints().is_empty() {
        tracing::warn!(
            "no static backends and no pd-addrs: backends must be pushed to /api/v1/backends"
        );
    }
    let balance = balance_config(&config);
    // `stopping` ends background tasks at exit; `closing` tells sessions to finish.
    let (stopping_tx, stopping_rx) = watch::channel(false);
    let (closing_tx, closing_rx) = watch::channel(false);
    tokio::spawn(run_balancer(
        registry.clone(),
        balance.clone(),
        stopping_rx.clone(),
    ));
    tokio::spawn(tiproxy::health::run_health_observer(
        registry.clone(),
        health_config(&config),
        stopping_rx.clone(),
    ));
    let pd = config.proxy.pd_endpoints();
    if !pd.is_empty() {
        tracing::info!(endpoints = ?pd, "discovering TiDB servers from PD");
        tokio::spawn(tiproxy::discovery::run_etcd_discovery(
            pd,
            registry.clone(),
            stopping_rx.clone(),
        ));
    }
    let ctx = Arc::new(SessionContext::new(
        config.clone(),
        server_tls,
        sql_tls,
        registry.clone(),
        balance,
        closing_rx.clone(),
    ));
    let workers = Workers::per_core().context("cannot start the session threads")?;
    let server = SqlServer::bind(ctx, workers)
        .await
        .with_context(|| format!("cannot listen on proxy.addr {}", config.proxy.addr))?;
    let api_listener = tokio::net::TcpListener::bind(&config.api.addr)
        .await
        .with_context(|| format!("cannot listen on api.addr {}", config.api.addr))?;
    let api_listener_addr = api_listener.local_addr()?;
    let ready = Arc::new(AtomicBool::new(true));
    let api_task = tokio::spawn(api::serve(
        api_listener,
        ApiState {
            ready: ready.clone(),
            registry: registry.clone(),
            settings: api_settings.clone(),
        },
        stopping_rx.clone(),
    ));
    tracing::info!(
        addr = %server.local_addr()?,
        api = %api_listener_addr,
        config = %path.map_or_else(|| "<defaults>".into(), |p| p.display().to_string()),
        version = env!("CARGO_PKG_VERSION"),
        session_threads = server.session_threads(),
        api_token = api_settings.auth.required(),
        ready_requires_backend = config.api.ready_requires_backend,
        "tiproxy started"
    );
    if let Some(path) = path {
        let live = LiveSettings {
            registry: registry.clone(),
            connections: server.connections(),
            set_log_level,
            api: api_settings.clone(),
        };
        tokio::spawn(tiproxy::config::reload::watch_config_file(
            path.to_path_buf(),
            (*config).clone(),
            live,
            stopping_rx.clone(),
        ));
    }
    let server_task = tokio::spawn(server.run(closing_rx));

    shutdown_signal().await;
    ready.store(false, Ordering::Relaxed);
    let wait = Duration::from_secs(config.proxy.graceful_wait_before_shutdown);
    tracing::info!(
        ?wait,
        "shutdown requested; still serving during graceful-wait-before-shutdown"
    );
    tokio::time::sleep(wait).await;
    let _ = closing_tx.send(true);
    server_task.await.context("SQL server task")?;
    let _ = stopping_tx.send(true);
    let _ = api_task.await;
    tracing::info!("tiproxy stopped");
    Ok(())
}

fn health_config(config: &Config) -> tiproxy::health::HealthConfig {
    let h = &config.health;
    tiproxy::health::HealthConfig {
        interval: Duration::from_secs_f64(h.interval),
        timeout: Duration::from_secs_f64(h.timeout),
        slow_probes_to_unhealthy: h.slow_probes_to_unhealthy,
        successes_to_recover: h.successes_to_recover,
        ..Default::default()
    }
}

fn balance_config(config: &Config) -> BalanceConfig {
    let b = &config.balance;
    BalanceConfig {
        label_name: (!b.label_name.is_empty()).then(|| b.label_name.clone()),
        labels: config.labels.clone(),
        status_drain_seconds: b.status_drain_seconds,
        conn_ratio: b.conn_count_ratio_threshold,
        conn_migrations_per_second: b.conn_migrations_per_second,
        ..BalanceConfig::default()
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
