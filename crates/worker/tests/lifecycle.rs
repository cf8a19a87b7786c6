//! Heartbeats, shutdown and exit of the real worker.
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use jsonrpsee::core::client::SubscriptionClientT;
use mlx_serving_protocol::{FinishReason, GenerateEvent, HEARTBEAT_METHOD, Heartbeat, Prompt, WorkerRpcClient};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_keep_arriving_during_a_long_prefill() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        // Small chunks, also while no other stream decodes, make the prefill of a near-context
        // prompt take many engine steps.
        let w = with_model(&["--prefill-chunk", "4", "--prefill-chunk-idle", "4", "--heartbeat-ms", "20"]).await;
        let mut beats = w.client.subscribe_to_method::<Heartbeat>(HEARTBEAT_METHOD).await.unwrap();
        let prompt: Vec<u32> = (0..1000u32).map(|i| 3 + (i * 7) % 900).collect();
        let before = w.client.stats().await.unwrap().progress.prefilled_tokens;
        let mut stream = w.client.generate(request("long", Prompt::TokenIds(prompt), 2)).await.unwrap();

        // Heartbeats seen while the prompt was part-way through prefill.
        let mut during = Vec::new();
        loop {
            tokio::select! {
                beat = beats.next() => {
                    let beat = beat.expect("heartbeats stopped").unwrap();
                    let done = beat.progress.prefilled_tokens - before;
                    if done > 0 && done < 999 {
                        during.push(beat);
                    }
                }
                event = stream.next() => {
                    match event.unwrap().unwrap() {
                        GenerateEvent::Token(_) => break,
                        GenerateEvent::Final(f) => panic!("ended without a token: {f:?}"),
                    }
                }
            }
        }
        assert!(during.len() >= 2, "only {} heartbeats arrived during the prefill", during.len());
        assert!(
            during
                .windows(2)
                .all(|w| w[1].seq > w[0].seq && w[1].progress.prefilled_tokens >= w[0].progress.prefilled_tokens)
        );
        assert!(during.iter().all(|b| b.active_sequences == 1 && b.models == ["m"]));
        assert!(during.iter().any(|b| b.memory.rss > 0 && b.memory.active > 0));
        let rest = collect(stream).await;
        assert_eq!(rest.last.finish_reason, FinishReason::Length);
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_with_a_deadline_cancels_what_runs_and_exits_zero() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let mut w = with_model(&[]).await;
        let client = Arc::new(w.client);
        let mut streams = Vec::new();
        for i in 0..4 {
            let mut sub =
                client.generate(request(&format!("s{i}"), Prompt::Text(format!("Stream {i}")), 1000)).await.unwrap();
            // Wait for a first token so the request is surely running.
            assert!(matches!(sub.next().await.unwrap().unwrap(), GenerateEvent::Token(_)));
            // The worker exits right after the final events: the subscriptions stay open until
            // every final has been read (see collect_from).
            streams.push(tokio::spawn(async move { (collect_from(&mut sub).await, sub) }));
        }
        let ack = client.shutdown(100).await.unwrap();
        assert_eq!(ack.in_flight, 4);
        let refused = client.generate(request("late", Prompt::Text("too late".into()), 4)).await;
        let Err(err) = refused else { panic!("admitted while shutting down") };
        let err = err.to_string();
        assert!(err.contains("1005") || err.contains("shutting down"), "{err}");
        let mut open = Vec::new();
        for s in streams {
            let (got, sub) = s.await.unwrap();
            assert_eq!(got.last.finish_reason, FinishReason::Cancelled);
            assert!(got.last.usage.completion_tokens < 1000);
            open.push(sub);
        }
        drop(open);
        let status = tokio::time::timeout(Duration::from_secs(10), w.child.wait())
            .await
            .expect("the worker did not exit")
            .unwrap();
        assert!(status.success(), "exit status {status}");
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_work_finish_before_the_deadline() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let mut w = with_model(&[]).await;
        let sub = w.client.generate(request("short", Prompt::Text("Hello".into()), 8)).await.unwrap();
        w.client.shutdown(60_000).await.unwrap();
        let got = collect(sub).await;
        assert_eq!(got.last.finish_reason, FinishReason::Length);
        let status = tokio::time::timeout(Duration::from_secs(10), w.child.wait())
            .await
            .expect("the worker did not exit")
            .unwrap();
        assert!(status.success(), "exit status {status}");
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_stdin_makes_the_worker_exit_within_a_second() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let mut raw = Raw::start(&["--model", model_dir(MODEL).to_str().unwrap(), "--model-name", "m"]);
        assert!(raw.call(1, "handshake", serde_json::json!({})).await["result"]["pid"].is_u64());
        // A stream in progress does not hold the worker up.
        let req = serde_json::json!({"id": "s", "model": "m", "prompt": {"text": "Hello"}, "max_tokens": 1000, "ignore_eos": true});
        let sub = raw.call(2, "generate", serde_json::json!({ "request": req })).await;
        assert!(sub["result"].is_u64(), "{sub}");
        raw.recv().await; // a first token event
        let mut child = raw.close_stdin();
        let start = Instant::now();
        let status = tokio::time::timeout(Duration::from_secs(5), child.wait()).await.expect("the worker did not exit").unwrap();
        let took = start.elapsed();
        assert!(took < Duration::from_secs(1), "exit took {took:?}");
        assert!(status.success(), "exit status {status}");
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_and_cache_limits_reach_mlx_and_change_no_token() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let mut runs = Vec::new();
        for args in [&[][..], &["--memory-limit-bytes", "1073741824", "--cache-limit-bytes", "0"][..]] {
            let mut w = with_model(args).await;
            let got =
                collect(w.client.generate(request("r", Prompt::Text("Hello there".into()), 16)).await.unwrap()).await;
            let stats = w.client.stats().await.unwrap();
            w.client.shutdown(1000).await.unwrap();
            let _ = w.child.wait().await;
            runs.push((got.tokens, stats.memory.cache));
        }
        eprintln!(
            "buffer cache after a request: {} bytes without limits, {} with a cache limit of 0",
            runs[0].1, runs[1].1
        );
        assert_eq!(runs[0].0, runs[1].0, "the limits changed the tokens");
        assert_eq!(runs[1].1, 0, "MLX kept freed buffers despite --cache-limit-bytes 0");
        assert!(runs[0].1 > 0, "without a limit MLX keeps freed buffers for reuse");
    })
    .await
    .expect("test timed out");
}

/// A model warmed up as it loads (`--warm-up always`; by default only on MLX's CUDA backend)
/// serves what it serves without: the warm-up's products and requests leave nothing behind in
/// the worker, greedy or sampled, and the worker's statistics count none of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warmed_up_model_serves_the_same_tokens() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let mut runs = Vec::new();
        for mode in ["never", "always"] {
            // Small chunks and few sequences keep the warm-up's rows (and CPU time) small.
            let args =
                ["--warm-up", mode, "--prefill-chunk", "16", "--prefill-chunk-idle", "32", "--max-sequences", "4"];
            let mut w = connect(&args);
            w.client.load_model("m".into(), model_dir("qwen3-q4g64").display().to_string()).await.expect("load_model");
            let greedy = request("g", Prompt::Text("Warm or cold".into()), 12);
            let mut sampled = request("s", Prompt::Text("Warm or cold".into()), 12);
            sampled.sampling = mlx_serving_protocol::Sampling { temperature: 0.9, seed: Some(5), ..Default::default() };
            let (a, b) = tokio::join!(async { collect(w.client.generate(greedy).await.unwrap()).await }, async {
                collect(w.client.generate(sampled).await.unwrap()).await
            });
            let stats = w.client.stats().await.unwrap();
            w.client.shutdown(1000).await.unwrap();
            let _ = w.child.wait().await;
            runs.push((a.tokens, b.tokens, stats.progress.decoded_tokens));
        }
        assert_eq!(runs[0], runs[1], "--warm-up always changed what the worker served or counted");
        assert_eq!(runs[0].2, 24);
    })
    .await
    .expect("test timed out");
}
