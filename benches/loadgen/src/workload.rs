//! The workloads: independent requests (a fixed number in flight, or Poisson arrivals), multi-turn
//! conversations, and bursts of identical requests. Every prompt and length is a function of the
//! seed and the request's index, so two runs with the same seed send the same requests.
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::client::{self, Api, Outcome, Target};
use crate::dist::Dist;
use crate::progress::{Counters, Progress};
use crate::prompt::PromptMaker;

/// What every workload shares: where to send, and how to build each request.
pub struct Common {
    pub target: Target,
    pub model: String,
    pub api: Api,
    pub stream: bool,
    pub prompt_len: Dist,
    pub max_tokens: Dist,
    pub temperature: f64,
    pub seed: u64,
    pub ignore_eos: bool,
    pub timeout: Duration,
    pub prompts: PromptMaker,
    pub progress: bool,
}

/// One measured request and where it belongs.
#[derive(Debug, Clone)]
pub struct Record {
    /// Requests with the same group sent the same body.
    pub group: usize,
    /// The turn of a conversation (0 first), in the chat workload.
    pub turn: Option<usize>,
    pub outcome: Outcome,
}

/// How requests arrive.
#[derive(Debug, Clone, Copy)]
pub enum Arrivals {
    /// This many requests in flight; each sends its next as soon as one ends.
    Closed { concurrency: usize },
    /// Poisson arrivals at `rate` per second, with at most `max_in_flight` in flight (further
    /// arrivals wait for one to end).
    Poisson { rate: f64, max_in_flight: Option<usize> },
}

/// Independent requests.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    pub arrivals: Arrivals,
    /// Send at most this many.
    pub requests: Option<usize>,
    /// Send no new request after this long.
    pub duration: Option<Duration>,
    /// The share of requests that repeat an earlier request's body (0 to 1).
    pub duplicates: f64,
    /// Requests sent (at the same concurrency) and left out of the results before the run.
    pub warmup: usize,
}

/// Random streams kept apart by purpose, so that changing one option does not shift the others.
#[derive(Clone, Copy)]
enum Stream {
    Request = 1,
    Arrival = 2,
    Turn = 3,
    Warmup = 4,
    Duplicate = 5,
}

/// A generator for `(seed, stream, index)`, mixed with splitmix64 so neighbouring indices are
/// unrelated.
fn rng_for(seed: u64, stream: Stream, index: u64) -> SmallRng {
    let mut x = seed ^ (stream as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ index.wrapping_mul(0xD1B5_4A32_D192_ED03);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    SmallRng::seed_from_u64(x ^ (x >> 31))
}

/// A prompt's first words: six random hex digits, so that prompts differ from their first token
/// (a server's prefix cache finds nothing to share), then what the request is.
fn tag(rng: &mut SmallRng, what: String) -> String {
    format!("{:06x} {what}", rng.random::<u32>() >> 8)
}

/// The body a request sends: a prompt (or the messages of a conversation) and a token budget.
#[derive(Debug, Clone, PartialEq)]
pub struct Spec {
    pub group: usize,
    pub prompt: String,
    pub max_tokens: u32,
}

impl Common {
    /// Request `i` of the run; with `duplicates` > 0, some requests take the body of an earlier one.
    pub fn spec(&self, i: usize, duplicates: f64) -> Result<Spec> {
        let mut i = i;
        while i > 0 && duplicates > 0.0 {
            let mut rng = rng_for(self.seed, Stream::Duplicate, i as u64);
            if rng.random::<f64>() >= duplicates {
                break;
            }
            i = rng.random_range(0..i);
        }
        let mut rng = rng_for(self.seed, Stream::Request, i as u64);
        let tag = tag(&mut rng, format!("request {i} of run {}:", self.seed));
        self.fresh_spec(&tag, i, &mut rng)
    }

    fn fresh_spec(&self, tag: &str, group: usize, rng: &mut SmallRng) -> Result<Spec> {
        let len = self.prompt_len.sample(rng);
        let max_tokens = self.max_tokens.sample(rng);
        let prompt = self.prompts.make(tag, len, rng)?;
        Ok(Spec { group, prompt, max_tokens })
    }

    /// The JSON body for a prompt (completions) or a list of messages (chat).
    pub fn body(&self, input: Input<'_>, max_tokens: u32, group: usize) -> Value {
        let mut b = json!({
            "model": self.model,
            "max_tokens": max_tokens,
            "temperature": self.temperature,
            "stream": self.stream,
        });
        match (self.api, input) {
            (Api::Completions, Input::Prompt(p)) => b["prompt"] = json!(p),
            (Api::Chat, Input::Prompt(p)) => b["messages"] = json!([{"role": "user", "content": p}]),
            (_, Input::Messages(m)) => b["messages"] = json!(m),
        }
        if self.stream {
            b["stream_options"] = json!({"include_usage": true});
        }
        if self.temperature > 0.0 {
            // Sampled requests with the same body sample the same way.
            b["seed"] = json!(self.seed.wrapping_add(group as u64) % (1 << 53));
        }
        if self.ignore_eos {
            b["ignore_eos"] = json!(true);
        }
        b
    }

    async fn send(&self, body: &Value, run_start: Instant) -> Outcome {
        let api = if body.get("messages").is_some() { Api::Chat } else { Api::Completions };
        client::send(&self.target, api, body, self.timeout, run_start).await
    }
}

pub enum Input<'a> {
    Prompt(&'a str),
    Messages(&'a [Value]),
}

/// Runs independent requests; returns them in the order they ended.
pub async fn load(common: Arc<Common>, load: Load) -> Result<Vec<Record>> {
    if load.warmup > 0 {
        let warm = Load { requests: Some(load.warmup), duration: None, duplicates: 0.0, warmup: 0, ..load };
        let progress = Progress::start("warm-up", Some(load.warmup), common.progress);
        let specs = Arc::new(move |c: &Common, i: usize| {
            let mut rng = rng_for(c.seed, Stream::Warmup, i as u64);
            let tag = tag(&mut rng, format!("warm-up {i} of run {}:", c.seed));
            c.fresh_spec(&tag, i, &mut rng)
        });
        drive(common.clone(), warm, specs, progress.counters(), Instant::now()).await?;
        progress.stop();
    }
    let progress = Progress::start("run", load.requests, common.progress);
    let start = Instant::now();
    let specs = Arc::new(move |c: &Common, i: usize| c.spec(i, load.duplicates));
    let records = drive(common, load, specs, progress.counters(), start).await?;
    progress.stop();
    Ok(records)
}

type SpecFn = Arc<dyn Fn(&Common, usize) -> Result<Spec> + Send + Sync>;

async fn drive(
    common: Arc<Common>,
    load: Load,
    specs: SpecFn,
    counters: Arc<Counters>,
    start: Instant,
) -> Result<Vec<Record>> {
    let seed = common.seed;
    let deadline = load.duration.map(|d| start + d);
    let limit = load.requests.unwrap_or(usize::MAX);
    let open = move |now: Instant| deadline.is_none_or(|d| now < d);
    let one = move |i: usize| {
        let (common, specs, counters) = (common.clone(), specs.clone(), counters.clone());
        async move {
            let spec = specs(&common, i)?;
            let body = common.body(Input::Prompt(&spec.prompt), spec.max_tokens, spec.group);
            let outcome = common.send(&body, start).await;
            counters.record(&outcome);
            Ok::<_, anyhow::Error>(Record { group: spec.group, turn: None, outcome })
        }
    };
    let mut records = Vec::new();
    match load.arrivals {
        Arrivals::Closed { concurrency } => {
            let next = Arc::new(AtomicUsize::new(0));
            let mut set = JoinSet::new();
            for _ in 0..concurrency.min(limit) {
                let (next, one) = (next.clone(), one.clone());
                set.spawn(async move {
                    let mut mine = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= limit || !open(Instant::now()) {
                            return Ok::<_, anyhow::Error>(mine);
                        }
                        mine.push(one(i).await?);
                    }
                });
            }
            while let Some(r) = set.join_next().await {
                records.extend(r??);
            }
        }
        Arrivals::Poisson { rate, max_in_flight } => {
            let slots = max_in_flight.map(|n| Arc::new(Semaphore::new(n)));
            let mut rng = rng_for(seed, Stream::Arrival, 0);
            let mut at = start;
            let mut set = JoinSet::new();
            for i in 0..limit {
                // Exponential gaps: 1 - u is in (0, 1].
                at += Duration::from_secs_f64(-(1.0 - rng.random::<f64>()).ln() / rate);
                if !open(at) {
                    break;
                }
                tokio::time::sleep_until(at.into()).await;
                let permit = match &slots {
                    Some(s) => Some(s.clone().acquire_owned().await?),
                    None => None,
                };
                let one = one.clone();
                set.spawn(async move {
                    let r = one(i).await;
                    drop(permit);
                    r
                });
                while let Some(r) = set.try_join_next() {
                    records.push(r??);
                }
            }
            while let Some(r) = set.join_next().await {
                records.push(r??);
            }
        }
    }
    Ok(records)
}

/// Multi-turn conversations.
#[derive(Debug, Clone, Copy)]
pub struct Chat {
    /// Conversations held at once, each sending its turns one after the other.
    pub conversations: usize,
    pub turns: usize,
}

/// Runs `chat.conversations` conversations at once. Each turn sends every earlier message, the
/// assistant's replies included, plus a new user message, so each prompt extends the previous
/// one. A conversation stops at its first failed turn.
pub async fn chat(common: Arc<Common>, chat: Chat) -> Result<Vec<Record>> {
    let progress = Progress::start("chat", Some(chat.conversations * chat.turns), common.progress);
    let start = Instant::now();
    let mut set = JoinSet::new();
    for c in 0..chat.conversations {
        let (common, counters) = (common.clone(), progress.counters());
        set.spawn(async move {
            let mut messages: Vec<Value> = Vec::new();
            let mut records = Vec::new();
            for turn in 0..chat.turns {
                let mut rng = rng_for(common.seed, Stream::Turn, (c * chat.turns + turn) as u64);
                let tag = tag(&mut rng, format!("conversation {c} of run {}, turn {turn}:", common.seed));
                let spec = common.fresh_spec(&tag, c, &mut rng)?;
                messages.push(json!({"role": "user", "content": spec.prompt}));
                let body = common.body(Input::Messages(&messages), spec.max_tokens, c * chat.turns + turn);
                let outcome = common.send(&body, start).await;
                counters.record(&outcome);
                let failed = !outcome.ok();
                messages.push(json!({"role": "assistant", "content": outcome.text}));
                records.push(Record { group: c, turn: Some(turn), outcome });
                if failed {
                    break;
                }
            }
            Ok::<_, anyhow::Error>(records)
        });
    }
    let mut records = Vec::new();
    while let Some(r) = set.join_next().await {
        records.extend(r??);
    }
    progress.stop();
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn common(seed: u64) -> Common {
        Common {
            target: Target::parse("http://127.0.0.1:1", None).unwrap(),
            model: "m".into(),
            api: Api::Completions,
            stream: true,
            prompt_len: "uniform:5-50".parse().unwrap(),
            max_tokens: "uniform:1-64".parse().unwrap(),
            temperature: 0.0,
            seed,
            ignore_eos: false,
            timeout: Duration::from_secs(1),
            prompts: PromptMaker::words(),
            progress: false,
        }
    }

    #[test]
    fn specs_depend_on_the_seed_and_index_only_and_are_distinct() {
        let (a, b) = (common(5), common(5));
        for i in 0..20 {
            let with = a.spec(i, 0.5).unwrap();
            if with.group == i {
                assert_eq!(with, a.spec(i, 0.0).unwrap(), "an original is the same with or without duplicates");
            }
        }
        let specs: Vec<Spec> = (0..50).map(|i| a.spec(i, 0.0).unwrap()).collect();
        assert_eq!(specs, (0..50).map(|i| b.spec(i, 0.0).unwrap()).collect::<Vec<_>>());
        let prompts: std::collections::HashSet<&str> = specs.iter().map(|s| s.prompt.as_str()).collect();
        assert_eq!(prompts.len(), 50);
        assert!(specs.iter().enumerate().all(|(i, s)| s.group == i));
        assert_ne!(common(6).spec(0, 0.0).unwrap(), specs[0]);
        let lengths: std::collections::HashSet<u32> = specs.iter().map(|s| s.max_tokens).collect();
        assert!(lengths.len() > 10, "max_tokens should vary: {lengths:?}");
    }

    #[test]
    fn duplicates_repeat_earlier_bodies_in_about_the_asked_share() {
        let c = common(1);
        let specs: Vec<Spec> = (0..2000).map(|i| c.spec(i, 0.3).unwrap()).collect();
        let repeats = specs.iter().enumerate().filter(|(i, s)| s.group != *i).count();
        assert!((500..700).contains(&repeats), "{repeats} of 2000 repeat");
        for (i, s) in specs.iter().enumerate() {
            assert!(s.group <= i);
            assert_eq!(*s, Spec { group: s.group, ..specs[s.group].clone() });
        }
        let all: Vec<Spec> = (0..20).map(|i| c.spec(i, 1.0).unwrap()).collect();
        assert!(all.iter().all(|s| *s == all[0] && s.group == 0));
    }

    #[test]
    fn bodies_follow_the_options() {
        let mut c = common(3);
        let b = c.body(Input::Prompt("hi"), 16, 0);
        assert_eq!(b["prompt"], "hi");
        assert_eq!(b["stream_options"]["include_usage"], true);
        assert!(b.get("seed").is_none() && b.get("ignore_eos").is_none());
        c.api = Api::Chat;
        c.stream = false;
        c.temperature = 0.7;
        c.ignore_eos = true;
        let b = c.body(Input::Prompt("hi"), 16, 2);
        assert_eq!(b["messages"][0]["content"], "hi");
        assert!(b.get("stream_options").is_none());
        assert_eq!((b["seed"].as_u64(), b["ignore_eos"].as_bool()), (Some(5), Some(true)));
    }
}
