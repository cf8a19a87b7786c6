//! `mlx-serving serve`: the supervisor. Starts the worker pool and the admin API; SIGTERM and
//! SIGINT drain and exit within the drain deadline; SIGHUP reloads the configuration.
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;
use mlx_serving_supervisor::admin::{self, AdminContext, Listen, Reloader};
use mlx_serving_supervisor::api::{self, ApiState};
use mlx_serving_supervisor::config::ms;
use mlx_serving_supervisor::{Config, Pool};
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

#[derive(Args)]
pub struct ServeArgs {
    /// Configuration file (TOML); see config/mlx-serving.example.toml.
    #[arg(long, env = "MLX_SERVING_CONFIG")]
    config: PathBuf,
    /// Number of workers, overriding `pool.workers`.
    #[arg(long)]
    workers: Option<usize>,
    /// Admin API address (`HOST:PORT` or `unix:PATH`), overriding `admin.listen`.
    #[arg(long)]
    admin_listen: Option<String>,
    /// OpenAI API address (`HOST:PORT`), overriding `http.listen`.
    #[arg(long)]
    listen: Option<String>,
    /// Log as JSON lines.
    #[arg(long)]
    log_json: bool,
}

fn load(args: &ServeArgs) -> Result<Config> {
    let mut config = Config::load(&args.config)?;
    if let Some(n) = args.workers {
        config.pool.workers = n;
    }
    if let Some(l) = &args.admin_listen {
        config.admin.listen = l.clone();
    }
    if let Some(l) = &args.listen {
        config.http.listen = l.clone();
    }
    Ok(config)
}

pub fn run(args: ServeArgs) -> Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let logs = tracing_subscriber::fmt().with_writer(std::io::stderr).with_ansi(false).with_env_filter(filter);
    if args.log_json {
        logs.json().init();
    } else {
        logs.init();
    }
    let config = load(&args)?;
    let http: std::net::SocketAddr =
        config.http.listen.parse().with_context(|| format!("`http.listen` = `{}` is not HOST:PORT", config.http.listen))?;
    let listen = Listen::parse(&config.admin.listen).map_err(anyhow::Error::msg)?;
    listen.check_token(config.admin.token.as_deref()).map_err(anyhow::Error::msg)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let result = runtime.block_on(serve(args, config, listen, http));
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    result
}

async fn serve(args: ServeArgs, config: Config, listen: Listen, http: std::net::SocketAddr) -> Result<()> {
    let metrics = mlx_serving_supervisor::metrics::install();
    let pool = Pool::start(config.clone());
    tokio::spawn(mlx_serving_supervisor::metrics::refresh(pool.clone(), metrics.clone(), std::time::Duration::from_secs(1)));
    let args = Arc::new(args);
    let reload: Reloader = {
        let args = args.clone();
        Arc::new(move || load(&args).map_err(|e| mlx_serving_supervisor::config::ConfigError::Invalid(format!("{e:#}"))))
    };
    let module = admin::module(AdminContext { pool: pool.clone(), reload: reload.clone() });
    let stop = CancellationToken::new();
    let mut server = tokio::spawn(admin::serve(listen, config.admin.token.clone(), module, stop.clone()));
    let router = api::router(Arc::new(ApiState::new(pool.clone(), config.http.clone(), metrics)));
    let mut front = tokio::spawn(api::serve(http, router, stop.clone()));
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    tracing::info!(workers = config.pool.workers, "supervisor started");
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => match reload() {
                Ok(c) => {
                    let n = pool.reload(c).await;
                    tracing::info!(?n, "configuration reloaded");
                }
                Err(e) => tracing::error!("configuration not reloaded: {e}"),
            },
            r = &mut server => {
                r.context("the admin API task failed")?.context("the admin API stopped")?;
                break;
            }
            r = &mut front => {
                r.context("the HTTP API task failed")?.context("the HTTP API stopped")?;
                break;
            }
        }
    }
    let deadline = ms(pool.config().pool.drain_deadline_ms);
    tracing::info!(?deadline, "draining and stopping");
    pool.shutdown(deadline).await;
    stop.cancel();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), server).await;
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), front).await;
    tracing::info!("stopped");
    Ok(())
}
