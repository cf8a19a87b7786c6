//! `mlx-serving-worker`: one MLX device context and the models loaded in it, served over
//! JSON-RPC 2.0 on stdin/stdout (one JSON object per line). stdout carries the protocol only;
//! logs go to stderr. The worker exits when stdin ends: that is how it learns its parent died.
mod engine;
mod heartbeat;
mod rpc;
mod scheduler;
mod server;
mod state;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Parser, ValueEnum};
use mlx_serving_protocol::framing::DEFAULT_MAX_LINE_BYTES;
use mlx_serving_protocol::{Handshake, PROTOCOL_VERSION, WorkerRpcServer};
use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;

use crate::engine::{Command, EngineConfig, WarmUp};
use crate::scheduler::Scheduler;
use crate::state::Shared;

#[derive(Clone, Copy, ValueEnum)]
enum DeviceArg {
    /// The GPU where MLX has one (Metal, CUDA), else the CPU.
    Auto,
    Gpu,
    Cpu,
}

#[derive(Parser)]
#[command(name = "mlx-serving-worker", version, about = "An mlx-serving worker: JSON-RPC 2.0 over stdin/stdout")]
struct Args {
    /// Load this model directory at start-up (more can be loaded with `load_model`).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Name of the --model for requests; the directory name when absent.
    #[arg(long, requires = "model")]
    model_name: Option<String>,
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    device: DeviceArg,
    /// Milliseconds between heartbeat notifications.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    heartbeat_ms: u64,
    /// Sequences decoded together at most.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..))]
    max_sequences: u64,
    /// Requests waiting for admission at most; more are refused as overloaded.
    #[arg(long, default_value_t = 256)]
    max_queue: usize,
    /// Bytes of KV cache the running sequences may reserve together (prompt + max_tokens each).
    #[arg(long, default_value_t = 2 << 30)]
    kv_cache_bytes: u64,
    /// Prompt tokens per prefill chunk; between chunks the running streams decode a step.
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u64).range(1..))]
    prefill_chunk: u64,
    /// Prompt tokens per prefill chunk at most while no stream decodes: no one waits on the
    /// chunk, and a larger one prefills faster where each operation has a fixed cost (mlx-lm's
    /// prefill step by default). A chunk grows only as far as the model prefills in about a
    /// second, measured on its last chunk; below --prefill-chunk this changes nothing.
    #[arg(long, default_value_t = 2048, value_parser = clap::value_parser!(u64).range(1..))]
    prefill_chunk_idle: u64,
    /// Milliseconds a prefill chunk may hold up the streams that decode (each waits for it
    /// before its next token): a chunk grows past --prefill-chunk to as many tokens as the model
    /// prefills in this time, measured on its last chunk, and at most --prefill-chunk-idle. Where
    /// a chunk is fast (a small model on a GPU) a burst of prompts starts in fewer steps; 0: every
    /// chunk while streams decode takes --prefill-chunk.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(0..=1000))]
    prefill_stall_ms: u64,
    /// Longest accepted input line in bytes; longer lines get an error response.
    #[arg(long, default_value_t = DEFAULT_MAX_LINE_BYTES)]
    max_line_bytes: usize,
    /// Context of every model in tokens (prompt plus max_tokens) when below the model's own;
    /// 0 keeps each model's own.
    #[arg(long, default_value_t = 0)]
    max_context_tokens: usize,
    /// Bytes of keys and values kept per model so that prompts sharing a prefix with a recent
    /// one skip that part of the prefill; 0 turns the prefix cache off.
    #[arg(long, default_value_t = 512 << 20)]
    prefix_cache_bytes: u64,
    /// MLX's memory limit in bytes: past it, an allocation first waits for running work to
    /// free memory. Workers that share one GPU each need their share here. 0 keeps MLX's own
    /// (the device's recommended working set).
    #[arg(long, default_value_t = 0)]
    memory_limit_bytes: u64,
    /// Bytes of freed buffers MLX keeps for reuse. What one worker keeps, other processes on
    /// the same GPU cannot use. MLX's own when absent (the memory limit); 0 keeps none.
    #[arg(long)]
    cache_limit_bytes: Option<u64>,
    /// Compute the query, key and value projections as one matrix product, and the MLP's gate
    /// and up projections as another (the same values; fewer kernels per step).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    stack_projections: bool,
    /// On MLX's CUDA backend, attend over batch rows of different lengths with one kernel per
    /// layer instead of MLX's masked attention (composed of about 15 operations). No effect
    /// elsewhere.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    padded_attention_kernel: bool,
    /// Prefill the prompts of one chunk as rows of one batch, with one attention per layer for
    /// all of them, instead of one attention each.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    prefill_rows: bool,
    /// How much padding rows of different lengths may add to such a prefill, as a share of its
    /// tokens (0: rows of equal length only). When absent, 1 on MLX's CUDA backend, 0 on Metal
    /// and the CPU.
    #[arg(long, value_parser = padding_share)]
    prefill_row_padding: Option<f32>,
    /// Run each quantized matrix product of a model at every row tile it can take, and a few
    /// requests through the engine, while the model loads, before serving it. MLX's CUDA backend
    /// compiles kernels the first time each runs (a quantized tile about 35 s, then kept on disk
    /// under MLX_PTX_CACHE_DIR), and a request that waited on compiles would stall the worker
    /// past the supervisor's stall_timeout_ms. `auto`: on CUDA only.
    #[arg(long, value_enum, default_value_t = WarmUp::Auto)]
    warm_up: WarmUp,
}

fn padding_share(s: &str) -> std::result::Result<f32, String> {
    match s.parse::<f32>() {
        Ok(x) if x.is_finite() && x >= 0.0 => Ok(x),
        _ => Err(format!("expected a number of 0 or more (a share of the prefill's tokens), got `{s}`")),
    }
}

fn main() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let args = Args::parse();
    exit_with_parent();
    match run(args) {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            tracing::error!("{e:#}");
            std::process::exit(1);
        }
    }
}

/// On Linux the kernel also kills the worker when its parent dies (stdin EOF covers every OS).
/// The main thread lives as long as the process, which this setting needs.
#[cfg(target_os = "linux")]
fn exit_with_parent() {
    let parent = nix::unistd::getppid();
    if let Err(e) = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL) {
        tracing::warn!("PR_SET_PDEATHSIG failed: {e}");
    }
    // The parent may have died before the call.
    if nix::unistd::getppid() != parent {
        std::process::exit(1);
    }
}

#[cfg(not(target_os = "linux"))]
fn exit_with_parent() {}

fn run(args: Args) -> Result<()> {
    let device = match args.device {
        DeviceArg::Auto if mlx::gpu_available() => mlx::Device::Gpu,
        DeviceArg::Auto | DeviceArg::Cpu => mlx::Device::Cpu,
        DeviceArg::Gpu => mlx::Device::Gpu,
    };
    if args.memory_limit_bytes > 0 {
        let before = mlx::memory::set_memory_limit(args.memory_limit_bytes as usize);
        tracing::info!(bytes = args.memory_limit_bytes, before, "MLX memory limit");
    }
    if let Some(bytes) = args.cache_limit_bytes {
        let before = mlx::memory::set_cache_limit(bytes as usize);
        tracing::info!(bytes, before, "MLX buffer-cache limit");
    }
    let config = EngineConfig {
        device,
        max_sequences: args.max_sequences as usize,
        max_queue: args.max_queue,
        kv_cache_bytes: args.kv_cache_bytes,
        prefill_chunk: args.prefill_chunk as usize,
        prefill_chunk_idle: args.prefill_chunk_idle as usize,
        prefill_stall_s: args.prefill_stall_ms as f64 / 1e3,
        max_line_bytes: args.max_line_bytes,
        max_context_tokens: args.max_context_tokens,
        prefix_cache_bytes: args.prefix_cache_bytes,
        load: mlx_serving_engine::LoadOptions {
            stack_projections: args.stack_projections,
            padded_attention_kernel: args.padded_attention_kernel,
            prefill_rows: args.prefill_rows,
            prefill_row_padding: args.prefill_row_padding,
        },
        warm_up: args.warm_up,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let result = runtime.block_on(serve(args, config));
    // A blocking read of stdin may still be in progress; do not wait for it.
    runtime.shutdown_background();
    result
}

/// How long an exit on stdin EOF waits for the engine thread to finish MLX's outstanding work.
const ENGINE_EXIT_WAIT: Duration = Duration::from_secs(5);

async fn serve(args: Args, config: EngineConfig) -> Result<()> {
    let shared = Arc::new(Shared::new());
    let handshake = Handshake {
        protocol_version: PROTOCOL_VERSION.into(),
        engine: format!("mlx-serving-worker {} (mlx {})", env!("CARGO_PKG_VERSION"), mlx::version()),
        device: config.device.to_string(),
        pid: std::process::id(),
        capabilities: ["generate", "cancel", "logprobs", "chat", "token_ids", "continuous_batching"]
            .map(String::from)
            .to_vec(),
        limits: Scheduler::limits(&config),
    };
    let max_line_bytes = config.max_line_bytes;
    let (engine, mut engine_done) = engine::spawn(config, shared.clone())?;

    if let Some(path) = &args.model {
        let name = match &args.model_name {
            Some(n) => n.clone(),
            None => path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into()),
        };
        let path = path.clone();
        engine
            .call(|reply| Command::Load { model: name, path, reply })
            .await
            .map_err(|e| anyhow::anyhow!(e.message().to_string()))
            .context("loading --model")?;
    }

    let (out, lines) = mpsc::channel::<String>(4096);
    let writer = tokio::spawn(server::write_lines(lines, tokio::io::stdout()));
    let heartbeat = tokio::spawn(heartbeat::run(
        shared.clone(),
        Duration::from_millis(args.heartbeat_ms),
        out.clone(),
        engine.clone(),
    ));
    let module = Arc::new(rpc::Worker { engine: engine.clone(), handshake }.into_rpc());
    let tracker = TaskTracker::new();
    let mut reader =
        tokio::spawn(server::read_requests(tokio::io::stdin(), max_line_bytes, module, out, tracker.clone()));

    tokio::select! {
        _ = &mut engine_done => tracing::info!("shutdown complete"),
        _ = &mut reader => {
            tracing::info!("stdin closed: cancelling everything and exiting");
            let now = Instant::now();
            let _ = engine.call(|reply| Command::Shutdown { deadline: now, reply }).await;
            // The engine thread ends after the work MLX still runs for it (the step launched
            // before the last read); exiting before would tear MLX down under that work.
            if tokio::time::timeout(ENGINE_EXIT_WAIT, &mut engine_done).await.is_err() {
                tracing::warn!("the engine did not stop within {ENGINE_EXIT_WAIT:?}; exiting anyway");
            }
        }
    }
    reader.abort();
    // Let the last events (final events of cancelled streams) reach stdout, within bounds.
    drop(engine);
    tracker.close();
    let _ = tokio::time::timeout(Duration::from_millis(500), tracker.wait()).await;
    heartbeat.abort();
    let _ = heartbeat.await;
    let _ = tokio::time::timeout(Duration::from_millis(500), writer).await;
    Ok(())
}
