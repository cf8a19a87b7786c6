//! What the supervisor adds to a request and to each streamed token, against the same worker
//! binary and model called directly over its stdin and stdout. docs/benchmarks-overhead.md has
//! the method and results; benches/overhead.sh builds and runs this.
//!
//! Two workers run side by side: one this program talks to directly, one under
//! `mlx-serving serve` (one worker) that it talks to over HTTP. Requests alternate between the
//! two paths, one at a time. Both workers run with tap.c preloaded, which records on
//! CLOCK_MONOTONIC when a generate request reached the worker and when it wrote each event;
//! this program records on the same clock when it sent the request and when each token and the
//! end arrived. So for each request:
//!
//! - outside the worker = (reached worker - sent) + (end received - final event written): the
//!   whole path minus the worker's own work, which differs from run to run;
//! - per token = token received - token event written.
//!
//! The supervisor's overhead is the difference between the supervised and the direct path, at
//! p50, p90 and p99.
//!
//! A third worker sits behind a bare relay: a process that copies bytes between a TCP
//! connection and the worker's pipes, with no parsing. Relay minus direct is what one more
//! process between the client and the worker costs on this machine, whatever it does: the floor
//! under any out-of-process supervisor.
mod clock;
mod direct;
mod http;
mod relay;
mod report;
mod serve;
mod stats;
mod tap;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use mlx_serving_protocol::{GenerateRequest, Message, Prompt};
use serde_json::json;

use clock::Sample;
use direct::Direct;
use http::Http;
use serve::Supervisor;

#[derive(Parser)]
#[command(about = "Supervisor overhead against a worker called directly", args_override_self = true)]
pub struct Args {
    /// The worker binary (target/release/mlx-serving-worker).
    #[arg(long)]
    pub worker: PathBuf,
    /// The supervisor binary (target/release/mlx-serving).
    #[arg(long)]
    pub serve: PathBuf,
    /// A model directory.
    #[arg(long)]
    pub model: PathBuf,
    /// tap.c built as a shared object.
    #[arg(long)]
    pub tap: PathBuf,
    /// Rounds; each sends every kind of request once on each path.
    #[arg(long, default_value_t = 300)]
    pub rounds: usize,
    /// Rounds first, not counted.
    #[arg(long, default_value_t = 20)]
    pub warmup: usize,
    /// max_tokens of the streamed requests.
    #[arg(long, default_value_t = 32)]
    pub tokens: usize,
    /// Pause between requests, so each one starts on a quiet machine.
    #[arg(long, default_value_t = 5)]
    pub gap_ms: u64,
    /// Where to write the results as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Keep the temporary directory (config, logs, tap records) instead of removing it.
    #[arg(long)]
    pub keep: bool,
    /// Runs the tap's cost measurement child (internal).
    #[arg(long, hide = true)]
    pub tap_cost_child: Option<usize>,
    /// Runs as the relay between a TCP connection and the worker on stdin and stdout (internal).
    #[arg(long, hide = true)]
    pub relay_child: bool,
}

/// Which way a request reaches its worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// JSON-RPC lines on the worker's own pipes.
    Direct,
    /// The same lines through the bare relay (TCP to the relay, pipes to the worker).
    Relay,
    /// HTTP through `mlx-serving serve`.
    Supervised,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// max_tokens 1, straight to the worker.
    DirectRequest,
    /// max_tokens 1, through the bare relay.
    RelayRequest,
    /// max_tokens 1, `stream: true` through the supervisor.
    SseRequest,
    /// max_tokens 1, `stream: false` through the supervisor.
    JsonRequest,
    /// max_tokens N, straight to the worker.
    DirectStream,
    /// max_tokens N, through the bare relay.
    RelayStream,
    /// max_tokens N, `stream: true` through the supervisor.
    SseStream,
}

impl Kind {
    const ALL: [Kind; 7] = [
        Kind::DirectRequest,
        Kind::RelayRequest,
        Kind::SseRequest,
        Kind::JsonRequest,
        Kind::DirectStream,
        Kind::RelayStream,
        Kind::SseStream,
    ];

    /// The prompt of round `round`: new to the worker that gets it (workers keep a prefix cache),
    /// the same for the two requests compared with each other, and of the same length for all.
    fn prompt(self, round: usize) -> String {
        let variant = match self {
            Kind::DirectRequest | Kind::RelayRequest | Kind::SseRequest => 'a',
            Kind::JsonRequest => 'b',
            Kind::DirectStream | Kind::RelayStream | Kind::SseStream => 'c',
        };
        format!("Round {round} ({variant}): tell me about the license and what it allows.")
    }

    pub fn via(self) -> Via {
        match self {
            Kind::DirectRequest | Kind::DirectStream => Via::Direct,
            Kind::RelayRequest | Kind::RelayStream => Via::Relay,
            Kind::SseRequest | Kind::JsonRequest | Kind::SseStream => Via::Supervised,
        }
    }

    pub fn stream(self) -> bool {
        matches!(self, Kind::DirectStream | Kind::RelayStream | Kind::SseStream)
    }

    fn max_tokens(self, stream_tokens: usize) -> usize {
        if self.stream() { stream_tokens } else { 1 }
    }
}

pub struct Run {
    pub kind: Kind,
    pub counted: bool,
    pub sample: Sample,
    /// CPU time of all the supervisor's threads from just before this request to just before
    /// the next one (after the pause between them, so its trailing work is in), ns.
    pub supervisor_cpu_ns: u64,
}

/// Model name on both paths, so the lines the worker reads are the same size.
pub const MODEL: &str = "m";

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(n) = args.tap_cost_child {
        return tap::cost_child(n);
    }
    if args.relay_child {
        return relay::child();
    }
    let dir = std::env::temp_dir().join(format!("mlx-serving-overhead-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = run(&args, &dir);
    if result.is_ok() && !args.keep {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        eprintln!("logs kept in {}", dir.display());
    }
    result
}

fn run(args: &Args, dir: &Path) -> Result<()> {
    let model = args.model.canonicalize().with_context(|| format!("model {}", args.model.display()))?;
    let worker = args.worker.canonicalize()?;
    let tap = args.tap.canonicalize()?;
    let load_before = loadavg();

    let tap_cost = tap::cost(&tap, dir)?;
    eprintln!(
        "tap cost per call: write {:+.0} ns, read {:+.0} ns",
        tap_cost["write_ns_added"].as_f64().unwrap_or(f64::NAN),
        tap_cost["read_ns_added"].as_f64().unwrap_or(f64::NAN)
    );

    let mut supervisor = Supervisor::start(&args.serve, dir, &worker, &tap, &model)?;
    // The same flags the supervisor gives its workers by default.
    let command: Vec<String> = [worker.display().to_string()]
        .into_iter()
        .chain(["--heartbeat-ms", "1000", "--max-line-bytes", "4194304", "--device", "auto"].map(String::from))
        .collect();
    let mut direct =
        Direct::start(&command, &tap, &dir.join("direct.tap"), &dir.join("direct.log"), MODEL, &model, false)?;
    let mut relayed =
        Direct::start(&command, &tap, &dir.join("relay.tap"), &dir.join("relay.log"), MODEL, &model, true)?;
    supervisor.wait_ready()?;
    let mut http = Http::connect(supervisor.addr)?;
    eprintln!("both paths ready; {} warm-up rounds, then {} rounds", args.warmup, args.rounds);

    let started = Instant::now();
    let mut runs: Vec<Run> = Vec::new();
    let mut cpu_before = 0;
    for round in 0..args.warmup + args.rounds {
        let mut order = Kind::ALL;
        if round % 2 == 1 {
            order.reverse();
        }
        for kind in order {
            std::thread::sleep(Duration::from_millis(args.gap_ms));
            let cpu = supervisor.cpu_ns();
            if let Some(last) = runs.last_mut() {
                last.supervisor_cpu_ns = cpu.saturating_sub(cpu_before);
            }
            cpu_before = cpu;
            let max_tokens = kind.max_tokens(args.tokens);
            let id = format!("ovh-{round:06}-{}", kind as u8);
            let prompt = kind.prompt(round);
            let sample = if kind.via() != Via::Supervised {
                let mut req = GenerateRequest::new(
                    id,
                    MODEL,
                    Prompt::Messages(vec![Message { role: "user".to_string(), content: prompt.clone() }]),
                    max_tokens,
                );
                req.ignore_eos = true;
                if kind.via() == Via::Direct { direct.generate(&req)? } else { relayed.generate(&req)? }
            } else {
                let stream = kind != Kind::JsonRequest;
                let body = json!({
                    "model": MODEL,
                    "messages": [{"role": "user", "content": prompt}],
                    "max_tokens": max_tokens,
                    "temperature": 0,
                    "ignore_eos": true,
                    "return_token_ids": true,
                    "stream": stream,
                });
                http.post("/v1/chat/completions", &id, body.to_string().as_bytes(), stream)?
            };
            if sample.tokens.len() != max_tokens {
                bail!("{kind:?} gave {} tokens, not {max_tokens}", sample.tokens.len());
            }
            runs.push(Run { kind, counted: round >= args.warmup, sample, supervisor_cpu_ns: 0 });
        }
        if (round + 1) % 50 == 0 {
            eprintln!("  {} rounds, {:.0} s", round + 1, started.elapsed().as_secs_f64());
        }
    }
    std::thread::sleep(Duration::from_millis(args.gap_ms));
    if let Some(last) = runs.last_mut() {
        last.supervisor_cpu_ns = supervisor.cpu_ns().saturating_sub(cpu_before);
    }
    let elapsed_s = started.elapsed().as_secs_f64();
    drop(http);
    direct.stop()?;
    relayed.stop()?;
    supervisor.stop()?;

    let segments = report::Segments {
        direct: tap::segments(&dir.join("direct.tap"))?,
        relay: tap::segments(&dir.join("relay.tap"))?,
        supervised: tap::segments(&dir.join("supervised.tap"))?,
    };
    let report = report::report(&runs, &segments)?;
    let machine = json!({
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu_model": cpu_model(),
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
    });
    report::print(&report, args, &tap_cost, &machine);
    let out = json!({
        "settings": {"rounds": args.rounds, "warmup": args.warmup, "stream_tokens": args.tokens, "gap_ms": args.gap_ms,
                     "model": model.display().to_string(), "elapsed_s": elapsed_s},
        "machine": machine,
        "tap_cost": tap_cost,
        "results": report,
    });
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&out)?)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split(' ').take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_string()))
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}
