//! A slot of the pool: an actor task that owns one worker process at a time, watches it, and
//! replaces it when it dies or hangs. The rest of the supervisor holds an `Arc<Slot>`: routing
//! reads its state, requests count themselves against it, commands go through its channel.
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::process::ExitStatus;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use mlx_serving_protocol::link::WorkerLink;
use mlx_serving_protocol::{Heartbeat, ModelInfo, PROTOCOL_VERSION};
use nix::sys::signal::Signal;
use serde::Serialize;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::{Instant, sleep, sleep_until, timeout};

use crate::breaker::Breaker;
use crate::config::{Config, ms};
use crate::prefix::PrefixMemory;
use crate::restart::{Decision, RestartTracker};
use crate::worker::process::{self, Process, describe_exit};

/// Crash records kept per slot.
const CRASHES_KEPT: usize = 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerState {
    /// Spawned; handshake and model loads in progress.
    Starting,
    /// Takes requests.
    Ready,
    /// Finishes its requests and takes no new ones.
    Draining,
    /// Being shut down.
    Stopping,
    /// Not running; a replacement is due after the backoff.
    Exited,
    /// Died too often: retried slowly.
    Quarantined,
}

/// What is known about one worker death.
#[derive(Clone, Debug, Serialize)]
pub struct CrashRecord {
    /// Seconds since the Unix epoch.
    pub at_unix_s: f64,
    pub pid: u32,
    /// `exit status 3`, `signal 9 (SIGKILL)`, `hung: no heartbeat for 5.0 s`, `spawn failed: ...`.
    pub reason: String,
    /// Requests in flight on it when it died.
    pub in_flight: Vec<String>,
    pub stderr_tail: Vec<String>,
}

/// A model loaded on the slot's current worker.
#[derive(Clone, Debug)]
pub struct LoadedModel {
    pub info: ModelInfo,
    pub last_used: Instant,
}

/// A request in flight on a slot.
#[derive(Clone, Debug)]
pub struct RequestEntry {
    pub model: String,
    /// The worker process it was sent to.
    pub generation: u64,
}

/// The slot's current connection: valid until the process it belongs to dies.
pub struct Conn {
    pub client: WorkerLink,
    /// Counts processes in this slot; a retry goes to another (slot, generation).
    pub generation: u64,
}

pub enum SlotCommand {
    /// Stop the worker (graceful: shutdown call with the drain deadline first) and end the slot.
    /// `deadline`: how long running work may take in a graceful stop (`pool.drain_deadline_ms`
    /// when absent).
    Stop { graceful: bool, deadline: Option<Duration>, done: oneshot::Sender<()> },
    /// Stop the worker gracefully and start a new one at once.
    Restart,
}

/// State shared by the slot's task and the rest of the supervisor.
pub struct SlotInner {
    pub state: WorkerState,
    pub conn: Option<Arc<Conn>>,
    pub pid: Option<u32>,
    pub generation: u64,
    pub started_at: Option<SystemTime>,
    pub ready_at: Option<Instant>,
    pub models: BTreeMap<String, LoadedModel>,
    /// Models to load whenever a worker starts in this slot.
    pub desired: BTreeSet<String>,
    pub heartbeat: Option<Heartbeat>,
    pub breaker: Breaker,
    pub restarts: u64,
    pub crashes: VecDeque<CrashRecord>,
    /// Set by drain: no new requests.
    pub drain: bool,
    /// In-flight requests by id. A request whose worker died stays here until the death is
    /// recorded, so the crash record lists it.
    pub requests: BTreeMap<String, RequestEntry>,
    /// When a backoff or quarantine wait ends.
    pub next_start: Option<Instant>,
    /// Requests the current worker runs at once (its `max_sequences`).
    pub capacity: usize,
    /// The `CUDA_VISIBLE_DEVICES` its workers start with (`pool.cuda_visible_devices`); `None`:
    /// inherited.
    pub cuda_device: Option<String>,
    /// Prefix keys of the requests the current worker was sent lately, for affinity routing.
    pub prefixes: PrefixMemory,
}

pub struct Slot {
    pub id: u64,
    /// The group of workers (`pool.groups`) this slot belongs to; `None` for the main pool.
    pub group: Option<String>,
    /// Requests counted against this slot until their streams end.
    pub inflight: Arc<AtomicUsize>,
    /// Of those, requests that were on a worker when it died before they got a token: each
    /// worker takes at most one at a time, so a poisonous request and its innocent fellow
    /// passengers part ways, and only the poisonous one takes down a second worker.
    pub suspects: Arc<AtomicUsize>,
    /// Models being loaded on the worker at the pool's request (`Slot::loading`). A worker
    /// loads on its engine thread, so its progress stands still meanwhile; the load has its own
    /// bound, `start_timeout_ms`, and the stall watchdog waits for it.
    loads: AtomicUsize,
    inner: Mutex<SlotInner>,
    commands: mpsc::UnboundedSender<SlotCommand>,
}

/// A model load in progress on a slot's worker ([`Slot::loading`]).
pub struct LoadGuard<'a>(&'a Slot);

impl Drop for LoadGuard<'_> {
    fn drop(&mut self) {
        self.0.loads.fetch_sub(1, Relaxed);
    }
}

/// What the slot's task reads from the pool.
pub struct SlotContext {
    pub config: Arc<std::sync::RwLock<Arc<Config>>>,
    /// Notified whenever any slot changes state.
    pub changed: Arc<Notify>,
}

impl SlotContext {
    fn config(&self) -> Arc<Config> {
        self.config.read().map(|c| c.clone()).unwrap_or_default()
    }
}

impl Slot {
    /// Creates a slot and starts its task.
    pub fn start(
        id: u64,
        group: Option<String>,
        desired: BTreeSet<String>,
        breaker: Breaker,
        restart: RestartTracker,
        cuda_device: Option<String>,
        ctx: Arc<SlotContext>,
    ) -> Arc<Slot> {
        let (tx, rx) = mpsc::unbounded_channel();
        let slot = Arc::new(Slot {
            id,
            group,
            inflight: Arc::new(AtomicUsize::new(0)),
            suspects: Arc::new(AtomicUsize::new(0)),
            loads: AtomicUsize::new(0),
            inner: Mutex::new(SlotInner {
                state: WorkerState::Starting,
                conn: None,
                pid: None,
                generation: 0,
                started_at: None,
                ready_at: None,
                models: BTreeMap::new(),
                desired,
                heartbeat: None,
                breaker,
                restarts: 0,
                crashes: VecDeque::new(),
                drain: false,
                requests: BTreeMap::new(),
                next_start: None,
                capacity: 1,
                prefixes: PrefixMemory::default(),
                cuda_device,
            }),
            commands: tx,
        });
        tokio::spawn(run(slot.clone(), ctx, restart, rx));
        slot
    }

    pub fn lock(&self) -> MutexGuard<'_, SlotInner> {
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Marks a model load on the worker until the guard drops: while one runs, a busy worker
    /// whose progress stands still is loading, not hung.
    pub fn loading(&self) -> LoadGuard<'_> {
        self.loads.fetch_add(1, Relaxed);
        LoadGuard(self)
    }

    pub fn send(&self, command: SlotCommand) -> bool {
        self.commands.send(command).is_ok()
    }

    /// Stops the worker and ends the slot's task.
    pub async fn stop(&self, graceful: bool) {
        self.stop_with(graceful, None).await
    }

    /// A stop whose graceful part lasts at most `deadline` (`None`: the drain deadline).
    pub async fn stop_with(&self, graceful: bool, deadline: Option<Duration>) {
        let (done, rx) = oneshot::channel();
        if self.send(SlotCommand::Stop { graceful, deadline, done }) {
            let _ = rx.await;
        }
    }

    fn set_state(&self, ctx: &SlotContext, state: WorkerState) {
        self.lock().state = state;
        ctx.changed.notify_waiters();
    }
}

/// How a running worker's watch ended.
enum Ended {
    Exited(ExitStatus),
    /// Handshake or model loads failed (often because the process is exiting).
    StartFailed(String),
    Hung(String),
    /// It wrote a line that breaks the protocol (not JSON-RPC, too long, not UTF-8): killed.
    Broken(String),
    /// Resident memory over the limit: stopped gracefully, restarted with backoff.
    OverMemory(String),
    Disconnected,
    Command(SlotCommand),
}

/// How long a worker whose pipe closed gets to exit by itself before SIGKILL, so its own exit
/// status is what the crash record shows.
const EXIT_GRACE: Duration = Duration::from_millis(200);

async fn run(
    slot: Arc<Slot>,
    ctx: Arc<SlotContext>,
    mut restart: RestartTracker,
    mut commands: mpsc::UnboundedReceiver<SlotCommand>,
) {
    loop {
        let config = ctx.config();
        let p = &config.pool;
        restart.on_spawn(Instant::now());
        let (generation, cuda_device) = {
            let mut s = slot.lock();
            s.generation += 1;
            s.state = WorkerState::Starting;
            s.next_start = None;
            (s.generation, s.cuda_device.clone())
        };
        ctx.changed.notify_waiters();
        let command = config.worker_command_for(slot.group.as_deref());
        let env: Vec<(&str, &str)> = cuda_device.iter().map(|d| ("CUDA_VISIBLE_DEVICES", d.as_str())).collect();
        let ended = match process::spawn(&command, &env, slot.id, ms(p.start_timeout_ms), p.max_line_bytes) {
            Ok(mut proc) => {
                {
                    let mut s = slot.lock();
                    s.pid = Some(proc.pid);
                    s.started_at = Some(SystemTime::now());
                }
                let ended = serve(&slot, &ctx, &config, &mut proc, generation, &mut restart, &mut commands).await;
                finish(&slot, &ctx, &config, &mut proc, ended).await
            }
            Err(e) => {
                let reason = format!("spawn failed: {e}");
                record_crash(&slot, 0, reason.clone(), Vec::new());
                Finished::Crashed(reason)
            }
        };
        let reason = match ended {
            Finished::Crashed(reason) => reason,
            Finished::Stopped(done) => {
                slot.set_state(&ctx, WorkerState::Exited);
                let _ = done.send(());
                return;
            }
            Finished::Restart => {
                slot.lock().restarts += 1;
                continue;
            }
        };
        crate::metrics::restart(crate::metrics::reason_class(&reason));
        let decision = restart.next(Instant::now());
        let (state, after) = match decision {
            Decision::Restart { after } => (WorkerState::Exited, after),
            Decision::Quarantine { after } => (WorkerState::Quarantined, after),
        };
        tracing::warn!(worker = slot.id, %reason, ?state, next_start_in = ?after, "worker died");
        {
            let mut s = slot.lock();
            s.state = state;
            s.restarts += 1;
            s.next_start = Some(Instant::now() + after);
        }
        ctx.changed.notify_waiters();
        tokio::select! {
            _ = sleep(after) => {}
            command = commands.recv() => match command {
                Some(SlotCommand::Stop { done, .. }) => {
                    slot.set_state(&ctx, WorkerState::Exited);
                    let _ = done.send(());
                    return;
                }
                Some(SlotCommand::Restart) => {}
                None => return,
            }
        }
    }
}

enum Finished {
    /// The worker died or hung; the reason is recorded.
    Crashed(String),
    Stopped(oneshot::Sender<()>),
    Restart,
}

/// Starts the worker (handshake, models), then watches it until it ends.
async fn serve(
    slot: &Arc<Slot>,
    ctx: &SlotContext,
    config: &Config,
    proc: &mut Process,
    generation: u64,
    restart: &mut RestartTracker,
    commands: &mut mpsc::UnboundedReceiver<SlotCommand>,
) -> Ended {
    let client = proc.client.clone();
    let mut beats = client.heartbeats();
    let desired: Vec<String> = slot.lock().desired.iter().cloned().collect();
    let start = timeout(ms(config.pool.start_timeout_ms), start_worker(&client, config, &desired));
    let (capacity, loaded) = tokio::select! {
        r = start => match r {
            Ok(Ok(started)) => started,
            Ok(Err(e)) => return Ended::StartFailed(format!("start failed: {e}")),
            Err(_) => return Ended::Hung(format!("not ready within {} ms", config.pool.start_timeout_ms)),
        },
        status = proc.child.wait() => return status.map_or(Ended::Disconnected, Ended::Exited),
        command = commands.recv() => return command.map_or(Ended::Disconnected, Ended::Command),
    };
    {
        let now = Instant::now();
        let mut s = slot.lock();
        s.models = loaded.into_iter().map(|info| (info.model.clone(), LoadedModel { info, last_used: now })).collect();
        s.capacity = capacity.max(1);
        s.conn = Some(Arc::new(Conn { client: client.clone(), generation }));
        // Entries left by requests of an earlier process that ended without a crash record.
        s.requests.retain(|_, r| r.generation == generation);
        s.ready_at = Some(now);
        s.heartbeat = None;
        s.state = if s.drain { WorkerState::Draining } else { WorkerState::Ready };
    }
    restart.on_ready(Instant::now());
    ctx.changed.notify_waiters();
    tracing::info!(worker = slot.id, pid = proc.pid, generation, "worker ready");
    watch(slot, config, proc, &mut beats, commands).await
}

/// Handshake and model loads of a new worker: its capacity and its models.
async fn start_worker(
    client: &WorkerLink,
    config: &Config,
    desired: &[String],
) -> Result<(usize, Vec<ModelInfo>), String> {
    let hs = client.handshake().await.map_err(|e| format!("handshake: {e}"))?;
    let major = |v: &str| v.split('.').next().unwrap_or("").to_string();
    if major(&hs.protocol_version) != major(PROTOCOL_VERSION) {
        return Err(format!("protocol version {} is not compatible with {PROTOCOL_VERSION}", hs.protocol_version));
    }
    let mut loaded = Vec::new();
    for name in desired {
        let Some(m) = config.model(name) else { continue };
        let info = client
            .load_model(&m.name, &m.path.display().to_string())
            .await
            .map_err(|e| format!("loading `{name}`: {e}"))?;
        loaded.push(info);
    }
    Ok((hs.limits.max_sequences, loaded))
}

/// Watches a ready worker: exit, pipe EOF, heartbeats, stalls, idle models and commands.
async fn watch(
    slot: &Arc<Slot>,
    config: &Config,
    proc: &mut Process,
    beats: &mut mpsc::Receiver<Heartbeat>,
    commands: &mut mpsc::UnboundedReceiver<SlotCommand>,
) -> Ended {
    let p = &config.pool;
    let heartbeat_timeout = ms(p.heartbeat_timeout_ms);
    let stall_timeout = ms(p.stall_timeout_ms);
    let mut heartbeat_deadline = Instant::now() + heartbeat_timeout;
    let mut progress = None;
    let mut progress_at = Instant::now();
    let mut tick =
        tokio::time::interval((stall_timeout / 4).clamp(Duration::from_millis(10), Duration::from_millis(500)));
    let heartbeat_interval = ms(p.heartbeat_interval_ms);
    let mut next_ping = Instant::now();
    let client = proc.client.clone();
    loop {
        tokio::select! {
            status = proc.child.wait() => return status.map_or(Ended::Disconnected, Ended::Exited),
            _ = client.on_disconnect() => return disconnected(&client),
            beat = beats.recv() => match beat {
                Some(hb) => {
                    let now = Instant::now();
                    heartbeat_deadline = now + heartbeat_timeout;
                    if progress != Some(hb.progress) {
                        progress = Some(hb.progress);
                        progress_at = now;
                    }
                    let rss = hb.memory.rss;
                    slot.lock().heartbeat = Some(hb);
                    if p.max_worker_rss_bytes > 0 && rss > p.max_worker_rss_bytes {
                        return Ended::OverMemory(format!(
                            "memory: resident {} MiB over the limit of {} MiB; recycled",
                            rss >> 20,
                            p.max_worker_rss_bytes >> 20
                        ));
                    }
                }
                None => return disconnected(&client),
            },
            _ = sleep_until(heartbeat_deadline) => {
                return Ended::Hung(format!("hung: no heartbeat for {:.1} s", heartbeat_timeout.as_secs_f64()));
            }
            _ = tick.tick() => {
                let now = Instant::now();
                let busy = slot.inflight.load(Relaxed) > 0
                    || slot.lock().heartbeat.as_ref().is_some_and(|h| h.active_sequences > 0 || h.queue_depth > 0);
                if !busy || slot.loads.load(Relaxed) > 0 {
                    progress_at = now;
                } else if now.duration_since(progress_at) > stall_timeout {
                    return Ended::Hung(format!("hung: busy with no progress for {:.1} s", stall_timeout.as_secs_f64()));
                }
                unload_idle_models(slot, config, &client, now);
                if now >= next_ping {
                    next_ping = now + heartbeat_interval;
                    let (client, worker) = (client.clone(), slot.id);
                    // The handshake is answered off the engine thread: a round trip through
                    // the worker's pipes and RPC loop.
                    tokio::spawn(async move {
                        let t = Instant::now();
                        if timeout(heartbeat_interval, client.handshake()).await.is_ok_and(|r| r.is_ok()) {
                            crate::metrics::heartbeat_rtt(worker, t.elapsed().as_secs_f64());
                        }
                    });
                }
            }
            command = commands.recv() => return command.map_or(Ended::Disconnected, Ended::Command),
        }
    }
}

/// Unloads models whose keep-alive has passed with no request in flight.
/// How a closed link ended the worker. One that broke the protocol is not waited for: it is
/// killed at once.
fn disconnected(client: &WorkerLink) -> Ended {
    client.broken().map_or(Ended::Disconnected, |e| Ended::Broken(format!("protocol: {e}")))
}

fn unload_idle_models(slot: &Arc<Slot>, config: &Config, client: &WorkerLink, now: Instant) {
    let idle: Vec<String> = {
        let s = slot.lock();
        s.models
            .iter()
            .filter(|(name, m)| {
                let (keep, pinned) = config.model(name).map_or((0, false), |c| (c.keep_alive_s, c.pinned));
                keep > 0
                    && !pinned
                    && now.duration_since(m.last_used) >= Duration::from_secs(keep)
                    && !s.requests.values().any(|r| r.model == **name)
            })
            .map(|(name, _)| name.clone())
            .collect()
    };
    for name in idle {
        slot.lock().models.remove(&name);
        tracing::info!(worker = slot.id, model = %name, "unloading idle model");
        let client = client.clone();
        tokio::spawn(async move {
            if let Err(e) = client.unload_model(&name).await {
                tracing::warn!(model = %name, "idle unload failed: {e}");
            }
        });
    }
}

/// Ends the worker process after its watch ended, records a crash where it was one.
async fn finish(slot: &Arc<Slot>, ctx: &SlotContext, config: &Config, proc: &mut Process, ended: Ended) -> Finished {
    {
        let mut s = slot.lock();
        s.conn = None;
        s.models.clear();
        s.heartbeat = None;
        // The worker's KV cache went with it.
        s.prefixes.clear();
    }
    ctx.changed.notify_waiters();
    let reason = match ended {
        Ended::Exited(status) => describe_exit(&status),
        // Pipe EOF or a failed start: the process is usually exiting; its status says why.
        Ended::Disconnected => exit_or_kill(proc).await.unwrap_or_else(|| "stdout closed; killed".into()),
        Ended::StartFailed(reason) => exit_or_kill(proc).await.unwrap_or(reason),
        Ended::Hung(reason) | Ended::Broken(reason) => {
            process::signal_group(proc.pid, Signal::SIGKILL);
            let _ = proc.child.wait().await;
            reason
        }
        Ended::OverMemory(reason) => {
            tracing::warn!(worker = slot.id, pid = proc.pid, %reason, "recycling worker");
            slot.set_state(ctx, WorkerState::Stopping);
            stop_process(proc, config, true, None).await;
            reason
        }
        Ended::Command(command) => {
            slot.set_state(ctx, WorkerState::Stopping);
            let (graceful, deadline) = match &command {
                SlotCommand::Stop { graceful, deadline, .. } => (*graceful, *deadline),
                SlotCommand::Restart => (true, None),
            };
            stop_process(proc, config, graceful, deadline).await;
            return match command {
                SlotCommand::Stop { done, .. } => Finished::Stopped(done),
                SlotCommand::Restart => Finished::Restart,
            };
        }
    };
    // The last stderr lines arrive as the pipe closes.
    let _ = timeout(EXIT_GRACE, &mut proc.stderr_done).await;
    record_crash(slot, proc.pid, reason.clone(), proc.stderr.lines());
    Finished::Crashed(reason)
}

fn record_crash(slot: &Slot, pid: u32, reason: String, stderr_tail: Vec<String>) {
    let mut s = slot.lock();
    let generation = s.generation;
    let in_flight = s.requests.iter().filter(|(_, r)| r.generation == generation).map(|(id, _)| id.clone()).collect();
    s.requests.retain(|_, r| r.generation != generation);
    let record = CrashRecord {
        at_unix_s: SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64()),
        pid,
        reason,
        in_flight,
        stderr_tail,
    };
    if s.crashes.len() == CRASHES_KEPT {
        s.crashes.pop_front();
    }
    s.crashes.push_back(record);
}

/// Waits briefly for the process to exit by itself and describes how; kills it otherwise.
async fn exit_or_kill(proc: &mut Process) -> Option<String> {
    if let Ok(Ok(status)) = timeout(EXIT_GRACE, proc.child.wait()).await {
        return Some(describe_exit(&status));
    }
    process::signal_group(proc.pid, Signal::SIGKILL);
    let _ = proc.child.wait().await;
    None
}

/// Graceful: the shutdown call with the drain deadline (or `deadline`), then SIGTERM, then
/// SIGKILL after the grace period. Not graceful: SIGTERM, then SIGKILL.
async fn stop_process(proc: &mut Process, config: &Config, graceful: bool, deadline: Option<Duration>) {
    let p = &config.pool;
    if graceful {
        let deadline = deadline.unwrap_or(ms(p.drain_deadline_ms));
        let _ = timeout(Duration::from_secs(1), proc.client.shutdown(deadline.as_millis() as u64)).await;
        if timeout(deadline + Duration::from_secs(1), proc.child.wait()).await.is_ok() {
            return;
        }
    }
    process::signal_group(proc.pid, Signal::SIGTERM);
    if timeout(ms(p.stop_grace_ms), proc.child.wait()).await.is_ok() {
        return;
    }
    process::signal_group(proc.pid, Signal::SIGKILL);
    let _ = proc.child.wait().await;
}
