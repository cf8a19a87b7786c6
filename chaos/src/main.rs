//! `mlx-serving-chaos`: starts the real server on loopback, drives greedy streaming load from a
//! bounded client, injects faults, accounts for every request (ok, failed with a typed error, or
//! lost), checks every stream's tokens against a fault-free run, and prints a JSON summary. The
//! exit status is 1 when anything is lost or wrong, or a figure misses its target.
//! docs/chaos.md describes the scenarios.
mod client;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};
use mlx_serving_supervisor::admin::{Listen, call};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use rand::Rng;
use serde_json::{Value, json};
use tokio::sync::Mutex;

use client::{Outcome, stream, stream_prompt};

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum, Debug)]
enum Scenario {
    /// SIGKILL a random worker every 2-4 s.
    Kill9,
    /// SIGSTOP a random worker (the supervisor must kill and replace it), SIGCONT later.
    Hang,
    /// A worker command that dies at boot: backoff, quarantine, the supervisor stays up.
    Crashloop,
    /// Rolling restarts in a loop.
    Rolling,
    /// SIGKILL the supervisor; no worker may be alive 2 s later.
    SupervisorKill,
    /// SIGKILL a random worker every 5-30 s.
    Soak,
    /// Every worker writes a non-protocol line after 500 to 1500 tokens (through the fault-injecting
    /// proxy): each is killed and replaced, its streams resumed.
    Garbage,
    /// Every worker runs under an address-space rlimit (`ulimit -v`); among the load, prompts whose
    /// prefill needs more memory than that arrive every 1-2 s. Each must end with a typed error;
    /// the other streams and the pool must not notice. Linux only (macOS does not enforce it).
    Oom,
}

#[derive(Parser, Clone)]
#[command(name = "mlx-serving-chaos", about = "Fault injection against a real mlx-serving server")]
struct Args {
    scenario: Scenario,
    /// Seconds of load under faults (default 20; 120 for soak).
    #[arg(long)]
    duration: Option<u64>,
    /// Concurrent clients.
    #[arg(long, default_value_t = 8)]
    clients: usize,
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// Tokens per request.
    #[arg(long, default_value_t = 32)]
    max_tokens: usize,
    /// The `mlx-serving` binary (the worker binary must sit beside it).
    #[arg(long)]
    bin: Option<PathBuf>,
    #[arg(long)]
    model: Option<PathBuf>,
    /// Seed of the fault schedule.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

const PROMPTS: usize = 8;

impl Args {
    fn duration(&self) -> u64 {
        self.duration.unwrap_or(20)
    }
}

struct Server {
    child: Child,
    http: u16,
    admin: Listen,
    dir: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Starts the server. `restart_window_ms` is the restart-intensity window: short where faults
/// hit the same slot often on purpose, the default 30 s for the crash loop.
fn start(args: &Args, worker_command: Option<Vec<String>>, restart_window_ms: u64) -> Result<Server> {
    let bin = args.bin.clone().unwrap_or_else(|| root().join("target/release/mlx-serving"));
    let model = args.model.clone().unwrap_or_else(|| root().join("tests/fixtures/models/qwen3-bf16"));
    let (http, admin) = (free_port()?, free_port()?);
    let dir = std::env::temp_dir().join(format!("mlx-serving-chaos-{}-{http}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let command = worker_command.map(|c| format!("worker_command = {c:?}")).unwrap_or_default();
    let config = format!(
        r#"
[pool]
workers = {workers}
heartbeat_interval_ms = 200
heartbeat_timeout_ms = 2000
stall_timeout_ms = 5000
drain_deadline_ms = 10000
{command}

[restart]
window_ms = {restart_window_ms}

[http]
listen = "127.0.0.1:{http}"

[admin]
listen = "127.0.0.1:{admin}"

[[models]]
name = "m"
path = "{model}"
preload = true
"#,
        workers = args.workers,
        model = model.display()
    );
    let path = dir.join("config.toml");
    std::fs::write(&path, config)?;
    let child = Command::new(&bin)
        .args(["serve", "--config"])
        .arg(&path)
        .env("RUST_LOG", "error")
        .stdin(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    Ok(Server { child, http, admin: Listen::parse(&format!("127.0.0.1:{admin}")).map_err(anyhow::Error::msg)?, dir })
}

async fn status(s: &Server) -> Result<Value> {
    call(&s.admin, None, "status", json!({})).await.map_err(|e| anyhow::anyhow!("admin status: {e}"))
}

async fn wait_ready(s: &Server, n: usize) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        if let Ok(st) = status(s).await
            && st["ready_workers"].as_u64() == Some(n as u64)
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("the server did not get {n} ready workers")
}

fn prompt(i: usize) -> String {
    format!("Chaos prompt number {i}: tell me about {}", "free software ".repeat(i % 4 + 1))
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[((p / 100.0) * (v.len() - 1) as f64).round() as usize]
}

/// Per-id accounting of every request.
#[derive(Default)]
struct Ledger {
    ok: u64,
    typed_error: u64,
    lost: u64,
    mismatched: u64,
    latencies_ms: Vec<f64>,
    errors: Vec<String>,
}

/// Clients loop until `stop`: greedy streams whose tokens must equal `expected`.
async fn load(
    clients: usize,
    max_tokens: usize,
    http: u16,
    expected: Arc<Vec<Vec<u32>>>,
    stop: Arc<AtomicBool>,
) -> Ledger {
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (expected, stop, ledger) = (expected.clone(), stop.clone(), ledger.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Relaxed) {
                let p = (c + i) % PROMPTS;
                let id = format!("c{c}-{i}");
                let t = Instant::now();
                let outcome = stream(http, &id, &prompt(p), max_tokens).await;
                let ms = t.elapsed().as_secs_f64() * 1000.0;
                let mut l = ledger.lock().await;
                match outcome {
                    Outcome::Ok(tokens) if tokens == expected[p] => {
                        l.ok += 1;
                        l.latencies_ms.push(ms);
                    }
                    Outcome::Ok(tokens) => {
                        l.mismatched += 1;
                        l.errors.push(format!(
                            "{id}: {} tokens, expected {:?}.., got {:?}..",
                            tokens.len(),
                            &expected[p][..4.min(expected[p].len())],
                            &tokens[..4.min(tokens.len())]
                        ));
                    }
                    Outcome::TypedError(e) => {
                        l.typed_error += 1;
                        l.errors.push(format!("{id}: {e}"));
                    }
                    Outcome::Lost(e) => {
                        l.lost += 1;
                        l.errors.push(format!("{id}: LOST: {e}"));
                    }
                }
                i += 1;
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    Arc::try_unwrap(ledger).map(Mutex::into_inner).unwrap_or_default()
}

/// The fault schedule of a scenario; returns the faults injected and, per fault, the
/// milliseconds until the supervisor recorded the death and until the slot was ready again.
async fn inject(scenario: Scenario, s: &Server, duration: Duration, seed: u64) -> Result<(u64, Vec<(f64, f64)>)> {
    use rand::SeedableRng;
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let end = Instant::now() + duration;
    let (mut faults, mut kills) = (0, Vec::new());
    while Instant::now() < end {
        let gap = match scenario {
            Scenario::Kill9 | Scenario::Hang => rng.random_range(2000..4000),
            Scenario::Soak => rng.random_range(5000..30000),
            Scenario::Rolling => 500,
            Scenario::Oom => {
                // The oversized prompts are the faults; they run beside the load.
                tokio::time::sleep(duration).await;
                return Ok((0, kills));
            }
            Scenario::Garbage => {
                // The workers break by themselves; count what the supervisor saw.
                let before = status(s).await?;
                tokio::time::sleep(end.saturating_duration_since(Instant::now())).await;
                let after = status(s).await?;
                let restarts = |v: &Value| {
                    v["workers"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|w| w["restarts"].as_u64().unwrap_or(0))
                        .sum::<u64>()
                };
                return Ok((restarts(&after).saturating_sub(restarts(&before)), kills));
            }
            _ => return Ok((0, kills)),
        };
        tokio::time::sleep(Duration::from_millis(gap).min(end.saturating_duration_since(Instant::now()))).await;
        if Instant::now() >= end {
            break;
        }
        let st = status(s).await?;
        let ready: Vec<u32> = st["workers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|w| w["state"] == "ready")
            .filter_map(|w| w["pid"].as_u64().map(|p| p as u32))
            .collect();
        if scenario == Scenario::Rolling {
            call(&s.admin, None, "rolling_restart", json!({}))
                .await
                .map_err(|e| anyhow::anyhow!("rolling restart: {e}"))?;
            faults += 1;
            continue;
        }
        if ready.len() < 2 {
            continue;
        }
        let pid = ready[rng.random_range(0..ready.len())];
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH)?.as_secs_f64();
        if scenario == Scenario::Hang {
            kill(Pid::from_raw(pid as i32), Signal::SIGSTOP)?;
            let resume = pid;
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(4)).await;
                let _ = kill(Pid::from_raw(resume as i32), Signal::SIGCONT);
            });
        } else {
            kill(Pid::from_raw(pid as i32), Signal::SIGKILL)?;
        }
        faults += 1;
        // The crash record of this pid (its time minus the kill's is the detection latency),
        // then the slot ready again with a new process (replacement-ready time).
        let (deadline, killed_at) = (Instant::now() + Duration::from_secs(30), Instant::now());
        let (mut detected, mut slot) = (None, None);
        while Instant::now() < deadline {
            let st = status(s).await?;
            for w in st["workers"].as_array().into_iter().flatten() {
                let c = &w["last_crash"];
                if detected.is_none() && c["pid"].as_u64() == Some(u64::from(pid)) {
                    detected = c["at_unix_s"].as_f64().map(|at| (at - now) * 1000.0);
                    slot = w["id"].as_u64();
                }
                if slot.is_some()
                    && w["id"].as_u64() == slot
                    && w["state"] == "ready"
                    && w["pid"].as_u64() != Some(u64::from(pid))
                {
                    kills.push((detected.unwrap_or(f64::NAN), killed_at.elapsed().as_secs_f64() * 1000.0));
                    slot = None;
                    detected = Some(f64::NAN);
                }
            }
            if detected.is_some_and(f64::is_nan) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    Ok((faults, kills))
}

fn alive(pid: i32) -> bool {
    if kill(Pid::from_raw(pid), None).is_err() {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'),
        Err(_) => !cfg!(target_os = "linux"),
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = Args::parse();
    match run(&args).await {
        Ok(summary) => {
            println!("{}", serde_json::to_string_pretty(&summary).unwrap_or_default());
            if summary["pass"] != true {
                std::process::exit(1);
            }
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(2);
        }
    }
}

async fn run(args: &Args) -> Result<Value> {
    let mut args = Args {
        duration: Some(args.duration.unwrap_or(if args.scenario == Scenario::Soak { 120 } else { 20 })),
        ..args.clone()
    };
    let args = &mut args;
    match args.scenario {
        Scenario::Crashloop => return crashloop(args).await,
        Scenario::SupervisorKill => return supervisor_kill(args).await,
        _ => {}
    }
    let command = (args.scenario == Scenario::Garbage).then(|| {
        let bin = args.bin.clone().unwrap_or_else(|| root().join("target/release/mlx-serving"));
        vec![
            bin.with_file_name("mlx-serving-faultworker").display().to_string(),
            "--fault".into(),
            "garbage-at-token:500-1500".into(),
            "--".into(),
            bin.with_file_name("mlx-serving-worker").display().to_string(),
        ]
    });
    let command = match args.scenario {
        Scenario::Oom => Some(oom_setup(args).await?),
        _ => command,
    };
    let server = start(args, command, 5000)?;
    wait_ready(&server, args.workers).await?;
    // Expected tokens from fault-free runs.
    let mut expected = Vec::new();
    for p in 0..PROMPTS {
        match stream(server.http, &format!("expect-{p}"), &prompt(p), args.max_tokens).await {
            Outcome::Ok(t) => expected.push(t),
            other => bail!("the fault-free run of prompt {p} failed: {other:?}"),
        }
    }
    let expected = Arc::new(expected);
    // A fault-free phase for the latency baseline.
    let baseline_for = Duration::from_secs((args.duration() / 3).clamp(3, 60));
    let stop = Arc::new(AtomicBool::new(false));
    let phase = tokio::spawn({
        let stop = stop.clone();
        async move {
            tokio::time::sleep(baseline_for).await;
            stop.store(true, Relaxed);
        }
    });
    let mut baseline = load(args.clients, args.max_tokens, server.http, expected.clone(), stop).await;
    let _ = phase.await;

    let before = status(&server).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let loader = {
        let (stop, expected, http, clients, max_tokens) =
            (stop.clone(), expected.clone(), server.http, args.clients, args.max_tokens);
        tokio::spawn(async move { load(clients, max_tokens, http, expected, stop).await })
    };
    let oversized =
        (args.scenario == Scenario::Oom).then(|| tokio::spawn(oversized_prompts(server.http, stop.clone(), args.seed)));
    let (mut faults, kills) = inject(args.scenario, &server, Duration::from_secs(args.duration()), args.seed).await?;
    stop.store(true, Relaxed);
    let mut chaos = loader.await?;
    let oversized = match oversized {
        Some(task) => Some(task.await?),
        None => None,
    };
    if let Some(o) = &oversized {
        faults = o.sent;
    }
    // Let the pool heal, then read the figures.
    let healed = wait_ready(&server, args.workers).await.is_ok();
    let after = status(&server).await?;

    // Detection latency: kill time to the crash record of that pid; then to ready again.
    let detection: Vec<f64> = kills.iter().map(|(d, _)| *d).filter(|d| d.is_finite()).collect();
    let mut ready_ms: Vec<f64> = kills.iter().map(|(_, r)| *r).collect();
    let counter = |k: &str| after[k].as_u64().unwrap_or(0).saturating_sub(before[k].as_u64().unwrap_or(0));
    let (p99_base, p99_chaos) =
        (percentile(&mut baseline.latencies_ms, 99.0), percentile(&mut chaos.latencies_ms, 99.0));
    let inflation = if p99_base > 0.0 { p99_chaos / p99_base } else { 0.0 };
    let mut failures = Vec::new();
    if chaos.lost > 0 {
        failures.push(format!("{} requests lost", chaos.lost));
    }
    if chaos.mismatched > 0 {
        failures.push(format!("{} streams with duplicated or missing tokens", chaos.mismatched));
    }
    if chaos.typed_error > 0 {
        failures.push(format!("{} client-visible errors", chaos.typed_error));
    }
    if !healed {
        failures.push("the pool did not return to full strength".into());
    }
    if args.scenario == Scenario::Garbage && faults == 0 {
        failures.push("no worker wrote garbage: the run tested nothing".into());
    }
    if let Some(o) = &oversized {
        if o.sent == 0 {
            failures.push("no oversized prompt was sent: the run tested nothing".into());
        }
        if o.completed > 0 {
            failures.push(format!(
                "{} oversized prompts completed: the memory limit was not reached, the run tested nothing",
                o.completed
            ));
        }
        if o.lost > 0 {
            failures.push(format!("{} oversized prompts were lost (no typed error)", o.lost));
        }
    }
    let detection_p99 = percentile(&mut detection.clone(), 99.0);
    if detection_p99 > 50.0 && matches!(args.scenario, Scenario::Kill9 | Scenario::Soak) {
        failures.push(format!("crash detection p99 {detection_p99:.1} ms > 50 ms"));
    }
    if args.scenario == Scenario::Soak && inflation > 2.0 {
        failures.push(format!("p99 latency inflation {inflation:.2}x > 2x"));
    }
    chaos.errors.truncate(20);
    Ok(json!({
        "scenario": format!("{:?}", args.scenario).to_lowercase(),
        "duration_s": args.duration(),
        "workers": args.workers,
        "clients": args.clients,
        "faults_injected": faults,
        "requests": {
            "total": chaos.ok + chaos.typed_error + chaos.lost + chaos.mismatched,
            "ok": chaos.ok,
            "failed_with_typed_error": chaos.typed_error,
            "lost": chaos.lost,
            "duplicated_or_missing_tokens": chaos.mismatched,
        },
        "detection_ms": {"p50": percentile(&mut detection.clone(), 50.0), "p99": detection_p99, "samples": detection.len()},
        "replacement_ready_ms": {"p50": percentile(&mut ready_ms, 50.0), "p99": percentile(&mut ready_ms, 99.0), "samples": ready_ms.len()},
        "latency_ms": {
            "fault_free": {"p50": percentile(&mut baseline.latencies_ms, 50.0), "p99": p99_base, "requests": baseline.ok},
            "under_faults": {"p50": percentile(&mut chaos.latencies_ms, 50.0), "p99": p99_chaos},
            "p99_inflation": inflation,
        },
        "moved": counter("moved_requests"),
        "retried": counter("retried_requests"),
        "resumed": counter("resumed_streams"),
        "worker_restarts": after["workers"].as_array().into_iter().flatten().map(|w| w["restarts"].as_u64().unwrap_or(0)).sum::<u64>()
            .saturating_sub(before["workers"].as_array().into_iter().flatten().map(|w| w["restarts"].as_u64().unwrap_or(0)).sum::<u64>()),
        "oversized_prompts": oversized.as_ref().map(|o| json!({
            "sent": o.sent, "typed_errors": o.typed_errors, "completed": o.completed, "lost": o.lost,
            "error_latency_ms": {"p50": percentile(&mut o.latencies_ms.clone(), 50.0), "p99": percentile(&mut o.latencies_ms.clone(), 99.0)},
            "errors_seen": o.messages,
        })),
        "errors": chaos.errors,
        "failures": failures,
        "pass": failures.is_empty(),
    }))
}

/// A worker command that exits at boot: backoff and quarantine, no spin, and the supervisor
/// keeps answering.
async fn crashloop(args: &Args) -> Result<Value> {
    let command = ["sh", "-c", "echo 'chaos: dying at boot' >&2; exit 7"].map(String::from).to_vec();
    let server = start(args, Some(command), 30_000)?;
    let watch = Duration::from_secs(args.duration().clamp(5, 60));
    tokio::time::sleep(watch).await;
    let st = status(&server).await?;
    let health = client::get(server.http, "/health").await.unwrap_or(0);
    let ready = client::get(server.http, "/ready").await.unwrap_or(0);
    let workers = st["workers"].as_array().cloned().unwrap_or_default();
    let spawns: Vec<u64> = workers.iter().map(|w| w["generation"].as_u64().unwrap_or(0)).collect();
    let quarantined = workers.iter().filter(|w| w["state"] == "quarantined").count();
    // At most 5 spawns per slot per 30 s window.
    let bound = 5 * (watch.as_secs() / 30 + 1);
    let mut failures = Vec::new();
    if spawns.iter().any(|&s| s > bound) {
        failures.push(format!("a slot spawned more than {bound} times in {} s: {spawns:?}", watch.as_secs()));
    }
    if quarantined == 0 {
        failures.push("no slot shows as quarantined".into());
    }
    if health != 200 || ready != 503 {
        failures.push(format!("health {health} (want 200), ready {ready} (want 503)"));
    }
    Ok(json!({
        "scenario": "crashloop", "watched_s": watch.as_secs(), "spawns_per_slot": spawns, "quarantined_slots": quarantined,
        "last_crash": workers.first().map(|w| w["last_crash"].clone()), "health": health, "ready": ready,
        "failures": failures, "pass": failures.is_empty(),
    }))
}

/// SIGKILL the supervisor under load: no worker may be alive 2 s later.
async fn supervisor_kill(args: &Args) -> Result<Value> {
    let mut server = start(args, None, 5000)?;
    wait_ready(&server, args.workers).await?;
    let st = status(&server).await?;
    let pids: Vec<i32> =
        st["workers"].as_array().into_iter().flatten().filter_map(|w| w["pid"].as_i64().map(|p| p as i32)).collect();
    let http = server.http;
    let busy = tokio::spawn(async move { stream(http, "busy", &prompt(0), 500).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.child.kill()?;
    server.child.wait()?;
    let _ = busy.await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let orphans: Vec<i32> = pids.iter().copied().filter(|&p| alive(p)).collect();
    let pass = orphans.is_empty();
    Ok(json!({"scenario": "supervisor-kill", "workers": pids, "orphans_after_2s": orphans, "pass": pass}))
}

/// Prompt tokens of the oversized prompts.
const OVERSIZED_TOKENS: usize = 16_000;
/// Address space a worker may use beyond what it needed to start and serve a request.
const OOM_HEADROOM_BYTES: u64 = 512 << 20;

/// The oversized prompt `i`: token ids.
fn oversized_prompt(i: u64) -> Vec<u32> {
    (0..OVERSIZED_TOKENS).map(|t| 10 + ((t as u64 * 7919 + i * 104_729) % 490) as u32).collect()
}

/// The oom scenario's worker command: the real worker behind the fault proxy, both under
/// `ulimit -v` set to what a probe worker needed plus a headroom. The proxy's
/// `memory-per-request-byte` fault makes each request need memory in proportion to its size:
/// an oversized prompt needs twice the limit, a normal one a few percent of it. (On the CPU the
/// real worker bounds a prompt's memory with its KV budget and chunked prefill, and a prompt
/// big enough to pass an rlimit anyway takes minutes to prefill.)
async fn oom_setup(args: &Args) -> Result<Vec<String>> {
    if !cfg!(target_os = "linux") {
        bail!("the oom scenario needs Linux: other systems do not enforce an address-space rlimit");
    }
    let model = args.model.clone().unwrap_or_else(|| root().join("tests/fixtures/models/qwen3-bf16"));
    let bin = args.bin.clone().unwrap_or_else(|| root().join("target/release/mlx-serving"));
    let worker = bin.with_file_name("mlx-serving-worker").display().to_string();
    let proxy = bin.with_file_name("mlx-serving-faultworker").display().to_string();
    let limit = probe_peak_vm(&worker, &model).await? + OOM_HEADROOM_BYTES;
    let big_line = serde_json::to_string(&oversized_prompt(0))?.len() as u64;
    let per_byte = 2 * limit / big_line;
    Ok(vec![
        "sh".into(),
        "-c".into(),
        r#"ulimit -v "$0" && exec "$@""#.into(),
        (limit >> 10).to_string(),
        proxy,
        "--fault".into(),
        format!("memory-per-request-byte:{per_byte}"),
        "--".into(),
        worker,
    ])
}

/// Peak virtual memory of a worker that loaded `model` and served one short request.
async fn probe_peak_vm(worker: &str, model: &std::path::Path) -> Result<u64> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let mut child = tokio::process::Command::new(worker)
        .arg("--model")
        .arg(model)
        .args(["--model-name", "m"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let pid = child.id().context("probe pid")?;
    let mut stdin = child.stdin.take().context("probe stdin")?;
    let mut lines = BufReader::new(child.stdout.take().context("probe stdout")?).lines();
    let request = json!({"jsonrpc": "2.0", "id": 1, "method": "generate", "params": {"request": {
        "id": "probe", "model": "m", "prompt": {"text": prompt(0)}, "max_tokens": 8}}});
    stdin.write_all(format!("{request}\n").as_bytes()).await?;
    let done = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await? {
            if line.contains("\"type\":\"final\"") {
                return Ok::<_, anyhow::Error>(());
            }
        }
        bail!("the probe worker ended before its request finished")
    });
    done.await.context("the probe worker did not finish its request")??;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmPeak:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .context("no VmPeak in /proc/PID/status")?;
    drop(stdin);
    let _ = child.wait().await;
    Ok(kib << 10)
}

/// What happened to the oversized prompts.
#[derive(Default)]
struct Oversized {
    sent: u64,
    typed_errors: u64,
    completed: u64,
    lost: u64,
    latencies_ms: Vec<f64>,
    messages: Vec<String>,
}

/// Sends an oversized prompt every 1-2 s until `stop`.
async fn oversized_prompts(http: u16, stop: Arc<AtomicBool>, seed: u64) -> Oversized {
    use rand::SeedableRng;
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed ^ 0x00f0);
    let mut o = Oversized::default();
    while !stop.load(Relaxed) {
        tokio::time::sleep(Duration::from_millis(rng.random_range(1000..2000))).await;
        if stop.load(Relaxed) {
            break;
        }
        let t = Instant::now();
        let outcome = stream_prompt(http, &format!("oversized-{}", o.sent), json!(oversized_prompt(o.sent)), 8).await;
        o.sent += 1;
        match outcome {
            Outcome::TypedError(e) => {
                o.typed_errors += 1;
                o.latencies_ms.push(t.elapsed().as_secs_f64() * 1000.0);
                let e: String = e.chars().take(300).collect();
                if !o.messages.contains(&e) {
                    o.messages.push(e);
                }
            }
            Outcome::Ok(_) => o.completed += 1,
            Outcome::Lost(e) => {
                o.lost += 1;
                o.messages.push(format!("LOST: {e}"));
            }
        }
    }
    o
}
