//! The protocol's hot paths, one message at a time: a token event written by the worker and read
//! by the supervisor, a generate request the other way, and the line framing under both.
//!
//! `cargo bench -p mlx-serving-protocol --bench codec`
//!
//! - `token_event/encode`: what the worker does per token: the event to a raw JSON value, wrapped
//!   in the `generate_event` notification, as jsonrpsee's subscription sink does.
//! - `token_event/decode`: what the supervisor's jsonrpsee client does per line: it tries the line
//!   as a response first, then as a subscription notification, then the event itself.
//! - `generate_request/encode` and `/decode`: the request line, written by the client and read by
//!   the worker (which parses it as a JSON value to check the envelope, then as typed params).
//! - `framing/read_line`, `framing/write_line`: [`LineReader`] over a buffer of token lines, and
//!   [`write_line`] into a sink.
//! - `client/link` and `client/jsonrpsee`: the real path end to end, the supervisor's
//!   [`WorkerLink`] (and, to compare, jsonrpsee's client) over an in-memory pipe reading a stream
//!   of token lines from a fake worker on the same thread (the fake's writes are included).
use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use jsonrpsee::core::client::{ClientBuilder, Subscription};
use jsonrpsee::types::{Id, Request, Response, SubscriptionPayload, SubscriptionResponse};
use mlx_serving_protocol::framing::{DEFAULT_MAX_LINE_BYTES, LineReader, PipeReceiver, PipeSender, write_line};
use mlx_serving_protocol::link::WorkerLink;
use mlx_serving_protocol::{
    FinalEvent, FinishReason, GenerateEvent, GenerateRequest, Message, Prompt, Sampling, TokenEvent, Usage,
    WorkerRpcClient,
};
use serde_json::value::{RawValue, to_raw_value};
use tokio::io::{AsyncWriteExt, DuplexStream};
use tokio::runtime::Runtime;
use tokio::sync::mpsc;

const SUBSCRIPTION: u64 = 8417026851031807;
const LINES: usize = 1024;

fn token() -> GenerateEvent {
    GenerateEvent::Token(TokenEvent {
        token_ids: vec![646],
        text: " Hi".to_string(),
        logprobs: None,
        top_logprobs: None,
    })
}

fn final_event() -> GenerateEvent {
    GenerateEvent::Final(FinalEvent {
        finish_reason: FinishReason::Length,
        text: String::new(),
        usage: Usage { prompt_tokens: 12, completion_tokens: 64, cached_tokens: 0 },
        time_to_first_token_ms: Some(25.1),
        total_ms: 135.8,
        error: None,
    })
}

/// A chat request as the HTTP front makes it.
fn request() -> GenerateRequest {
    let mut r = GenerateRequest::new(
        "req-4f1c2a9b0d3e5f67",
        "tiny",
        Prompt::Messages(vec![Message {
            role: "user".to_string(),
            content: "Tell me about the license and what it allows.".to_string(),
        }]),
        64,
    );
    r.sampling = Sampling { temperature: 0.7, top_p: 0.9, seed: Some(1), ..Sampling::default() };
    r
}

/// A notification line as the worker writes it.
fn encode_event(event: &GenerateEvent) -> String {
    let raw = to_raw_value(event).expect("an event serializes");
    let notif = SubscriptionResponse::new(
        "generate_event".into(),
        SubscriptionPayload { subscription: SUBSCRIPTION.into(), result: raw },
    );
    serde_json::to_string(&notif).expect("a notification serializes")
}

/// A request line as the client writes it (`param_kind = map`: the params are an object).
fn encode_request(id: u64, request: &GenerateRequest) -> String {
    let params = to_raw_value(&serde_json::json!({ "request": request })).expect("a request serializes");
    let req = Request::owned("generate".to_string(), Some(params), Id::Number(id));
    serde_json::to_string(&req).expect("a request serializes")
}

fn decode_event(line: &str) -> GenerateEvent {
    // jsonrpsee's client tries a response first; a notification fails that parse.
    if serde_json::from_str::<Response<&RawValue>>(line).is_ok() {
        panic!("a notification parsed as a response");
    }
    let notif: SubscriptionResponse<&RawValue> = serde_json::from_str(line).expect("a notification");
    serde_json::from_str(notif.params.result.get()).expect("an event")
}

fn decode_request(line: &str) -> GenerateRequest {
    #[derive(serde::Deserialize)]
    struct Params {
        request: GenerateRequest,
    }
    let envelope: serde_json::Value = serde_json::from_str(line).expect("JSON");
    assert!(envelope.get("id").is_some());
    let req: Request = serde_json::from_str(line).expect("a request");
    let params: Params = serde_json::from_str(req.params.expect("params").get()).expect("params");
    params.request
}

fn codec(c: &mut Criterion) {
    let token_line = encode_event(&token());
    assert_eq!(decode_event(&token_line), token());
    let request_line = encode_request(7, &request());
    assert_eq!(decode_request(&request_line), request());

    let mut g = c.benchmark_group("token_event");
    g.throughput(Throughput::Elements(1));
    g.bench_function("encode", |b| {
        let event = token();
        b.iter(|| encode_event(black_box(&event)))
    });
    g.bench_function("decode", |b| b.iter(|| decode_event(black_box(&token_line))));
    g.finish();

    let mut g = c.benchmark_group("final_event");
    g.throughput(Throughput::Elements(1));
    let final_line = encode_event(&final_event());
    g.bench_function("encode", |b| {
        let event = final_event();
        b.iter(|| encode_event(black_box(&event)))
    });
    g.bench_function("decode", |b| b.iter(|| decode_event(black_box(&final_line))));
    g.finish();

    let mut g = c.benchmark_group("generate_request");
    g.throughput(Throughput::Elements(1));
    g.bench_function("encode", |b| {
        let req = request();
        b.iter(|| encode_request(7, black_box(&req)))
    });
    g.bench_function("decode", |b| b.iter(|| decode_request(black_box(&request_line))));
    g.finish();
}

fn framing(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().build().expect("a runtime");
    let line = encode_event(&token());
    let mut input = Vec::new();
    for _ in 0..LINES {
        input.extend_from_slice(line.as_bytes());
        input.push(b'\n');
    }
    let mut g = c.benchmark_group("framing");
    g.throughput(Throughput::Elements(LINES as u64));
    g.bench_function("read_line", |b| {
        b.iter(|| {
            rt.block_on(async {
                let mut reader = LineReader::new(black_box(&input[..]), DEFAULT_MAX_LINE_BYTES);
                let mut n = 0;
                while let Some(l) = reader.next_line().await.expect("a line") {
                    n += l.len();
                }
                n
            })
        })
    });
    g.bench_function("write_line", |b| {
        b.iter(|| {
            rt.block_on(async {
                let mut out = tokio::io::sink();
                for _ in 0..LINES {
                    write_line(&mut out, black_box(&line)).await.expect("a sink takes anything");
                }
            })
        })
    });
    g.finish();
}

/// Answers `generate` with a subscription, then writes as many token lines as `go` says and a
/// final event; answers `generate_unsubscribe` with `true`.
async fn fake_worker(input: DuplexStream, mut output: DuplexStream, mut go: mpsc::Receiver<u64>) {
    let token_line = encode_event(&token());
    let final_line = encode_event(&final_event());
    let mut lines = LineReader::new(input, DEFAULT_MAX_LINE_BYTES);
    while let Ok(Some(line)) = lines.next_line().await {
        let req: serde_json::Value = serde_json::from_str(&line).expect("a request");
        let id = &req["id"];
        if req["method"] == "generate" {
            let reply = serde_json::json!({"jsonrpc": "2.0", "id": id, "result": SUBSCRIPTION});
            write_line(&mut output, &reply.to_string()).await.expect("the pipe is open");
            let Some(n) = go.recv().await else { return };
            for _ in 0..n {
                output.write_all(token_line.as_bytes()).await.expect("the pipe is open");
                output.write_all(b"\n").await.expect("the pipe is open");
            }
            write_line(&mut output, &final_line).await.expect("the pipe is open");
        } else {
            let reply = serde_json::json!({"jsonrpc": "2.0", "id": id, "result": true});
            write_line(&mut output, &reply.to_string()).await.expect("the pipe is open");
        }
    }
}

/// Times `n` token events and the final one through a client connected to a fake worker.
fn run_stream<S, F, Fut>(rt: &Runtime, go: &mpsc::Sender<u64>, iters: u64, subscribe: F) -> Duration
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = S>,
    S: EventSource,
{
    rt.block_on(async {
        let mut total = Duration::ZERO;
        let mut left = iters;
        while left > 0 {
            let n = left.min(LINES as u64);
            let mut sub = subscribe().await;
            let start = Instant::now();
            go.send(n).await.expect("the fake worker runs");
            for _ in 0..n {
                match sub.next_event().await {
                    Some(GenerateEvent::Token(t)) => {
                        black_box(t);
                    }
                    other => panic!("expected a token, got {other:?}"),
                }
            }
            match sub.next_event().await {
                Some(GenerateEvent::Final(_)) => {}
                other => panic!("expected the final event, got {other:?}"),
            }
            total += start.elapsed();
            left -= n;
        }
        total
    })
}

trait EventSource {
    async fn next_event(&mut self) -> Option<GenerateEvent>;
}

impl EventSource for Subscription<GenerateEvent> {
    async fn next_event(&mut self) -> Option<GenerateEvent> {
        self.next().await.map(|e| e.expect("an event"))
    }
}

impl EventSource for mlx_serving_protocol::link::EventStream {
    async fn next_event(&mut self) -> Option<GenerateEvent> {
        self.next().await.map(|e| e.expect("an event"))
    }
}

fn client(c: &mut Criterion) {
    let rt: Runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
    let fake = || {
        let (to_worker, worker_in) = tokio::io::duplex(64 * 1024);
        let (worker_out, from_worker) = tokio::io::duplex(64 * 1024);
        let (go, go_rx) = mpsc::channel(1);
        tokio::spawn(fake_worker(worker_in, worker_out, go_rx));
        (to_worker, LineReader::new(from_worker, DEFAULT_MAX_LINE_BYTES), go)
    };
    let (link, link_go) = rt.block_on(async {
        let (to_worker, from_worker, go) = fake();
        (WorkerLink::new(to_worker, from_worker, Duration::from_secs(30)), go)
    });
    let (client, client_go) = rt.block_on(async {
        let (to_worker, from_worker, go) = fake();
        let client = ClientBuilder::default()
            .request_timeout(Duration::from_secs(30))
            .max_buffer_capacity_per_subscription(64 * 1024)
            .build_with_tokio(PipeSender(to_worker), PipeReceiver(from_worker));
        (client, go)
    });
    let req = request();
    let mut g = c.benchmark_group("client");
    g.throughput(Throughput::Elements(1));
    g.bench_function("link", |b| {
        b.iter_custom(|iters| {
            run_stream(&rt, &link_go, iters, || async { link.generate(&req).await.expect("subscribed") })
        })
    });
    g.bench_function("jsonrpsee", |b| {
        b.iter_custom(|iters| {
            run_stream(&rt, &client_go, iters, || async { client.generate(req.clone()).await.expect("subscribed") })
        })
    });
    g.finish();
}

criterion_group!(benches, codec, framing, client);
criterion_main!(benches);
