//! The heartbeat: a notification every interval from a tokio task, which never waits on MLX; it
//! reads the figures the engine thread publishes in [`Shared`].
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use mlx_serving_protocol::{HEARTBEAT_METHOD, Heartbeat};
use sysinfo::{ProcessRefreshKind, ProcessesToUpdate, System};
use tokio::sync::mpsc;

use crate::engine::EngineHandle;
use crate::state::Shared;

/// Resident set size of this process, 0 where it cannot be read.
pub fn rss_bytes() -> u64 {
    let (Ok(mut sys), Ok(pid)) = (System::new(), sysinfo::get_current_pid()) else {
        return 0;
    };
    sys.refresh_processes_specifics(
        ProcessesToUpdate::Some(&[pid]),
        false,
        ProcessRefreshKind::nothing().with_memory(),
    );
    sys.process(pid).map_or(0, |p| p.memory())
}

pub fn heartbeat(shared: &Shared, seq: u64) -> Heartbeat {
    Heartbeat {
        seq,
        uptime_ms: shared.uptime_ms(),
        progress: shared.progress(),
        queue_depth: shared.queue_depth.load(Relaxed),
        active_sequences: shared.active_sequences.load(Relaxed),
        models: shared.models(),
        memory: shared.memory(rss_bytes()),
        draining: shared.draining.load(Relaxed),
        prefix_cache: shared.prefix_cache(),
    }
}

/// Sends a heartbeat notification to `out` every `period` until `out` closes. Each tick also
/// wakes the engine thread, so that an idle engine's figures are at most one period old.
pub async fn run(shared: Arc<Shared>, period: Duration, out: mpsc::Sender<String>, engine: EngineHandle) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    for seq in 0.. {
        tick.tick().await;
        engine.refresh();
        let msg = serde_json::json!({
            "jsonrpc": "2.0",
            "method": HEARTBEAT_METHOD,
            "params": heartbeat(&shared, seq),
        });
        if out.send(msg.to_string()).await.is_err() {
            return;
        }
    }
}
