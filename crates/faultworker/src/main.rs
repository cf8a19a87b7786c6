//! `mlx-serving-faultworker`: a test tool, never a replacement for the real worker. It starts the
//! real worker (the command after `--`), passes the protocol through line by line, and injects
//! one fault:
//!
//! N may be a range `MIN-MAX`: each process picks its own count in it.
//!
//! - `crash-at-token:N`: after N token events, the worker dies (SIGKILL) and so does the proxy;
//! - `abort-at-token:N`: the same, by SIGABRT of the proxy (a crash with a core-dump signal);
//! - `hang-at-token:N`: after N token events, the worker is stopped (SIGSTOP) and nothing more
//!   passes, heartbeats included;
//! - `stall-at-token:N`: after N token events, generate events stop, heartbeats keep coming with
//!   their progress counters frozen and a sequence active;
//! - `garbage-at-token:N`: after N token events, one line that is not JSON;
//! - `oversized-at-token:N`: after N token events, one 8 MiB line;
//! - `poison:TEXT`: abort as soon as a request whose line contains TEXT arrives;
//! - `leak-per-token:BYTES`: every token event leaks BYTES of touched memory in this process
//!   (which, to the supervisor, is the worker), and heartbeats report the worker's RSS plus what
//!   leaked. Under a memory rlimit the process eventually dies of an allocation failure;
//! - `slow-load:MS`: each `load_model` request is held MS milliseconds before it is passed on,
//!   and meanwhile the worker looks as a worker does whose engine thread is busy loading: its
//!   generate events are held back (and passed on afterwards, none lost) and its heartbeats'
//!   progress counters stand still;
//! - `memory-per-request-byte:K`: each generate request needs K bytes of touched memory per byte
//!   of its line while it is passed on, so under a memory rlimit a large enough prompt kills the
//!   process with an allocation failure (the way a worker dies that runs out of memory), while
//!   small ones pass.
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;

#[derive(Parser)]
struct Args {
    /// KIND:ARG, e.g. crash-at-token:10 (see the crate docs).
    #[arg(long)]
    fault: String,
    /// The real worker command.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

#[derive(Clone, Debug)]
enum Fault {
    Crash(usize),
    Abort(usize),
    Hang(usize),
    Stall(usize),
    Garbage(usize),
    Oversized(usize),
    Poison(String),
    Leak(usize),
    MemoryPerRequestByte(usize),
    SlowLoad(usize),
}

fn parse(s: &str) -> Result<Fault> {
    let (kind, arg) = s.split_once(':').context("a fault is KIND:ARG")?;
    // N, or MIN-MAX for a count picked per process (so workers do not fail in step).
    let n = || -> Result<usize> {
        match arg.split_once('-') {
            Some((lo, hi)) => {
                let (lo, hi): (usize, usize) = (lo.parse()?, hi.parse()?);
                let span = hi.saturating_sub(lo) + 1;
                Ok(lo + (std::process::id() as usize).wrapping_mul(2_654_435_761) % span)
            }
            None => arg.parse::<usize>().with_context(|| format!("`{arg}` is not a token count")),
        }
    };
    Ok(match kind {
        "crash-at-token" => Fault::Crash(n()?),
        "abort-at-token" => Fault::Abort(n()?),
        "hang-at-token" => Fault::Hang(n()?),
        "stall-at-token" => Fault::Stall(n()?),
        "garbage-at-token" => Fault::Garbage(n()?),
        "oversized-at-token" => Fault::Oversized(n()?),
        "poison" => Fault::Poison(arg.to_string()),
        "leak-per-token" => Fault::Leak(n()?),
        "memory-per-request-byte" => Fault::MemoryPerRequestByte(n()?),
        "slow-load" => Fault::SlowLoad(n()?),
        other => bail!("unknown fault `{other}`"),
    })
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args = Args::parse();
    let fault = parse(&args.fault)?;
    let (program, rest) = args.command.split_first().context("no worker command")?;
    let mut child =
        Command::new(program).args(rest).stdin(Stdio::piped()).stdout(Stdio::piped()).kill_on_drop(true).spawn()?;
    let pid = Pid::from_raw(child.id().unwrap_or(0) as i32);
    let mut child_in = child.stdin.take().context("stdin")?;
    let child_out = child.stdout.take().context("stdout")?;

    // Requests in.
    let poison = match &fault {
        Fault::Poison(text) => Some(text.clone()),
        _ => None,
    };
    let per_request_byte = match fault {
        Fault::MemoryPerRequestByte(k) => k,
        _ => 0,
    };
    let slow_load = match fault {
        Fault::SlowLoad(ms) => Some(Duration::from_millis(ms as u64)),
        _ => None,
    };
    // Until when the worker looks busy loading (`slow-load`).
    let loading_until: Arc<Mutex<Option<Instant>>> = Arc::default();
    let loading = loading_until.clone();
    let inbound = tokio::spawn(async move {
        let mut lines = BufReader::new(tokio::io::stdin()).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(hold) = slow_load.filter(|_| line.contains("\"method\":\"load_model\"")) {
                *loading.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now() + hold);
                tokio::time::sleep(hold).await;
            }
            if poison.as_ref().is_some_and(|p| line.contains(p.as_str())) {
                let _ = kill(pid, Signal::SIGKILL);
                std::process::abort();
            }
            // Held (and filled, so resident) until the request is passed on.
            let needs = (per_request_byte > 0 && line.contains("\"method\":\"generate\""))
                .then(|| vec![1u8; per_request_byte.saturating_mul(line.len())]);
            std::hint::black_box(&needs);
            if child_in.write_all(line.as_bytes()).await.is_err() || child_in.write_all(b"\n").await.is_err() {
                break;
            }
            let _ = child_in.flush().await;
        }
        // Our stdin closed: the worker's closes too, and it exits.
    });

    // Protocol out.
    let mut out = tokio::io::stdout();
    let mut lines = BufReader::new(child_out).lines();
    let (mut tokens, mut stalled_progress): (usize, Option<String>) = (0, None);
    let mut leaked: Vec<Vec<u8>> = Vec::new();
    let (mut held, mut loading_progress): (Vec<String>, String) = (Vec::new(), String::new());
    while let Ok(Some(mut line)) = lines.next_line().await {
        let until = *loading_until.lock().unwrap_or_else(|p| p.into_inner());
        if until.is_some_and(|t| Instant::now() < t) {
            if line.contains("\"generate_event\"") {
                held.push(line);
                continue;
            }
            if line.contains("\"method\":\"heartbeat\"") {
                line = freeze(&line, &mut loading_progress);
            }
        } else if until.is_some() {
            *loading_until.lock().unwrap_or_else(|p| p.into_inner()) = None;
            loading_progress.clear();
            for l in held.drain(..) {
                write(&mut out, &l).await;
            }
        }
        if matches!(fault, Fault::Leak(_)) && line.contains("\"method\":\"heartbeat\"") {
            line = add_rss(&line, leaked.iter().map(Vec::len).sum());
        }
        let is_token = line.contains("\"generate_event\"") && line.contains("\"type\":\"token\"");
        if let Some(frozen) = &mut stalled_progress {
            if line.contains("\"generate_event\"") {
                continue;
            }
            if line.contains("\"method\":\"heartbeat\"") {
                let l = freeze(&line, frozen).replace("\"active_sequences\":0", "\"active_sequences\":1");
                write(&mut out, &l).await;
                continue;
            }
        }
        write(&mut out, &line).await;
        if !is_token {
            continue;
        }
        tokens += 1;
        match &fault {
            Fault::Crash(n) if tokens == *n => {
                let _ = kill(pid, Signal::SIGKILL);
                std::process::exit(3);
            }
            Fault::Abort(n) if tokens == *n => {
                let _ = kill(pid, Signal::SIGKILL);
                std::process::abort();
            }
            Fault::Hang(n) if tokens == *n => {
                let _ = kill(pid, Signal::SIGSTOP);
                inbound.abort();
                std::future::pending::<()>().await;
            }
            Fault::Stall(n) if tokens == *n => stalled_progress = Some(String::new()),
            Fault::Garbage(n) if tokens == *n => write(&mut out, "this is not a protocol line").await,
            Fault::Oversized(n) if tokens == *n => write(&mut out, &"x".repeat(8 << 20)).await,
            // Filled, so the pages are resident; kept, so they are never freed.
            Fault::Leak(bytes) => leaked.push(vec![1u8; *bytes]),
            _ => {}
        }
    }
    let status = child.wait().await?;
    std::process::exit(status.code().unwrap_or(1));
}

/// The heartbeat line with the progress counters of the first heartbeat after the stall began
/// (which `frozen` remembers).
fn freeze(line: &str, frozen: &mut String) -> String {
    let Some(start) = line.find("\"progress\":{") else { return line.to_string() };
    let Some(len) = line[start..].find('}') else { return line.to_string() };
    let current = &line[start..start + len + 1];
    if frozen.is_empty() {
        *frozen = current.to_string();
    }
    line.replace(current, frozen)
}

/// The heartbeat line with `extra` bytes added to the worker's reported RSS.
fn add_rss(line: &str, extra: usize) -> String {
    let Ok(mut v) = serde_json::from_str::<serde_json::Value>(line) else { return line.to_string() };
    if let Some(rss) = v.pointer_mut("/params/memory/rss")
        && let Some(n) = rss.as_u64()
    {
        *rss = (n + extra as u64).into();
    }
    v.to_string()
}

async fn write(out: &mut tokio::io::Stdout, line: &str) {
    let _ = out.write_all(line.as_bytes()).await;
    let _ = out.write_all(b"\n").await;
    let _ = out.flush().await;
}
