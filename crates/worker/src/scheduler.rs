//! Continuous batching on the engine thread.
//!
//! Each turn of the loop takes the commands that arrived, admits queued requests while the
//! sequence limit and the KV-cache budget allow, prefills one chunk of one prompt, starts one
//! decode step for every sequence that is ready (one forward pass per model), and only then
//! reads the tokens of the previous step, so MLX computes step n+1 while step n's tokens are
//! turned into events. Sequences join and leave at every step.
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use jsonrpsee::types::ErrorObjectOwned;
use mlx::Array;
use mlx_serving_engine::{
    Batch, EngineError, GenerateParams, Model, PrefixCache, Sampler, SamplingParams, Sequence, TextStream,
};
use mlx_serving_protocol::error::ErrorInfo;
use mlx_serving_protocol::{
    ErrorCode, FinalEvent, FinishReason, GenerateEvent, GenerateRequest, Limits, MAX_TOP_LOGPROBS, ModelInfo,
    PrefixCacheStats, Prompt, RequestCounts, ShutdownAck, Stats, TokenEvent, TopLogprob, Unloaded, Usage,
};
use tokio::sync::mpsc::{self, error::TryRecvError};

use crate::engine::{Command, EngineConfig, WarmUp};
use crate::state::Shared;

struct Loaded {
    model: Model,
    path: PathBuf,
    kv_per_token: u64,
    weight_bytes: u64,
    /// The decoding sequences of this model, one row each.
    batch: Batch,
    prefix: PrefixCache,
    /// Prompt tokens per second of this model's last prefill chunk, once one ran.
    prefill_rate: Option<f64>,
}

/// The longest a prefill chunk of an idle worker is meant to take: the engine reports no progress
/// while a chunk runs, and a supervisor calls a busy worker hung after a few seconds of none.
const IDLE_CHUNK_SECONDS: f64 = 1.0;

impl Loaded {
    /// Takes the rows of `gone` out of the batch. A row whose sequence `history` gives (its
    /// prompt and accepted tokens) leaves its keys and values to the prefix cache.
    fn retire<'a>(
        &mut self,
        gone: &[u64],
        history: impl Fn(u64) -> Option<&'a [u32]>,
    ) -> mlx_serving_engine::Result<()> {
        let caching = self.prefix.enabled();
        for (key, kv) in self.batch.remove(gone, |k| caching && history(k).is_some())? {
            if let Some(tokens) = history(key).and_then(|h| h.get(..kv.offset().max(0) as usize)) {
                self.prefix.insert(tokens.to_vec(), kv);
            }
        }
        Ok(())
    }
}

/// One request, from admission to its final event.
struct Request {
    /// Unique for the worker's lifetime (client ids may be reused once a request ends).
    key: u64,
    id: String,
    model: String,
    seq: Sequence,
    text: TextStream,
    params: GenerateParams,
    logprobs: bool,
    top_logprobs: usize,
    events: mpsc::UnboundedSender<GenerateEvent>,
    arrived: Instant,
    /// KV-cache bytes held against the budget while running.
    reserve: u64,
    first_token: Option<Instant>,
    /// Tokens produced on another worker before this one resumed the stream.
    resumed: usize,
    /// Prompt tokens taken from the prefix cache.
    cached: usize,
    /// Tokens reported to the caller (resumed ones included).
    generated: usize,
    /// Decode steps started (some may not be read yet).
    scheduled: usize,
    /// Set when the request should end at the next sweep.
    done: Option<(FinishReason, Option<ErrorInfo>)>,
}

impl Request {
    fn ready_to_decode(&self) -> bool {
        self.done.is_none() && !self.seq.needs_prefill() && self.scheduled < self.params.max_tokens
    }

    fn end(&mut self, reason: FinishReason, error: Option<ErrorInfo>) {
        self.done.get_or_insert((reason, error));
    }
}

/// One model's decode step, not read yet.
struct Pending {
    /// Each row's request key and output index.
    rows: Vec<(u64, usize)>,
    /// `[rows]` uint32.
    tokens: Array,
    /// `[rows]` float32, when a row asked for log-probabilities.
    logprobs: Option<Array>,
    /// Per row: ids and log-probabilities of the most likely tokens, unsorted.
    top: Vec<Option<(Array, Array)>>,
}

pub struct Scheduler {
    config: EngineConfig,
    shared: Arc<Shared>,
    models: BTreeMap<String, Loaded>,
    queue: VecDeque<Request>,
    running: Vec<Request>,
    in_flight: Vec<Pending>,
    kv_reserved: u64,
    next_key: u64,
    /// Set by shutdown: admit nothing, cancel what runs at this instant.
    deadline: Option<Instant>,
    counts: RequestCounts,
    timing: StepTiming,
}

/// Where the engine thread's time goes, summed over the steps since the last report: a debug
/// log line every [`StepTiming::EVERY`] steps and when the engine goes idle
/// (`RUST_LOG=mlx_serving_worker::scheduler=debug`).
/// `build`: building one step's graph and handing it to MLX, of which `submit` is MLX's
/// `async_eval` (on a GPU it also launches the step's kernels); `wait`: blocked until the
/// previous step's tokens can be read; `prefill`: prefill chunks, evaluated in place; `rest`: the
/// rest of the loop (events, text, admission). `steady_*`: the same for the steps that only
/// decode (no prefill chunk, no sequence joining or leaving a batch), apart from the mean.
#[derive(Default)]
struct StepTiming {
    steps: u32,
    loop_start: Option<Instant>,
    prefill: Duration,
    build: Duration,
    /// The part of `build` in `async_eval`.
    submit: Duration,
    wait: Duration,
    /// Whole passes of the loop.
    total: Duration,
    /// Set during a step that prefills, or whose batches gain or lose rows.
    changed: bool,
    steady_steps: u32,
    steady_build: Duration,
    steady_submit: Duration,
    steady_wait: Duration,
}

impl StepTiming {
    const EVERY: u32 = 256;

    /// Ends one pass of the loop (started at the previous call).
    fn lap(&mut self) {
        let now = Instant::now();
        if let Some(start) = self.loop_start.replace(now) {
            self.total += now - start;
        }
    }

    fn step_done(&mut self) {
        self.steps += 1;
        if self.steps >= Self::EVERY {
            self.report();
        }
    }

    /// Logs the means since the last report, if any step ran since.
    fn report(&mut self) {
        if self.steps == 0 {
            return;
        }
        self.lap();
        let mean = |d: Duration, n: u32| (d.as_secs_f64() * 1e6 / f64::from(n.max(1))).round() / 1e3;
        let per = |d: Duration| mean(d, self.steps);
        let steady = |d: Duration| mean(d, self.steady_steps);
        let rest = self.total.saturating_sub(self.prefill + self.build + self.wait);
        tracing::debug!(
            steps = self.steps,
            build_ms = per(self.build),
            submit_ms = per(self.submit),
            wait_ms = per(self.wait),
            prefill_ms = per(self.prefill),
            rest_ms = per(rest),
            steady_steps = self.steady_steps,
            steady_build_ms = steady(self.steady_build),
            steady_submit_ms = steady(self.steady_submit),
            steady_wait_ms = steady(self.steady_wait),
            "step timing (means per step)"
        );
        *self = StepTiming { loop_start: self.loop_start, ..StepTiming::default() };
    }
}

impl Scheduler {
    pub fn new(config: EngineConfig, shared: Arc<Shared>) -> Scheduler {
        Scheduler {
            config,
            shared,
            models: BTreeMap::new(),
            queue: VecDeque::new(),
            running: Vec::new(),
            in_flight: Vec::new(),
            kv_reserved: 0,
            next_key: 0,
            deadline: None,
            counts: RequestCounts::default(),
            timing: StepTiming::default(),
        }
    }

    /// Runs until a shutdown has finished or every command sender is gone.
    pub fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        let mut open = true;
        while open {
            if self.idle() {
                if self.deadline.is_some() {
                    break;
                }
                match commands.blocking_recv() {
                    Some(c) => self.handle(c),
                    None => break,
                }
            }
            loop {
                match commands.try_recv() {
                    Ok(c) => self.handle(c),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            }
            if !open || self.deadline.is_some_and(|d| Instant::now() >= d) {
                self.cancel_all();
            }
            for r in &mut self.running {
                if r.events.is_closed() {
                    r.end(FinishReason::Cancelled, None);
                }
            }
            self.sweep();
            self.admit();
            self.step();
            self.sweep();
            if self.idle() {
                // Work MLX still runs (copies into the prefix cache) holds buffers until it
                // ends: an idle worker reports its memory once that work is done.
                self.settle();
            }
            self.publish();
            if self.idle() {
                self.timing.report();
                self.timing.loop_start = None;
            }
            if self.deadline.is_some() && self.idle() {
                break;
            }
        }
        self.cancel_all();
        self.sweep();
        self.publish();
        self.settle();
    }

    /// Waits for the work MLX still runs asynchronously (the last step, copies into the prefix
    /// cache), so none of it is running when the thread and the process end, and none of its
    /// buffers counts in the memory an idle worker reports.
    fn settle(&mut self) {
        let mut arrays: Vec<&Array> = Vec::new();
        for p in &self.in_flight {
            arrays.push(&p.tokens);
            arrays.extend(p.logprobs.as_ref());
            arrays.extend(p.top.iter().flatten().flat_map(|(i, v)| [i, v]));
        }
        for l in self.models.values() {
            arrays.extend(l.batch.arrays());
            arrays.extend(l.prefix.arrays());
        }
        if let Err(e) = mlx::eval(&arrays) {
            tracing::warn!(error = %e, "finishing MLX work at exit");
        }
    }

    fn idle(&self) -> bool {
        self.queue.is_empty() && self.running.is_empty() && self.in_flight.is_empty()
    }

    fn handle(&mut self, command: Command) {
        match command {
            Command::Load { model, path, reply } => {
                let _ = reply.send(self.load(model, path));
            }
            Command::Unload { model, reply } => {
                let _ = reply.send(self.unload(&model));
            }
            Command::List { reply } => {
                let _ = reply.send(Ok(self.model_infos()));
            }
            Command::Generate { request, arrived, events, reply } => {
                let result = self.enqueue(request, arrived, events);
                if result.is_err() {
                    self.counts.rejected += 1;
                }
                // Admit at once what fits, so the queue holds only requests that wait for room
                // (whether later commands find it full does not depend on when the loop turns).
                self.admit();
                let _ = reply.send(result);
            }
            Command::Cancel { id, reply } => {
                let _ = reply.send(Ok(self.cancel(&id)));
            }
            Command::Stats { reply } => {
                let _ = reply.send(Ok(self.stats()));
            }
            Command::Refresh => {}
            Command::Shutdown { deadline, reply } => {
                let deadline = self.deadline.map_or(deadline, |d| d.min(deadline));
                self.deadline = Some(deadline);
                self.shared.draining.store(true, Relaxed);
                let ack = ShutdownAck {
                    in_flight: self.queue.len() + self.running.len(),
                    deadline_ms: deadline.saturating_duration_since(Instant::now()).as_millis() as u64,
                };
                let _ = reply.send(Ok(ack));
            }
        }
    }

    fn load(&mut self, name: String, path: PathBuf) -> Result<ModelInfo, ErrorObjectOwned> {
        if self.deadline.is_some() {
            return Err(ErrorCode::ShuttingDown.error("the worker is shutting down"));
        }
        if name.is_empty() {
            return Err(ErrorCode::InvalidRequestParams.error("`model` must not be empty"));
        }
        if let Some(l) = self.models.get(&name) {
            if l.path == path {
                return Ok(self.model_info(&name, l));
            }
            return Err(ErrorCode::InvalidRequestParams
                .error(format!("model `{name}` is already loaded from {}; unload it first", l.path.display())));
        }
        let mut model = Model::load_with(&path, self.config.load)
            .map_err(|e| ErrorCode::ModelLoadFailed.error(format!("loading `{name}` from {}: {e}", path.display())))?;
        let warm_up = match self.config.warm_up {
            WarmUp::Auto => mlx::default_device_is_cuda(),
            WarmUp::Always => true,
            WarmUp::Never => false,
        };
        if warm_up {
            self.warm_up(&name, &path, &model)?;
        }
        model.set_context_cap((self.config.max_context_tokens > 0).then_some(self.config.max_context_tokens));
        let loaded = Loaded {
            kv_per_token: model.kv_bytes_per_token() as u64,
            weight_bytes: model.weight_bytes() as u64,
            model,
            path,
            batch: Batch::new(),
            prefix: PrefixCache::new(self.config.prefix_cache_bytes as usize),
            prefill_rate: None,
        };
        tracing::info!(model = %name, weight_bytes = loaded.weight_bytes, "model loaded");
        let info = self.model_info(&name, &loaded);
        self.models.insert(name, loaded);
        self.publish_models();
        Ok(info)
    }

    /// Runs the model's quantized products at every number of rows the engine multiplies at
    /// once, and a few requests through the engine, so that MLX's CUDA backend compiles their
    /// kernels now (see [`Model::warm_up`]): decode takes one row per sequence, a prefill chunk
    /// at most the larger of `prefill_chunk` and `prefill_chunk_idle` tokens, and the padding of
    /// its rows.
    fn warm_up(&self, name: &str, path: &Path, model: &Model) -> Result<(), ErrorObjectOwned> {
        let chunk = self.config.prefill_chunk.max(self.config.prefill_chunk_idle);
        let max_rows = model.transformer.max_prefill_rows(chunk).max(self.config.max_sequences);
        // The output projection takes one row per sequence: a prompt's last position, or a
        // decoded row.
        let w = model.warm_up(max_rows, self.config.max_sequences).map_err(|e| {
            after_mlx_error(&e);
            ErrorCode::ModelLoadFailed.error(format!("warming up `{name}` from {}: {e}", path.display()))
        })?;
        let (slowest_rows, slowest_seconds) = w.slowest.unwrap_or((0, 0.0));
        tracing::info!(
            model = %name,
            max_rows,
            products = w.products,
            calls = w.calls,
            seconds = format_args!("{:.2}", w.seconds),
            slowest_rows,
            slowest_seconds = format_args!("{slowest_seconds:.2}"),
            engine_seconds = format_args!("{:.2}", w.engine_seconds),
            "model warmed up"
        );
        Ok(())
    }

    fn unload(&mut self, name: &str) -> Result<Unloaded, ErrorObjectOwned> {
        if !self.models.contains_key(name) {
            return Err(self.not_loaded(name));
        }
        let mut cancelled = 0;
        for r in self.queue.iter_mut().chain(self.running.iter_mut()).filter(|r| r.model == name) {
            r.end(FinishReason::Cancelled, None);
            cancelled += 1;
        }
        self.sweep();
        self.models.remove(name);
        self.publish_models();
        mlx::memory::clear_cache();
        tracing::info!(model = %name, cancelled, "model unloaded");
        Ok(Unloaded { model: name.to_string(), cancelled_requests: cancelled })
    }

    fn not_loaded(&self, name: &str) -> ErrorObjectOwned {
        let loaded: Vec<&str> = self.models.keys().map(String::as_str).collect();
        ErrorCode::ModelNotLoaded.error(format!("model `{name}` is not loaded (loaded: {loaded:?})"))
    }

    /// Validates a request and queues it; the error names what is wrong.
    fn enqueue(
        &mut self,
        request: GenerateRequest,
        arrived: Instant,
        events: mpsc::UnboundedSender<GenerateEvent>,
    ) -> Result<(), ErrorObjectOwned> {
        if self.deadline.is_some() {
            return Err(ErrorCode::ShuttingDown.error("the worker is shutting down"));
        }
        let loaded = self.models.get(&request.model).ok_or_else(|| self.not_loaded(&request.model))?;
        if self.queue.iter().chain(&self.running).any(|r| r.id == request.id) {
            return Err(invalid(format!("request id `{}` is already in use", request.id)));
        }
        let model = &loaded.model;
        let mut prompt = match &request.prompt {
            Prompt::Text(text) => model.tokenizer.encode(text, true).map_err(|e| invalid(e.to_string()))?,
            Prompt::TokenIds(ids) => ids.clone(),
            Prompt::Messages(messages) => {
                let messages: Vec<_> = messages
                    .iter()
                    .map(|m| mlx_serving_engine::ChatMessage { role: m.role.clone(), content: m.content.clone() })
                    .collect();
                model.encode_chat(&messages).map_err(engine_error)?
            }
        };
        let s = &request.sampling;
        let params = GenerateParams {
            max_tokens: request.max_tokens,
            sampling: SamplingParams {
                temperature: s.temperature,
                top_p: s.top_p,
                top_k: s.top_k,
                min_p: s.min_p,
                repetition_penalty: s.repetition_penalty,
                repetition_context_size: s.repetition_context_size,
                seed: s.seed,
            },
            stop: request.stop.clone(),
            stop_token_ids: request.stop_token_ids.clone(),
            ignore_eos: request.ignore_eos,
            prefill_step: self.config.prefill_chunk,
        };
        if params.max_tokens == 0 {
            return Err(invalid("`max_tokens` must be at least 1".into()));
        }
        let resumed = request.resume_tokens.len();
        if resumed > params.max_tokens {
            return Err(invalid(format!(
                "`resume_tokens` ({resumed}) must not exceed `max_tokens` ({})",
                params.max_tokens
            )));
        }
        prompt.extend_from_slice(&request.resume_tokens);
        let remaining = GenerateParams { max_tokens: (params.max_tokens - resumed).max(1), ..params.clone() };
        model.check_request(prompt.len(), &remaining).map_err(engine_error)?;
        if request.top_logprobs > MAX_TOP_LOGPROBS {
            return Err(invalid(format!(
                "`top_logprobs` must be at most {MAX_TOP_LOGPROBS}, got {}",
                request.top_logprobs
            )));
        }
        let reserve = (prompt.len() + remaining.max_tokens) as u64 * loaded.kv_per_token;
        if reserve > self.config.kv_cache_bytes {
            return Err(invalid(format!(
                "the request needs {reserve} bytes of KV cache (prompt {} + max_tokens {} tokens), more than the worker's budget of {} bytes",
                prompt.len(),
                params.max_tokens,
                self.config.kv_cache_bytes
            )));
        }
        if self.queue.len() >= self.config.max_queue {
            return Err(
                ErrorCode::Overloaded.error(format!("the queue is full ({} requests waiting)", self.config.max_queue))
            );
        }
        let mut text = TextStream::new(&model.tokenizer, &params.stop).map_err(engine_error)?;
        let mut sampler = Sampler::new(params.sampling.clone()).map_err(engine_error)?;
        // A resumed stream picks up where it stopped: the detokeniser holds what it held then
        // (its text was sent already), and the random stream is where it was.
        let mut done = None;
        for &t in &request.resume_tokens {
            if text.push(t).map_err(engine_error)?.stopped {
                done = Some((FinishReason::Stop, None));
            }
        }
        // The stream had everything but its final event: it ends at once.
        if done.is_none() && resumed == params.max_tokens {
            done = Some((FinishReason::Length, None));
        }
        sampler.advance(resumed).map_err(engine_error)?;
        let seq = Sequence::new(model, prompt, sampler).map_err(engine_error)?;
        self.next_key += 1;
        self.queue.push_back(Request {
            key: self.next_key,
            id: request.id,
            model: request.model,
            seq,
            text,
            params,
            logprobs: request.logprobs || request.top_logprobs > 0,
            top_logprobs: request.top_logprobs,
            events,
            arrived,
            reserve,
            first_token: None,
            resumed,
            cached: 0,
            generated: resumed,
            scheduled: resumed,
            done,
        });
        self.counts.accepted += 1;
        Ok(())
    }

    fn cancel(&mut self, id: &str) -> bool {
        let mut found = false;
        for r in self.queue.iter_mut().chain(self.running.iter_mut()).filter(|r| r.id == id) {
            r.end(FinishReason::Cancelled, None);
            found = true;
        }
        self.sweep();
        found
    }

    fn cancel_all(&mut self) {
        for r in self.queue.iter_mut().chain(self.running.iter_mut()) {
            r.end(FinishReason::Cancelled, None);
        }
    }

    /// Moves queued requests into the running batch, oldest first, while they fit.
    fn admit(&mut self) {
        while let Some(front) = self.queue.front() {
            let fits = self.running.len() < self.config.max_sequences
                && self.kv_reserved + front.reserve <= self.config.kv_cache_bytes;
            if !fits {
                break;
            }
            let mut r = self.queue.pop_front().expect("front exists");
            self.kv_reserved += r.reserve;
            if r.done.is_none() && r.seq.needs_prefill() {
                self.seed_from_prefix_cache(&mut r);
            }
            self.running.push(r);
        }
    }

    /// Starts `r` from the longest cached prefix of its prompt, if any.
    fn seed_from_prefix_cache(&mut self, r: &mut Request) {
        let Some(loaded) = self.models.get_mut(&r.model) else { return };
        let max = r.seq.prompt().len() - 1;
        match loaded.prefix.lookup(r.seq.prompt(), max) {
            Ok(Some(kv)) => {
                let n = kv.offset().max(0) as usize;
                match r.seq.seed_cache(kv) {
                    Ok(()) => r.cached = n,
                    Err(e) => tracing::warn!(error = %e, "prefix cache entry not usable"),
                }
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "prefix cache lookup failed"),
        }
    }

    fn step(&mut self) {
        let timed = tracing::enabled!(tracing::Level::DEBUG);
        if timed {
            self.timing.lap();
        }
        let t0 = Instant::now();
        let prefilled = self.prefill_one_chunk();
        let t1 = Instant::now();
        self.timing.changed = prefilled;
        let submitted = self.timing.submit;
        let next = self.start_decode();
        let t2 = Instant::now();
        let previous = std::mem::replace(&mut self.in_flight, next);
        let waited = self.read(previous);
        self.shared.steps.fetch_add(1, Relaxed);
        if timed {
            let t = &mut self.timing;
            t.prefill += t1 - t0;
            t.build += t2 - t1;
            t.wait += waited;
            if !t.changed {
                t.steady_steps += 1;
                t.steady_build += t2 - t1;
                t.steady_submit += t.submit - submitted;
                t.steady_wait += waited;
            }
            t.step_done();
        }
    }

    /// One chunk of prompt tokens, from the oldest prompts still prefilling of one model, in
    /// one forward pass: a long prompt delays the running streams by one chunk per step rather
    /// than by its whole length, and many short prompts start together. A chunk takes as many
    /// tokens as the model's last chunk says it prefills in `prefill_stall_s` while streams
    /// decode (they wait for it), or in [`IDLE_CHUNK_SECONDS`] while none does; never fewer
    /// than `prefill_chunk` (the first chunk of a model takes that many) and never more than
    /// `prefill_chunk_idle`. Returns whether it ran one.
    fn prefill_one_chunk(&mut self) -> bool {
        let decoding = self.models.values().any(|m| !m.batch.is_empty());
        let Some(model) =
            self.running.iter().find(|r| r.done.is_none() && r.seq.needs_prefill()).map(|r| r.model.clone())
        else {
            return false;
        };
        let Some(loaded) = self.models.get_mut(&model) else {
            return false;
        };
        let (chunk, idle) = (self.config.prefill_chunk, self.config.prefill_chunk_idle);
        let seconds = if decoding { self.config.prefill_stall_s } else { IDLE_CHUNK_SECONDS };
        let budget = match loaded.prefill_rate {
            Some(rate) => ((rate * seconds) as usize).min(idle).max(chunk),
            None => chunk,
        };
        let mut group: Vec<&mut Request> = Vec::new();
        let mut tokens = 0;
        for r in self.running.iter_mut().filter(|r| r.model == model && r.done.is_none() && r.seq.needs_prefill()) {
            if tokens >= budget {
                break;
            }
            tokens += r.seq.prompt().len() - 1 - r.seq.prefilled();
            group.push(r);
        }
        let start = Instant::now();
        let result = {
            let mut seqs: Vec<&mut Sequence> = group.iter_mut().map(|r| &mut r.seq).collect();
            loaded.model.prefill_chunks(&mut seqs, budget)
        };
        match result {
            Ok(counts) => {
                let tokens = counts.iter().sum::<usize>();
                loaded.prefill_rate = Some(tokens as f64 / start.elapsed().as_secs_f64().max(1e-6));
                self.shared.prefilled_tokens.fetch_add(tokens as u64, Relaxed);
            }
            Err(e) => {
                after_mlx_error(&e);
                for r in group {
                    r.end(FinishReason::Error, Some(failure(&e)));
                }
            }
        }
        true
    }

    /// Starts one decode step for every ready sequence (one batched forward pass per model) and
    /// returns its lazy results. Sequences that stopped leave their model's batch first (their
    /// keys and values go to the prefix cache), and sequences whose prompt is prefilled join it.
    fn start_decode(&mut self) -> Vec<Pending> {
        let mut out = Vec::new();
        let index: HashMap<u64, usize> = self.running.iter().enumerate().map(|(i, r)| (r.key, i)).collect();
        let submit = &mut self.timing.submit;
        let changed = &mut self.timing.changed;
        for (name, loaded) in &mut self.models {
            let running = &mut self.running;
            let gone: Vec<u64> = loaded
                .batch
                .keys()
                .iter()
                .copied()
                .filter(|k| index.get(k).is_none_or(|&i| !running[i].ready_to_decode()))
                .collect();
            let result = (|| -> mlx_serving_engine::Result<Option<Pending>> {
                loaded.retire(&gone, |k| index.get(&k).map(|&i| running[i].seq.history()))?;
                let in_batch: std::collections::HashSet<u64> = loaded.batch.keys().iter().copied().collect();
                let mut joining: Vec<(u64, &mut Sequence)> = running
                    .iter_mut()
                    .filter(|r| &r.model == name && r.ready_to_decode() && !in_batch.contains(&r.key))
                    .map(|r| (r.key, &mut r.seq))
                    .collect();
                // The prompt's keys and values (all but its last token) go to the prefix cache.
                let prompts: Vec<Vec<u32>> = if loaded.prefix.enabled() {
                    joining.iter().map(|(_, s)| s.prompt()[..s.cached_tokens().max(0) as usize].to_vec()).collect()
                } else {
                    Vec::new()
                };
                *changed |= !gone.is_empty() || !joining.is_empty();
                let caches = if joining.is_empty() {
                    Vec::new()
                } else {
                    loaded.model.join(&mut loaded.batch, std::mem::take(&mut joining))?
                };
                for (tokens, kv) in prompts.into_iter().zip(caches) {
                    loaded.prefix.insert(tokens, kv);
                }
                if loaded.batch.is_empty() {
                    return Ok(None);
                }
                let keys = loaded.batch.keys().to_vec();
                let mut rows: Vec<&mut Request> = Vec::with_capacity(keys.len());
                {
                    let mut by_key: HashMap<u64, &mut Request> = running.iter_mut().map(|r| (r.key, r)).collect();
                    for k in &keys {
                        let r = by_key.remove(k).ok_or_else(|| {
                            EngineError::Mlx(mlx::Error::Invalid("a batch row has no request".into()))
                        })?;
                        rows.push(r);
                    }
                }
                let step = {
                    let mut seqs: Vec<&mut Sequence> = rows.iter_mut().map(|r| &mut r.seq).collect();
                    loaded.model.decode_batch(&mut loaded.batch, &mut seqs)?
                };
                let any_logprobs = rows.iter().any(|r| r.logprobs);
                let logprobs = if any_logprobs { Some(step.token_logprobs()?) } else { None };
                let mut top = Vec::with_capacity(rows.len());
                for (i, r) in rows.iter_mut().enumerate() {
                    r.scheduled += 1;
                    top.push(if r.top_logprobs > 0 {
                        let i = i as i32;
                        Some(top_k(&step.logprobs.slice_axis(0, i, i + 1)?, r.top_logprobs)?)
                    } else {
                        None
                    });
                }
                let arrays: Vec<&Array> = std::iter::once(&step.tokens)
                    .chain(logprobs.as_ref())
                    .chain(top.iter().flatten().flat_map(|(i, v)| [i, v]))
                    .collect();
                let t = Instant::now();
                mlx::async_eval(&arrays)?;
                *submit += t.elapsed();
                Ok(Some(Pending { rows: step.rows, tokens: step.tokens, logprobs, top }))
            })();
            match result {
                Ok(Some(p)) => out.push(p),
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(model = %name, error = %e, "decode step failed");
                    after_mlx_error(&e);
                    for r in self.running.iter_mut().filter(|r| &r.model == name) {
                        if !r.seq.needs_prefill() {
                            r.end(FinishReason::Error, Some(failure(&e)));
                        }
                    }
                    loaded.batch = Batch::new();
                }
            }
        }
        out
    }

    /// Reads sampled tokens and turns them into events and stop decisions. Returns the time spent
    /// waiting for the values.
    fn read(&mut self, pending: Vec<Pending>) -> Duration {
        let mut waited = Duration::ZERO;
        for p in pending {
            let t = Instant::now();
            let values = p
                .tokens
                .to_vec::<u32>()
                .and_then(|t| Ok((t, p.logprobs.as_ref().map(Array::to_vec::<f32>).transpose()?)));
            waited += t.elapsed();
            let (tokens, logprobs) = match values {
                Ok(v) => v,
                Err(e) => {
                    let e = EngineError::from(e);
                    after_mlx_error(&e);
                    for r in self.running.iter_mut().filter(|r| p.rows.iter().any(|(k, _)| *k == r.key)) {
                        r.end(FinishReason::Error, Some(failure(&e)));
                    }
                    continue;
                }
            };
            let index: HashMap<u64, usize> = self.running.iter().enumerate().map(|(i, r)| (r.key, i)).collect();
            for (row, &(key, sample_index)) in p.rows.iter().enumerate() {
                let Some(&ri) = index.get(&key) else { continue };
                let r = &mut self.running[ri];
                if r.done.is_some() {
                    continue;
                }
                let token = tokens[row];
                let logprob = if r.logprobs { logprobs.as_ref().map(|l| l[row]) } else { None };
                self.shared.decoded_tokens.fetch_add(1, Relaxed);
                r.seq.accept(sample_index, token);
                r.first_token.get_or_insert_with(Instant::now);
                let eos = !r.params.ignore_eos && r.seq_eos(token, &self.models);
                if eos || r.params.stop_token_ids.contains(&token) {
                    r.end(FinishReason::Stop, None);
                    continue;
                }
                r.generated += 1;
                let step = match r.text.push(token) {
                    Ok(s) => s,
                    Err(e) => {
                        r.end(FinishReason::Error, Some(failure(&e)));
                        continue;
                    }
                };
                let top = match &p.top[row] {
                    Some((ids, values)) => match top_list(ids, values, &self.models, &r.model) {
                        Ok(list) => Some(vec![list]),
                        Err(e) => {
                            r.end(FinishReason::Error, Some(failure(&e)));
                            continue;
                        }
                    },
                    None => None,
                };
                let event = TokenEvent {
                    token_ids: vec![token],
                    text: step.text,
                    logprobs: logprob.map(|l| vec![l]),
                    top_logprobs: top,
                };
                let _ = r.events.send(GenerateEvent::Token(event));
                if step.stopped {
                    r.end(FinishReason::Stop, None);
                } else if r.generated >= r.params.max_tokens {
                    r.end(FinishReason::Length, None);
                }
            }
        }
        waited
    }

    /// Ends every request marked done: sends its final event and frees its place and memory.
    fn sweep(&mut self) {
        let mut ended = Vec::new();
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].done.is_some() {
                let r = self.running.swap_remove(i);
                self.kv_reserved -= r.reserve;
                ended.push(r);
            } else {
                i += 1;
            }
        }
        self.leave_batches(&ended);
        let (done, kept): (Vec<_>, Vec<_>) = self.queue.drain(..).partition(|r| r.done.is_some());
        self.queue = kept.into();
        // Keep the running order by arrival, so prefill stays first come, first served.
        self.running.sort_by_key(|r| r.key);
        for r in ended.into_iter().chain(done) {
            self.finish(r);
        }
    }

    /// Takes the rows of ended requests out of their models' batches; the keys and values of
    /// those that did not fail go to the prefix cache with the tokens they hold.
    fn leave_batches(&mut self, ended: &[Request]) {
        let mut failed = Vec::new();
        for (name, loaded) in &mut self.models {
            let gone: Vec<&Request> =
                ended.iter().filter(|r| &r.model == name && loaded.batch.contains(r.key)).collect();
            if gone.is_empty() {
                continue;
            }
            let keys: Vec<u64> = gone.iter().map(|r| r.key).collect();
            let history = |k: u64| {
                gone.iter()
                    .find(|r| r.key == k && !matches!(r.done, Some((FinishReason::Error, _))))
                    .map(|r| r.seq.history())
            };
            match loaded.retire(&keys, history) {
                Ok(()) => {}
                Err(e) => {
                    tracing::error!(model = %name, error = %e, "leaving the batch failed");
                    failed.push((name.clone(), loaded.batch.keys().to_vec(), e));
                    loaded.batch = Batch::new();
                }
            }
        }
        // The rows still in a failed batch lost their keys and values.
        for (model, keys, e) in failed {
            for r in self.running.iter_mut().filter(|r| r.model == model && keys.contains(&r.key)) {
                r.end(FinishReason::Error, Some(failure(&e)));
            }
        }
    }

    fn finish(&mut self, mut r: Request) {
        let (reason, error) = r.done.take().unwrap_or((FinishReason::Cancelled, None));
        let text = match reason {
            FinishReason::Stop | FinishReason::Length => r.text.finish().map(|s| s.text).unwrap_or_default(),
            FinishReason::Cancelled | FinishReason::Error => String::new(),
        };
        match reason {
            FinishReason::Stop => self.counts.stopped += 1,
            FinishReason::Length => self.counts.length += 1,
            FinishReason::Cancelled => self.counts.cancelled += 1,
            FinishReason::Error => self.counts.failed += 1,
        }
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let event = FinalEvent {
            finish_reason: reason,
            text,
            usage: Usage {
                prompt_tokens: r.seq.prompt().len() - r.resumed,
                completion_tokens: r.generated,
                cached_tokens: r.cached.min(r.seq.prompt().len() - r.resumed),
            },
            time_to_first_token_ms: r.first_token.map(|t| ms(t.duration_since(r.arrived))),
            total_ms: ms(r.arrived.elapsed()),
            error,
        };
        let _ = r.events.send(GenerateEvent::Final(event));
    }

    fn publish(&self) {
        if let Ok(mut p) = self.shared.prefix_cache.lock() {
            *p = self.prefix_cache_stats();
        }
        self.shared.queue_depth.store(self.queue.len(), Relaxed);
        self.shared.active_sequences.store(self.running.len(), Relaxed);
        self.shared.publish_mlx_memory();
    }

    fn publish_models(&self) {
        if let Ok(mut m) = self.shared.models.lock() {
            *m = self.models.keys().cloned().collect();
        }
    }

    fn prefix_cache_stats(&self) -> PrefixCacheStats {
        let mut s = PrefixCacheStats::default();
        for l in self.models.values() {
            let c = l.prefix.counts();
            s.hits += c.hits;
            s.misses += c.misses;
            s.cached_tokens += c.cached_tokens;
            s.evictions += c.evictions;
            s.entries += c.entries;
            s.bytes += c.bytes as u64;
        }
        s
    }

    fn model_info(&self, name: &str, l: &Loaded) -> ModelInfo {
        let kv: usize =
            l.batch.nbytes() + self.running.iter().filter(|r| r.model == name).map(|r| r.seq.kv_bytes()).sum::<usize>();
        ModelInfo {
            model: name.to_string(),
            path: l.path.display().to_string(),
            model_type: l.model.transformer.config.model_type.clone(),
            weight_bytes: l.weight_bytes,
            kv_cache_bytes: kv as u64,
            context_length: l.model.context_length(),
            kv_bytes_per_token: l.kv_per_token,
        }
    }

    fn model_infos(&self) -> Vec<ModelInfo> {
        self.models.iter().map(|(n, l)| self.model_info(n, l)).collect()
    }

    pub fn limits(config: &EngineConfig) -> Limits {
        Limits {
            max_sequences: config.max_sequences,
            max_queue: config.max_queue,
            kv_cache_bytes: config.kv_cache_bytes,
            max_line_bytes: config.max_line_bytes,
            prefill_chunk: config.prefill_chunk,
            prefix_cache_bytes: config.prefix_cache_bytes,
        }
    }

    fn stats(&self) -> Stats {
        self.publish();
        Stats {
            uptime_ms: self.shared.uptime_ms(),
            progress: self.shared.progress(),
            queue_depth: self.queue.len(),
            active_sequences: self.running.len(),
            requests: self.counts,
            models: self.model_infos(),
            memory: self.shared.memory(crate::heartbeat::rss_bytes()),
            kv_reserved_bytes: self.kv_reserved,
            prefix_cache: self.prefix_cache_stats(),
            limits: Scheduler::limits(&self.config),
            draining: self.deadline.is_some(),
        }
    }
}

impl Request {
    fn seq_eos(&self, token: u32, models: &BTreeMap<String, Loaded>) -> bool {
        models.get(&self.model).is_some_and(|l| l.model.tokenizer.eos_token_ids().contains(&token))
    }
}

/// The `k` most likely token ids and their log-probabilities (lazy, unsorted).
fn top_k(logprobs: &Array, k: usize) -> mlx_serving_engine::Result<(Array, Array)> {
    let flat = logprobs.reshape(&[-1])?;
    let k = (k as i32).min(flat.dim(0));
    let idx = flat.negative()?.argpartition(k - 1, -1)?.slice_axis(0, 0, k)?;
    let values = flat.take(&idx, 0)?.astype(mlx::Dtype::Float32)?;
    Ok((idx.astype(mlx::Dtype::Uint32)?, values))
}

/// Reads top-k arrays into a list sorted by log-probability, with each token's text.
fn top_list(
    ids: &Array,
    values: &Array,
    models: &BTreeMap<String, Loaded>,
    model: &str,
) -> mlx_serving_engine::Result<Vec<TopLogprob>> {
    let (ids, values) = (ids.to_vec::<u32>()?, values.to_vec::<f32>()?);
    let tokenizer = models.get(model).map(|l| &l.model.tokenizer);
    let mut list: Vec<TopLogprob> = ids
        .into_iter()
        .zip(values)
        .map(|(token_id, logprob)| {
            let text = tokenizer.and_then(|t| t.decode(&[token_id], false).ok()).unwrap_or_default();
            TopLogprob { token_id, text, logprob }
        })
        .collect();
    list.sort_by(|a, b| b.logprob.total_cmp(&a.logprob));
    Ok(list)
}

fn invalid(message: String) -> ErrorObjectOwned {
    ErrorCode::InvalidRequestParams.error(message)
}

/// Errors about the request itself are the caller's; MLX failures are the engine's.
fn engine_error(e: EngineError) -> ErrorObjectOwned {
    match e {
        EngineError::Mlx(_) => ErrorCode::EngineFailure.error(e.to_string()),
        _ => invalid(e.to_string()),
    }
}

/// Exit status of a worker whose device context is lost.
const DEVICE_LOST_EXIT: i32 = 70;

/// Errors after which the process's GPU context is unusable: CUDA's sticky errors. Every later
/// call in the process fails the same way.
fn device_lost(message: &str) -> bool {
    const STICKY: &[&str] = &[
        "illegal memory access",
        "unspecified launch failure",
        "illegal instruction",
        "misaligned address",
        "device-side assert",
        "hardware stack error",
        "uncorrectable ECC error",
    ];
    STICKY.iter().any(|s| message.contains(s))
}

/// What a failed MLX step leaves behind. Out of device memory: the buffer cache goes back, so
/// the next step has room. A lost device context: the worker exits at once, without final
/// events, so that the supervisor replaces it and resumes its streams on another worker.
fn after_mlx_error(e: &EngineError) {
    let message = e.to_string();
    if device_lost(&message) {
        tracing::error!(error = %message, "the device context is lost; exiting so that a new worker takes over");
        std::process::exit(DEVICE_LOST_EXIT);
    }
    if message.contains("out of memory") {
        tracing::warn!(cache_bytes = mlx::memory::cache(), "out of device memory; returning the buffer cache");
        mlx::memory::clear_cache();
    }
}

fn failure(e: &EngineError) -> ErrorInfo {
    ErrorInfo::new(ErrorCode::EngineFailure, e.to_string())
}

#[cfg(test)]
mod tests {
    use super::device_lost;

    #[test]
    fn only_sticky_device_errors_count_as_a_lost_device() {
        // Messages MLX CUDA gave on an H200 with several workers sharing the GPU.
        assert!(device_lost(
            "MLX: cudaGraphInstantiate(&handle_, graph, nullptr, nullptr, 0) failed: an illegal memory access was encountered"
        ));
        assert!(device_lost("MLX: cudaMallocManaged(&data, size) failed: an illegal memory access was encountered"));
        assert!(!device_lost("MLX: cudaMallocAsync(&data, size, stream) failed: out of memory"));
        assert!(!device_lost("MLX: cudaGraphInstantiate(&handle_, graph, nullptr, nullptr, 0) failed: out of memory"));
        assert!(!device_lost("[reshape] Cannot reshape array of size 6 into shape (4)."));
    }
}
