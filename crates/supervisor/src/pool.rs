//! The pool: N slots, each with a worker process, and the request path over them: route to the
//! least busy ready worker, retry failures that happened before the first token on another
//! worker within a budget, and feed each worker's circuit breaker.
use std::collections::{BTreeSet, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use mlx_serving_protocol::link::LinkError;
use mlx_serving_protocol::{ErrorCode, FinishReason, GenerateEvent, GenerateRequest};
use rand::SeedableRng;
use rand::rngs::SmallRng;
use tokio::sync::{Notify, mpsc};
use tokio::time::{Instant, sleep, timeout_at};

use crate::breaker::{Breaker, BreakerConfig, BreakerState, Outcome};
use crate::config::{Config, ms};
use crate::error::PoolError;
use crate::restart::{RestartPolicy, RestartTracker};
use crate::retry::{RetryBudget, RetryConfig, retry_delay};
use crate::route::{Candidate, InFlight, Picked, pick};
use crate::status::{PoolStatus, WorkerStatus};
use crate::worker::slot::{Conn, LoadedModel, RequestEntry, Slot, SlotContext, WorkerState};

/// What a request's stream carries.
#[derive(Clone, Debug, PartialEq)]
pub enum PoolEvent {
    /// A worker accepted the request; sent once, before any token. A caller that must choose a
    /// status code waits for this or an error.
    Started,
    Event(GenerateEvent),
}

/// Events of one request as the caller sees them; an `Err` is always the last item.
pub type StreamItem = Result<PoolEvent, PoolError>;

/// Where a pool request's events go. An error, if any, is the last item.
pub trait Sink: Send + 'static {
    /// Delivers one item; `false` once nobody reads them any more, which cancels the request.
    fn deliver(&mut self, item: StreamItem) -> impl std::future::Future<Output = bool> + Send;
}

/// A bounded channel: a slow reader makes the request wait.
impl Sink for mpsc::Sender<StreamItem> {
    async fn deliver(&mut self, item: StreamItem) -> bool {
        self.send(item).await.is_ok()
    }
}

/// Completions remembered to measure the drain rate.
const DRAIN_WINDOW: Duration = Duration::from_secs(10);

/// Events buffered per request between the pool and its caller.
const STREAM_BUFFER: usize = 256;

/// Attempts per request at most, whatever the cause.
const MAX_ATTEMPTS: u32 = 8;

/// A request that took down this many workers is poisonous: it and its twins are refused.
const POISON_CRASHES: u32 = 2;

/// How long a poisonous request stays refused.
const POISON_TTL: Duration = Duration::from_secs(600);

/// What makes two requests the same for poison quarantine: everything but the id.
fn fingerprint(r: &GenerateRequest) -> u64 {
    use std::hash::Hasher;
    /// Hashes the JSON text as it is written, without keeping it.
    struct HashWriter(std::collections::hash_map::DefaultHasher);
    impl std::io::Write for HashWriter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.write(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut h = HashWriter(std::collections::hash_map::DefaultHasher::new());
    // Writing into a hasher cannot fail.
    let _ = serde_json::to_writer(
        &mut h,
        &(&r.model, &r.prompt, r.max_tokens, &r.sampling, &r.stop, &r.stop_token_ids, r.ignore_eos),
    );
    h.0.finish()
}

pub struct Pool {
    config: Arc<RwLock<Arc<Config>>>,
    slots: Mutex<Vec<Arc<Slot>>>,
    next_slot: AtomicU64,
    next_request: AtomicU64,
    ctx: Arc<SlotContext>,
    budget: Arc<RetryBudget>,
    rng: Mutex<SmallRng>,
    changed: Arc<Notify>,
    shutting_down: AtomicBool,
    started: Instant,
    /// Requests moved off a dead worker before their first token.
    moved: AtomicU64,
    /// Requests retried after a failure answer before their first token.
    retried: AtomicU64,
    /// Streams resumed on another worker after theirs died mid-stream.
    resumed: AtomicU64,
    /// Requests sent to a worker because it knew the longest prefix of their prompt.
    prefix_routed: AtomicU64,
    /// Requests in the pool (waiting or running) per model.
    per_model: Mutex<std::collections::HashMap<String, usize>>,
    /// When recent requests ended, for the drain rate behind Retry-After.
    finished: Mutex<std::collections::VecDeque<Instant>>,
    /// Requests waiting for a worker: (model, priority, arrival number).
    waiting: Mutex<BTreeSet<(String, Priority, u64)>>,
    /// Fingerprints of requests that took down workers, and until when they are refused.
    poisoned: Mutex<std::collections::HashMap<u64, Instant>>,
    next_ticket: AtomicU64,
}

/// Counts a request against its model's and the global bound until it ends.
struct Admission {
    pool: Arc<Pool>,
    model: String,
}

impl Drop for Admission {
    fn drop(&mut self) {
        if let Ok(mut m) = self.pool.per_model.lock()
            && let Some(n) = m.get_mut(&self.model)
        {
            *n = n.saturating_sub(1);
        }
        if let Ok(mut f) = self.pool.finished.lock() {
            let now = Instant::now();
            f.push_back(now);
            while f.front().is_some_and(|t| now.duration_since(*t) > DRAIN_WINDOW) {
                f.pop_front();
            }
        }
    }
}

/// The order waiting requests are served in; the `x-priority` header sets it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Priority {
    Urgent,
    #[default]
    Default,
    Background,
}

impl Priority {
    pub fn parse(s: &str) -> Option<Priority> {
        match s {
            "urgent" => Some(Priority::Urgent),
            "default" => Some(Priority::Default),
            "background" => Some(Priority::Background),
            _ => None,
        }
    }
}

/// What routing found.
enum Pick {
    /// `by_prefix`: chosen for the prefix of the prompt it holds.
    Chosen {
        slot: Arc<Slot>,
        conn: Arc<Conn>,
        by_prefix: bool,
    },
    /// Workers serve the model but none has room.
    Full,
    /// No eligible worker has the model; this one may load it.
    NotLoaded(Arc<Slot>),
    Nothing,
}

/// What a request needs of a worker.
struct Want<'a> {
    model: &'a str,
    /// Keys of its prompt's prefixes (`prefix::keys`); empty when prefix affinity is off.
    prefix: &'a [u64],
    /// How many keys a worker's memory holds (`pool.prefix_affinity_keys`).
    prefix_capacity: usize,
    priority: Priority,
    /// It was on a worker that died before producing a token for it.
    suspect: bool,
}

/// A request's place among those waiting for a worker for its model.
struct Ticket<'a> {
    pool: &'a Pool,
    key: (String, Priority, u64),
    /// Goes ahead of the line.
    ahead: bool,
}

impl<'a> Ticket<'a> {
    fn take(pool: &'a Pool, model: &str, priority: Priority, ahead: bool) -> Ticket<'a> {
        let key = (model.to_string(), priority, pool.next_ticket.fetch_add(1, Relaxed));
        if !ahead {
            pool.waiting.lock().unwrap_or_else(|p| p.into_inner()).insert(key.clone());
        }
        Ticket { pool, key, ahead }
    }

    /// Whether no request for the same model is ahead of this one.
    fn is_first(&self) -> bool {
        if self.ahead {
            return true;
        }
        let waiting = self.pool.waiting.lock().unwrap_or_else(|p| p.into_inner());
        let start = (self.key.0.clone(), Priority::Urgent, 0);
        waiting.range(start..).next() == Some(&self.key)
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        if self.ahead {
            return;
        }
        self.pool.waiting.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.key);
        // The next in line may go now.
        self.pool.changed.notify_waiters();
    }
}

/// How one attempt on one worker ended.
enum Attempt {
    Done,
    /// The caller went away.
    CallerGone,
    /// The request is wrong: no other worker would take it either.
    Refused(String),
    /// The worker is full; try another.
    Overloaded,
    /// The worker's view was stale (model not loaded after all, shutting down); try another.
    Stale,
    /// The worker answered with a failure before any token reached the caller.
    Failed(String),
    /// The worker's process or pipe went away before any token reached the caller.
    WorkerGone(String),
    /// The worker failed after tokens reached the caller (an engine error: not resumed).
    FailedMidStream(String),
    /// The worker's process or pipe went away after tokens reached the caller: resumable.
    /// `before_token`: this worker died before it produced a token of this request.
    DiedMidStream {
        message: String,
        before_token: bool,
    },
}

/// Counts a request against a slot until the stream ends.
struct RequestGuard {
    slot: Arc<Slot>,
    conn: Arc<Conn>,
    key: String,
    model: String,
    changed: Arc<Notify>,
    _inflight: InFlight,
    _suspect: Option<InFlight>,
}

impl RequestGuard {
    fn new(
        slot: &Arc<Slot>,
        conn: &Arc<Conn>,
        key: String,
        model: &str,
        suspect: bool,
        changed: &Arc<Notify>,
    ) -> RequestGuard {
        let inflight = InFlight::new(slot.inflight.clone());
        let suspect = suspect.then(|| InFlight::new(slot.suspects.clone()));
        let mut s = slot.lock();
        s.requests.insert(key.clone(), RequestEntry { model: model.to_string(), generation: conn.generation });
        if let Some(m) = s.models.get_mut(model) {
            m.last_used = Instant::now();
        }
        RequestGuard {
            slot: slot.clone(),
            conn: conn.clone(),
            key,
            model: model.to_string(),
            changed: changed.clone(),
            _inflight: inflight,
            _suspect: suspect,
        }
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let mut s = self.slot.lock();
        // If the worker died, the slot records the request in the crash record and drops it.
        if self.conn.client.is_connected() {
            s.requests.remove(&self.key);
        }
        if let Some(m) = s.models.get_mut(&self.model) {
            m.last_used = Instant::now();
        }
        drop(s);
        // A waiting request may take the freed place.
        self.changed.notify_waiters();
    }
}

impl Pool {
    /// Starts the configured number of workers. Returns at once; workers become ready in the
    /// background ([`Pool::wait_ready`]).
    pub fn start(config: Config) -> Arc<Pool> {
        let r = &config.retry;
        let budget =
            RetryBudget::new(RetryConfig { ratio: r.ratio, floor: r.floor, base: ms(r.base_ms), cap: ms(r.cap_ms) });
        let rng = match config.pool.seed {
            Some(seed) => SmallRng::seed_from_u64(seed),
            None => SmallRng::from_os_rng(),
        };
        let workers = config.pool.workers;
        let changed = Arc::new(Notify::new());
        let config = Arc::new(RwLock::new(Arc::new(config)));
        let pool = Arc::new(Pool {
            ctx: Arc::new(SlotContext { config: config.clone(), changed: changed.clone() }),
            config,
            slots: Mutex::new(Vec::new()),
            next_slot: AtomicU64::new(0),
            next_request: AtomicU64::new(0),
            budget: Arc::new(budget),
            rng: Mutex::new(rng),
            changed,
            shutting_down: AtomicBool::new(false),
            started: Instant::now(),
            moved: AtomicU64::new(0),
            retried: AtomicU64::new(0),
            resumed: AtomicU64::new(0),
            prefix_routed: AtomicU64::new(0),
            per_model: Mutex::new(std::collections::HashMap::new()),
            finished: Mutex::new(std::collections::VecDeque::new()),
            waiting: Mutex::new(BTreeSet::new()),
            poisoned: Mutex::new(std::collections::HashMap::new()),
            next_ticket: AtomicU64::new(0),
        });
        for _ in 0..workers {
            pool.add_slot(None);
        }
        for group in pool.config().pool.groups.clone() {
            for _ in 0..group.workers {
                pool.add_slot(Some(group.name.clone()));
            }
        }
        pool
    }

    /// The current configuration (a shared snapshot: cheap to take on every request).
    pub fn config(&self) -> Arc<Config> {
        self.config.read().map(|c| c.clone()).unwrap_or_default()
    }

    pub fn slots(&self) -> Vec<Arc<Slot>> {
        self.slots.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Starts a worker of `group` (`None`: the main pool).
    fn add_slot(&self, group: Option<String>) -> Arc<Slot> {
        let config = self.config();
        let desired: BTreeSet<String> = config
            .models
            .iter()
            .filter(|m| (m.preload || m.pinned) && config.serves(group.as_deref(), &m.name))
            .map(|m| m.name.clone())
            .collect();
        let b = &config.breaker;
        let breaker = Breaker::new(BreakerConfig {
            failure_threshold: b.failure_threshold,
            base_ejection: ms(b.base_ejection_ms),
            max_ejection: ms(b.max_ejection_ms),
        });
        let r = &config.restart;
        let restart = RestartTracker::new(RestartPolicy {
            min_delay: ms(r.min_delay_ms),
            max_delay: ms(r.max_delay_ms),
            max_spawns: r.max_spawns,
            window: ms(r.window_ms),
        });
        let id = self.next_slot.fetch_add(1, Relaxed);
        let cuda_device = least_used(config.cuda_devices_for(group.as_deref()), &self.cuda_devices());
        let slot = Slot::start(id, group, desired, breaker, restart, cuda_device, self.ctx.clone());
        if let Ok(mut slots) = self.slots.lock() {
            slots.push(slot.clone());
        }
        self.changed.notify_waiters();
        slot
    }

    /// The `CUDA_VISIBLE_DEVICES` entry of every slot that has one.
    fn cuda_devices(&self) -> Vec<String> {
        self.slots().iter().filter_map(|s| s.lock().cuda_device.clone()).collect()
    }

    /// Gives each slot whose `CUDA_VISIBLE_DEVICES` entry is no longer in its list another one
    /// (none when its list is empty), for its next start.
    fn replace_cuda_devices(&self, config: &Config) {
        for slot in self.slots() {
            let list = config.cuda_devices_for(slot.group.as_deref());
            let current = slot.lock().cuda_device.clone();
            let keep = match &current {
                Some(d) => list.contains(d),
                None => list.is_empty(),
            };
            if !keep {
                // This slot's own entry is not in `list`, so counting it with the others changes
                // nothing.
                let next = least_used(list, &self.cuda_devices());
                tracing::info!(worker = slot.id, from = ?current, to = ?next, "CUDA_VISIBLE_DEVICES changes at the next start");
                slot.lock().cuda_device = next;
            }
        }
    }

    fn slot(&self, id: u64) -> Result<Arc<Slot>, PoolError> {
        let slots = self.slots();
        slots
            .iter()
            .find(|s| s.id == id)
            .cloned()
            .ok_or_else(|| PoolError::UnknownWorker { id, known: slots.iter().map(|s| s.id).collect() })
    }

    /// Waits until at least `n` workers are ready, or `within` passes.
    pub async fn wait_ready(&self, n: usize, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        loop {
            let notified = self.changed.notified();
            if self.ready_count() >= n {
                return true;
            }
            if timeout_at(deadline, notified).await.is_err() {
                return self.ready_count() >= n;
            }
        }
    }

    pub fn ready_count(&self) -> usize {
        self.slots().iter().filter(|s| s.lock().state == WorkerState::Ready).count()
    }

    /// Starts a request. The stream yields its events; an error, if any, is the last item.
    /// Dropping the receiver cancels the request on its worker.
    ///
    /// Over the configured bounds (requests per model, requests in all) the stream is one
    /// `QueueFull` error at once.
    pub fn generate(self: &Arc<Self>, request: GenerateRequest) -> mpsc::Receiver<StreamItem> {
        self.generate_with(request, Priority::Default)
    }

    /// [`Pool::generate`] with a priority: among requests waiting for a worker, urgent ones go
    /// first, background ones last.
    pub fn generate_with(self: &Arc<Self>, request: GenerateRequest, priority: Priority) -> mpsc::Receiver<StreamItem> {
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        self.generate_into(request, priority, tx);
        rx
    }

    /// [`Pool::generate_with`] into a sink of the caller's: its events go there from the task
    /// that reads them from the worker, with no task in between.
    pub fn generate_into<S: Sink>(self: &Arc<Self>, request: GenerateRequest, priority: Priority, mut sink: S) {
        match self.admit(&request) {
            Ok(admission) => {
                tokio::spawn(self.clone().run_request(request, priority, sink, admission));
            }
            Err(e) => {
                tokio::spawn(async move { sink.deliver(Err(e)).await });
            }
        }
    }

    async fn run_request<S: Sink>(
        self: Arc<Self>,
        mut request: GenerateRequest,
        priority: Priority,
        mut tx: S,
        _admission: Admission,
    ) {
        let _active = self.budget.start_request();
        // A sampled stream gets a seed here, so a resumed stream continues the same draws.
        if request.sampling.temperature > 0.0 && request.sampling.seed.is_none() {
            request.sampling.seed = Some(rand::random());
        }
        let config = self.config();
        let resume_wait = ms(config.pool.resume_timeout_ms);
        // Tokens the caller has received, for resuming on another worker.
        let mut emitted: Vec<u32> = request.resume_tokens.clone();
        let mut resuming = false;
        let mut started = false;
        // Workers that died with this request on them.
        let mut deaths = 0u32;
        let retry_config = *self.budget.config();
        let prefix_capacity = config.pool.prefix_affinity_keys;
        let prefix =
            if prefix_capacity > 0 { crate::prefix::keys(&request.model, &request.prompt) } else { Vec::new() };
        let mut exclude = HashSet::new();
        let mut overloaded = HashSet::new();
        let mut attempts = 0u32;
        let mut last_error = String::new();
        loop {
            attempts += 1;
            let wait = resuming.then_some(resume_wait);
            let key = format!("{}#{}", request.id, self.next_request.fetch_add(1, Relaxed));
            let suspect = deaths > 0;
            let want = Want { model: &request.model, prefix: &prefix, prefix_capacity, priority, suspect };
            let (slot, conn, guard) = match self.choose(&want, &key, &exclude, wait).await {
                Ok(choice) => choice,
                Err(e) if resuming => {
                    let message = format!("the stream could not be resumed: {e}");
                    tx.deliver(Err(PoolError::WorkerFailedMidStream { worker: u64::MAX, message })).await;
                    return;
                }
                Err(e) => {
                    let e = if attempts > 1 && !last_error.is_empty() {
                        PoolError::RetriesExhausted { attempts: attempts - 1, last: last_error }
                    } else {
                        e
                    };
                    tx.deliver(Err(e)).await;
                    return;
                }
            };
            let mut attempt_request = request.clone();
            attempt_request.id = key.clone();
            attempt_request.resume_tokens = emitted.clone();
            let outcome = self.attempt(&slot, &conn, attempt_request, &mut tx, &mut started, &mut emitted).await;
            drop(guard);
            let record = |o: Outcome| self.record(&slot, o);
            match outcome {
                Attempt::Done => return record(Outcome::Success),
                Attempt::CallerGone => return record(Outcome::Ignored),
                Attempt::Refused(message) => {
                    record(Outcome::Ignored);
                    tx.deliver(Err(PoolError::InvalidRequest { message })).await;
                    return;
                }
                Attempt::Overloaded => {
                    record(Outcome::Ignored);
                    exclude.insert((slot.id, conn.generation));
                    overloaded.insert((slot.id, conn.generation));
                    if overloaded.len() >= self.serving_count(&request.model) {
                        tx.deliver(Err(PoolError::Overloaded)).await;
                        return;
                    }
                    continue;
                }
                Attempt::Stale => {
                    record(Outcome::Ignored);
                    exclude.insert((slot.id, conn.generation));
                    continue;
                }
                Attempt::FailedMidStream(message) => {
                    record(Outcome::Failure);
                    tx.deliver(Err(PoolError::WorkerFailedMidStream { worker: slot.id, message })).await;
                    return;
                }
                // Only a death before the worker produced anything for the request counts against
                // it: a poisonous input takes a worker down as it starts on it, while deaths in
                // the middle of a stream come from elsewhere (a kill, a fault) far more often.
                Attempt::DiedMidStream { before_token: true, .. } | Attempt::WorkerGone(_)
                    if self.blame(&request, &mut deaths).is_some() =>
                {
                    record(Outcome::Failure);
                    tx.deliver(Err(PoolError::Poisoned { crashes: deaths })).await;
                    return;
                }
                Attempt::DiedMidStream { message, .. } => {
                    // Resume on another worker: the prompt plus the tokens already sent, the
                    // random stream where it was. The caller sees one unbroken stream.
                    record(Outcome::Failure);
                    exclude.insert((slot.id, conn.generation));
                    let permit = if attempts < MAX_ATTEMPTS { self.wait_for_retry(resume_wait).await } else { None };
                    let Some(_permit) = permit else {
                        let message =
                            format!("{message}; the stream could not be resumed (retry budget or attempts spent)");
                        tx.deliver(Err(PoolError::WorkerFailedMidStream { worker: slot.id, message })).await;
                        return;
                    };
                    tracing::info!(worker = slot.id, request = %request.id, tokens = emitted.len(), "resuming the stream on another worker");
                    self.resumed.fetch_add(1, Relaxed);
                    crate::metrics::retry("resumed");
                    resuming = true;
                    sleep(self.retry_delay(&retry_config, attempts)).await;
                }
                Attempt::Failed(message) | Attempt::WorkerGone(message) if attempts >= MAX_ATTEMPTS => {
                    record(Outcome::Failure);
                    tx.deliver(Err(PoolError::RetriesExhausted { attempts, last: message })).await;
                    return;
                }
                Attempt::WorkerGone(message) => {
                    // The worker died: its requests that had not started are moved to another
                    // worker. That replays each of them once, so it does not spend the retry
                    // budget, which guards against retry storms on live but failing workers.
                    record(Outcome::Failure);
                    tracing::info!(worker = slot.id, request = %request.id, %message, "moving the request off a dead worker");
                    exclude.insert((slot.id, conn.generation));
                    last_error = message;
                    self.moved.fetch_add(1, Relaxed);
                    crate::metrics::retry("moved");
                    sleep(self.retry_delay(&retry_config, attempts)).await;
                }
                Attempt::Failed(message) => {
                    record(Outcome::Failure);
                    tracing::warn!(worker = slot.id, request = %request.id, %message, "attempt failed before the first token");
                    exclude.insert((slot.id, conn.generation));
                    last_error = message;
                    let Some(_permit) = self.budget.try_retry() else {
                        tx.deliver(Err(PoolError::RetriesExhausted { attempts, last: last_error })).await;
                        return;
                    };
                    self.retried.fetch_add(1, Relaxed);
                    crate::metrics::retry("retried");
                    sleep(self.retry_delay(&retry_config, attempts)).await;
                }
            }
        }
    }

    /// A retry permit, waiting up to `within` for one: when a worker dies, all its streams want
    /// to resume at once, and the budget lets them through a few at a time.
    async fn wait_for_retry(&self, within: Duration) -> Option<crate::retry::RetryPermit> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(p) = self.budget.try_retry() {
                return Some(p);
            }
            if Instant::now() >= deadline {
                return None;
            }
            sleep(Duration::from_millis(5)).await;
        }
    }

    fn retry_delay(&self, config: &RetryConfig, attempt: u32) -> Duration {
        let mut rng = self.rng.lock().unwrap_or_else(|p| p.into_inner());
        retry_delay(config, attempt, &mut *rng)
    }

    /// Checks the model and the bounds and counts the request in.
    fn admit(self: &Arc<Self>, request: &GenerateRequest) -> Result<Admission, PoolError> {
        if self.shutting_down.load(Relaxed) {
            return Err(PoolError::ShuttingDown);
        }
        let config = self.config();
        configured(&config, &request.model)?;
        if self.is_poisoned(request) {
            return Err(PoolError::Poisoned { crashes: POISON_CRASHES });
        }
        let mut per_model = self.per_model.lock().unwrap_or_else(|p| p.into_inner());
        let total: usize = per_model.values().sum();
        let mine = per_model.get(&request.model).copied().unwrap_or(0);
        let full = if total >= config.pool.max_queue {
            Some(("all models".to_string(), config.pool.max_queue, total))
        } else if mine >= config.pool.max_queue_per_model {
            Some((format!("model `{}`", request.model), config.pool.max_queue_per_model, mine))
        } else {
            None
        };
        if let Some((scope, limit, depth)) = full {
            return Err(PoolError::QueueFull { scope, limit, retry_after_s: self.retry_after(depth) });
        }
        *per_model.entry(request.model.clone()).or_insert(0) += 1;
        Ok(Admission { pool: self.clone(), model: request.model.clone() })
    }

    fn is_poisoned(&self, request: &GenerateRequest) -> bool {
        let mut p = self.poisoned.lock().unwrap_or_else(|e| e.into_inner());
        if p.is_empty() {
            return false;
        }
        let now = Instant::now();
        p.retain(|_, until| *until > now);
        !p.is_empty() && p.contains_key(&fingerprint(request))
    }

    /// Counts a worker death against a request; returns the error once it is poisonous.
    fn blame(&self, request: &GenerateRequest, deaths: &mut u32) -> Option<PoolError> {
        *deaths += 1;
        if *deaths < POISON_CRASHES {
            return None;
        }
        tracing::error!(request = %request.id, "the request took down {deaths} workers: refusing it and its twins");
        crate::metrics::poisoned();
        self.poisoned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(fingerprint(request), Instant::now() + POISON_TTL);
        Some(PoolError::Poisoned { crashes: *deaths })
    }

    /// Seconds for `depth` requests to drain at the rate requests ended lately (1 to 60).
    fn retry_after(&self, depth: usize) -> u64 {
        let now = Instant::now();
        let recent =
            self.finished.lock().map_or(0, |f| f.iter().filter(|t| now.duration_since(**t) <= DRAIN_WINDOW).count());
        if recent == 0 {
            return 1;
        }
        let rate = recent as f64 / DRAIN_WINDOW.as_secs_f64();
        ((depth as f64 / rate).ceil() as u64).clamp(1, 60)
    }

    /// Requests in the pool (waiting or running) for `model`.
    pub fn queue_depth(&self, model: &str) -> usize {
        self.per_model.lock().map_or(0, |m| m.get(model).copied().unwrap_or(0))
    }

    /// One attempt on one worker: forwards its events to the caller.
    async fn attempt<S: Sink>(
        &self,
        slot: &Arc<Slot>,
        conn: &Conn,
        request: GenerateRequest,
        tx: &mut S,
        started: &mut bool,
        emitted: &mut Vec<u32>,
    ) -> Attempt {
        let model = request.model.clone();
        let mut sub = match conn.client.generate(&request).await {
            Ok(sub) => sub,
            Err(LinkError::Call(e)) => {
                return match ErrorCode::from_code(e.code()) {
                    Some(ErrorCode::Overloaded) => Attempt::Overloaded,
                    Some(ErrorCode::InvalidRequestParams | ErrorCode::InvalidParams) => {
                        Attempt::Refused(e.message().to_string())
                    }
                    Some(ErrorCode::ModelNotLoaded) => {
                        slot.lock().models.remove(&model);
                        Attempt::Stale
                    }
                    Some(ErrorCode::ShuttingDown) => Attempt::Stale,
                    _ => Attempt::Failed(e.to_string()),
                };
            }
            // The connection is gone (or never answered): the worker died or hangs.
            Err(e) if emitted.is_empty() => return Attempt::WorkerGone(e.to_string()),
            Err(e) => return Attempt::DiedMidStream { message: e.to_string(), before_token: true },
        };
        if !*started {
            *started = true;
            if !tx.deliver(Ok(PoolEvent::Started)).await {
                return Attempt::CallerGone;
            }
        }
        let mut tokens_here = 0usize;
        loop {
            let mid_stream = !emitted.is_empty();
            let event = match sub.next().await {
                Some(Ok(event)) => event,
                Some(Err(e)) => {
                    let message = format!("unreadable event: {e}");
                    return if mid_stream { Attempt::FailedMidStream(message) } else { Attempt::Failed(message) };
                }
                None => {
                    let message = "the worker went away".to_string();
                    return if mid_stream {
                        Attempt::DiedMidStream { message, before_token: tokens_here == 0 }
                    } else {
                        Attempt::WorkerGone(message)
                    };
                }
            };
            let (last, failed) = match &event {
                GenerateEvent::Token(_) => (false, None),
                GenerateEvent::Final(f) if f.finish_reason == FinishReason::Error => {
                    (true, Some(f.error.as_ref().map_or_else(|| "engine error".to_string(), |e| e.message.clone())))
                }
                GenerateEvent::Final(_) => (true, None),
            };
            if let (Some(message), false) = (&failed, mid_stream) {
                return Attempt::Failed(message.clone());
            }
            if let GenerateEvent::Token(t) = &event {
                emitted.extend_from_slice(&t.token_ids);
                tokens_here += t.token_ids.len();
            }
            if !tx.deliver(Ok(PoolEvent::Event(event))).await {
                return Attempt::CallerGone;
            }
            if last {
                return match failed {
                    Some(message) => Attempt::FailedMidStream(message),
                    None => Attempt::Done,
                };
            }
        }
    }

    /// Feeds a worker's breaker; never ejects more than half the pool.
    fn record(&self, slot: &Arc<Slot>, outcome: Outcome) {
        let now = Instant::now();
        let slots = self.slots();
        let open = slots
            .iter()
            .filter(|s| s.id != slot.id && matches!(s.lock().breaker.state(now), BreakerState::Open { .. }))
            .count();
        let may_open = (open + 1) * 2 <= slots.len();
        slot.lock().breaker.record(outcome, now, may_open);
    }

    /// Workers that are ready and serve `model`.
    fn serving_count(&self, model: &str) -> usize {
        self.slots()
            .iter()
            .filter(|s| {
                let s = s.lock();
                s.state == WorkerState::Ready && s.models.contains_key(model)
            })
            .count()
    }

    /// Picks a worker for the request, waiting up to the queue timeout while every worker that
    /// serves its model is at capacity. Waiting requests go in priority order, then first come
    /// first served, per model. Loads the model on the least busy worker when no worker has it.
    async fn choose(
        &self,
        want: &Want<'_>,
        key: &str,
        exclude: &HashSet<(u64, u64)>,
        wait: Option<Duration>,
    ) -> Result<(Arc<Slot>, Arc<Conn>, RequestGuard), PoolError> {
        let model = want.model;
        let waited = wait.unwrap_or_else(|| ms(self.config().pool.queue_timeout_ms));
        let deadline = Instant::now() + waited;
        // A request on its second worker or later does not queue again behind new arrivals.
        let ticket = Ticket::take(self, model, want.priority, !exclude.is_empty());
        loop {
            let notified = self.changed.notified();
            if self.shutting_down.load(Relaxed) {
                return Err(PoolError::ShuttingDown);
            }
            if ticket.is_first() {
                match self.pick_worker(want, exclude) {
                    Pick::Chosen { slot, conn, by_prefix } => {
                        // Counted against the worker before the next in line looks.
                        let guard =
                            RequestGuard::new(&slot, &conn, key.to_string(), model, want.suspect, &self.changed);
                        if !want.prefix.is_empty() {
                            let mut s = slot.lock();
                            s.prefixes.set_capacity(want.prefix_capacity);
                            s.prefixes.remember(want.prefix);
                        }
                        if by_prefix {
                            self.prefix_routed.fetch_add(1, Relaxed);
                            crate::metrics::prefix_routed();
                        }
                        return Ok((slot, conn, guard));
                    }
                    Pick::NotLoaded(slot) => match self.load_on(&slot, model).await {
                        Ok(()) => continue,
                        Err(e) => tracing::warn!(worker = slot.id, model, "on-demand load failed: {e}"),
                    },
                    Pick::Full | Pick::Nothing => {}
                }
            }
            let poll = Instant::now() + Duration::from_millis(250);
            if timeout_at(deadline.min(poll), notified).await.is_err() && Instant::now() >= deadline {
                return Err(PoolError::NoWorker { model: model.to_string(), waited_ms: waited.as_millis() as u64 });
            }
        }
    }

    /// The least busy eligible worker with the model loaded and room for one more request (for
    /// a suspect, one with no other suspect on it), or, within `pool.prefix_affinity_slack` of
    /// it, the one that knows the longest prefix of the prompt.
    fn pick_worker(&self, want: &Want<'_>, exclude: &HashSet<(u64, u64)>) -> Pick {
        let (model, suspect) = (want.model, want.suspect);
        let now = Instant::now();
        let config = self.config();
        let cap_override = config.pool.max_in_flight_per_worker;
        let (mut eligible, mut full, mut without) = (Vec::new(), false, Vec::new());
        for slot in self.slots() {
            if !config.serves(slot.group.as_deref(), model) {
                continue;
            }
            let mut s = slot.lock();
            let Some(conn) = s.conn.clone() else { continue };
            if s.state != WorkerState::Ready || s.drain || exclude.contains(&(slot.id, conn.generation)) {
                continue;
            }
            if matches!(s.breaker.state(now), BreakerState::Open { .. }) {
                continue;
            }
            let inflight = slot.inflight.load(Relaxed);
            let beat = s.heartbeat.as_ref().map_or(0, |h| h.active_sequences + h.queue_depth);
            let load = inflight.max(beat);
            if !s.models.contains_key(model) {
                without.push((slot.clone(), load));
                continue;
            }
            let capacity = if cap_override > 0 { cap_override } else { s.capacity };
            if inflight >= capacity || (suspect && slot.suspects.load(Relaxed) > 0) {
                full = true;
                continue;
            }
            let prefix = s.prefixes.longest(want.prefix);
            drop(s);
            eligible.push((slot, conn, load, prefix));
        }
        let mut candidates: Vec<Candidate> =
            eligible.iter().map(|(s, _, load, prefix)| Candidate { id: s.id, load: *load, prefix: *prefix }).collect();
        let slack = config.pool.prefix_affinity_slack;
        while !candidates.is_empty() {
            let picked = {
                let mut rng = self.rng.lock().unwrap_or_else(|p| p.into_inner());
                pick(&candidates, slack, &mut *rng)
            };
            let Some(Picked { id, by_prefix }) = picked else { break };
            let Some((slot, conn, ..)) = eligible.iter().find(|(s, ..)| s.id == id) else { break };
            if slot.lock().breaker.try_acquire(now) {
                return Pick::Chosen { slot: slot.clone(), conn: conn.clone(), by_prefix };
            }
            candidates.retain(|c| c.id != slot.id);
        }
        if full {
            return Pick::Full;
        }
        match without.into_iter().min_by_key(|(_, load)| *load) {
            Some((slot, _)) if eligible.is_empty() => Pick::NotLoaded(slot),
            _ => Pick::Nothing,
        }
    }

    /// Loads `model` on a slot's current worker, first unloading least recently used idle models
    /// when the memory budget requires it.
    async fn load_on(&self, slot: &Arc<Slot>, model: &str) -> Result<(), PoolError> {
        let config = self.config();
        let m = configured(&config, model)?;
        let Some(conn) = slot.lock().conn.clone() else {
            return Err(PoolError::Conflict { message: format!("worker {} is not running", slot.id) });
        };
        if config.pool.memory_budget_bytes > 0 {
            self.make_room(slot, &conn, model_bytes(&m.path), config.pool.memory_budget_bytes).await?;
        }
        // The worker's engine is busy with the load (and, on CUDA, its warm-up): bounded here
        // as a start is, and not taken for a stall meanwhile.
        let info = {
            let _loading = slot.loading();
            tokio::time::timeout(
                ms(config.pool.start_timeout_ms),
                conn.client.load_model(&m.name, &m.path.display().to_string()),
            )
            .await
            .map_err(|_| PoolError::Conflict {
                message: format!(
                    "loading `{model}` on worker {}: no answer within {} ms (pool.start_timeout_ms)",
                    slot.id, config.pool.start_timeout_ms
                ),
            })?
            .map_err(|e| PoolError::Conflict { message: format!("loading `{model}` on worker {}: {e}", slot.id) })?
        };
        let mut s = slot.lock();
        if s.conn.as_ref().is_some_and(|c| c.generation == conn.generation) {
            s.models.insert(model.to_string(), LoadedModel { info, last_used: Instant::now() });
        }
        drop(s);
        self.changed.notify_waiters();
        Ok(())
    }

    /// Unloads idle models, least recently used first, until `need` more bytes fit the budget.
    async fn make_room(&self, slot: &Arc<Slot>, conn: &Conn, need: u64, budget: u64) -> Result<(), PoolError> {
        let config = self.config();
        let pinned = |name: &str| config.model(name).is_some_and(|m| m.pinned);
        loop {
            let (used, victim) = {
                let s = slot.lock();
                let used: u64 = s.models.values().map(|m| m.info.weight_bytes).sum();
                let victim = s
                    .models
                    .iter()
                    .filter(|(name, _)| !pinned(name) && !s.requests.values().any(|r| r.model == **name))
                    .min_by_key(|(_, m)| m.last_used)
                    .map(|(name, _)| name.clone());
                (used, victim)
            };
            if used + need <= budget {
                return Ok(());
            }
            let Some(victim) = victim else {
                return Err(PoolError::Conflict {
                    message: format!(
                        "worker {} cannot fit {need} more bytes of weights in its budget of {budget} (in use: {used}, nothing idle and unpinned to evict)",
                        slot.id
                    ),
                });
            };
            tracing::info!(worker = slot.id, model = %victim, "evicting the least recently used idle model");
            let _ = conn.client.unload_model(&victim).await;
            slot.lock().models.remove(&victim);
        }
    }

    pub fn status(&self) -> PoolStatus {
        let now = Instant::now();
        let workers = self.slots().iter().map(|slot| WorkerStatus::of(slot, now)).collect();
        let config = self.config();
        PoolStatus {
            uptime_s: self.started.elapsed().as_secs_f64(),
            target_workers: config.pool.workers,
            ready_workers: self.ready_count(),
            active_requests: self.budget.active(),
            retrying_requests: self.budget.retrying(),
            moved_requests: self.moved.load(Relaxed),
            retried_requests: self.retried.load(Relaxed),
            resumed_streams: self.resumed.load(Relaxed),
            prefix_routed_requests: self.prefix_routed.load(Relaxed),
            models: config.models.iter().map(|m| m.name.clone()).collect(),
            shutting_down: self.shutting_down.load(Relaxed),
            workers,
        }
    }

    /// Stops routing new requests to a worker; its requests finish.
    pub fn drain(&self, id: u64) -> Result<(), PoolError> {
        let slot = self.slot(id)?;
        let mut s = slot.lock();
        s.drain = true;
        if s.state == WorkerState::Ready {
            s.state = WorkerState::Draining;
        }
        drop(s);
        self.changed.notify_waiters();
        Ok(())
    }

    pub fn undrain(&self, id: u64) -> Result<(), PoolError> {
        let slot = self.slot(id)?;
        let mut s = slot.lock();
        s.drain = false;
        if s.state == WorkerState::Draining {
            s.state = WorkerState::Ready;
        }
        drop(s);
        self.changed.notify_waiters();
        Ok(())
    }

    /// Restarts one worker: graceful stop, then a new process in the same slot.
    pub fn restart(&self, id: u64) -> Result<(), PoolError> {
        let slot = self.slot(id)?;
        self.drain(id)?;
        slot.lock().drain = false;
        slot.send(crate::worker::slot::SlotCommand::Restart);
        Ok(())
    }

    /// Replaces every worker, one at a time: start the replacement, wait until it is ready with
    /// its models, drain the old worker, stop it. Ready capacity never drops below its level at
    /// the start.
    pub async fn rolling_restart(&self) -> Result<Vec<u64>, PoolError> {
        let config = self.config();
        let old = self.slots();
        let mut replaced = Vec::new();
        for slot in old {
            let before = self.ready_count();
            let fresh = self.add_slot(slot.group.clone());
            {
                let desired = slot.lock().desired.clone();
                fresh.lock().desired.extend(desired);
            }
            let deadline = Instant::now() + ms(config.pool.start_timeout_ms);
            loop {
                let notified = self.changed.notified();
                if fresh.lock().state == WorkerState::Ready && self.ready_count() > before.min(self.slots().len() - 1) {
                    break;
                }
                if timeout_at(deadline, notified).await.is_err() {
                    self.remove_slot(&fresh, false).await;
                    return Err(PoolError::Conflict {
                        message: format!(
                            "the replacement for worker {} did not become ready; rolling restart stopped",
                            slot.id
                        ),
                    });
                }
            }
            self.retire(&slot, &config).await;
            replaced.push(slot.id);
        }
        Ok(replaced)
    }

    /// Drains a slot, waits for its requests (up to the drain deadline), stops it and removes it.
    async fn retire(&self, slot: &Arc<Slot>, config: &Config) {
        let _ = self.drain(slot.id);
        let deadline = Instant::now() + ms(config.pool.drain_deadline_ms);
        while slot.inflight.load(Relaxed) > 0 && Instant::now() < deadline {
            sleep(Duration::from_millis(10)).await;
        }
        self.remove_slot(slot, true).await;
    }

    async fn remove_slot(&self, slot: &Arc<Slot>, graceful: bool) {
        if let Ok(mut slots) = self.slots.lock() {
            slots.retain(|s| s.id != slot.id);
        }
        slot.stop(graceful).await;
        self.changed.notify_waiters();
    }

    /// Loads a model on the given workers (all when `None`), now and whenever they restart.
    pub async fn prefetch(&self, model: &str, workers: Option<Vec<u64>>) -> Result<Vec<u64>, PoolError> {
        let targets = self.targets(workers)?;
        let config = self.config();
        configured(&config, model)?;
        let mut done = Vec::new();
        for slot in targets {
            if !config.serves(slot.group.as_deref(), model) {
                continue;
            }
            slot.lock().desired.insert(model.to_string());
            if slot.lock().conn.is_some() {
                self.load_on(&slot, model).await?;
            }
            done.push(slot.id);
        }
        Ok(done)
    }

    /// Unloads a model from the given workers (all when `None`).
    pub async fn unload(&self, model: &str, workers: Option<Vec<u64>>) -> Result<Vec<u64>, PoolError> {
        let targets = self.targets(workers)?;
        configured(&self.config(), model)?;
        let mut done = Vec::new();
        for slot in targets {
            let conn = {
                let mut s = slot.lock();
                s.desired.remove(model);
                s.models.remove(model).and(s.conn.clone())
            };
            if let Some(conn) = conn {
                conn.client.unload_model(model).await.map_err(|e| PoolError::Conflict {
                    message: format!("unloading `{model}` from worker {}: {e}", slot.id),
                })?;
                done.push(slot.id);
            }
        }
        self.changed.notify_waiters();
        Ok(done)
    }

    fn targets(&self, workers: Option<Vec<u64>>) -> Result<Vec<Arc<Slot>>, PoolError> {
        match workers {
            None => Ok(self.slots()),
            Some(ids) => ids.into_iter().map(|id| self.slot(id)).collect(),
        }
    }

    /// Grows or shrinks the pool to `n` workers; shrinking drains and stops the newest first.
    pub async fn scale(&self, n: usize) -> Result<usize, PoolError> {
        if let Ok(mut c) = self.config.write() {
            Arc::make_mut(&mut c).pool.workers = n;
        }
        self.scale_group(None, n).await;
        Ok(self.group_slots(None).len())
    }

    fn group_slots(&self, group: Option<&str>) -> Vec<Arc<Slot>> {
        self.slots().into_iter().filter(|s| s.group.as_deref() == group).collect()
    }

    /// Grows or shrinks one group of workers to `n`.
    async fn scale_group(&self, group: Option<&str>, n: usize) {
        let config = self.config();
        let mut slots = self.group_slots(group);
        while slots.len() < n {
            self.add_slot(group.map(str::to_string));
            slots = self.group_slots(group);
        }
        if slots.len() > n {
            // Workers that are not serving go first, then the newest.
            slots.sort_by_key(|s| (s.lock().state == WorkerState::Ready, std::cmp::Reverse(s.id)));
            let extra: Vec<Arc<Slot>> = slots.iter().take(slots.len() - n).cloned().collect();
            for slot in extra {
                self.retire(&slot, &config).await;
            }
        }
    }

    /// Replaces the configuration (validated by the caller) and applies the worker counts of
    /// the pool and its groups; workers of groups no longer configured are stopped. Returns
    /// the number of workers.
    pub async fn reload(&self, config: Config) -> Result<usize, PoolError> {
        let workers = config.pool.workers;
        let groups: Vec<(String, usize)> = config.pool.groups.iter().map(|g| (g.name.clone(), g.workers)).collect();
        if let Ok(mut c) = self.config.write() {
            *c = Arc::new(config);
        }
        self.replace_cuda_devices(&self.config());
        self.scale_group(None, workers).await;
        for (name, n) in &groups {
            self.scale_group(Some(name), *n).await;
        }
        let config = self.config();
        let gone: Vec<Arc<Slot>> = self
            .slots()
            .into_iter()
            .filter(|s| s.group.is_some() && config.group(s.group.as_deref()).is_none())
            .collect();
        for slot in gone {
            self.retire(&slot, &config).await;
        }
        Ok(self.slots().len())
    }

    /// Stops admitting, lets requests finish within `deadline`, stops every worker.
    pub async fn shutdown(&self, deadline: Duration) {
        self.shutting_down.store(true, Relaxed);
        self.changed.notify_waiters();
        let end = Instant::now() + deadline;
        while self.budget.active() > 0 && Instant::now() < end {
            sleep(Duration::from_millis(10)).await;
        }
        // All workers at once, with what is left of the deadline: the stop as a whole takes
        // the drain deadline plus the stop grace at most.
        let left = end.saturating_duration_since(Instant::now());
        let stops = self.slots().into_iter().map(|slot| async move { slot.stop_with(true, Some(left)).await });
        futures_util::future::join_all(stops).await;
    }
}

/// The model's configuration, or the error that lists the configured models.
fn configured<'a>(config: &'a Config, model: &str) -> Result<&'a crate::config::ModelConfig, PoolError> {
    config.model(model).ok_or_else(|| PoolError::UnknownModel {
        model: model.to_string(),
        configured: config.models.iter().map(|m| m.name.clone()).collect(),
    })
}

/// Bytes of a model's weight files, to check a memory budget before loading it.
fn model_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// The entry of `list` that the fewest of `taken` hold, the first of them on a tie; `None` when
/// `list` is empty.
fn least_used(list: &[String], taken: &[String]) -> Option<String> {
    list.iter().min_by_key(|d| taken.iter().filter(|t| t == d).count()).cloned()
}

#[cfg(test)]
mod tests {
    use super::least_used;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn workers_spread_over_the_gpus_least_used_first() {
        let gpus = strings(&["0", "1"]);
        let mut taken = Vec::new();
        for _ in 0..5 {
            taken.push(least_used(&gpus, &taken).unwrap());
        }
        assert_eq!(taken, strings(&["0", "1", "0", "1", "0"]));
        // After the workers on GPU 0 but one stop, new ones fill GPU 0 first.
        let taken = strings(&["0", "1", "1"]);
        assert_eq!(least_used(&gpus, &taken).as_deref(), Some("0"));
        // Entries outside the list (a reload dropped them) count for nothing.
        assert_eq!(least_used(&strings(&["2", "3"]), &strings(&["0", "2"])).as_deref(), Some("3"));
        assert_eq!(least_used(&[], &taken), None);
    }
}
