//! A pool of real worker processes on the fixture models.
#![allow(dead_code)]
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use mlx_serving_protocol::{FinalEvent, GenerateEvent, GenerateRequest, Prompt};
use mlx_serving_supervisor::config::ModelConfig;
use mlx_serving_supervisor::{Config, Pool, PoolError, PoolEvent};

pub const TEST_TIMEOUT: Duration = Duration::from_secs(240);

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// The worker binary, built beside this test (`cargo test --workspace` builds it).
pub fn worker_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(Path::parent).unwrap();
    let bin = dir.join("mlx-serving-worker");
    assert!(bin.exists(), "{} is missing: build it first (cargo build --release -p mlx-serving-worker)", bin.display());
    bin
}

/// A configuration for tests: fast heartbeats, two models (`m` preloaded, `m2` on demand).
pub fn config(workers: usize) -> Config {
    let mut c = Config::default();
    c.pool.workers = workers;
    c.pool.worker_command = vec![worker_bin().display().to_string()];
    c.pool.heartbeat_interval_ms = 100;
    c.pool.heartbeat_timeout_ms = 1500;
    c.pool.stall_timeout_ms = 3000;
    c.pool.stop_grace_ms = 1000;
    c.pool.drain_deadline_ms = 10_000;
    c.pool.seed = Some(7);
    c.models = vec![
        ModelConfig {
            name: "m".into(),
            path: fixtures().join("models/qwen3-bf16"),
            preload: true,
            keep_alive_s: 0,
            pinned: false,
        },
        ModelConfig {
            name: "m2".into(),
            path: fixtures().join("models/llama-bf16"),
            preload: false,
            keep_alive_s: 0,
            pinned: false,
        },
    ];
    c
}

pub async fn started(config: Config) -> Arc<Pool> {
    let n = config.pool.workers;
    let pool = Pool::start(config);
    assert!(pool.wait_ready(n, Duration::from_secs(60)).await, "workers not ready: {:?}", pool.status());
    pool
}

pub fn request(id: &str, text: &str, max_tokens: usize) -> GenerateRequest {
    GenerateRequest { ignore_eos: true, ..GenerateRequest::new(id, "m", Prompt::Text(text.into()), max_tokens) }
}

/// What one request delivered.
#[derive(Debug)]
pub struct Outcome {
    pub tokens: Vec<u32>,
    pub last: Result<FinalEvent, PoolError>,
}

pub async fn collect(pool: &Arc<Pool>, request: GenerateRequest) -> Outcome {
    let mut rx = pool.generate(request);
    let mut tokens = Vec::new();
    while let Some(item) = rx.recv().await {
        match item {
            Ok(PoolEvent::Started) => {}
            Ok(PoolEvent::Event(GenerateEvent::Token(t))) => tokens.extend(t.token_ids),
            Ok(PoolEvent::Event(GenerateEvent::Final(f))) => return Outcome { tokens, last: Ok(f) },
            Err(e) => return Outcome { tokens, last: Err(e) },
        }
    }
    panic!("the stream ended without a final event or an error");
}

/// Polls `check` until it holds or `within` passes.
pub async fn eventually(within: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    check()
}
