//! Figures the engine thread publishes for the heartbeat and stats, readable from any thread
//! without waiting on MLX.
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::Instant;

use mlx_serving_protocol::{Memory, PrefixCacheStats, Progress};

pub struct Shared {
    pub started: Instant,
    pub prefilled_tokens: AtomicU64,
    pub decoded_tokens: AtomicU64,
    pub steps: AtomicU64,
    pub queue_depth: AtomicUsize,
    pub active_sequences: AtomicUsize,
    pub mlx_active: AtomicU64,
    pub mlx_peak: AtomicU64,
    pub mlx_cache: AtomicU64,
    pub draining: AtomicBool,
    pub models: Mutex<Vec<String>>,
    pub prefix_cache: Mutex<PrefixCacheStats>,
}

impl Shared {
    pub fn new() -> Shared {
        Shared {
            started: Instant::now(),
            prefilled_tokens: AtomicU64::new(0),
            decoded_tokens: AtomicU64::new(0),
            steps: AtomicU64::new(0),
            queue_depth: AtomicUsize::new(0),
            active_sequences: AtomicUsize::new(0),
            mlx_active: AtomicU64::new(0),
            mlx_peak: AtomicU64::new(0),
            mlx_cache: AtomicU64::new(0),
            draining: AtomicBool::new(false),
            models: Mutex::new(Vec::new()),
            prefix_cache: Mutex::new(PrefixCacheStats::default()),
        }
    }

    pub fn prefix_cache(&self) -> PrefixCacheStats {
        self.prefix_cache.lock().map(|p| *p).unwrap_or_default()
    }

    pub fn uptime_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    pub fn progress(&self) -> Progress {
        Progress {
            prefilled_tokens: self.prefilled_tokens.load(Relaxed),
            decoded_tokens: self.decoded_tokens.load(Relaxed),
            steps: self.steps.load(Relaxed),
        }
    }

    /// MLX's figures as last published by the engine thread, and the process RSS (`rss`).
    pub fn memory(&self, rss: u64) -> Memory {
        Memory {
            active: self.mlx_active.load(Relaxed),
            peak: self.mlx_peak.load(Relaxed),
            cache: self.mlx_cache.load(Relaxed),
            rss,
        }
    }

    pub fn models(&self) -> Vec<String> {
        self.models.lock().map(|m| m.clone()).unwrap_or_default()
    }

    /// Called on the engine thread only.
    pub fn publish_mlx_memory(&self) {
        self.mlx_active.store(mlx::memory::active() as u64, Relaxed);
        self.mlx_peak.store(mlx::memory::peak() as u64, Relaxed);
        self.mlx_cache.store(mlx::memory::cache() as u64, Relaxed);
    }
}

impl Default for Shared {
    fn default() -> Self {
        Shared::new()
    }
}
