//! Prometheus metrics. Every name is listed in docs/metrics.md; they are recorded where the
//! events happen (the HTTP front, the pool, the slots) and exported by `GET /metrics`.
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::pool::Pool;
use crate::worker::slot::WorkerState;

/// Buckets for latencies in seconds.
const LATENCY_BUCKETS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Buckets of the token-count histograms: powers of two up to 32768.
const TOKEN_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0, 32768.0];

/// Installs the process-wide recorder once and returns its handle.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_tokens".into()), TOKEN_BUCKETS))
                .expect("the bucket lists are not empty");
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed");
            }
            // Counters of rare events exist from the start, at 0.
            for reason in ["exit", "signal", "hung", "spawn", "start", "memory"] {
                counter!("mlx_worker_restarts_total", "reason" => reason).increment(0);
            }
            counter!("mlx_poisoned_requests_total").increment(0);
            for kind in ["moved", "retried", "resumed"] {
                counter!("mlx_retries_total", "kind" => kind).increment(0);
            }
            counter!("mlx_prefix_routed_requests_total").increment(0);
            counter!("mlx_coalesced_requests_total").increment(0);
            counter!("mlx_response_cache_hits_total").increment(0);
            counter!("mlx_response_cache_misses_total").increment(0);
            for reason in ["lru", "ttl"] {
                counter!("mlx_response_cache_evictions_total", "reason" => reason).increment(0);
            }
            cache_size(0, 0);
            handle
        })
        .clone()
}

pub fn request_done(route: &'static str, model: &str, status: u16) {
    counter!("mlx_http_requests_total", "route" => route, "model" => model.to_string(), "status" => status.to_string())
        .increment(1);
}

pub fn request_seconds(route: &'static str, model: &str, seconds: f64) {
    histogram!("mlx_request_duration_seconds", "route" => route, "model" => model.to_string()).record(seconds);
}

pub fn queue_wait(model: &str, seconds: f64) {
    histogram!("mlx_queue_wait_seconds", "model" => model.to_string()).record(seconds);
}

/// A request's handles to its model's per-token latency histograms: looked up once per request,
/// recorded on every token.
pub struct TokenLatency {
    first: metrics::Histogram,
    gap: metrics::Histogram,
}

impl TokenLatency {
    pub fn new(model: &str) -> TokenLatency {
        TokenLatency {
            first: histogram!("mlx_time_to_first_token_seconds", "model" => model.to_string()),
            gap: histogram!("mlx_inter_token_latency_seconds", "model" => model.to_string()),
        }
    }

    pub fn first_token(&self, seconds: f64) {
        self.first.record(seconds);
    }

    /// `n` tokens that arrived together, `seconds` apart on average.
    pub fn gaps(&self, seconds: f64, n: usize) {
        self.gap.record_many(seconds, n);
    }
}

pub fn tokens(model: &str, prompt: usize, completion: usize) {
    counter!("mlx_prompt_tokens_total", "model" => model.to_string()).increment(prompt as u64);
    counter!("mlx_completion_tokens_total", "model" => model.to_string()).increment(completion as u64);
    histogram!("mlx_prompt_tokens", "model" => model.to_string()).record(prompt as f64);
    histogram!("mlx_completion_tokens", "model" => model.to_string()).record(completion as f64);
}

pub fn cancelled(model: &str) {
    counter!("mlx_cancellations_total", "model" => model.to_string()).increment(1);
}

pub fn rejected(model: &str, reason: &'static str) {
    counter!("mlx_rejected_requests_total", "model" => model.to_string(), "reason" => reason).increment(1);
}

/// A request moved off a dead worker (`moved`), retried after a failure answer (`retried`), or
/// a stream resumed on another worker (`resumed`).
pub fn retry(kind: &'static str) {
    counter!("mlx_retries_total", "kind" => kind).increment(1);
}

/// A request was sent to a worker because it knew the longest prefix of its prompt.
pub fn prefix_routed() {
    counter!("mlx_prefix_routed_requests_total").increment(1);
}

/// A request joined an identical generation already running.
pub fn coalesced() {
    counter!("mlx_coalesced_requests_total").increment(1);
}

/// A deterministic request was answered from the response cache (`hit`) or not (`miss`).
pub fn cache_lookup(hit: bool) {
    if hit {
        counter!("mlx_response_cache_hits_total").increment(1);
    } else {
        counter!("mlx_response_cache_misses_total").increment(1);
    }
}

/// Answers left the response cache: `lru` to make room, `ttl` when they expired.
pub fn cache_evicted(reason: &'static str, n: usize) {
    counter!("mlx_response_cache_evictions_total", "reason" => reason).increment(n as u64);
}

/// What the response cache holds now.
pub fn cache_size(bytes: usize, entries: usize) {
    gauge!("mlx_response_cache_bytes").set(bytes as f64);
    gauge!("mlx_response_cache_entries").set(entries as f64);
}

/// A worker died; `reason` is its class: exit, signal, hung, spawn, start.
pub fn restart(reason: &'static str) {
    counter!("mlx_worker_restarts_total", "reason" => reason).increment(1);
}

/// A request was quarantined as poisonous.
pub fn poisoned() {
    counter!("mlx_poisoned_requests_total").increment(1);
}

pub fn heartbeat_rtt(worker: u64, seconds: f64) {
    histogram!("mlx_worker_rpc_rtt_seconds", "worker" => worker.to_string()).record(seconds);
}

/// The class of a crash reason, for the restart counter.
pub fn reason_class(reason: &str) -> &'static str {
    if reason.starts_with("exit status") {
        "exit"
    } else if reason.starts_with("signal") {
        "signal"
    } else if reason.starts_with("hung") {
        "hung"
    } else if reason.starts_with("spawn") {
        "spawn"
    } else if reason.starts_with("memory") {
        "memory"
    } else {
        "start"
    }
}

const STATES: [(WorkerState, &str); 6] = [
    (WorkerState::Starting, "starting"),
    (WorkerState::Ready, "ready"),
    (WorkerState::Draining, "draining"),
    (WorkerState::Stopping, "stopping"),
    (WorkerState::Exited, "exited"),
    (WorkerState::Quarantined, "quarantined"),
];

/// Sets the gauges from the pool's status and runs the exporter's upkeep, every `period`.
pub async fn refresh(pool: Arc<Pool>, handle: PrometheusHandle, period: Duration) {
    let mut tick = tokio::time::interval(period);
    loop {
        tick.tick().await;
        let status = pool.status();
        for model in &status.models {
            gauge!("mlx_queue_depth", "model" => model.clone()).set(pool.queue_depth(model) as f64);
        }
        gauge!("mlx_ready_workers").set(status.ready_workers as f64);
        for w in &status.workers {
            let id = w.id.to_string();
            gauge!("mlx_worker_in_flight", "worker" => id.clone()).set(w.in_flight as f64);
            for (state, name) in STATES {
                gauge!("mlx_worker_state", "worker" => id.clone(), "state" => name).set(f64::from(u8::from(w.state == state)));
            }
            let breaker = match w.breaker {
                "closed" => 0.0,
                "half_open" => 1.0,
                _ => 2.0,
            };
            gauge!("mlx_worker_breaker_state", "worker" => id.clone()).set(breaker);
            if let Some(m) = w.memory {
                for (kind, v) in [("active", m.active), ("peak", m.peak), ("cache", m.cache), ("rss", m.rss)] {
                    gauge!("mlx_worker_memory_bytes", "worker" => id.clone(), "kind" => kind).set(v as f64);
                }
            }
            if let Some(p) = w.prefix_cache {
                let figures = [
                    ("hits", p.hits),
                    ("misses", p.misses),
                    ("cached_tokens", p.cached_tokens),
                    ("evictions", p.evictions),
                    ("entries", p.entries as u64),
                    ("bytes", p.bytes),
                ];
                for (kind, v) in figures {
                    gauge!("mlx_worker_prefix_cache", "worker" => id.clone(), "kind" => kind).set(v as f64);
                }
            }
        }
        handle.run_upkeep();
    }
}
