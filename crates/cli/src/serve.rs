//! `mlx-serving serve`: the supervisor. Starts the worker pool and the admin API; SIGTERM and
//! SIGINT drain and exit within the drain deadline; SIGHUP reloads the configuration.
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;
use mlx_serving_supervisor::admin::{self, AdminContext, Listen, Reloader};
use mlx_serving_supervisor::api::{self, ApiState};
use mlx_serving_supervisor::config::ms;
use mlx_serving_supervisor::worker::slot::WorkerState;
use mlx_serving_supervisor::{Config, Pool};
use sd_notify::NotifyState;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// Where the configuration comes from, and what the environment and flags override in it.
/// Precedence: the file, then `MLX_SERVING_*` variables, then flags.
#[derive(Args, Clone)]
pub struct Overrides {
    /// Configuration file (TOML); config/mlx-serving.toml documents every key.
    #[arg(long, env = "MLX_SERVING_CONFIG")]
    pub config: Option<PathBuf>,
    /// Workers of the main pool (`pool.workers`).
    #[arg(long, env = "MLX_SERVING_WORKERS")]
    pub workers: Option<usize>,
    /// OpenAI API address, `HOST:PORT` (`http.listen`).
    #[arg(long, env = "MLX_SERVING_LISTEN")]
    pub listen: Option<String>,
    /// Admin API address, `HOST:PORT` or `unix:PATH` (`admin.listen`).
    #[arg(long, env = "MLX_SERVING_ADMIN_LISTEN")]
    pub admin_listen: Option<String>,
    /// Bearer token the admin API requires (`admin.token`).
    #[arg(long, env = "MLX_SERVING_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Log filter, e.g. `info` or `warn,mlx_serving_supervisor=debug` (`logging.level`);
    /// `RUST_LOG` wins over it when set.
    #[arg(long, env = "MLX_SERVING_LOG_LEVEL")]
    pub log_level: Option<String>,
    /// Log as JSON lines (`logging.json`); `--log-json=false` turns it off.
    #[arg(long, env = "MLX_SERVING_LOG_JSON", num_args = 0..=1, default_missing_value = "true",
          value_parser = clap::builder::BoolishValueParser::new())]
    pub log_json: Option<bool>,
}

impl Overrides {
    /// The effective configuration: the file (defaults without one), then the overrides,
    /// validated.
    pub fn load(&self) -> Result<Config> {
        let mut config = match &self.config {
            Some(path) => Config::load(path)?,
            None => {
                let mut c = Config::default();
                c.resolve_paths(&std::env::current_dir()?)?;
                c
            }
        };
        if let Some(n) = self.workers {
            config.pool.workers = n;
        }
        if let Some(l) = &self.listen {
            config.http.listen = l.clone();
        }
        if let Some(l) = &self.admin_listen {
            config.admin.listen = l.clone();
        }
        if let Some(t) = &self.admin_token {
            config.admin.token = Some(t.clone());
        }
        if let Some(l) = &self.log_level {
            config.logging.level = l.clone();
        }
        if let Some(j) = self.log_json {
            config.logging.json = j;
        }
        config.validate()?;
        config
            .http
            .listen
            .parse::<std::net::SocketAddr>()
            .with_context(|| format!("`http.listen` = `{}` is not HOST:PORT", config.http.listen))?;
        let listen = Listen::parse(&config.admin.listen).map_err(anyhow::Error::msg)?;
        listen.check_token(config.admin.token.as_deref()).map_err(anyhow::Error::msg)?;
        Ok(config)
    }
}

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    overrides: Overrides,
}

fn load(args: &ServeArgs) -> Result<Config> {
    if args.overrides.config.is_none() {
        anyhow::bail!(
            "no configuration file: pass --config FILE or set MLX_SERVING_CONFIG (config/mlx-serving.toml documents every key)"
        );
    }
    args.overrides.load()
}

/// Logs to stderr: text or JSON lines, filtered by `RUST_LOG` when set, else by `level`.
pub fn init_logging(level: &str, json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::try_new(level).unwrap_or_else(|_| "info".into()));
    let logs = tracing_subscriber::fmt().with_writer(std::io::stderr).with_ansi(false).with_env_filter(filter);
    if json {
        logs.json().init();
    } else {
        logs.init();
    }
}

pub fn run(args: ServeArgs) -> Result<()> {
    let config = load(&args)?;
    init_logging(&config.logging.level, config.logging.json);
    let http: std::net::SocketAddr = config.http.listen.parse()?;
    let listen = Listen::parse(&config.admin.listen).map_err(anyhow::Error::msg)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let result = runtime.block_on(serve(args, config, listen, http));
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    result
}

async fn serve(args: ServeArgs, config: Config, listen: Listen, http: std::net::SocketAddr) -> Result<()> {
    let metrics = mlx_serving_supervisor::metrics::install();
    let pool = Pool::start(config.clone());
    tokio::spawn(mlx_serving_supervisor::metrics::refresh(
        pool.clone(),
        metrics.clone(),
        std::time::Duration::from_secs(1),
    ));
    let args = Arc::new(args);
    let reload: Reloader = {
        let args = args.clone();
        Arc::new(move || {
            load(&args).map_err(|e| mlx_serving_supervisor::config::ConfigError::Invalid(format!("{e:#}")))
        })
    };
    let module = admin::module(AdminContext { pool: pool.clone(), reload: reload.clone() });
    let stop = CancellationToken::new();
    let mut server = tokio::spawn(admin::serve(listen, config.admin.token.clone(), module, stop.clone()));
    let mut state = ApiState::new(pool.clone(), config.http.clone(), metrics);
    state.serve_metrics = config.metrics.enabled;
    let router = api::router(Arc::new(state));
    tokio::spawn(notify_systemd(pool.clone(), config.http.min_ready_workers));
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
    notify(&[NotifyState::Stopping, NotifyState::Status("draining")]);
    pool.shutdown(deadline).await;
    stop.cancel();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), server).await;
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), front).await;
    tracing::info!("stopped");
    Ok(())
}

/// Sends to systemd's notification socket when there is one (`Type=notify`); a no-op otherwise.
fn notify(states: &[NotifyState<'_>]) {
    if std::env::var_os("NOTIFY_SOCKET").is_some()
        && let Err(e) = sd_notify::notify(states)
    {
        tracing::warn!("systemd notification failed: {e}");
    }
}

/// One line about the pool for systemd's STATUS=.
fn summary(pool: &Pool) -> String {
    let s = pool.status();
    let count = |state: WorkerState| s.workers.iter().filter(|w| w.state == state).count();
    format!(
        "{}/{} workers ready, {} quarantined, {} requests active",
        s.ready_workers,
        s.workers.len(),
        count(WorkerState::Quarantined),
        s.active_requests
    )
}

/// READY=1 once `min_ready` workers are ready, then, while systemd watches, WATCHDOG=1 with a
/// STATUS= line at half the watchdog interval (every 5 s without one). The tick reads the pool's
/// state, so a supervisor whose runtime or pool is stuck stops sending and systemd restarts it.
async fn notify_systemd(pool: Arc<Pool>, min_ready: usize) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    let watchdog = sd_notify::watchdog_enabled();
    let tick = watchdog.map_or(std::time::Duration::from_secs(5), |d| d / 2);
    while !pool.wait_ready(min_ready.max(1), tick).await {
        if watchdog.is_some() {
            notify(&[NotifyState::Watchdog]);
        }
        notify(&[NotifyState::Status(&format!("starting: {}", summary(&pool)))]);
    }
    notify(&[NotifyState::Ready, NotifyState::Status(&summary(&pool))]);
    tracing::info!("told systemd the service is ready");
    let mut interval = tokio::time::interval(tick);
    loop {
        interval.tick().await;
        let line = summary(&pool);
        if watchdog.is_some() {
            notify(&[NotifyState::Watchdog, NotifyState::Status(&line)]);
        } else {
            notify(&[NotifyState::Status(&line)]);
        }
    }
}
