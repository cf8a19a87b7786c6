//! The supervisor's configuration: one TOML file, every field documented, unknown keys refused,
//! defaults in one place. Durations are in milliseconds (`*_ms`) or seconds (`*_s`).
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("{0}: {1}")]
    Parse(PathBuf, toml::de::Error),
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub pool: PoolConfig,
    /// Models the pool may serve. Requests name them by `name`.
    pub models: Vec<ModelConfig>,
    pub breaker: BreakerSettings,
    pub restart: RestartSettings,
    pub retry: RetrySettings,
    pub admin: AdminConfig,
    pub http: HttpConfig,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// `HOST:PORT` of the OpenAI-compatible API.
    pub listen: String,
    /// Accepted bearer tokens; the API is open when empty. Health and metrics stay open.
    pub api_keys: Vec<String>,
    /// Largest request body; beyond it 413.
    pub max_body_bytes: usize,
    /// `max_tokens` when the request gives none.
    pub default_max_tokens: usize,
    /// The model `/ready` checks; the first configured model when absent.
    pub default_model: Option<String>,
    /// `/ready` answers 200 when at least this many workers are ready with the default model.
    pub min_ready_workers: usize,
    /// Seconds between SSE keep-alive comments on a quiet stream (a long prefill).
    pub sse_keep_alive_s: u64,
    /// Requests per second each API key may make on average (a token bucket); 0 is no limit.
    pub rate_limit_per_s: f64,
    /// Requests an API key may make at once before the rate applies.
    pub rate_limit_burst: u32,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: "127.0.0.1:8080".into(),
            api_keys: Vec::new(),
            max_body_bytes: 1 << 20,
            default_max_tokens: 512,
            default_model: None,
            min_ready_workers: 1,
            sse_keep_alive_s: 15,
            rate_limit_per_s: 0.0,
            rate_limit_burst: 10,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// `HOST:PORT` or `unix:PATH`. A non-loopback address needs `token`.
    pub listen: String,
    /// Bearer token the admin API requires; none when absent.
    pub token: Option<String>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig { listen: "127.0.0.1:8081".into(), token: None }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolConfig {
    /// Worker processes kept running.
    pub workers: usize,
    /// The worker program and its arguments; the `mlx-serving-worker` beside the supervisor's
    /// executable when empty.
    pub worker_command: Vec<String>,
    /// Milliseconds between a worker's heartbeats.
    pub heartbeat_interval_ms: u64,
    /// A worker with no heartbeat for this long is hung: killed and replaced.
    pub heartbeat_timeout_ms: u64,
    /// A busy worker whose progress counters stand still this long is hung.
    pub stall_timeout_ms: u64,
    /// Longest wait for a new worker to answer its handshake and load its models.
    pub start_timeout_ms: u64,
    /// After SIGTERM, how long a worker has before SIGKILL.
    pub stop_grace_ms: u64,
    /// How long a drained worker may take to finish its requests when it is being stopped.
    pub drain_deadline_ms: u64,
    /// Bytes of model weights one worker may hold; the least recently used idle model is unloaded
    /// to make room. 0 is no limit.
    pub memory_budget_bytes: u64,
    /// A worker whose resident memory (from its heartbeats) exceeds this is recycled: it stops
    /// taking requests, finishes the ones it has (up to the drain deadline) and is restarted.
    /// Restarts for memory count as failures for the restart backoff. 0 is no limit.
    pub max_worker_rss_bytes: u64,
    /// How long a request waits for a worker that can take it before it fails.
    pub queue_timeout_ms: u64,
    /// How long a stream whose worker died waits for another worker to resume it.
    pub resume_timeout_ms: u64,
    /// Seed of the routing tie-breaker; random when absent.
    pub seed: Option<u64>,
    /// Requests in the supervisor (waiting or running) for all models together; beyond it
    /// requests are refused at once (HTTP 429 with Retry-After).
    pub max_queue: usize,
    /// The same bound for each model.
    pub max_queue_per_model: usize,
    /// Requests sent to one worker at once; more wait in the supervisor, in priority order.
    /// 0 takes the worker's own `max_sequences`.
    pub max_in_flight_per_worker: usize,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            workers: 2,
            worker_command: Vec::new(),
            heartbeat_interval_ms: 1000,
            heartbeat_timeout_ms: 5000,
            stall_timeout_ms: 5000,
            start_timeout_ms: 120_000,
            stop_grace_ms: 2000,
            drain_deadline_ms: 30_000,
            memory_budget_bytes: 0,
            max_worker_rss_bytes: 0,
            queue_timeout_ms: 30_000,
            resume_timeout_ms: 10_000,
            seed: None,
            max_queue: 512,
            max_queue_per_model: 256,
            max_in_flight_per_worker: 0,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// The name requests use.
    pub name: String,
    /// Model directory in the mlx-community layout; a relative path is relative to the
    /// configuration file.
    pub path: PathBuf,
    /// Load on every worker at start.
    #[serde(default)]
    pub preload: bool,
    /// Unload from a worker after this many seconds without requests; 0 never.
    #[serde(default = "default_keep_alive")]
    pub keep_alive_s: u64,
}

fn default_keep_alive() -> u64 {
    300
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerSettings {
    /// Consecutive failures that open a worker's circuit.
    pub failure_threshold: u32,
    /// The n-th ejection lasts n times this, up to `max_ejection_ms`.
    pub base_ejection_ms: u64,
    pub max_ejection_ms: u64,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        BreakerSettings { failure_threshold: 5, base_ejection_ms: 30_000, max_ejection_ms: 300_000 }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RestartSettings {
    /// First restart delay; it doubles (with jitter) up to `max_delay_ms`.
    pub min_delay_ms: u64,
    pub max_delay_ms: u64,
    /// Spawns allowed per slot inside `window_ms`; beyond, the slot is quarantined.
    pub max_spawns: usize,
    pub window_ms: u64,
}

impl Default for RestartSettings {
    fn default() -> Self {
        RestartSettings { min_delay_ms: 100, max_delay_ms: 60_000, max_spawns: 5, window_ms: 30_000 }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetrySettings {
    /// Retries in progress may be this share of active requests...
    pub ratio: f64,
    /// ...or this many, whichever is more.
    pub floor: usize,
    /// Full-jitter backoff: base and cap of the retry delay.
    pub base_ms: u64,
    pub cap_ms: u64,
}

impl Default for RetrySettings {
    fn default() -> Self {
        RetrySettings { ratio: 0.2, floor: 3, base_ms: 25, cap_ms: 250 }
    }
}

pub fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read(path.to_path_buf(), e))?;
        let mut config: Config = toml::from_str(&text).map_err(|e| ConfigError::Parse(path.to_path_buf(), e))?;
        // Relative model paths are relative to the configuration file.
        let base = path.parent().unwrap_or(Path::new("."));
        for m in &mut config.models {
            if m.path.is_relative() {
                m.path = base.join(&m.path);
            }
        }
        config.validate()?;
        Ok(config)
    }

    /// Checks what types alone cannot: ranges and uniqueness.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        let p = &self.pool;
        if p.heartbeat_interval_ms == 0 || p.heartbeat_timeout_ms <= p.heartbeat_interval_ms {
            return bad(format!(
                "`pool.heartbeat_timeout_ms` ({}) must exceed `pool.heartbeat_interval_ms` ({}), which must be positive",
                p.heartbeat_timeout_ms, p.heartbeat_interval_ms
            ));
        }
        let mut names = std::collections::BTreeSet::new();
        for m in &self.models {
            if m.name.is_empty() {
                return bad("a model has an empty `name`".into());
            }
            if !names.insert(&m.name) {
                return bad(format!("model `{}` is declared twice", m.name));
            }
        }
        if !(self.http.rate_limit_per_s >= 0.0 && self.http.rate_limit_per_s.is_finite()) {
            return bad(format!("`http.rate_limit_per_s` must be >= 0, got {}", self.http.rate_limit_per_s));
        }
        if !(0.0..=1.0).contains(&self.retry.ratio) {
            return bad(format!("`retry.ratio` must be in [0, 1], got {}", self.retry.ratio));
        }
        if self.breaker.failure_threshold == 0 {
            return bad("`breaker.failure_threshold` must be at least 1".into());
        }
        if self.restart.max_spawns == 0 {
            return bad("`restart.max_spawns` must be at least 1".into());
        }
        Ok(())
    }

    pub fn model(&self, name: &str) -> Option<&ModelConfig> {
        self.models.iter().find(|m| m.name == name)
    }

    /// The worker program and its arguments.
    pub fn worker_command(&self) -> Vec<String> {
        if !self.pool.worker_command.is_empty() {
            return self.pool.worker_command.clone();
        }
        let exe = std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(|d| d.join("mlx-serving-worker")))
            .unwrap_or_else(|| PathBuf::from("mlx-serving-worker"));
        vec![exe.display().to_string()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_are_named() {
        let e = toml::from_str::<Config>("[pool]\nworkerz = 3\n").unwrap_err().to_string();
        assert!(e.contains("workerz"), "{e}");
    }

    #[test]
    fn defaults_follow_the_targets() {
        let c: Config = toml::from_str("").unwrap();
        assert_eq!(c.pool.heartbeat_timeout_ms, 5000);
        assert_eq!(c.breaker.failure_threshold, 5);
        assert_eq!(c.restart.max_spawns, 5);
        assert_eq!(c.retry.floor, 3);
        c.validate().unwrap();
    }

    #[test]
    fn the_example_configuration_parses_and_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/mlx-serving.example.toml");
        let c = Config::load(&path).unwrap();
        assert_eq!(c.models[0].name, "tiny");
        assert!(c.models[0].path.join("config.json").exists(), "{}", c.models[0].path.display());
        assert_eq!(c.pool.max_queue_per_model, 256);
    }

    #[test]
    fn duplicate_models_are_refused() {
        let c: Config = toml::from_str(
            "[[models]]\nname = \"a\"\npath = \"/x\"\n[[models]]\nname = \"a\"\npath = \"/y\"\n",
        )
        .unwrap();
        assert!(c.validate().unwrap_err().to_string().contains("`a` is declared twice"));
    }
}
