//! SSE encoding: a token event from the pool's channel to the bytes of one
//! `data: {chat.completion.chunk}\n\n` frame of the HTTP body, through [`stream::sse`], as the
//! HTTP front runs it (Prometheus recorder installed, keep-alive timer armed).
//!
//! `cargo bench -p mlx-serving-supervisor --bench sse`
//!
//! Each iteration sends one event into the channel and reads one frame from the body, so every
//! token becomes its own chunk; `merged_8` sends eight before reading, which the stream merges
//! into one chunk (a reader that fell behind). Creating the stream is outside the timing.
use std::hint::black_box;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::response::IntoResponse;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use http_body_util::BodyExt;
use mlx_serving_protocol::{FinalEvent, FinishReason, GenerateEvent, TokenEvent, Usage};
use mlx_serving_supervisor::StreamItem;
use mlx_serving_supervisor::api::openai::{self, Route, TokenLimits};
use mlx_serving_supervisor::api::shared::Feed;
use mlx_serving_supervisor::api::stream;
use mlx_serving_supervisor::pool::PoolEvent;
use tokio::runtime::Runtime;
use tokio::sync::mpsc;

/// Tokens per stream; a longer run takes several streams.
const STREAM_TOKENS: u64 = 4096;

struct Case {
    name: &'static str,
    route: Route,
    body: &'static str,
    /// Tokens sent before each read.
    batch: u64,
}

const CASES: &[Case] = &[
    Case {
        name: "chat",
        route: Route::Chat,
        body: r#"{"model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "stream": true}"#,
        batch: 1,
    },
    Case {
        name: "chat_logprobs_token_ids",
        route: Route::Chat,
        body: r#"{"model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "stream": true, "logprobs": true, "return_token_ids": true}"#,
        batch: 1,
    },
    Case {
        name: "completions",
        route: Route::Completions,
        body: r#"{"model": "tiny", "prompt": "Hello", "stream": true}"#,
        batch: 1,
    },
    Case {
        name: "chat_merged_8",
        route: Route::Chat,
        body: r#"{"model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "stream": true}"#,
        batch: 8,
    },
];

fn token() -> StreamItem {
    Ok(PoolEvent::Event(GenerateEvent::Token(TokenEvent {
        token_ids: vec![646],
        text: " Hi".to_string(),
        logprobs: Some(vec![-0.53]),
        top_logprobs: None,
    })))
}

fn final_event(tokens: u64) -> StreamItem {
    Ok(PoolEvent::Event(GenerateEvent::Final(FinalEvent {
        finish_reason: FinishReason::Length,
        text: String::new(),
        usage: Usage { prompt_tokens: 12, completion_tokens: tokens as usize, cached_tokens: 0 },
        time_to_first_token_ms: Some(25.1),
        total_ms: 135.8,
        error: None,
    })))
}

async fn data_frame(body: &mut Body) -> axum::body::Bytes {
    let frame = body.frame().await.expect("the stream goes on").expect("no error");
    frame.into_data().expect("a data frame")
}

/// Times `tokens` tokens (rounded up to whole batches) through one stream.
async fn run_stream(case: &Case, tokens: u64) -> Duration {
    let limits = TokenLimits { default_max_tokens: 512, max_tokens: 0 };
    let req =
        openai::parse(case.route, case.body.as_bytes(), &limits, "req-4f1c2a9b0d3e5f67").expect("a valid request");
    let meta = stream::Meta::new(&req, "req-4f1c2a9b0d3e5f67", Instant::now());
    let (tx, rx) = mpsc::channel(64);
    let mut body = stream::sse(meta, &req, Feed::Direct(rx), None, 15).into_response().into_body();
    if case.route == Route::Chat {
        let role = data_frame(&mut body).await;
        assert!(role.starts_with(b"data: {"), "{role:?}");
    }
    let start = Instant::now();
    let mut sent = 0;
    while sent < tokens {
        for _ in 0..case.batch {
            tx.send(token()).await.expect("the stream is open");
        }
        sent += case.batch;
        black_box(data_frame(&mut body).await);
    }
    let elapsed = start.elapsed();
    tx.send(final_event(sent)).await.expect("the stream is open");
    drop(tx);
    while let Some(frame) = body.frame().await {
        black_box(frame.expect("no error"));
    }
    elapsed
}

fn sse(c: &mut Criterion) {
    mlx_serving_supervisor::metrics::install();
    let rt: Runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
    // One frame, to show what is measured.
    rt.block_on(async {
        let case = &CASES[0];
        let limits = TokenLimits { default_max_tokens: 512, max_tokens: 0 };
        let req = openai::parse(case.route, case.body.as_bytes(), &limits, "req-1").expect("a valid request");
        let (tx, rx) = mpsc::channel(64);
        let mut body = stream::sse(stream::Meta::new(&req, "req-1", Instant::now()), &req, Feed::Direct(rx), None, 15)
            .into_response()
            .into_body();
        data_frame(&mut body).await;
        tx.send(token()).await.expect("the stream is open");
        let frame = data_frame(&mut body).await;
        eprintln!("one token's frame: {:?}", String::from_utf8_lossy(&frame));
    });
    let mut g = c.benchmark_group("sse_token");
    for case in CASES {
        g.throughput(Throughput::Elements(case.batch));
        g.bench_function(case.name, |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let mut total = Duration::ZERO;
                    let mut left = iters * case.batch;
                    while left > 0 {
                        let n = left.min(STREAM_TOKENS);
                        total += run_stream(case, n).await;
                        left -= n;
                    }
                    total
                })
            })
        });
    }
    g.finish();
}

criterion_group!(benches, sse);
criterion_main!(benches);
