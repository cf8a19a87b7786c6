//! The command line: one subcommand per workload, options checked before anything is sent.
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args as ClapArgs, Parser, Subcommand};
use serde::Serialize;
use serde_json::json;

use crate::client::{Api, Target};
use crate::dist::Dist;
use crate::prompt::PromptMaker;
use crate::report::Report;
use crate::workload::{self, Arrivals, Chat, Common, Load, Record};

#[derive(Parser)]
#[command(
    name = "mlx-serving-bench",
    version,
    about = "Load generator for OpenAI-compatible servers (mlx-serving, mlx_lm.server)",
    after_help = "Lengths are distributions: `fixed:64` (or `64`), `uniform:32-256`, `normal:128,32`.\n\
                  Prompts count words, or tokens with --tokenizer. See docs/benchmarks.md."
)]
pub struct Args {
    #[command(subcommand)]
    pub workload: Workload,
}

#[derive(Subcommand)]
pub enum Workload {
    /// Independent requests: a fixed number in flight (--concurrency) or Poisson arrivals (--rate).
    Run {
        #[command(flatten)]
        common: CommonArgs,
        #[command(flatten)]
        run: RunArgs,
    },
    /// Multi-turn conversations: each turn resends the conversation so far plus a new message.
    Chat {
        #[command(flatten)]
        common: CommonArgs,
        #[command(flatten)]
        chat: ChatArgs,
    },
    /// Identical requests sent at once: do they all get the same answer?
    Duplicates {
        #[command(flatten)]
        common: CommonArgs,
        /// Identical requests sent together.
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(2..=10_000))]
        copies: u32,
    },
}

#[derive(ClapArgs, Serialize)]
pub struct CommonArgs {
    /// The server: `http://HOST:PORT` (a trailing `/v1` is fine).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// The `model` field of every request (mlx_lm.server: `default_model` for the one it loaded).
    #[arg(long)]
    pub model: String,
    /// The route: completions (a prompt) or chat (messages through the chat template).
    #[arg(long, value_enum, default_value_t = Api::Completions)]
    pub api: Api,
    /// Ask for whole responses instead of SSE streams (no time to first token then).
    #[arg(long)]
    pub no_stream: bool,
    /// Prompt length (a distribution): words, or tokens with --tokenizer.
    #[arg(long, default_value = "uniform:32-128")]
    pub prompt_len: Dist,
    /// `max_tokens` of each request (a distribution).
    #[arg(long, default_value = "fixed:64")]
    pub max_tokens: Dist,
    /// Sampling temperature; 0 is greedy. Above 0, every request carries a seed.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Seed of the prompts, lengths and arrivals (random when absent; the report gives it).
    #[arg(long)]
    pub seed: Option<u64>,
    /// A model directory whose tokenizer.json measures prompt lengths in tokens.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Send `ignore_eos: true` (an extension mlx-serving honours; mlx_lm.server ignores it).
    #[arg(long)]
    pub ignore_eos: bool,
    /// Bearer token for the Authorization header.
    #[arg(long)]
    #[serde(skip)]
    pub api_key: Option<String>,
    /// Seconds a request may take before it counts as failed.
    #[arg(long, default_value_t = 600.0)]
    pub timeout_s: f64,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// A name for this run, kept in the report.
    #[arg(long)]
    pub label: Option<String>,
    /// No progress line on stderr.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(ClapArgs, Serialize)]
pub struct RunArgs {
    /// Requests in flight at once (with --rate: the most in flight; further arrivals wait).
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// Poisson arrivals at this many requests per second.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Requests to send (default 100 unless --duration is given).
    #[arg(long)]
    pub requests: Option<usize>,
    /// Send no new request after this many seconds (with --requests: whichever comes first).
    #[arg(long)]
    pub duration_s: Option<f64>,
    /// Share of requests (0 to 1) that repeat an earlier request's body; the report says whether
    /// repeated bodies got the same text.
    #[arg(long, default_value_t = 0.0)]
    pub duplicates: f64,
    /// Requests sent first and left out of the results (distinct from the run's prompts).
    #[arg(long, default_value_t = 0)]
    pub warmup: usize,
}

#[derive(ClapArgs, Serialize)]
pub struct ChatArgs {
    /// Conversations held at once.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub conversations: u32,
    /// Turns per conversation.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1_000))]
    pub turns: u32,
}

impl CommonArgs {
    fn check(&self) -> Result<()> {
        if !(0.0..=2.0).contains(&self.temperature) {
            bail!("--temperature must be in [0, 2], got {}", self.temperature);
        }
        if !(self.timeout_s.is_finite() && self.timeout_s > 0.0) {
            bail!("--timeout-s must be a positive number of seconds, got {}", self.timeout_s);
        }
        if self.model.trim().is_empty() {
            bail!("--model must not be empty");
        }
        Ok(())
    }

    fn common(&self, seed: u64, api: Api) -> Result<Common> {
        self.check()?;
        let target = Target::parse(&self.url, self.api_key.clone())?;
        let prompts = match &self.tokenizer {
            Some(dir) => PromptMaker::tokens(dir)?,
            None => PromptMaker::words(),
        };
        Ok(Common {
            target,
            model: self.model.clone(),
            api,
            stream: !self.no_stream,
            prompt_len: self.prompt_len,
            max_tokens: self.max_tokens,
            temperature: self.temperature,
            seed,
            ignore_eos: self.ignore_eos,
            timeout: Duration::from_secs_f64(self.timeout_s),
            prompts,
            progress: !self.quiet,
        })
    }
}

impl RunArgs {
    fn load(&self) -> Result<Load> {
        if self.concurrency == Some(0) {
            bail!("--concurrency must be at least 1");
        }
        if let Some(r) = self.rate
            && !(r.is_finite() && r > 0.0)
        {
            bail!("--rate must be a positive number of requests per second, got {r}");
        }
        if self.requests == Some(0) {
            bail!("--requests must be at least 1");
        }
        if let Some(d) = self.duration_s
            && !(d.is_finite() && d > 0.0)
        {
            bail!("--duration-s must be a positive number of seconds, got {d}");
        }
        if !(0.0..=1.0).contains(&self.duplicates) {
            bail!("--duplicates must be a share between 0 and 1, got {}", self.duplicates);
        }
        let arrivals = match self.rate {
            Some(rate) => Arrivals::Poisson { rate, max_in_flight: self.concurrency },
            None => Arrivals::Closed { concurrency: self.concurrency.unwrap_or(1) },
        };
        let requests = match (self.requests, self.duration_s) {
            (None, None) => Some(100),
            (r, _) => r,
        };
        Ok(Load {
            arrivals,
            requests,
            duration: self.duration_s.map(Duration::from_secs_f64),
            duplicates: self.duplicates,
            warmup: self.warmup,
        })
    }

    fn describe(&self, load: &Load) -> String {
        let arrivals = match load.arrivals {
            Arrivals::Closed { concurrency } => format!("concurrency {concurrency}"),
            Arrivals::Poisson { rate, max_in_flight: Some(n) } => format!("Poisson {rate}/s, at most {n} in flight"),
            Arrivals::Poisson { rate, max_in_flight: None } => format!("Poisson {rate}/s"),
        };
        let mut limit = Vec::new();
        if let Some(n) = load.requests {
            limit.push(format!("{n} requests"));
        }
        if let Some(d) = load.duration {
            limit.push(format!("{} s", d.as_secs_f64()));
        }
        let dups =
            if load.duplicates > 0.0 { format!(", {}% duplicates", load.duplicates * 100.0) } else { String::new() };
        format!("{}, {arrivals}{dups}", limit.join(" or "))
    }
}

/// What to run: a checked workload and how to describe it.
struct Plan<'a> {
    name: &'static str,
    common: &'a CommonArgs,
    api: Api,
    describe: String,
    /// The workload's own options, for the report's settings.
    options: serde_json::Value,
    job: Job,
}

enum Job {
    Load(Load),
    Chat(Chat),
}

impl Workload {
    fn plan(&self) -> Result<Plan<'_>> {
        Ok(match self {
            Workload::Run { common, run } => {
                let load = run.load()?;
                let describe = run.describe(&load);
                Plan {
                    name: "run",
                    common,
                    api: common.api,
                    describe,
                    options: json!({"run": run}),
                    job: Job::Load(load),
                }
            }
            Workload::Chat { common, chat } => Plan {
                name: "chat",
                common,
                api: Api::Chat,
                describe: format!("{} conversations of {} turns", chat.conversations, chat.turns),
                options: json!({"chat": chat}),
                job: Job::Chat(Chat { conversations: chat.conversations as usize, turns: chat.turns as usize }),
            },
            Workload::Duplicates { common, copies } => {
                let n = *copies as usize;
                Plan {
                    name: "duplicates",
                    common,
                    api: common.api,
                    describe: format!("{copies} identical requests at once"),
                    options: json!({"copies": copies}),
                    job: Job::Load(Load {
                        arrivals: Arrivals::Closed { concurrency: n },
                        requests: Some(n),
                        duration: None,
                        duplicates: 1.0,
                        warmup: 0,
                    }),
                }
            }
        })
    }
}

/// Runs the chosen workload and reports it.
pub async fn main(args: Args) -> Result<()> {
    let plan = args.workload.plan()?;
    let seed = plan.common.seed.unwrap_or_else(|| rand::random::<u64>() % 1_000_000);
    let common = Arc::new(plan.common.common(seed, plan.api)?);
    preflight(&common.target).await?;
    // Open the JSON file first: a path that cannot be written fails before the run, not after.
    let json_file = match &plan.common.json {
        Some(path) => Some((path, std::fs::File::create(path).with_context(|| format!("--json {}", path.display()))?)),
        None => None,
    };

    let records: Vec<Record> = match plan.job {
        Job::Load(load) => workload::load(common.clone(), load).await?,
        Job::Chat(chat) => workload::chat(common.clone(), chat).await?,
    };

    let mut settings = json!({"common": plan.common, "seed": seed});
    if let (Some(s), Some(o)) = (settings.as_object_mut(), plan.options.as_object()) {
        s.extend(o.clone());
    }
    let report = Report::new(plan.name, plan.common.label.clone(), settings, &records);
    let mode = if common.stream { "streaming" } else { "not streaming" };
    let title = format!(
        "mlx-serving-bench {}: {}\n  {} ({mode}), model {}, prompts {} {}, max_tokens {}, temperature {}, seed {seed}",
        plan.name,
        plan.describe,
        common.target.url(plan.api.path()),
        common.model,
        common.prompt_len,
        common.prompts.unit_name(),
        common.max_tokens,
        common.temperature,
    );
    print!("{}", report.table(&title));
    if let Some((path, mut file)) = json_file {
        use std::io::Write;
        serde_json::to_writer_pretty(&mut file, &report)?;
        writeln!(file).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Fails at once when nothing listens at the target.
async fn preflight(target: &Target) -> Result<()> {
    let url = target.url("");
    let (host, port) = target.host_port();
    tokio::time::timeout(Duration::from_secs(10), tokio::net::TcpStream::connect((host, port)))
        .await
        .with_context(|| format!("connecting to {url} took over 10 s"))?
        .with_context(|| format!("cannot connect to {url}"))?;
    Ok(())
}
