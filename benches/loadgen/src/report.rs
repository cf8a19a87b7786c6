//! The results of a run: figures computed from the requests' outcomes, printed as a table and
//! written as JSON.
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write;
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

use crate::stats::Summary;
use crate::workload::Record;

/// Error messages kept in a report: the first distinct ones.
const KEPT_ERRORS: usize = 5;

#[derive(Debug, Serialize)]
pub struct Report {
    pub tool: &'static str,
    pub version: &'static str,
    /// `run`, `chat` or `duplicates`.
    pub workload: &'static str,
    pub label: Option<String>,
    /// The options of the run, as given.
    pub settings: Value,
    /// From the first request sent to the last response ended.
    pub duration_s: f64,
    pub requests: Requests,
    pub throughput: Throughput,
    pub tokens: Tokens,
    pub latency_ms: Latency,
    /// Per request: completion tokens after the first over the time after the first.
    pub decode_tokens_per_s: Option<Summary>,
    pub finish_reasons: BTreeMap<String, usize>,
    pub errors: Errors,
    pub duplicates: Option<Duplicates>,
    pub turns: Option<Vec<Turn>>,
}

#[derive(Debug, Serialize)]
pub struct Requests {
    pub sent: usize,
    pub ok: usize,
    pub errors: usize,
    /// Connection attempts refused or reset before a response and made again.
    pub connect_retries: u64,
}

#[derive(Debug, Serialize)]
pub struct Throughput {
    /// Successful requests per second.
    pub requests_per_s: f64,
    /// Completion tokens of successful requests per second, all streams together.
    pub output_tokens_per_s: f64,
    /// Prompt and completion tokens of successful requests per second.
    pub total_tokens_per_s: f64,
}

#[derive(Debug, Serialize)]
pub struct Tokens {
    pub prompt: u64,
    pub completion: u64,
    pub cached: u64,
    pub prompt_per_request: Option<Summary>,
    pub completion_per_request: Option<Summary>,
    /// Successful requests whose server reported usage (the others count streamed chunks).
    pub usage_reported: usize,
}

#[derive(Debug, Serialize)]
pub struct Latency {
    /// Time to the first chunk with text (streaming only).
    pub ttft: Option<Summary>,
    /// Gaps between chunks with text.
    pub itl: Option<Summary>,
    /// Time per output token after the first.
    pub tpot: Option<Summary>,
    /// Sending to the end of the response.
    pub e2e: Option<Summary>,
}

#[derive(Debug, Serialize)]
pub struct Errors {
    pub count: usize,
    pub first: Vec<String>,
}

/// Requests that sent the same body: did they get the same text?
#[derive(Debug, Serialize)]
pub struct Duplicates {
    /// Bodies sent more than once (and answered more than once).
    pub groups: usize,
    /// Successful requests in those groups.
    pub requests: usize,
    pub identical_groups: usize,
    pub all_identical: bool,
    /// The most distinct texts one body got.
    pub max_distinct_outputs: usize,
}

#[derive(Debug, Serialize)]
pub struct Turn {
    /// 1 for the first turn.
    pub turn: usize,
    pub ok: usize,
    pub errors: usize,
    pub ttft_ms: Option<Summary>,
    pub prompt_tokens_mean: Option<f64>,
    /// `usage.prompt_tokens_details.cached_tokens`, 0 where a server leaves it out.
    pub cached_tokens_mean: Option<f64>,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn mean(v: &[f64]) -> Option<f64> {
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

impl Report {
    pub fn new(workload: &'static str, label: Option<String>, settings: Value, records: &[Record]) -> Report {
        let ok: Vec<&Record> = records.iter().filter(|r| r.outcome.ok()).collect();
        let outs = || ok.iter().map(|r| &r.outcome);
        let begin = records.iter().map(|r| r.outcome.sent_at).fold(f64::INFINITY, f64::min);
        let end = records.iter().map(|r| r.outcome.sent_at + r.outcome.e2e.as_secs_f64()).fold(0.0, f64::max);
        let duration_s = if records.is_empty() { 0.0 } else { end - begin };
        let per_s = |x: f64| if duration_s > 0.0 { x / duration_s } else { 0.0 };

        let prompt: u64 = outs().filter_map(|o| o.prompt_tokens).sum();
        let completion: u64 = outs().map(|o| o.completion_tokens).sum();
        let mut finish_reasons = BTreeMap::new();
        for o in outs() {
            *finish_reasons.entry(o.finish_reason.clone().unwrap_or_else(|| "none".into())).or_insert(0) += 1;
        }
        let mut first_errors: Vec<String> = Vec::new();
        for r in records {
            if let Some(e) = &r.outcome.error
                && first_errors.len() < KEPT_ERRORS
                && !first_errors.contains(e)
            {
                first_errors.push(e.clone());
            }
        }
        let turns = records.iter().any(|r| r.turn.is_some()).then(|| turns(records));
        Report {
            tool: "mlx-serving-bench",
            version: env!("CARGO_PKG_VERSION"),
            workload,
            label,
            settings,
            duration_s,
            requests: Requests {
                sent: records.len(),
                ok: ok.len(),
                errors: records.len() - ok.len(),
                connect_retries: records.iter().map(|r| u64::from(r.outcome.retries)).sum(),
            },
            throughput: Throughput {
                requests_per_s: per_s(ok.len() as f64),
                output_tokens_per_s: per_s(completion as f64),
                total_tokens_per_s: per_s((prompt + completion) as f64),
            },
            tokens: Tokens {
                prompt,
                completion,
                cached: outs().map(|o| o.cached_tokens).sum(),
                prompt_per_request: Summary::of(outs().filter_map(|o| o.prompt_tokens.map(|p| p as f64))),
                completion_per_request: Summary::of(outs().map(|o| o.completion_tokens as f64)),
                usage_reported: outs().filter(|o| o.usage_reported).count(),
            },
            latency_ms: Latency {
                ttft: Summary::of(outs().filter_map(|o| o.ttft.map(ms))),
                itl: Summary::of(outs().flat_map(|o| o.chunk_gaps.iter().copied().map(ms))),
                tpot: Summary::of(outs().filter_map(|o| o.tpot().map(ms))),
                e2e: Summary::of(outs().map(|o| ms(o.e2e))),
            },
            decode_tokens_per_s: Summary::of(outs().filter_map(|o| o.tpot().map(|t| 1.0 / t.as_secs_f64()))),
            finish_reasons,
            errors: Errors { count: records.len() - ok.len(), first: first_errors },
            duplicates: duplicates(&ok),
            turns,
        }
    }

    /// The report as a table for people.
    pub fn table(&self, title: &str) -> String {
        let mut s = String::new();
        let r = &self.requests;
        let _ = writeln!(s, "{title}");
        let _ = writeln!(
            s,
            "  requests    {} sent, {} ok, {} errors, {} connect retries",
            r.sent, r.ok, r.errors, r.connect_retries
        );
        let _ = writeln!(s, "  duration    {:.2} s", self.duration_s);
        let t = &self.throughput;
        let _ = writeln!(
            s,
            "  throughput  {:.2} requests/s, {:.1} output tokens/s, {:.1} tokens/s with prompts",
            t.requests_per_s, t.output_tokens_per_s, t.total_tokens_per_s
        );
        let k = &self.tokens;
        let per = |x: &Option<Summary>| x.map_or("-".to_string(), |x| format!("{:.1}", x.mean));
        let _ = writeln!(
            s,
            "  tokens      {} prompt ({} per request, {} cached), {} completion ({} per request)",
            k.prompt,
            per(&k.prompt_per_request),
            k.cached,
            k.completion,
            per(&k.completion_per_request)
        );
        if !self.finish_reasons.is_empty() {
            let reasons: Vec<String> = self.finish_reasons.iter().map(|(k, v)| format!("{k} {v}")).collect();
            let _ = writeln!(s, "  finished    {}", reasons.join(", "));
        }
        let _ = writeln!(s, "  {:<22}{:>9}{:>9}{:>9}{:>9}{:>9}", "", "mean", "p50", "p95", "p99", "max");
        let l = &self.latency_ms;
        for (name, v) in [
            ("ttft (ms)", l.ttft),
            ("itl (ms)", l.itl),
            ("tpot (ms)", l.tpot),
            ("e2e (ms)", l.e2e),
            ("decode (tokens/s)", self.decode_tokens_per_s),
        ] {
            let row = match v {
                Some(x) => format!("{:>9.1}{:>9.1}{:>9.1}{:>9.1}{:>9.1}", x.mean, x.p50, x.p95, x.p99, x.max),
                None => format!("{:>9}", "-"),
            };
            let _ = writeln!(s, "  {name:<22}{row}");
        }
        if let Some(d) = &self.duplicates {
            let verdict = if d.all_identical { "all identical" } else { "DIFFERENT" };
            let _ = writeln!(
                s,
                "  duplicates  {} bodies sent {} times: {verdict} ({} of {} groups identical, at most {} distinct outputs)",
                d.groups, d.requests, d.identical_groups, d.groups, d.max_distinct_outputs
            );
        }
        if let Some(turns) = &self.turns {
            let _ = writeln!(
                s,
                "  {:<6}{:>6}{:>8}{:>12}{:>12}{:>10}{:>10}",
                "turn", "ok", "errors", "ttft p50", "ttft p95", "prompt", "cached"
            );
            for t in turns {
                let f = |x: Option<f64>| x.map_or("-".to_string(), |x| format!("{x:.1}"));
                let _ = writeln!(
                    s,
                    "  {:<6}{:>6}{:>8}{:>12}{:>12}{:>10}{:>10}",
                    t.turn,
                    t.ok,
                    t.errors,
                    f(t.ttft_ms.map(|x| x.p50)),
                    f(t.ttft_ms.map(|x| x.p95)),
                    f(t.prompt_tokens_mean),
                    f(t.cached_tokens_mean)
                );
            }
        }
        if self.errors.count > 0 {
            let _ = writeln!(s, "  errors      {} (first distinct ones below)", self.errors.count);
            for e in &self.errors.first {
                let _ = writeln!(s, "    {e}");
            }
        }
        s
    }
}

fn duplicates(ok: &[&Record]) -> Option<Duplicates> {
    let mut groups: HashMap<usize, Vec<&str>> = HashMap::new();
    for r in ok.iter().filter(|r| r.turn.is_none()) {
        groups.entry(r.group).or_default().push(&r.outcome.text);
    }
    groups.retain(|_, v| v.len() > 1);
    if groups.is_empty() {
        return None;
    }
    let distinct: Vec<usize> = groups
        .values()
        .map(|v| {
            let mut texts = v.clone();
            texts.sort_unstable();
            texts.dedup();
            texts.len()
        })
        .collect();
    let identical_groups = distinct.iter().filter(|&&n| n == 1).count();
    Some(Duplicates {
        groups: groups.len(),
        requests: groups.values().map(Vec::len).sum(),
        identical_groups,
        all_identical: identical_groups == groups.len(),
        max_distinct_outputs: distinct.into_iter().max().unwrap_or(0),
    })
}

fn turns(records: &[Record]) -> Vec<Turn> {
    let last = records.iter().filter_map(|r| r.turn).max().unwrap_or(0);
    (0..=last)
        .map(|t| {
            let all: Vec<&Record> = records.iter().filter(|r| r.turn == Some(t)).collect();
            let ok: Vec<&Record> = all.iter().copied().filter(|r| r.outcome.ok()).collect();
            let prompt: Vec<f64> = ok.iter().filter_map(|r| r.outcome.prompt_tokens.map(|p| p as f64)).collect();
            let cached: Vec<f64> = ok.iter().map(|r| r.outcome.cached_tokens as f64).collect();
            Turn {
                turn: t + 1,
                ok: ok.len(),
                errors: all.len() - ok.len(),
                ttft_ms: Summary::of(ok.iter().filter_map(|r| r.outcome.ttft.map(ms))),
                prompt_tokens_mean: mean(&prompt),
                cached_tokens_mean: mean(&cached),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::Outcome;

    fn rec(group: usize, turn: Option<usize>, sent_at: f64, e2e_ms: u64, tokens: u64, text: &str) -> Record {
        Record {
            group,
            turn,
            outcome: Outcome {
                sent_at,
                ttft: Some(Duration::from_millis(e2e_ms / 4)),
                e2e: Duration::from_millis(e2e_ms),
                completion_tokens: tokens,
                prompt_tokens: Some(10),
                cached_tokens: if turn == Some(1) { 8 } else { 0 },
                usage_reported: true,
                text: text.into(),
                finish_reason: Some("length".into()),
                ..Outcome::default()
            },
        }
    }

    #[test]
    fn throughput_counts_successful_tokens_over_the_whole_run() {
        let mut failed = rec(2, None, 0.5, 100, 0, "");
        failed.outcome.error = Some("HTTP 429: busy".into());
        let records = vec![rec(0, None, 0.0, 1000, 10, "a"), rec(1, None, 1.0, 1000, 30, "b"), failed.clone(), failed];
        let r = Report::new("run", None, Value::Null, &records);
        assert!((r.duration_s - 2.0).abs() < 1e-9);
        assert_eq!((r.requests.sent, r.requests.ok, r.requests.errors), (4, 2, 2));
        assert!((r.throughput.output_tokens_per_s - 20.0).abs() < 1e-9);
        assert!((r.throughput.requests_per_s - 1.0).abs() < 1e-9);
        assert_eq!(r.errors.first, ["HTTP 429: busy"]);
        assert_eq!(r.finish_reasons["length"], 2);
        assert!(r.duplicates.is_none());
        let e2e = r.latency_ms.e2e.unwrap();
        assert_eq!((e2e.count, e2e.p50), (2, 1000.0));
        assert!(r.table("t").contains("2 ok, 2 errors"));
    }

    #[test]
    fn duplicate_groups_are_compared() {
        let same = vec![rec(0, None, 0.0, 10, 1, "x"), rec(0, None, 0.0, 10, 1, "x"), rec(1, None, 0.0, 10, 1, "y")];
        let d = Report::new("duplicates", None, Value::Null, &same).duplicates.unwrap();
        assert_eq!((d.groups, d.requests, d.all_identical, d.max_distinct_outputs), (1, 2, true, 1));
        let differ = vec![rec(0, None, 0.0, 10, 1, "x"), rec(0, None, 0.0, 10, 1, "z"), rec(0, None, 0.0, 10, 1, "x")];
        let r = Report::new("duplicates", None, Value::Null, &differ);
        let d = r.duplicates.as_ref().unwrap();
        assert_eq!((d.all_identical, d.max_distinct_outputs), (false, 2));
        assert!(r.table("t").contains("DIFFERENT"));
    }

    #[test]
    fn turns_report_their_ttft_and_cached_tokens() {
        let records = vec![
            rec(0, Some(0), 0.0, 400, 4, "a"),
            rec(0, Some(1), 0.5, 800, 4, "b"),
            rec(1, Some(0), 0.0, 400, 4, "c"),
        ];
        let r = Report::new("chat", None, Value::Null, &records);
        let t = r.turns.unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!((t[0].turn, t[0].ok, t[0].cached_tokens_mean), (1, 2, Some(0.0)));
        assert_eq!((t[1].turn, t[1].ok, t[1].cached_tokens_mean), (2, 1, Some(8.0)));
        assert_eq!(t[1].ttft_ms.unwrap().p50, 200.0);
        assert!(r.duplicates.is_none(), "conversations are not duplicates");
    }
}
