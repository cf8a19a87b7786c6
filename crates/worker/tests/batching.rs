//! Continuous batching through the real worker: concurrent streams produce what each produces
//! alone; cancelling one leaves the others intact.
mod common;

use std::sync::Arc;

use common::*;
use mlx_serving_protocol::{FinishReason, GenerateEvent, GenerateRequest, Prompt, Sampling, WorkerRpcClient};
use serde::Deserialize;

#[derive(Deserialize)]
struct Golden {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    prompt_ids: Vec<u32>,
    greedy_tokens: Vec<u32>,
}

fn golden() -> Golden {
    let path = fixtures().join("golden").join(format!("{MODEL}.json"));
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// 16 requests that differ in prompt length (one longer than several prefill chunks), output
/// length and sampling, so sequences join and leave the batch at different steps.
fn sixteen_requests() -> Vec<GenerateRequest> {
    let g = golden();
    let mut out = Vec::new();
    for (i, case) in g.cases.iter().enumerate() {
        out.push(request(&format!("golden-{i}"), Prompt::TokenIds(case.prompt_ids.clone()), case.greedy_tokens.len()));
    }
    let long: String = (0..60).map(|i| format!("line {i} of a long prompt. ")).collect();
    out.push(request("long", Prompt::Text(long), 24));
    let mut i = 0;
    while out.len() < 16 {
        let mut r = request(
            &format!("text-{i}"),
            Prompt::Text(format!("Request number {i} asks about {}", "free software ".repeat(i % 5 + 1))),
            8 + 9 * i,
        );
        if i % 6 == 5 {
            r.sampling = Sampling { temperature: 0.8, top_p: 0.9, seed: Some(i as u64), ..Sampling::default() };
        }
        if i == 3 {
            r.prompt =
                Prompt::Messages(vec![mlx_serving_protocol::Message { role: "user".into(), content: "Hello!".into() }]);
        }
        out.push(r);
        i += 1;
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_concurrent_streams_equal_each_alone() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let w = with_model(&["--prefill-chunk", "64", "--max-sequences", "16"]).await;
        let requests = sixteen_requests();

        let mut alone = Vec::new();
        for r in &requests {
            alone.push(collect(w.client.generate(r.clone()).await.expect("generate")).await);
        }
        // The worker's greedy output is mlx-lm's.
        for (i, case) in golden().cases.iter().enumerate() {
            assert_eq!(alone[i].tokens, case.greedy_tokens, "golden case {i} differs from mlx-lm");
        }

        // On this worker, and on one that prefills prompts of different lengths as rows of one
        // batch (on the CPU only prompts of equal length are, unless told otherwise).
        let rows = with_model(&["--prefill-chunk", "64", "--max-sequences", "16", "--prefill-row-padding", "1"]).await;
        for (w, served_before) in [(w, 16), (rows, 0)] {
            let client = Arc::new(w.client);
            let mut tasks = Vec::new();
            for r in requests.clone() {
                let client = client.clone();
                tasks.push(tokio::spawn(async move { collect(client.generate(r).await.expect("generate")).await }));
            }
            for ((task, alone), r) in tasks.into_iter().zip(&alone).zip(&requests) {
                let together = task.await.unwrap();
                assert_eq!(together.tokens, alone.tokens, "stream {} changed when batched", r.id);
                assert_eq!(together.text, alone.text, "stream {} text changed when batched", r.id);
                assert_eq!(together.last.finish_reason, FinishReason::Length, "stream {}", r.id);
                assert_eq!(together.last.usage.completion_tokens, r.max_tokens);
            }
            let stats = client.stats().await.unwrap();
            assert_eq!(stats.active_sequences, 0);
            assert_eq!(stats.kv_reserved_bytes, 0, "every reservation is released");
            assert_eq!(stats.requests.length, served_before + 16);
        }
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_one_stream_leaves_the_others_intact() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let w = with_model(&[]).await;
        let make = |i: usize| request(&format!("s{i}"), Prompt::Text(format!("Stream {i} says hello")), 300);
        let mut alone = Vec::new();
        for i in 1..4 {
            alone.push(collect(w.client.generate(make(i)).await.unwrap()).await);
        }

        let client = Arc::new(w.client);
        let mut victim = client.generate(make(0)).await.unwrap();
        let mut others = Vec::new();
        for i in 1..4 {
            let client = client.clone();
            others.push(tokio::spawn(async move { collect(client.generate(make(i)).await.unwrap()).await }));
        }
        // Cancel once the victim has streamed a few tokens.
        let mut seen = 0;
        while seen < 5 {
            match victim.next().await.unwrap().unwrap() {
                GenerateEvent::Token(_) => seen += 1,
                GenerateEvent::Final(f) => panic!("ended before the cancel: {f:?}"),
            }
        }
        assert!(client.cancel("s0".into()).await.unwrap(), "the running request is found");
        let rest = collect(victim).await;
        assert_eq!(rest.last.finish_reason, FinishReason::Cancelled);
        assert!(rest.last.usage.completion_tokens < 300);

        for (task, alone) in others.into_iter().zip(alone) {
            let got = task.await.unwrap();
            assert_eq!(got.last.finish_reason, FinishReason::Length);
            assert_eq!(got.tokens, alone.tokens, "a neighbour of the cancelled stream changed");
        }
        assert!(!client.cancel("s0".into()).await.unwrap(), "an ended request is not found");

        // Dropping a subscription (the caller went away) cancels too, and frees the slot.
        let mut dropped = client.generate(make(7)).await.unwrap();
        let _ = dropped.next().await;
        drop(dropped);
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let s = client.stats().await.unwrap();
            if s.active_sequences == 0 {
                assert_eq!(s.kv_reserved_bytes, 0);
                assert_eq!(s.requests.cancelled, 2);
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "the dropped stream was never cancelled");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_request_continues_exactly_where_the_first_stopped() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let w = with_model(&[]).await;
        let mut sampled = request("s", Prompt::Text("Resume me".into()), 40);
        sampled.sampling = Sampling { temperature: 0.9, seed: Some(3), ..Sampling::default() };
        for base in [request("g", Prompt::Text("Resume me".into()), 40), sampled] {
            let whole = collect(w.client.generate(base.clone()).await.unwrap()).await;
            for cut in [10, 40] {
                let mut resumed = base.clone();
                resumed.id = format!("{}-{cut}", base.id);
                resumed.resume_tokens = whole.tokens[..cut].to_vec();
                let rest = collect(w.client.generate(resumed).await.unwrap()).await;
                assert_eq!(rest.tokens, whole.tokens[cut..], "{} resumed after {cut}", base.id);
                assert_eq!(rest.last.finish_reason, FinishReason::Length);
                assert_eq!(rest.last.usage.completion_tokens, 40);
                assert_eq!(rest.last.usage.prompt_tokens, whole.last.usage.prompt_tokens);
            }
        }
        let mut too_many = request("x", Prompt::Text("Resume me".into()), 4);
        too_many.resume_tokens = vec![5; 5];
        let Err(err) = w.client.generate(too_many).await else {
            panic!("resume_tokens beyond max_tokens was admitted")
        };
        let err = err.to_string();
        assert!(err.contains("resume_tokens"), "{err}");
    })
    .await
    .expect("test timed out");
}

/// Runs `turns` of a chat on `w`: each turn's prompt is the conversation so far (earlier replies
/// included) plus a new user message. Returns each turn's tokens and cached prompt tokens.
async fn chat_turns(w: &Connected, name: &str, turns: usize) -> Vec<(Vec<u32>, usize)> {
    let mut messages = vec![mlx_serving_protocol::Message {
        role: "system".into(),
        content: "You are a patient assistant who answers questions about free software licences.".into(),
    }];
    let mut out = Vec::new();
    for t in 0..turns {
        messages.push(mlx_serving_protocol::Message {
            role: "user".into(),
            content: format!("Question {t} from {name}: what does clause {t} allow?"),
        });
        let r = request(&format!("{name}-{t}"), Prompt::Messages(messages.clone()), 12);
        let s = collect(w.client.generate(r).await.expect("generate")).await;
        messages.push(mlx_serving_protocol::Message { role: "assistant".into(), content: s.text.clone() });
        out.push((s.tokens, s.last.usage.cached_tokens));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_prefix_cache_skips_earlier_turns_and_changes_no_token() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let cached = with_model(&["--prefill-chunk", "16"]).await;
        let plain = with_model(&["--prefill-chunk", "16", "--prefix-cache-bytes", "0"]).await;
        for name in ["ada", "bob"] {
            let with = chat_turns(&cached, name, 4).await;
            let without = chat_turns(&plain, name, 4).await;
            for (t, (a, b)) in with.iter().zip(&without).enumerate() {
                assert_eq!(a.0, b.0, "{name} turn {t}: the prefix cache changed the tokens");
                assert_eq!(b.1, 0, "no prefix cache, no cached tokens");
                if t > 0 {
                    assert!(a.1 > 0, "{name} turn {t} reused nothing from the earlier turns");
                }
            }
        }
        let s = cached.client.stats().await.unwrap().prefix_cache;
        assert!(s.hits >= 6 && s.cached_tokens > 0 && s.entries > 0 && s.bytes > 0, "{s:?}");
        let limits = cached.client.stats().await.unwrap().limits;
        assert_eq!(limits.prefix_cache_bytes, 512 << 20);
        assert_eq!(plain.client.stats().await.unwrap().prefix_cache.hits, 0);
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_prefix_cache_stays_within_its_budget() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        // Room for a couple of short sequences at most.
        let w = with_model(&["--prefix-cache-bytes", "200000"]).await;
        for i in 0..12 {
            let prompt = Prompt::Text(format!("Distinct prompt {i}: {}", "words ".repeat(i + 3)));
            collect(w.client.generate(request(&format!("p{i}"), prompt, 8)).await.expect("generate")).await;
        }
        let s = w.client.stats().await.unwrap().prefix_cache;
        assert!(s.bytes <= 200000, "{s:?}");
        assert!(s.evictions > 0, "{s:?}");
    })
    .await
    .expect("test timed out");
}

/// While a stream decodes, a prefill chunk takes as many tokens as the model prefills in
/// `--prefill-stall-ms` (up to `--prefill-chunk-idle`); with 0 each chunk takes `--prefill-chunk`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_worker_prefills_as_much_as_its_stall_allows() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let prompt: Vec<u32> = (0..400u32).map(|i| 3 + (i * 7) % 900).collect();
        let mut runs = Vec::new();
        for stall in ["1000", "0"] {
            let w = with_model(&["--prefill-chunk", "8", "--prefill-chunk-idle", "4096", "--prefill-stall-ms", stall])
                .await;
            // A stream that decodes throughout; once it has a token, the model's speed is known.
            let mut long = w.client.generate(request("long", Prompt::TokenIds(vec![5; 8]), 600)).await.unwrap();
            assert!(matches!(long.next().await.unwrap().unwrap(), GenerateEvent::Token(_)));
            let before = w.client.stats().await.unwrap();
            let s = collect(w.client.generate(request("p", Prompt::TokenIds(prompt.clone()), 1)).await.unwrap()).await;
            let after = w.client.stats().await.unwrap();
            assert_eq!(s.last.finish_reason, FinishReason::Length);
            assert_eq!(after.progress.prefilled_tokens - before.progress.prefilled_tokens, 399);
            assert_eq!(after.active_sequences, 1, "the long stream ended before the prompt: nothing was measured");
            runs.push((after.progress.steps - before.progress.steps, s.tokens));
            assert_eq!(collect(long).await.last.finish_reason, FinishReason::Length);
        }
        // 399 prompt tokens: with a stall of a second, one chunk (this CPU prefills thousands of
        // tokens a second on the fixture); with none, 50 chunks of 8, one per engine step. The
        // steps in between also count the stats calls' round trips, a few at most.
        let (large, none) = (runs[0].0, runs[1].0);
        eprintln!("engine steps during the prompt: {large} (stall 1000 ms), {none} (stall 0)");
        assert!(none >= 50 && large < 20, "engine steps during the prompt (stall 1000 ms, then 0): {large}, {none}");
        assert_eq!(runs[0].1, runs[1].1, "the chunks change no token");
    })
    .await
    .expect("test timed out");
}

/// While no stream decodes, no one waits on a prefill chunk: it takes up to
/// `--prefill-chunk-idle` tokens instead of `--prefill-chunk`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_worker_prefills_in_larger_chunks() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let prompt: Vec<u32> = (0..100u32).map(|i| 3 + (i * 7) % 900).collect();
        let mut runs = Vec::new();
        for idle in ["4096", "8"] {
            let w = with_model(&["--prefill-chunk", "8", "--prefill-chunk-idle", idle]).await;
            // The first chunk of a model takes `--prefill-chunk` tokens and measures its speed.
            collect(w.client.generate(request("warm-up", Prompt::TokenIds(vec![5; 20]), 1)).await.unwrap()).await;
            let before = w.client.stats().await.unwrap().progress;
            let s = collect(w.client.generate(request("p", Prompt::TokenIds(prompt.clone()), 1)).await.unwrap()).await;
            assert_eq!(s.last.finish_reason, FinishReason::Length);
            let after = w.client.stats().await.unwrap().progress;
            assert_eq!(after.prefilled_tokens - before.prefilled_tokens, 99);
            runs.push((after.steps as i64 - before.steps as i64, s.tokens));
        }
        // 99 prompt tokens: one chunk of up to 4096, or 13 chunks of 8, so 12 more engine steps.
        // Either count may include one step more: the decode step built ahead of the last token
        // runs after the final event, before or after the second `stats`.
        let more = runs[1].0 - runs[0].0;
        assert!((11..=13).contains(&more), "engine steps (idle chunk 4096, then 8): {runs:?}");
        assert_eq!(runs[0].1, runs[1].1, "the chunks change no token");
    })
    .await
    .expect("test timed out");
}
