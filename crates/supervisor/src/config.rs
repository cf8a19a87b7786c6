//! The supervisor's configuration: one TOML file, every field documented, unknown keys refused,
//! defaults in one place. Durations are in milliseconds (`*_ms`) or seconds (`*_s`).
use std::path::{Path, PathBuf};
use std::time::Duration;

use schemars::JsonSchema;
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

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Directories models must lie in. Every model path is made canonical (links and `..`
    /// resolved) and must be inside one of them; relative roots are relative to the
    /// configuration file. Empty: any path.
    pub model_roots: Vec<PathBuf>,
    pub pool: PoolConfig,
    /// Models the pool may serve. Requests name them by `name`.
    pub models: Vec<ModelConfig>,
    pub breaker: BreakerSettings,
    pub restart: RestartSettings,
    pub retry: RetrySettings,
    pub admin: AdminConfig,
    pub http: HttpConfig,
    pub metrics: MetricsConfig,
    pub logging: LoggingConfig,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Serve Prometheus metrics at `/metrics` on the HTTP listener.
    pub enabled: bool,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig { enabled: true }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct LoggingConfig {
    /// A tracing filter: `info`, `debug`, `warn,mlx_serving_supervisor=debug`. `RUST_LOG`, when
    /// set, takes precedence.
    pub level: String,
    /// JSON lines instead of text (both to stderr). Worker stderr lines are logged with the
    /// worker's id.
    pub json: bool,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        LoggingConfig { level: "info".into(), json: false }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
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
    /// Largest `max_tokens` a request may ask for; beyond it 400. 0: only the context bounds it.
    pub max_tokens: usize,
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
    /// Identical deterministic requests (temperature 0, or the same explicit seed, and the same
    /// model, prompt and parameters) that arrive while one of them runs share its generation:
    /// each gets the whole stream from the start, and the generation stops only when every one
    /// of them went away.
    pub coalesce: bool,
    pub response_cache: ResponseCacheConfig,
}

/// A cache of complete answers to deterministic requests (`[http.response_cache]`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct ResponseCacheConfig {
    /// Answer a deterministic request that was answered before from the cache, and mark every
    /// answer `x-cache: hit` or `x-cache: miss`.
    pub enabled: bool,
    /// Bytes the stored answers (with their keys) may take; the least recently used go first.
    pub max_bytes: usize,
    /// Seconds an answer stays in the cache after it was stored; 0 keeps it until it is evicted.
    pub ttl_s: u64,
}

impl Default for ResponseCacheConfig {
    fn default() -> Self {
        ResponseCacheConfig { enabled: false, max_bytes: 64 << 20, ttl_s: 600 }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: "127.0.0.1:8080".into(),
            api_keys: Vec::new(),
            max_body_bytes: 1 << 20,
            default_max_tokens: 512,
            max_tokens: 0,
            default_model: None,
            min_ready_workers: 1,
            sse_keep_alive_s: 15,
            rate_limit_per_s: 0.0,
            rate_limit_burst: 10,
            coalesce: true,
            response_cache: ResponseCacheConfig::default(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
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

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct PoolConfig {
    /// Worker processes kept running.
    pub workers: usize,
    /// The worker program and its arguments; the `mlx-serving-worker` beside the supervisor's
    /// executable when empty. The supervisor appends `--heartbeat-ms`, `--max-line-bytes`,
    /// `--device` and, when set, `--max-context-tokens`.
    pub worker_command: Vec<String>,
    /// MLX device of the workers: `auto` (the GPU where MLX has one), `gpu` or `cpu`.
    pub device: String,
    /// On a host with several NVIDIA GPUs, the GPUs the workers are spread over: each worker
    /// starts with `CUDA_VISIBLE_DEVICES` set to one entry (a GPU index or UUID, or several
    /// separated by commas; each entry once), the one the fewest workers have, and keeps it when
    /// it restarts. Empty: workers inherit the variable.
    pub cuda_visible_devices: Vec<String>,
    /// Models these workers serve; every configured model when empty.
    pub models: Vec<String>,
    /// Further groups of workers, each with its own command (another worker program, such as
    /// the Python worker) and the models it serves.
    pub groups: Vec<WorkerGroup>,
    /// Longest protocol line, in bytes, either way between the supervisor and a worker. A
    /// worker that writes a longer one is killed and replaced.
    pub max_line_bytes: usize,
    /// Context of every model, in tokens (prompt plus `max_tokens`), when below the model's own;
    /// longer requests get 400. 0: each model's own context. Passed to workers as
    /// `--max-context-tokens`.
    pub max_context_tokens: usize,
    /// Milliseconds between a worker's heartbeats.
    pub heartbeat_interval_ms: u64,
    /// A worker with no heartbeat for this long is hung: killed and replaced.
    pub heartbeat_timeout_ms: u64,
    /// A busy worker whose progress counters stand still this long is hung (not while it loads a
    /// model the pool asked for: `start_timeout_ms` bounds that).
    pub stall_timeout_ms: u64,
    /// Longest wait for a new worker to answer its handshake and load its models (warm-up
    /// included).
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
    /// Prefix-affinity routing: a request goes to the worker that was sent the longest prefix
    /// of its prompt (the same first messages, or the same leading blocks of text or token
    /// ids), where that worker's KV cache may still hold it, unless that worker has more than
    /// this many requests beyond the least busy one. 0: a prefix only breaks ties among the
    /// least busy workers.
    pub prefix_affinity_slack: usize,
    /// Prefix keys each worker's memory holds (least recently used forgotten first; all of them
    /// when the worker restarts). 0 turns prefix affinity off.
    pub prefix_affinity_keys: usize,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            workers: 2,
            worker_command: Vec::new(),
            device: "auto".into(),
            cuda_visible_devices: Vec::new(),
            models: Vec::new(),
            groups: Vec::new(),
            max_line_bytes: mlx_serving_protocol::framing::DEFAULT_MAX_LINE_BYTES,
            max_context_tokens: 0,
            heartbeat_interval_ms: 1000,
            heartbeat_timeout_ms: 5000,
            stall_timeout_ms: 5000,
            start_timeout_ms: 300_000,
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
            prefix_affinity_slack: 2,
            prefix_affinity_keys: 4096,
        }
    }
}

/// A group of workers beside the main pool (`[[pool.groups]]`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WorkerGroup {
    /// Shown in status and logs.
    pub name: String,
    /// Worker processes of this group.
    pub workers: usize,
    /// The worker program and its arguments (the same flags are appended as for the pool).
    pub worker_command: Vec<String>,
    /// Models the group serves; every configured model when empty.
    #[serde(default)]
    pub models: Vec<String>,
    /// MLX device; `pool.device` when absent.
    #[serde(default)]
    pub device: Option<String>,
    /// GPUs this group's workers are spread over (as `pool.cuda_visible_devices`); the pool's
    /// list when absent.
    #[serde(default)]
    pub cuda_visible_devices: Option<Vec<String>>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
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
    /// Loaded on every worker that serves it and never unloaded: not when idle, not to make
    /// room under `pool.memory_budget_bytes` (implies `preload`).
    #[serde(default)]
    pub pinned: bool,
}

fn default_keep_alive() -> u64 {
    300
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
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

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
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

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
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
        config.resolve_paths(path.parent().unwrap_or(Path::new(".")))?;
        config.validate()?;
        Ok(config)
    }

    /// Makes model paths and roots absolute (relative ones are relative to `base`, the
    /// configuration file's directory) and canonical, and checks that every model lies under a
    /// root. A model directory must exist when roots are set; otherwise a missing one is left
    /// as written and fails when a worker loads it.
    pub fn resolve_paths(&mut self, base: &Path) -> Result<(), ConfigError> {
        let absolute = |p: &Path| if p.is_relative() { base.join(p) } else { p.to_path_buf() };
        let mut roots = Vec::new();
        for (i, root) in self.model_roots.iter().enumerate() {
            let r = absolute(root);
            let canonical = r
                .canonicalize()
                .map_err(|e| ConfigError::Invalid(format!("`model_roots[{i}]` = `{}`: {e}", r.display())))?;
            roots.push(canonical);
        }
        for m in &mut self.models {
            let p = absolute(&m.path);
            match p.canonicalize() {
                Ok(canonical) => m.path = canonical,
                Err(e) if !roots.is_empty() => {
                    return Err(ConfigError::Invalid(format!("model `{}`: path `{}`: {e}", m.name, p.display())));
                }
                Err(_) => m.path = p,
            }
            if !roots.is_empty() && !roots.iter().any(|r| m.path.starts_with(r)) {
                return Err(ConfigError::Invalid(format!(
                    "model `{}`: path `{}` is outside the model roots ({})",
                    m.name,
                    m.path.display(),
                    roots.iter().map(|r| format!("`{}`", r.display())).collect::<Vec<_>>().join(", ")
                )));
            }
        }
        self.model_roots = roots;
        Ok(())
    }

    /// Checks what types alone cannot: ranges and uniqueness.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        let p = &self.pool;
        let workers = p.workers + p.groups.iter().map(|g| g.workers).sum::<usize>();
        if workers == 0 {
            return bad("`pool.workers` must be at least 1 (or a group in `pool.groups` must have workers)".into());
        }
        let devices = ["auto", "gpu", "cpu"];
        for (key, device) in std::iter::once(("pool.device".to_string(), Some(&p.device)))
            .chain(p.groups.iter().enumerate().map(|(i, g)| (format!("pool.groups[{i}].device"), g.device.as_ref())))
        {
            if let Some(d) = device
                && !devices.contains(&d.as_str())
            {
                return bad(format!("`{key}` must be one of auto, gpu, cpu; got `{d}`"));
            }
        }
        let gpu_lists = std::iter::once(("pool.cuda_visible_devices".to_string(), Some(&p.cuda_visible_devices)))
            .chain(
                p.groups
                    .iter()
                    .enumerate()
                    .map(|(i, g)| (format!("pool.groups[{i}].cuda_visible_devices"), g.cuda_visible_devices.as_ref())),
            );
        for (key, list) in gpu_lists {
            let list = list.map_or(&[][..], Vec::as_slice);
            if let Some(entry) =
                list.iter().find(|d| d.is_empty() || d.chars().any(|c| c.is_whitespace() || c.is_control()))
            {
                return bad(format!(
                    "`{key}` entries must be non-empty and without spaces, got `{}`",
                    entry.escape_debug()
                ));
            }
            if let Some((i, twice)) = list.iter().enumerate().find(|(i, d)| list[..*i].contains(d)) {
                return bad(format!(
                    "`{key}` lists `{twice}` twice (entry {i}); each GPU once: workers are spread evenly"
                ));
            }
        }
        if p.max_line_bytes < 4096 {
            return bad(format!("`pool.max_line_bytes` must be at least 4096, got {}", p.max_line_bytes));
        }
        let mut group_names = std::collections::BTreeSet::new();
        for (i, g) in p.groups.iter().enumerate() {
            if g.name.is_empty() || !group_names.insert(&g.name) {
                return bad(format!("`pool.groups[{i}].name` must be present and unique, got `{}`", g.name));
            }
            if g.worker_command.is_empty() {
                return bad(format!("`pool.groups[{i}].worker_command` is empty"));
            }
        }
        let model_lists = std::iter::once(("pool.models".to_string(), &p.models))
            .chain(p.groups.iter().enumerate().map(|(i, g)| (format!("pool.groups[{i}].models"), &g.models)));
        for (key, list) in model_lists {
            if let Some(unknown) = list.iter().find(|m| self.model(m).is_none()) {
                return bad(format!("`{key}` names `{unknown}`, which is not a configured model"));
            }
        }
        if self.logging.level.trim().is_empty() {
            return bad("`logging.level` is empty".into());
        }
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
        let cache = &self.http.response_cache;
        if cache.enabled && cache.max_bytes == 0 {
            return bad(
                "`http.response_cache.max_bytes` must be at least 1 when `http.response_cache.enabled` is true".into(),
            );
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

    /// A group by name (`None`: the main pool's workers).
    pub fn group(&self, name: Option<&str>) -> Option<&WorkerGroup> {
        name.and_then(|n| self.pool.groups.iter().find(|g| g.name == n))
    }

    /// Whether workers of `group` serve `model`.
    pub fn serves(&self, group: Option<&str>, model: &str) -> bool {
        let list = match group {
            None => &self.pool.models,
            Some(_) => match self.group(group) {
                Some(g) => &g.models,
                None => return false,
            },
        };
        list.is_empty() || list.iter().any(|m| m == model)
    }

    /// The `CUDA_VISIBLE_DEVICES` values the workers of `group` are spread over (`None`: the
    /// main pool's workers); empty when they inherit the variable.
    pub fn cuda_devices_for(&self, group: Option<&str>) -> &[String] {
        match self.group(group).and_then(|g| g.cuda_visible_devices.as_ref()) {
            Some(list) => list,
            None => &self.pool.cuda_visible_devices,
        }
    }

    /// The command that starts a worker of `group`: its program and arguments, then the flags
    /// the supervisor sets.
    pub fn worker_command_for(&self, group: Option<&str>) -> Vec<String> {
        let (mut command, device) = match self.group(group) {
            Some(g) => (g.worker_command.clone(), g.device.clone().unwrap_or_else(|| self.pool.device.clone())),
            None => (self.worker_command(), self.pool.device.clone()),
        };
        command.extend([
            "--heartbeat-ms".to_string(),
            self.pool.heartbeat_interval_ms.to_string(),
            "--max-line-bytes".to_string(),
            self.pool.max_line_bytes.to_string(),
            "--device".to_string(),
            device,
        ]);
        if self.pool.max_context_tokens > 0 {
            command.extend(["--max-context-tokens".to_string(), self.pool.max_context_tokens.to_string()]);
        }
        command
    }

    /// The main pool's worker program and its arguments.
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

    fn repo() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
    }

    #[test]
    fn the_documented_configuration_parses_and_is_valid() {
        let c = Config::load(&repo().join("config/mlx-serving.toml")).unwrap();
        assert_eq!(c.models[0].name, "demo");
        assert!(c.models[0].path.join("config.json").exists(), "{}", c.models[0].path.display());
        assert_eq!(c.pool.max_queue_per_model, 256);
    }

    /// Every key of the schema, as `section.key` paths (`models[].name`).
    fn schema_keys() -> Vec<String> {
        let schema = serde_json::to_value(schemars::schema_for!(Config)).unwrap();
        let defs = schema["$defs"].clone();
        fn walk(v: &serde_json::Value, defs: &serde_json::Value, prefix: &str, out: &mut Vec<String>) {
            let resolve = |v: &serde_json::Value| -> serde_json::Value {
                match v.get("$ref").and_then(|r| r.as_str()) {
                    Some(r) => defs[r.trim_start_matches("#/$defs/")].clone(),
                    None => v.clone(),
                }
            };
            let v = resolve(v);
            let Some(props) = v.get("properties").and_then(|p| p.as_object()) else { return };
            for (k, sub) in props {
                let path = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                out.push(path.clone());
                let sub = resolve(sub);
                walk(&sub, defs, &path, out);
                if let Some(items) = sub.get("items") {
                    walk(items, defs, &format!("{path}[]"), out);
                }
            }
        }
        let mut out = Vec::new();
        walk(&schema, &defs, "", &mut out);
        out
    }

    #[test]
    fn every_key_is_in_the_documented_file_and_the_reference() {
        let file = std::fs::read_to_string(repo().join("config/mlx-serving.toml")).unwrap();
        let reference = std::fs::read_to_string(repo().join("docs/configuration.md")).unwrap();
        let keys = schema_keys();
        assert!(keys.len() > 50, "{keys:?}");
        for key in keys {
            let leaf = key.rsplit(['.', ']']).next().unwrap();
            // `key =` (set or commented out) or a table header naming it.
            let in_file = file.lines().any(|l| {
                let l = l.trim_start_matches(['#', ' ']);
                l.starts_with(&format!("{leaf} "))
                    || l.starts_with(&format!("{leaf}="))
                    || l.contains(&format!(".{leaf}]"))
                    || l.contains(&format!("[{leaf}]"))
            });
            assert!(in_file, "`{key}` is missing from config/mlx-serving.toml");
            assert!(reference.contains(&format!("`{key}`")), "`{key}` is missing from docs/configuration.md");
        }
    }

    #[test]
    fn every_documented_key_round_trips() {
        let c = Config::load(&repo().join("config/mlx-serving.toml")).unwrap();
        let text = toml::to_string(&c).unwrap();
        let again: Config = toml::from_str(&text).unwrap();
        assert_eq!(c, again);
        // The documented values are the defaults, but for the model and its root.
        let defaults = Config { models: c.models.clone(), model_roots: c.model_roots.clone(), ..Config::default() };
        assert_eq!(c, defaults, "config/mlx-serving.toml and the defaults differ");
        // A file with every optional field set (groups, seed, token) round-trips too.
        let mut full = c.clone();
        full.pool.seed = Some(7);
        full.admin.token = Some("t".into());
        full.http.default_model = Some("tiny".into());
        full.pool.groups.push(WorkerGroup {
            name: "python".into(),
            workers: 1,
            worker_command: vec!["pyworker".into()],
            models: vec!["tiny".into()],
            device: Some("cpu".into()),
            cuda_visible_devices: Some(vec!["1".into()]),
        });
        let again: Config = toml::from_str(&toml::to_string(&full).unwrap()).unwrap();
        assert_eq!(full, again);
        again.validate().unwrap();
    }

    fn load_text(text: &str) -> Result<Config, ConfigError> {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("mlx-serving-config-test-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.toml");
        std::fs::write(&path, text).unwrap();
        let r = Config::load(&path);
        let _ = std::fs::remove_dir_all(&dir);
        r
    }

    #[test]
    fn bad_files_get_errors_that_name_the_problem_and_the_file() {
        let e = load_text("[pool]\nworkers = 2\nheartbeat_intervall_ms = 5\n").unwrap_err().to_string();
        assert!(e.contains("heartbeat_intervall_ms") && e.contains("c.toml"), "{e}");
        let e = load_text("[http]\nmax_body_bytes = \"big\"\n").unwrap_err().to_string();
        assert!(e.contains("max_body_bytes") && e.contains("c.toml") && e.contains("invalid type"), "{e}");
        let e = load_text("[pool]\nworkers = 0\n").unwrap_err().to_string();
        assert!(e.contains("`pool.workers` must be at least 1"), "{e}");
        let e = load_text("[pool]\ndevice = \"tpu\"\n").unwrap_err().to_string();
        assert!(e.contains("`pool.device`") && e.contains("tpu"), "{e}");
        let e = load_text("[pool]\ncuda_visible_devices = [\"0\", \"\"]\n").unwrap_err().to_string();
        assert!(e.contains("`pool.cuda_visible_devices`") && e.contains("non-empty"), "{e}");
        let e = load_text(
            "[[pool.groups]]\nname = \"g\"\nworkers = 1\nworker_command = [\"w\"]\ncuda_visible_devices = [\"0 1\"]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("`pool.groups[0].cuda_visible_devices`") && e.contains("`0 1`"), "{e}");
        let e = load_text("[pool]\ncuda_visible_devices = [\"0\", \"1\", \"0\"]\n").unwrap_err().to_string();
        assert!(e.contains("`pool.cuda_visible_devices` lists `0` twice"), "{e}");
        let e = load_text("[pool]\nmodels = [\"nope\"]\n").unwrap_err().to_string();
        assert!(e.contains("`pool.models` names `nope`"), "{e}");
        let e = load_text("[http.response_cache]\nenabled = true\nmax_bytes = 0\n").unwrap_err().to_string();
        assert!(e.contains("`http.response_cache.max_bytes`"), "{e}");
        let e = load_text("[http.response_cache]\nttl = 5\n").unwrap_err().to_string();
        assert!(e.contains("ttl") && e.contains("ttl_s"), "{e}");
        let e = load_text("[http]\ncoalesce = \"yes\"\n").unwrap_err().to_string();
        assert!(e.contains("coalesce") && e.contains("invalid type"), "{e}");
    }

    #[test]
    fn a_group_spreads_over_its_own_gpus_or_the_pools() {
        let c = load_text(
            "[pool]\ncuda_visible_devices = [\"0\", \"1\"]\n\
             [[pool.groups]]\nname = \"own\"\nworkers = 1\nworker_command = [\"w\"]\ncuda_visible_devices = [\"2\"]\n\
             [[pool.groups]]\nname = \"inherits\"\nworkers = 1\nworker_command = [\"w\"]\n\
             [[pool.groups]]\nname = \"none\"\nworkers = 1\nworker_command = [\"w\"]\ncuda_visible_devices = []\n",
        )
        .unwrap();
        assert_eq!(c.cuda_devices_for(None), ["0", "1"]);
        assert_eq!(c.cuda_devices_for(Some("own")), ["2"]);
        assert_eq!(c.cuda_devices_for(Some("inherits")), ["0", "1"]);
        assert!(c.cuda_devices_for(Some("none")).is_empty(), "an empty list: the variable is inherited");
    }

    #[test]
    fn model_paths_must_lie_under_the_roots() {
        let root = repo().join("tests/fixtures/models").canonicalize().unwrap();
        let config = |path: &str| {
            format!("model_roots = [\"{}\"]\n[[models]]\nname = \"x\"\npath = \"{path}\"\n", root.display())
        };
        // `..` that leaves the root, and an absolute path elsewhere.
        for path in [format!("{}/../../../crates", root.display()), "/tmp".to_string()] {
            let e = load_text(&config(&path)).unwrap_err().to_string();
            assert!(e.contains("model `x`") && e.contains("outside the model roots"), "{e}");
        }
        // A path through `..` that stays inside is made canonical.
        let c = load_text(&config(&format!("{}/llama-bf16/../qwen3-bf16", root.display()))).unwrap();
        assert_eq!(c.models[0].path, root.join("qwen3-bf16"));
        // Under roots, a missing directory is an error at once.
        let e = load_text(&config(&format!("{}/nope", root.display()))).unwrap_err().to_string();
        assert!(e.contains("model `x`") && e.contains("nope"), "{e}");
    }
}
