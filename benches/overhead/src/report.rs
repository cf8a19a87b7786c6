//! From the client's samples and the taps' segments to the figures: per request and per token,
//! each path, and supervised minus direct.
use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::stats::{Added, Summary, added, summary};
use crate::tap::Segment;
use crate::{Args, Kind, Run, Via};

/// Microseconds between two CLOCK_MONOTONIC readings.
fn us(from: u64, to: u64) -> f64 {
    (to as f64 - from as f64) / 1000.0
}

#[derive(Default)]
struct Measures {
    /// Per request, µs.
    outside: Vec<f64>,
    ingress: Vec<f64>,
    egress: Vec<f64>,
    end_to_end: Vec<f64>,
    inside: Vec<f64>,
    /// Per token, µs: received by the client minus written by the worker.
    token_delivery: Vec<f64>,
    /// Medians per request of the gaps between tokens, µs, as the worker wrote them and as the
    /// client received them.
    worker_gap: Vec<f64>,
    client_gap: Vec<f64>,
    /// Per request, µs of CPU the supervisor spent (all its threads).
    supervisor_cpu: Vec<f64>,
}

pub fn median(v: &[f64]) -> f64 {
    summary(v).p50
}

fn gaps(times: &[u64]) -> Vec<f64> {
    times.windows(2).map(|w| us(w[0], w[1])).collect()
}

/// The requests each worker's tap saw, in order.
pub struct Segments {
    pub direct: Vec<Segment>,
    pub relay: Vec<Segment>,
    pub supervised: Vec<Segment>,
}

impl Segments {
    fn of(&self, via: Via) -> &[Segment] {
        match via {
            Via::Direct => &self.direct,
            Via::Relay => &self.relay,
            Via::Supervised => &self.supervised,
        }
    }
}

fn measure(kind: Kind, runs: &[Run], segments: &Segments) -> Result<Measures> {
    let mut m = Measures::default();
    let mut seen = [0usize; 3];
    for run in runs {
        let via = run.kind.via();
        seen[via as usize] += 1;
        let seg = segments.of(via).get(seen[via as usize] - 1);
        let seg = seg.with_context(|| format!("the tap has fewer requests than were sent ({:?})", run.kind))?;
        if seg.tokens.len() != run.sample.tokens.len() {
            bail!("the tap and the client disagree on the tokens of a {:?} request", run.kind);
        }
        if run.kind != kind || !run.counted {
            continue;
        }
        let x = &run.sample;
        let ingress = us(x.sent, seg.arrived);
        let egress = us(seg.finished, x.done);
        if ingress <= 0.0 || egress <= 0.0 || seg.arrived == 0 {
            bail!("a {kind:?} request's times are out of order: the tap and the client are misaligned");
        }
        m.ingress.push(ingress);
        m.egress.push(egress);
        m.outside.push(ingress + egress);
        m.end_to_end.push(us(x.sent, x.done));
        m.inside.push(us(seg.arrived, seg.finished));
        m.supervisor_cpu.push(run.supervisor_cpu_ns as f64 / 1000.0);
        if kind.stream() {
            m.token_delivery.extend(x.tokens.iter().zip(&seg.tokens).map(|(r, w)| us(*w, *r)));
            m.worker_gap.push(median(&gaps(&seg.tokens)));
            m.client_gap.push(median(&gaps(&x.tokens)));
        }
    }
    Ok(m)
}

#[derive(serde::Serialize)]
struct PathReport {
    outside: Summary,
    ingress: Summary,
    egress: Summary,
    end_to_end: Summary,
    inside: Summary,
    #[serde(skip_serializing_if = "Option::is_none")]
    token_delivery: Option<Summary>,
    #[serde(skip_serializing_if = "Option::is_none")]
    worker_gap: Option<Summary>,
    #[serde(skip_serializing_if = "Option::is_none")]
    client_gap: Option<Summary>,
    /// CPU the supervisor spent per request, µs (for direct requests: its idle work, a control).
    supervisor_cpu: Summary,
    /// The raw per-request outside-the-worker times, µs.
    outside_us: Vec<f64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    token_delivery_us: Vec<f64>,
}

fn path_report(m: &Measures) -> PathReport {
    let stream = !m.token_delivery.is_empty();
    PathReport {
        outside: summary(&m.outside),
        ingress: summary(&m.ingress),
        egress: summary(&m.egress),
        end_to_end: summary(&m.end_to_end),
        inside: summary(&m.inside),
        token_delivery: stream.then(|| summary(&m.token_delivery)),
        worker_gap: stream.then(|| summary(&m.worker_gap)),
        client_gap: stream.then(|| summary(&m.client_gap)),
        supervisor_cpu: summary(&m.supervisor_cpu),
        outside_us: m.outside.iter().map(|v| (v * 10.0).round() / 10.0).collect(),
        token_delivery_us: m.token_delivery.iter().map(|v| (v * 10.0).round() / 10.0).collect(),
    }
}

#[derive(serde::Serialize)]
pub struct Report {
    direct_request: PathReport,
    relay_request: PathReport,
    sse_request: PathReport,
    json_request: PathReport,
    direct_stream: PathReport,
    relay_stream: PathReport,
    sse_stream: PathReport,
    /// Relay minus direct: what one more process that only copies bytes adds, per request
    /// (outside the worker) and per streamed token. The floor under the figures below.
    floor_per_request: Added,
    floor_per_token: Added,
    /// Supervised (SSE) minus relay: what the supervisor adds above that floor.
    above_floor_per_request: Added,
    above_floor_per_token: Added,
    /// Supervised minus direct, per request (max_tokens 1), outside the worker.
    added_per_request_sse: Added,
    added_per_request_json: Added,
    /// The same from end-to-end times alone (the worker's own time included, so noisier).
    added_end_to_end_sse: Added,
    added_end_to_end_json: Added,
    /// Supervised minus direct, per streamed token.
    added_per_token: Added,
    /// Supervised minus direct, of the per-request median gap between tokens at the client.
    added_client_gap: Added,
    /// CPU the supervisor spends per streamed token beyond the first, µs: the difference of the
    /// medians of its CPU per streamed request and per max_tokens=1 request, over N - 1 tokens.
    supervisor_cpu_per_token: f64,
}

pub fn report(runs: &[Run], segments: &Segments) -> Result<Report> {
    for via in [Via::Direct, Via::Relay, Via::Supervised] {
        let sent = runs.iter().filter(|r| r.kind.via() == via).count();
        let seen = segments.of(via).len();
        if seen != sent {
            bail!("the tap of the {via:?} worker saw {seen} requests; {sent} were sent");
        }
    }
    let stream_tokens = runs.iter().find(|r| r.kind == Kind::SseStream).map_or(1, |r| r.sample.tokens.len());
    let m = |k| measure(k, runs, segments);
    let (dr, rr, sr, jr) =
        (m(Kind::DirectRequest)?, m(Kind::RelayRequest)?, m(Kind::SseRequest)?, m(Kind::JsonRequest)?);
    let (ds, rs, ss) = (m(Kind::DirectStream)?, m(Kind::RelayStream)?, m(Kind::SseStream)?);
    Ok(Report {
        floor_per_request: added(&dr.outside, &rr.outside),
        floor_per_token: added(&ds.token_delivery, &rs.token_delivery),
        above_floor_per_request: added(&rr.outside, &sr.outside),
        above_floor_per_token: added(&rs.token_delivery, &ss.token_delivery),
        added_per_request_sse: added(&dr.outside, &sr.outside),
        added_per_request_json: added(&dr.outside, &jr.outside),
        added_end_to_end_sse: added(&dr.end_to_end, &sr.end_to_end),
        added_end_to_end_json: added(&dr.end_to_end, &jr.end_to_end),
        added_per_token: added(&ds.token_delivery, &ss.token_delivery),
        added_client_gap: added(&ds.client_gap, &ss.client_gap),
        supervisor_cpu_per_token: (median(&ss.supervisor_cpu) - median(&sr.supervisor_cpu))
            / (stream_tokens.max(2) - 1) as f64,
        direct_request: path_report(&dr),
        relay_request: path_report(&rr),
        sse_request: path_report(&sr),
        json_request: path_report(&jr),
        direct_stream: path_report(&ds),
        relay_stream: path_report(&rs),
        sse_stream: path_report(&ss),
    })
}

pub fn print(r: &Report, args: &Args, tap_cost: &Value, machine: &Value) {
    let row =
        |name: &str, s: &Summary| println!("  {name:<44} {:>9.1} {:>9.1} {:>9.1} {:>6}", s.p50, s.p90, s.p99, s.n);
    let add = |name: &str, a: &Added, target: Option<f64>| {
        let verdict = target.map_or(String::new(), |t| {
            format!("  target p50 <= {t:.0}: {}", if a.p50 <= t { "met" } else { "NOT met" })
        });
        println!(
            "  {name:<44} {:>+9.1} {:>+9.1} {:>+9.1}   p50 95% CI [{:+.1}, {:+.1}]{verdict}",
            a.p50, a.p90, a.p99, a.p50_ci95[0], a.p50_ci95[1]
        );
    };
    println!();
    println!(
        "Supervisor overhead: {} rounds (after {} warm-up), streams of {} tokens, model {}",
        args.rounds,
        args.warmup,
        args.tokens,
        args.model.display()
    );
    println!(
        "machine: {} CPUs, {}, load average before {} after {}",
        machine["cpus"], machine["cpu_model"], machine["loadavg_before"], machine["loadavg_after"]
    );
    println!(
        "tap (LD_PRELOAD in both workers): {:+.0} ns per write, {:+.0} ns per read, none of it inside the measured intervals",
        tap_cost["write_ns_added"].as_f64().unwrap_or(f64::NAN),
        tap_cost["read_ns_added"].as_f64().unwrap_or(f64::NAN)
    );
    println!();
    println!("  {:<44} {:>9} {:>9} {:>9} {:>6}", "per request, max_tokens=1 (µs)", "p50", "p90", "p99", "n");
    row("direct: outside the worker", &r.direct_request.outside);
    row("bare relay: outside the worker", &r.relay_request.outside);
    row("supervisor, SSE: outside the worker", &r.sse_request.outside);
    row("supervisor, JSON: outside the worker", &r.json_request.outside);
    row("direct: request reaches the worker", &r.direct_request.ingress);
    row("supervisor, SSE: request reaches the worker", &r.sse_request.ingress);
    row("direct: final event to the client", &r.direct_request.egress);
    row("supervisor, SSE: final event to [DONE]", &r.sse_request.egress);
    row("direct: inside the worker", &r.direct_request.inside);
    row("supervisor, SSE: inside the worker", &r.sse_request.inside);
    row("direct: end to end", &r.direct_request.end_to_end);
    row("supervisor, SSE: end to end", &r.sse_request.end_to_end);
    row("supervisor, JSON: end to end", &r.json_request.end_to_end);
    add("ADDED per request, SSE (outside the worker)", &r.added_per_request_sse, Some(200.0));
    add("ADDED per request, JSON (outside the worker)", &r.added_per_request_json, Some(200.0));
    add("added per request, SSE (end to end)", &r.added_end_to_end_sse, None);
    add("added per request, JSON (end to end)", &r.added_end_to_end_json, None);
    add("floor: bare relay - direct", &r.floor_per_request, None);
    add("supervisor, SSE - bare relay", &r.above_floor_per_request, None);
    println!();
    println!(
        "  {:<44} {:>9} {:>9} {:>9} {:>6}",
        format!("per token, streams of {} (µs)", args.tokens),
        "p50",
        "p90",
        "p99",
        "n"
    );
    if let (Some(d), Some(s)) = (&r.direct_stream.token_delivery, &r.sse_stream.token_delivery) {
        row("direct: token written -> line read", d);
        if let Some(relay) = &r.relay_stream.token_delivery {
            row("bare relay: token written -> line read", relay);
        }
        row("supervisor, SSE: token written -> chunk read", s);
    }
    add("ADDED per token", &r.added_per_token, Some(20.0));
    add("floor: bare relay - direct", &r.floor_per_token, None);
    add("supervisor, SSE - bare relay", &r.above_floor_per_token, None);
    if let (Some(dw), Some(sw), Some(dc), Some(sc)) =
        (&r.direct_stream.worker_gap, &r.sse_stream.worker_gap, &r.direct_stream.client_gap, &r.sse_stream.client_gap)
    {
        row("direct: gap between tokens, at the worker", dw);
        row("supervisor: gap between tokens, at the worker", sw);
        row("direct: gap between tokens, at the client", dc);
        row("supervisor: gap between tokens, at the client", sc);
    }
    add("added gap between tokens at the client", &r.added_client_gap, None);
    println!();
    println!("  {:<44} {:>9} {:>9} {:>9} {:>6}", "supervisor CPU, all threads (µs)", "p50", "p90", "p99", "n");
    row("per direct request (control: idle work)", &r.direct_request.supervisor_cpu);
    row("per direct stream (control: idle work)", &r.direct_stream.supervisor_cpu);
    row("per request, SSE, max_tokens=1", &r.sse_request.supervisor_cpu);
    row("per request, JSON, max_tokens=1", &r.json_request.supervisor_cpu);
    row(&format!("per request, SSE, max_tokens={}", args.tokens), &r.sse_stream.supervisor_cpu);
    println!("  {:<44} {:>9.1}", "per streamed token (difference of p50s / (N-1))", r.supervisor_cpu_per_token);
    println!();
}
