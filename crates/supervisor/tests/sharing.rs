//! Identical deterministic requests through the real HTTP front and real workers: coalesced
//! onto one generation, and answered from the response cache.
mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use mlx_serving_protocol::RequestCounts;
use mlx_serving_supervisor::api::{self, ApiState};
use mlx_serving_supervisor::config::{HttpConfig, ResponseCacheConfig};
use mlx_serving_supervisor::{Config, Pool, PoolEvent, StreamItem};
use serde_json::{Value, json};
use tokio::sync::mpsc;

/// The HTTP API on a free port, in this process.
struct Api {
    addr: SocketAddr,
    state: Arc<ApiState>,
}

async fn serve(pool: &Arc<Pool>, http: HttpConfig) -> Api {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let state = Arc::new(ApiState::new(pool.clone(), http, mlx_serving_supervisor::metrics::install()));
    let router = api::router(state.clone());
    tokio::spawn(async move { axum::serve(listener, router).await });
    Api { addr, state }
}

/// One worker that takes one request at a time, so a held request keeps the others waiting.
fn one_at_a_time() -> Config {
    let mut c = config(1);
    c.pool.max_in_flight_per_worker = 1;
    // A held request's worker finishes and then stands still with a request in flight.
    c.pool.stall_timeout_ms = 120_000;
    c
}

/// Takes the only place on the worker until the returned stream is dropped: the caller does not
/// read it, so it cannot end (it has more tokens than the pool buffers).
async fn occupy(pool: &Arc<Pool>) -> mpsc::Receiver<StreamItem> {
    let mut rx = pool.generate(request("blocker", "hold the worker", 600));
    assert_eq!(rx.recv().await, Some(Ok(PoolEvent::Started)));
    rx
}

/// The workers' own request counts, summed.
async fn counts(pool: &Pool) -> RequestCounts {
    let mut total = RequestCounts::default();
    for slot in pool.slots() {
        let Some(conn) = slot.lock().conn.clone() else { continue };
        let c = conn.client.stats().await.expect("stats").requests;
        total.accepted += c.accepted;
        total.cancelled += c.cancelled;
        total.length += c.length;
        total.stopped += c.stopped;
    }
    total
}

async fn connect(
    addr: SocketAddr,
    path: &str,
    body: &Value,
) -> (hyper::Response<Incoming>, tokio::task::JoinHandle<()>) {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
    let conn = tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = hyper::Request::post(path)
        .header("content-type", "application/json")
        .header("host", "localhost")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    (sender.send_request(req).await.unwrap(), conn)
}

/// What a client got, from a JSON body or an SSE stream.
#[derive(Debug, PartialEq)]
struct Answer {
    status: u16,
    x_cache: Option<String>,
    text: String,
    token_ids: Vec<u64>,
    finish_reason: String,
    usage: Value,
}

fn text_of(choice: &Value) -> &str {
    choice["message"]["content"]
        .as_str()
        .or(choice["delta"]["content"].as_str())
        .or(choice["text"].as_str())
        .unwrap_or("")
}

async fn call(addr: SocketAddr, path: &str, body: &Value) -> Answer {
    let (response, _conn) = connect(addr, path, body).await;
    let status = response.status().as_u16();
    let x_cache = response.headers().get("x-cache").map(|v| v.to_str().unwrap().to_string());
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8(bytes.to_vec()).unwrap();
    let mut a = Answer {
        status,
        x_cache,
        text: String::new(),
        token_ids: Vec::new(),
        finish_reason: String::new(),
        usage: Value::Null,
    };
    if status != 200 {
        a.text = text;
        return a;
    }
    let mut add = |v: &Value| {
        if let Some(choice) = v["choices"].get(0) {
            a.text.push_str(text_of(choice));
            a.token_ids.extend(choice["token_ids"].as_array().into_iter().flatten().map(|t| t.as_u64().unwrap()));
            if let Some(r) = choice["finish_reason"].as_str() {
                a.finish_reason = r.to_string();
            }
        }
        if !v["usage"].is_null() {
            a.usage = v["usage"].clone();
        }
    };
    if body["stream"] == true {
        let data: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
        assert_eq!(data.last(), Some(&"[DONE]"), "{text}");
        for d in &data[..data.len() - 1] {
            add(&serde_json::from_str(d).unwrap());
        }
    } else {
        add(&serde_json::from_str(&text).unwrap());
    }
    a
}

/// Reads `n` SSE events of a stream, then goes away.
async fn read_then_leave(addr: SocketAddr, body: &Value, n: usize) {
    let (response, conn) = connect(addr, "/v1/chat/completions", body).await;
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let mut seen = 0;
    while seen < n {
        let frame = body.frame().await.expect("the stream ended early").unwrap();
        if let Some(data) = frame.data_ref() {
            seen += String::from_utf8_lossy(data).matches("data: ").count();
        }
    }
    drop(body);
    conn.abort();
}

fn chat(content: &str, max_tokens: usize) -> Value {
    json!({
        "model": "m", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
        "temperature": 0, "ignore_eos": true, "return_token_ids": true,
    })
}

fn streaming(mut body: Value) -> Value {
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    body
}

/// The same answer, as far as a client can tell (ids and timestamps aside).
fn same_output(a: &Answer, b: &Answer) {
    assert_eq!(
        (a.status, &a.text, &a.token_ids, &a.finish_reason, &a.usage),
        (b.status, &b.text, &b.token_ids, &b.finish_reason, &b.usage)
    );
}

/// The same output from two generations: a worker's prefix cache may serve one's prompt, so
/// `cached_tokens` may differ.
fn same_tokens(a: &Answer, b: &Answer) {
    let counts = |x: &Answer| (x.usage["prompt_tokens"].clone(), x.usage["completion_tokens"].clone());
    assert_eq!(
        (a.status, &a.text, &a.token_ids, &a.finish_reason, counts(a)),
        (b.status, &b.text, &b.token_ids, &b.finish_reason, counts(b))
    );
}

/// Waits until no worker runs or queues anything and no request is in flight.
async fn idle(pool: &Pool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let mut busy = pool.status().workers.iter().any(|w| w.in_flight > 0);
        for slot in pool.slots() {
            let Some(conn) = slot.lock().conn.clone() else { continue };
            let stats = conn.client.stats().await.expect("stats");
            busy |= stats.active_sequences > 0 || stats.queue_depth > 0;
        }
        if !busy {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "the workers did not become idle: {:?}", pool.status().workers);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_identical_greedy_requests_share_one_generation() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let pool = started(one_at_a_time()).await;
        let api = serve(&pool, HttpConfig::default()).await;
        let blocker = occupy(&pool).await;
        let before = counts(&pool).await;
        let body = chat("Tell me a story.", 24);
        let mut clients = Vec::new();
        for i in 0..20 {
            // Streaming and non-streaming clients share.
            let body = if i % 2 == 0 { streaming(body.clone()) } else { body.clone() };
            let addr = api.addr;
            clients.push(tokio::spawn(async move { call(addr, "/v1/chat/completions", &body).await }));
        }
        // All twenty are in before the generation can start.
        let hub = api.state.hub.clone();
        assert!(eventually(Duration::from_secs(60), || hub.coalesced() == 19).await, "coalesced: {}", hub.coalesced());
        drop(blocker);
        let mut answers = Vec::new();
        for c in clients {
            answers.push(c.await.unwrap());
        }
        let first = &answers[0];
        assert_eq!(
            (first.status, first.finish_reason.as_str(), first.token_ids.len()),
            (200, "length", 24),
            "{first:?}"
        );
        assert_eq!(first.usage["completion_tokens"], 24);
        assert_eq!(first.x_cache, None, "no x-cache header without the cache");
        for a in &answers {
            same_output(a, first);
        }
        let after = counts(&pool).await;
        assert_eq!(after.accepted - before.accepted, 1, "the worker ran one generation for twenty requests");

        // The same request alone, now that nothing runs: a generation of its own, the same output.
        let alone = call(api.addr, "/v1/chat/completions", &body).await;
        same_tokens(&alone, first);
        assert_eq!(counts(&pool).await.accepted - after.accepted, 1);
        assert_eq!(hub.coalesced(), 19);
        pool.shutdown(Duration::from_secs(5)).await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_leaves_does_not_end_the_generation_of_the_others() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let pool = started(one_at_a_time()).await;
        let api = serve(&pool, HttpConfig::default()).await;
        let blocker = occupy(&pool).await;
        let body = streaming(chat("Count to a hundred.", 300));
        let mut stayers = Vec::new();
        for _ in 0..2 {
            let (addr, body) = (api.addr, body.clone());
            stayers.push(tokio::spawn(async move { call(addr, "/v1/chat/completions", &body).await }));
        }
        let quitter = {
            let (addr, body) = (api.addr, body.clone());
            tokio::spawn(async move { read_then_leave(addr, &body, 3).await })
        };
        let hub = api.state.hub.clone();
        assert!(eventually(Duration::from_secs(60), || hub.coalesced() == 2).await);
        drop(blocker);
        quitter.await.unwrap();
        let a = stayers.remove(0).await.unwrap();
        let b = stayers.remove(0).await.unwrap();
        assert_eq!((a.status, a.finish_reason.as_str(), a.token_ids.len()), (200, "length", 300), "{a:?}");
        same_output(&a, &b);

        // When every subscriber goes away, the generation is cancelled on the worker.
        idle(&pool).await;
        let before = counts(&pool).await;
        let body = streaming(chat("Count to a thousand.", 900));
        let leavers: Vec<_> = (0..2)
            .map(|_| {
                let (addr, body) = (api.addr, body.clone());
                tokio::spawn(async move { read_then_leave(addr, &body, 2).await })
            })
            .collect();
        for l in leavers {
            l.await.unwrap();
        }
        idle(&pool).await;
        let after = counts(&pool).await;
        assert_eq!(after.accepted - before.accepted, after.cancelled - before.cancelled, "{before:?} {after:?}");
        assert!(after.cancelled > before.cancelled, "{before:?} {after:?}");
        pool.shutdown(Duration::from_secs(5)).await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampled_requests_without_a_seed_are_not_coalesced() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let pool = started(one_at_a_time()).await;
        let api = serve(&pool, HttpConfig::default()).await;
        let blocker = occupy(&pool).await;
        let before = counts(&pool).await;
        let mut sampled = chat("Pick a word.", 4);
        sampled["temperature"] = json!(0.8);
        let mut seeded = sampled.clone();
        seeded["seed"] = json!(5);
        let mut clients = Vec::new();
        for body in [&sampled, &sampled, &sampled, &sampled, &seeded, &seeded] {
            let (addr, body) = (api.addr, body.clone());
            clients.push(tokio::spawn(async move { call(addr, "/v1/chat/completions", &body).await }));
        }
        // The blocker, four sampled requests and one seeded generation wait in the pool.
        let hub = api.state.hub.clone();
        assert!(eventually(Duration::from_secs(60), || hub.coalesced() == 1 && pool.queue_depth("m") == 6).await);
        drop(blocker);
        let answers: Vec<Answer> =
            futures_util::future::join_all(clients).await.into_iter().map(Result::unwrap).collect();
        assert!(answers.iter().all(|a| a.status == 200 && a.token_ids.len() == 4), "{answers:?}");
        same_output(&answers[4], &answers[5]);
        assert_eq!(
            counts(&pool).await.accepted - before.accepted,
            5,
            "four sampled requests ran apart, the seeded two together"
        );
        assert_eq!(hub.coalesced(), 1);
        pool.shutdown(Duration::from_secs(5)).await;
    })
    .await
    .expect("test timed out");
}

fn cache(ttl_s: u64) -> HttpConfig {
    HttpConfig {
        response_cache: ResponseCacheConfig { enabled: true, max_bytes: 1 << 20, ttl_s },
        ..HttpConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeat_is_answered_from_the_cache_as_json_or_as_a_stream() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let pool = started(config(1)).await;
        let api = serve(&pool, cache(600)).await;
        let mut body = chat("What is free software?", 12);
        body["logprobs"] = json!(true);
        let first = call(api.addr, "/v1/chat/completions", &body).await;
        assert_eq!(first.x_cache.as_deref(), Some("miss"));
        assert_eq!((first.status, first.token_ids.len()), (200, 12), "{first:?}");
        let ran = counts(&pool).await.accepted;

        let again = call(api.addr, "/v1/chat/completions", &body).await;
        assert_eq!(again.x_cache.as_deref(), Some("hit"));
        same_output(&again, &first);
        let streamed = call(api.addr, "/v1/chat/completions", &streaming(body.clone())).await;
        assert_eq!(streamed.x_cache.as_deref(), Some("hit"));
        same_output(&streamed, &first);
        assert_eq!(counts(&pool).await.accepted, ran, "a hit does not reach a worker");

        // Another parameter is another answer; a sampled request is never cached.
        let mut longer = body.clone();
        longer["max_tokens"] = json!(13);
        assert_eq!(call(api.addr, "/v1/chat/completions", &longer).await.x_cache.as_deref(), Some("miss"));
        let mut sampled = body.clone();
        sampled["temperature"] = json!(0.9);
        for _ in 0..2 {
            assert_eq!(call(api.addr, "/v1/chat/completions", &sampled).await.x_cache.as_deref(), Some("miss"));
        }
        assert_eq!(counts(&pool).await.accepted, ran + 3);
        let completion = json!({"model": "m", "prompt": "Free software is", "max_tokens": 5, "temperature": 0});
        assert_eq!(call(api.addr, "/v1/completions", &completion).await.x_cache.as_deref(), Some("miss"));
        let hit = call(api.addr, "/v1/completions", &completion).await;
        assert_eq!((hit.status, hit.x_cache.as_deref()), (200, Some("hit")));
        assert_eq!(api.state.hub.cache().unwrap().stats().entries, 3);
        pool.shutdown(Duration::from_secs(5)).await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_answer_expires_after_its_ttl() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let pool = started(config(1)).await;
        let api = serve(&pool, cache(1)).await;
        let body = chat("Say something.", 4);
        let first = call(api.addr, "/v1/chat/completions", &body).await;
        assert_eq!(first.x_cache.as_deref(), Some("miss"));
        let ran = counts(&pool).await.accepted;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(api.state.hub.cache().unwrap().stats().entries, 0);
        let again = call(api.addr, "/v1/chat/completions", &body).await;
        assert_eq!(again.x_cache.as_deref(), Some("miss"), "expired answers are not served");
        same_tokens(&again, &first);
        assert_eq!(counts(&pool).await.accepted, ran + 1);
        pool.shutdown(Duration::from_secs(5)).await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_cache_nothing_is_cached_and_there_is_no_header() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let pool = started(config(1)).await;
        let api = serve(&pool, HttpConfig::default()).await;
        assert!(api.state.hub.cache().is_none());
        let body = chat("Say something.", 4);
        let before = counts(&pool).await.accepted;
        let a = call(api.addr, "/v1/chat/completions", &body).await;
        let b = call(api.addr, "/v1/chat/completions", &body).await;
        assert_eq!((a.x_cache.as_deref(), b.x_cache.as_deref()), (None, None));
        same_tokens(&a, &b);
        assert_eq!(counts(&pool).await.accepted, before + 2, "each request ran on the worker");
        pool.shutdown(Duration::from_secs(5)).await;
    })
    .await
    .expect("test timed out");
}
