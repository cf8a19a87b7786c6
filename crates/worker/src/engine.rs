//! The engine thread: the one thread that calls MLX. The rest of the worker talks to it through
//! an [`EngineHandle`] (a channel of [`Command`]s, each with its own reply channel).
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use jsonrpsee::types::ErrorObjectOwned;
use mlx_serving_protocol::{ErrorCode, GenerateEvent, GenerateRequest, ModelInfo, ShutdownAck, Stats, Unloaded};
use tokio::sync::{mpsc, oneshot};

use crate::scheduler::Scheduler;
use crate::state::Shared;

/// Bounds of the engine, from the command line.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub device: mlx::Device,
    pub max_sequences: usize,
    pub max_queue: usize,
    pub kv_cache_bytes: u64,
    pub prefill_chunk: usize,
    /// Prompt tokens per prefill chunk at most, while no stream decodes and while they do.
    pub prefill_chunk_idle: usize,
    /// How long a prefill chunk may hold up the decoding streams, in seconds: a chunk grows past
    /// `prefill_chunk` to what the model's last chunk says it prefills in this time.
    pub prefill_stall_s: f64,
    pub max_line_bytes: usize,
    /// Context of every model when below its own; 0: each model's own.
    pub max_context_tokens: usize,
    /// Bytes of keys and values kept per model for prompts that share a prefix (0: none).
    pub prefix_cache_bytes: u64,
    /// How models are loaded.
    pub load: mlx_serving_engine::LoadOptions,
    /// When a model is warmed up as it loads ([`mlx_serving_engine::Model::warm_up`]), so that
    /// MLX compiles its kernels before any request waits on them.
    pub warm_up: WarmUp,
}

/// When the worker warms a model up as it loads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum WarmUp {
    /// On MLX's CUDA backend, which compiles kernels at run time (Metal compiles its own in
    /// milliseconds; the CPU compiles none).
    Auto,
    /// On every device.
    Always,
    /// Not at all.
    Never,
}

pub type Reply<T> = oneshot::Sender<Result<T, ErrorObjectOwned>>;

pub enum Command {
    Load {
        model: String,
        path: PathBuf,
        reply: Reply<ModelInfo>,
    },
    Unload {
        model: String,
        reply: Reply<Unloaded>,
    },
    List {
        reply: Reply<Vec<ModelInfo>>,
    },
    /// Admits or refuses a request; once admitted, its events go to `events`, the last one final.
    Generate {
        request: GenerateRequest,
        arrived: Instant,
        events: mpsc::UnboundedSender<GenerateEvent>,
        reply: Reply<()>,
    },
    Cancel {
        id: String,
        reply: Reply<bool>,
    },
    Stats {
        reply: Reply<Stats>,
    },
    /// Stop admitting; cancel what still runs at `deadline`; then the engine thread ends.
    Shutdown {
        deadline: Instant,
        reply: Reply<ShutdownAck>,
    },
    /// Nothing to do: wakes an idle engine thread, which then publishes fresh figures (its
    /// memory drops as MLX finishes work the thread no longer waits for).
    Refresh,
}

/// A cheap handle to the engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::UnboundedSender<Command>,
}

impl EngineHandle {
    /// Sends the command built by `make` and waits for its reply.
    pub async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, ErrorObjectOwned> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(make(reply)).map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }

    /// Sends [`Command::Refresh`] without waiting.
    pub fn refresh(&self) {
        let _ = self.tx.send(Command::Refresh);
    }
}

fn stopped() -> ErrorObjectOwned {
    ErrorCode::ShuttingDown.error("the engine has stopped")
}

/// Starts the engine thread. `done` fires when it ends: after a shutdown has finished, or when
/// every handle is gone.
pub fn spawn(config: EngineConfig, shared: Arc<Shared>) -> std::io::Result<(EngineHandle, oneshot::Receiver<()>)> {
    let (tx, rx) = mpsc::unbounded_channel();
    let (done_tx, done_rx) = oneshot::channel();
    std::thread::Builder::new().name("engine".into()).spawn(move || {
        if let Err(e) = mlx::set_default_device(config.device) {
            tracing::error!("cannot use the {} device: {e}", config.device);
            return;
        }
        Scheduler::new(config, shared).run(rx);
        let _ = done_tx.send(());
    })?;
    Ok((EngineHandle { tx }, done_rx))
}
