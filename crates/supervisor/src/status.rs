//! What the admin API's `status` reports.
use serde::Serialize;
use tokio::time::Instant;

use crate::worker::slot::{CrashRecord, Slot, WorkerState};

#[derive(Clone, Debug, Serialize)]
pub struct PoolStatus {
    pub uptime_s: f64,
    pub target_workers: usize,
    pub ready_workers: usize,
    pub active_requests: usize,
    pub retrying_requests: usize,
    /// Requests moved off a dead worker before their first token, since start.
    pub moved_requests: u64,
    /// Requests retried after a failure answer before their first token, since start.
    pub retried_requests: u64,
    /// Streams resumed on another worker after theirs died mid-stream, since start.
    pub resumed_streams: u64,
    /// Requests sent to a worker because it knew the longest prefix of their prompt, since
    /// start.
    pub prefix_routed_requests: u64,
    /// Models in the configuration.
    pub models: Vec<String>,
    pub shutting_down: bool,
    pub workers: Vec<WorkerStatus>,
}

#[derive(Clone, Debug, Serialize)]
pub struct WorkerStatus {
    pub id: u64,
    /// The worker group (`pool.groups`); absent for the main pool.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    pub state: WorkerState,
    /// The `CUDA_VISIBLE_DEVICES` its worker starts with (`pool.cuda_visible_devices`); absent
    /// when inherited.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cuda_visible_devices: Option<String>,
    pub pid: Option<u32>,
    /// Processes started in this slot so far.
    pub generation: u64,
    /// Seconds since the current worker became ready.
    pub uptime_s: Option<f64>,
    /// Requests in flight through this worker.
    pub in_flight: usize,
    /// From the last heartbeat.
    pub queue_depth: usize,
    pub active_sequences: usize,
    pub models: Vec<ModelStatus>,
    /// Bytes: MLX active, peak and cache memory and the process RSS, from the last heartbeat.
    pub memory: Option<mlx_serving_protocol::Memory>,
    /// The worker's prefix KV cache, from the last heartbeat.
    pub prefix_cache: Option<mlx_serving_protocol::PrefixCacheStats>,
    pub progress: Option<mlx_serving_protocol::Progress>,
    pub breaker: &'static str,
    pub consecutive_failures: u32,
    pub restarts: u64,
    /// Seconds until the next start, while exited or quarantined.
    pub next_start_in_s: Option<f64>,
    pub draining: bool,
    /// Prefix keys the supervisor remembers for this worker (prefix-affinity routing).
    pub prefix_keys: usize,
    pub last_crash: Option<CrashRecord>,
    pub crashes: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct ModelStatus {
    pub name: String,
    pub weight_bytes: u64,
    pub idle_s: f64,
}

impl WorkerStatus {
    pub fn of(slot: &Slot, now: Instant) -> WorkerStatus {
        let mut s = slot.lock();
        let beat = s.heartbeat.clone();
        WorkerStatus {
            id: slot.id,
            group: slot.group.clone(),
            state: s.state,
            cuda_visible_devices: s.cuda_device.clone(),
            pid: s.pid,
            generation: s.generation,
            uptime_s: s.ready_at.filter(|_| s.conn.is_some()).map(|t| now.duration_since(t).as_secs_f64()),
            in_flight: slot.inflight.load(std::sync::atomic::Ordering::Relaxed),
            queue_depth: beat.as_ref().map_or(0, |b| b.queue_depth),
            active_sequences: beat.as_ref().map_or(0, |b| b.active_sequences),
            models: s
                .models
                .iter()
                .map(|(name, m)| ModelStatus {
                    name: name.clone(),
                    weight_bytes: m.info.weight_bytes,
                    idle_s: now.duration_since(m.last_used).as_secs_f64(),
                })
                .collect(),
            memory: beat.as_ref().map(|b| b.memory),
            prefix_cache: beat.as_ref().map(|b| b.prefix_cache),
            progress: beat.as_ref().map(|b| b.progress),
            breaker: s.breaker.name(now),
            consecutive_failures: s.breaker.consecutive_failures(),
            restarts: s.restarts,
            next_start_in_s: s.next_start.map(|t| t.saturating_duration_since(now).as_secs_f64()),
            draining: s.drain,
            prefix_keys: s.prefixes.len(),
            last_crash: s.crashes.back().cloned(),
            crashes: s.crashes.len(),
        }
    }
}
