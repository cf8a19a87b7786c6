//! Prometheus metrics. Every name is listed in docs/metrics.md; they are recorded where the
//! events happen (the HTTP front, the pool, the slots) and exported by `GET /metrics`.
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use metrics_util::MetricKindMask;

use crate::pool::Pool;
use crate::worker::slot::WorkerState;

/// Buckets for latencies in seconds.
const LATENCY_BUCKETS: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// A gauge not set for this long leaves the scrape output: the series of a worker that was
/// removed (scaled down) or a model no longer served. [`refresh`] sets every live gauge each
/// period, so only those go.
pub const GAUGE_IDLE: Duration = Duration::from_secs(10);

/// The response cache's size, kept for [`refresh`] to set again each period.
static CACHE_BYTES: AtomicU64 = AtomicU64::new(0);
static CACHE_ENTRIES: AtomicU64 = AtomicU64::new(0);

/// Buckets of the token-count histograms: powers of two up to 32768.
const TOKEN_BUCKETS: &[f64] =
    &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0, 32768.0];

/// Installs the process-wide recorder once and returns its handle.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_tokens".into()), TOKEN_BUCKETS))
                .expect("the bucket lists are not empty")
                .idle_timeout(MetricKindMask::GAUGE, Some(GAUGE_IDLE));
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

/// The handles a request a worker took records into, for its route and model: registered once
/// per route and model and kept (each `counter!`/`histogram!` with labels builds a key and
/// looks it up in the registry, which a request would otherwise do about ten times).
pub struct RequestMetrics {
    route: &'static str,
    model: String,
    queue_wait: metrics::Histogram,
    first_token: metrics::Histogram,
    token_gap: metrics::Histogram,
    prompt_total: metrics::Counter,
    completion_total: metrics::Counter,
    prompt: metrics::Histogram,
    completion: metrics::Histogram,
    seconds: metrics::Histogram,
    done_ok: metrics::Counter,
    cancelled: metrics::Counter,
}

/// At most this many (route, model) pairs keep their handles; more register per request. Only
/// requests a worker took get here, so the pairs are those of the models being served.
const KEPT_REQUEST_METRICS: usize = 256;

type Kept = RwLock<HashMap<&'static str, HashMap<String, Arc<RequestMetrics>>>>;

static KEPT: OnceLock<Kept> = OnceLock::new();

impl RequestMetrics {
    /// The handles of `route` and `model`, registered on first use.
    pub fn of(route: &'static str, model: &str) -> Arc<RequestMetrics> {
        let kept = KEPT.get_or_init(Default::default);
        if let Some(m) =
            kept.read().unwrap_or_else(|e| e.into_inner()).get(route).and_then(|by_model| by_model.get(model))
        {
            return m.clone();
        }
        let m = Arc::new(RequestMetrics::register(route, model));
        // Handles taken before the recorder is installed go nowhere: keep only live ones.
        if HANDLE.get().is_some() {
            let mut kept = kept.write().unwrap_or_else(|e| e.into_inner());
            if kept.values().map(HashMap::len).sum::<usize>() < KEPT_REQUEST_METRICS {
                kept.entry(route).or_default().insert(model.to_string(), m.clone());
            }
        }
        m
    }

    fn register(route: &'static str, model: &str) -> RequestMetrics {
        let m = || model.to_string();
        RequestMetrics {
            route,
            model: m(),
            queue_wait: histogram!("mlx_queue_wait_seconds", "model" => m()),
            first_token: histogram!("mlx_time_to_first_token_seconds", "model" => m()),
            token_gap: histogram!("mlx_inter_token_latency_seconds", "model" => m()),
            prompt_total: counter!("mlx_prompt_tokens_total", "model" => m()),
            completion_total: counter!("mlx_completion_tokens_total", "model" => m()),
            prompt: histogram!("mlx_prompt_tokens", "model" => m()),
            completion: histogram!("mlx_completion_tokens", "model" => m()),
            seconds: histogram!("mlx_request_duration_seconds", "route" => route, "model" => m()),
            done_ok: counter!("mlx_http_requests_total", "route" => route, "model" => m(), "status" => "200"),
            cancelled: counter!("mlx_cancellations_total", "model" => m()),
        }
    }

    pub fn model(&self) -> &str {
        &self.model
    }

    pub fn queue_wait(&self, seconds: f64) {
        self.queue_wait.record(seconds);
    }

    pub fn first_token(&self, seconds: f64) {
        self.first_token.record(seconds);
    }

    /// `n` tokens that arrived together, `seconds` apart on average.
    pub fn gaps(&self, seconds: f64, n: usize) {
        self.token_gap.record_many(seconds, n);
    }

    pub fn tokens(&self, prompt: usize, completion: usize) {
        self.prompt_total.increment(prompt as u64);
        self.completion_total.increment(completion as u64);
        self.prompt.record(prompt as f64);
        self.completion.record(completion as f64);
    }

    /// The request ended with `status` after `seconds`.
    pub fn done(&self, status: u16, seconds: f64) {
        if status == 200 {
            self.done_ok.increment(1);
        } else {
            request_done(self.route, &self.model, status);
        }
        self.seconds.record(seconds);
    }

    /// The client went away before the end.
    pub fn cancelled(&self) {
        self.cancelled.increment(1);
        request_done(self.route, &self.model, 499);
    }
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
    CACHE_BYTES.store(bytes as u64, Relaxed);
    CACHE_ENTRIES.store(entries as u64, Relaxed);
    set_cache_gauges();
}

fn set_cache_gauges() {
    gauge!("mlx_response_cache_bytes").set(CACHE_BYTES.load(Relaxed) as f64);
    gauge!("mlx_response_cache_entries").set(CACHE_ENTRIES.load(Relaxed) as f64);
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
        set_cache_gauges();
        for w in &status.workers {
            let id = w.id.to_string();
            gauge!("mlx_worker_in_flight", "worker" => id.clone()).set(w.in_flight as f64);
            for (state, name) in STATES {
                gauge!("mlx_worker_state", "worker" => id.clone(), "state" => name)
                    .set(f64::from(u8::from(w.state == state)));
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
