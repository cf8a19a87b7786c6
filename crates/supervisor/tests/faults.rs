//! Faults with real worker processes: kill -9 under load, a hung (stopped) worker, a worker that
//! dies at start-up.
mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use mlx_serving_protocol::FinishReason;
use mlx_serving_supervisor::PoolError;
use mlx_serving_supervisor::worker::slot::WorkerState;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

fn pid_of(pool: &mlx_serving_supervisor::Pool, id: u64) -> i32 {
    pool.status().workers.iter().find(|w| w.id == id).and_then(|w| w.pid).expect("a running worker") as i32
}

/// Runs `n` requests at once; `during` runs once they are under way.
async fn under_load(
    pool: &Arc<mlx_serving_supervisor::Pool>,
    n: usize,
    max_tokens: usize,
    during: impl AsyncFnOnce(),
) -> Vec<(String, Outcome)> {
    let mut tasks = Vec::new();
    for i in 0..n {
        let pool = pool.clone();
        let text = format!("Request {i} wants {}", "words ".repeat(i % 7 + 1));
        tasks.push((
            text.clone(),
            tokio::spawn(async move { collect(&pool, request(&format!("r{i}"), &text, max_tokens)).await }),
        ));
    }
    during().await;
    let mut out = Vec::new();
    for (text, t) in tasks {
        out.push((text, t.await.unwrap()));
    }
    out
}

/// Every request that had not streamed a token completed, with the tokens it gets alone;
/// the others completed too (resumed) or ended with a typed mid-stream error. Returns how many
/// were cut mid-stream.
async fn check_outcomes(
    pool: &Arc<mlx_serving_supervisor::Pool>,
    outcomes: &[(String, Outcome)],
    max_tokens: usize,
) -> usize {
    let mut cut = 0;
    for (text, o) in outcomes {
        match &o.last {
            Ok(f) => {
                assert_eq!(f.finish_reason, FinishReason::Length, "{text}");
                assert_eq!(o.tokens.len(), max_tokens, "{text}");
                let alone = collect(pool, request("check", text, max_tokens)).await;
                assert_eq!(o.tokens, alone.tokens, "a retried request produced other tokens: {text}");
            }
            Err(PoolError::WorkerFailedMidStream { .. }) => {
                assert!(!o.tokens.is_empty(), "a request failed mid-stream without tokens: {text}");
                cut += 1;
            }
            Err(e) => panic!("request {text} failed: {e}"),
        }
    }
    cut
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_loses_no_unstarted_request_and_the_slot_comes_back() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let pool = started(config(2)).await;
        let victim = pid_of(&pool, 0);
        let outcomes = under_load(&pool, 32, 48, async || {
            tokio::time::sleep(Duration::from_millis(100)).await;
            kill(Pid::from_raw(victim), Signal::SIGKILL).unwrap();
        })
        .await;
        let cut = check_outcomes(&pool, &outcomes, 48).await;
        let status = pool.status();
        let (moved, resumed) = (status.moved_requests, status.resumed_streams);
        eprintln!("{cut} of 32 streams were cut mid-stream, {moved} moved to another worker, {resumed} resumed");
        assert!(moved + resumed > 0, "nothing was moved or resumed: the kill came too late to test anything");
        assert_eq!(cut, 0, "greedy streams whose worker died were not all resumed");

        assert!(pool.wait_ready(2, Duration::from_secs(30)).await, "the slot was not replaced");
        let status = pool.status();
        let w0 = status.workers.iter().find(|w| w.id == 0).unwrap();
        assert_eq!(w0.generation, 2, "{w0:?}");
        assert_ne!(w0.pid, Some(victim as u32));
        let crash = w0.last_crash.as_ref().expect("the crash is recorded");
        assert_eq!(crash.reason, "signal 9 (SIGKILL)", "{crash:?}");
        assert_eq!(crash.pid, victim as u32);
        assert!(!crash.in_flight.is_empty(), "the crash record lists the requests in flight: {crash:?}");
        pool.shutdown(Duration::from_secs(5)).await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_worker_is_detected_as_hung_killed_and_replaced() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let mut c = config(2);
        // Few sequences per worker, so requests wait in its queue: those have no token yet.
        c.pool.worker_command.extend(["--max-sequences".into(), "2".into()]);
        let pool = started(c).await;
        let victim = pid_of(&pool, 0);
        let outcomes = under_load(&pool, 12, 32, async || {
            tokio::time::sleep(Duration::from_millis(30)).await;
            kill(Pid::from_raw(victim), Signal::SIGSTOP).unwrap();
        })
        .await;
        check_outcomes(&pool, &outcomes, 32).await;
        assert!(pool.wait_ready(2, Duration::from_secs(30)).await, "the slot was not replaced");
        let status = pool.status();
        let w0 = status.workers.iter().find(|w| w.id == 0).unwrap();
        let crash = w0.last_crash.as_ref().expect("the hang is recorded");
        assert!(crash.reason.contains("hung"), "{crash:?}");
        assert_eq!(crash.pid, victim as u32);
        // The stopped process was killed, not left behind.
        assert!(kill(Pid::from_raw(victim), None).is_err(), "the hung worker is still alive");
        pool.shutdown(Duration::from_secs(5)).await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_dies_at_start_is_backed_off_and_quarantined() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let mut c = config(1);
        c.pool.worker_command = vec!["sh".into(), "-c".into(), "echo 'cannot start: boom' >&2; exit 3".into()];
        c.pool.queue_timeout_ms = 1000;
        let pool = mlx_serving_supervisor::Pool::start(c);
        let quarantined =
            eventually(Duration::from_secs(20), || pool.status().workers[0].state == WorkerState::Quarantined).await;
        let w = pool.status().workers[0].clone();
        assert!(quarantined, "{w:?}");
        // 5 spawns (at 0, ~0.1, ~0.3, ~0.7, ~1.5 s) and then a wait: no spin.
        assert_eq!(w.generation, 5, "{w:?}");
        tokio::time::sleep(Duration::from_secs(2)).await;
        let later = pool.status().workers[0].clone();
        assert_eq!(later.generation, 5, "spawned again while quarantined: {later:?}");
        assert!(later.next_start_in_s.is_some_and(|s| s > 0.0), "{later:?}");
        let crash = later.last_crash.expect("crashes are recorded");
        assert_eq!(crash.reason, "exit status 3");
        assert!(crash.stderr_tail.iter().any(|l| l.contains("boom")), "{crash:?}");
        // The supervisor still answers and refuses requests cleanly.
        let o = collect(&pool, request("x", "hello", 4)).await;
        assert!(matches!(o.last, Err(PoolError::NoWorker { .. }) | Err(PoolError::RetriesExhausted { .. })), "{o:?}");
        pool.shutdown(Duration::from_secs(1)).await;
    })
    .await
    .expect("test timed out");
}

/// Reads a stream; after its `kill_after`-th token, SIGKILLs the worker serving it.
async fn stream_and_kill(
    pool: &Arc<mlx_serving_supervisor::Pool>,
    req: mlx_serving_protocol::GenerateRequest,
    kill_after: usize,
) -> Outcome {
    use mlx_serving_protocol::GenerateEvent;
    use mlx_serving_supervisor::PoolEvent;
    let mut rx = pool.generate(req);
    let mut tokens = Vec::new();
    let mut killed = false;
    while let Some(item) = rx.recv().await {
        match item {
            Ok(PoolEvent::Started) => {}
            Ok(PoolEvent::Event(GenerateEvent::Token(t))) => {
                tokens.extend(t.token_ids);
                if tokens.len() >= kill_after && !killed {
                    killed = true;
                    let serving = pool
                        .status()
                        .workers
                        .iter()
                        .find(|w| w.in_flight == 1)
                        .and_then(|w| w.pid)
                        .expect("the serving worker");
                    kill(Pid::from_raw(serving as i32), Signal::SIGKILL).unwrap();
                }
            }
            Ok(PoolEvent::Event(GenerateEvent::Final(f))) => return Outcome { tokens, last: Ok(f) },
            Err(e) => return Outcome { tokens, last: Err(e) },
        }
    }
    panic!("the stream ended without a final event or an error");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_whose_worker_dies_is_resumed_with_exactly_the_uninterrupted_tokens() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let pool = started(config(2)).await;
        let greedy = request("greedy", "Tell me about free software and its license", 64);
        let mut sampled = request("sampled", "Tell me about free software and its license", 64);
        sampled.sampling.temperature = 0.8;
        sampled.sampling.top_p = 0.95;
        sampled.sampling.seed = Some(5);
        for req in [greedy, sampled] {
            let whole = collect(&pool, req.clone()).await;
            assert_eq!(whole.tokens.len(), 64);
            let before = pool.status().resumed_streams;
            let cut = stream_and_kill(&pool, req.clone(), 10).await;
            let f = cut.last.unwrap_or_else(|e| panic!("{}: the stream was not resumed: {e}", req.id));
            assert_eq!(cut.tokens, whole.tokens, "{}: the resumed stream differs from an uninterrupted run", req.id);
            assert_eq!(f.finish_reason, FinishReason::Length);
            assert_eq!(f.usage.completion_tokens, 64);
            assert_eq!(f.usage.prompt_tokens, whole.last.as_ref().unwrap().usage.prompt_tokens);
            assert_eq!(pool.status().resumed_streams, before + 1);
            assert!(pool.wait_ready(2, Duration::from_secs(30)).await);
        }
        pool.shutdown(Duration::from_secs(5)).await;
    })
    .await
    .expect("test timed out");
}

/// A pool whose workers sit behind the fault-injecting proxy with `fault`.
async fn faulty_pool(workers: usize, fault: &str) -> Arc<mlx_serving_supervisor::Pool> {
    faulty_pool_with(config(workers), fault).await
}

async fn faulty_pool_with(mut c: mlx_serving_supervisor::Config, fault: &str) -> Arc<mlx_serving_supervisor::Pool> {
    let proxy = worker_bin().with_file_name("mlx-serving-faultworker");
    assert!(proxy.exists(), "{} is missing: build the workspace first", proxy.display());
    c.pool.worker_command = vec![
        proxy.display().to_string(),
        "--fault".into(),
        fault.into(),
        "--".into(),
        worker_bin().display().to_string(),
    ];
    started(c).await
}

/// Workers that break in ways other than dying (stalling while heartbeating, writing garbage or
/// an oversized line) are killed and replaced, and the stream goes on elsewhere unbroken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_garbage_and_oversized_workers_are_replaced_and_their_streams_resumed() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let reference = started(config(1)).await;
        // 8 tokens: the fault fires after 5 on the first worker; the resumed part (3) stays
        // below it on the next.
        let expected = collect(&reference, request("ref", "Faults ahead", 8)).await.tokens;
        reference.shutdown(Duration::from_secs(5)).await;
        for (fault, reason) in [
            ("stall-at-token:5", "no progress"),
            ("garbage-at-token:5", "protocol"),
            ("oversized-at-token:5", "protocol"),
        ] {
            let pool = faulty_pool(2, fault).await;
            let got = collect(&pool, request("r", "Faults ahead", 8)).await;
            assert!(got.last.is_ok(), "{fault}: {:?}", got.last);
            assert_eq!(got.tokens, expected, "{fault}: the resumed stream differs");
            assert_eq!(pool.status().resumed_streams, 1, "{fault}");
            // The stream may finish on the other worker before the broken one is reaped.
            let mut crash = None;
            for _ in 0..100 {
                crash = pool.status().workers.iter().find_map(|w| w.last_crash.clone());
                if crash.is_some() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let crash = crash.expect("the broken worker's end is recorded");
            assert!(crash.reason.contains(reason), "{fault}: {crash:?}");
            assert!(pool.wait_ready(2, Duration::from_secs(30)).await, "{fault}: not replaced");
            pool.shutdown(Duration::from_secs(5)).await;
        }
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poisonous_request_is_quarantined_and_the_pool_stays_healthy() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let pool = faulty_pool(3, "poison:POISON-PILL").await;
        let bad = collect(&pool, request("bad", "this prompt carries a POISON-PILL", 8)).await;
        assert!(matches!(bad.last, Err(PoolError::Poisoned { crashes: 2 })), "{:?}", bad.last);
        // Its twin is refused at once, without touching a worker.
        let restarts = || pool.status().workers.iter().map(|w| w.restarts).sum::<u64>();
        assert!(eventually(Duration::from_secs(10), || restarts() == 2).await, "two workers died: {}", restarts());
        let before = restarts();
        let twin = collect(&pool, request("twin", "this prompt carries a POISON-PILL", 8)).await;
        assert!(matches!(twin.last, Err(PoolError::Poisoned { .. })), "{:?}", twin.last);
        // The pool heals and serves everything else.
        assert!(pool.wait_ready(3, Duration::from_secs(30)).await);
        assert_eq!(before, restarts(), "the twin reached a worker");
        for i in 0..6 {
            let ok = collect(&pool, request(&format!("ok{i}"), "a healthy prompt", 4)).await;
            assert!(ok.last.is_ok(), "{:?}", ok.last);
        }
        pool.shutdown(Duration::from_secs(5)).await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_cannot_be_resumed_ends_with_a_typed_error_at_once() {
    use mlx_serving_protocol::GenerateEvent;
    use mlx_serving_supervisor::PoolEvent;
    tokio::time::timeout(TEST_TIMEOUT, async {
        // One worker, and a resume deadline shorter than its replacement takes.
        let mut c = config(1);
        c.pool.resume_timeout_ms = 50;
        let pool = started(c).await;
        let mut rx = pool.generate(request("lonely", "nowhere to go", 200));
        let mut tokens = 0;
        let mut killed_at = None;
        let end = loop {
            match rx.recv().await.expect("the stream ends with an event or an error") {
                Ok(PoolEvent::Event(GenerateEvent::Token(_))) => {
                    tokens += 1;
                    if tokens == 5 {
                        kill(Pid::from_raw(pid_of(&pool, 0)), Signal::SIGKILL).unwrap();
                        killed_at = Some(std::time::Instant::now());
                    }
                }
                Ok(PoolEvent::Event(GenerateEvent::Final(f))) => {
                    panic!("finished although its only worker died: {f:?}")
                }
                Ok(PoolEvent::Started) => {}
                Err(e) => break e,
            }
        };
        let took = killed_at.expect("the worker was killed").elapsed();
        assert!(matches!(end, PoolError::WorkerFailedMidStream { .. }), "{end:?}");
        assert!(end.to_string().contains("could not be resumed"), "{end}");
        // The deadline (50 ms) plus the retry backoff (at most 250 ms) plus slack for a busy machine.
        assert!(took < Duration::from_millis(1000), "the typed error took {took:?}");
        eprintln!("typed error {took:?} after the kill");
        pool.shutdown(Duration::from_secs(5)).await;
    })
    .await
    .expect("test timed out");
}

/// A worker that leaks memory (4 MiB per token) goes over `max_worker_rss_bytes`: it finishes
/// the stream it has, is restarted, and the pool serves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_over_its_memory_limit_is_recycled_after_finishing_its_streams() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let reference = started(config(1)).await;
        let expected = collect(&reference, request("ref", "Memory grows", 100)).await.tokens;
        let rss = reference.status().workers[0].memory.as_ref().map_or(0, |m| m.rss);
        reference.shutdown(Duration::from_secs(5)).await;
        assert!(rss > 0, "the worker reports its resident memory");

        let mut c = config(1);
        // 100 tokens leak 400 MiB: far past the limit, which a healthy worker never reaches.
        c.pool.max_worker_rss_bytes = rss + (200 << 20);
        let proxy = worker_bin().with_file_name("mlx-serving-faultworker");
        c.pool.worker_command = vec![
            proxy.display().to_string(),
            "--fault".into(),
            "leak-per-token:4194304".into(),
            "--".into(),
            worker_bin().display().to_string(),
        ];
        let pool = started(c).await;
        let first_pid = pid_of(&pool, 0);
        let got = collect(&pool, request("leaky", "Memory grows", 100)).await;
        assert!(got.last.is_ok(), "{:?}", got.last);
        assert_eq!(got.tokens, expected, "the stream in flight finished unbroken");
        assert!(
            eventually(Duration::from_secs(30), || pool.status().workers[0]
                .last_crash
                .as_ref()
                .is_some_and(|c| c.reason.starts_with("memory:")))
            .await,
            "no memory recycle recorded: {:?}",
            pool.status().workers[0].last_crash
        );
        assert!(pool.wait_ready(1, Duration::from_secs(30)).await, "not restarted");
        assert_ne!(pid_of(&pool, 0), first_pid, "the same process is still serving");
        let after = collect(&pool, request("after", "Memory grows", 8)).await;
        assert_eq!(after.tokens, expected[..8], "{:?}", after.last);
        pool.shutdown(Duration::from_secs(5)).await;
    })
    .await
    .expect("test timed out");
}

/// A model loaded on demand on a worker that is streaming: the worker's engine is taken up by the
/// load (held here for three times the stall timeout, as a large model or a CUDA warm-up takes
/// it) and its progress stands still. That is a load, not a stall: no worker is killed, and both
/// requests finish whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_load_on_a_busy_worker_is_not_taken_for_a_stall() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let mut c = config(1);
        c.pool.stall_timeout_ms = 1000;
        let pool = faulty_pool_with(c, "slow-load:3000").await;
        let mut busy = pool.generate(request("busy", "Keep streaming while a model loads", 1000));
        let mut tokens = 0;
        while tokens == 0 {
            match busy.recv().await.expect("the stream goes on") {
                Ok(mlx_serving_supervisor::PoolEvent::Event(mlx_serving_protocol::GenerateEvent::Token(t))) => {
                    tokens += t.token_ids.len()
                }
                Ok(_) => {}
                Err(e) => panic!("{e:?}"),
            }
        }
        // `m2` is not loaded: the pool loads it on the one worker, which is streaming.
        let mut load = request("load", "Load me", 4);
        load.model = "m2".into();
        let loaded = collect(&pool, load).await;
        assert!(loaded.last.is_ok(), "{:?}", loaded.last);
        assert_eq!(loaded.tokens.len(), 4);
        let mut last = None;
        while let Some(item) = busy.recv().await {
            match item {
                Ok(mlx_serving_supervisor::PoolEvent::Event(mlx_serving_protocol::GenerateEvent::Token(t))) => {
                    tokens += t.token_ids.len()
                }
                Ok(mlx_serving_supervisor::PoolEvent::Event(mlx_serving_protocol::GenerateEvent::Final(f))) => {
                    last = Some(f)
                }
                Ok(_) => {}
                Err(e) => panic!("the stream broke: {e:?}"),
            }
        }
        assert_eq!(last.expect("a final event").finish_reason, FinishReason::Length);
        assert_eq!(tokens, 1000);
        let w = &pool.status().workers[0];
        assert_eq!((w.restarts, w.last_crash.as_ref().map(|c| c.reason.clone())), (0, None), "{w:?}");
        pool.shutdown(Duration::from_secs(5)).await;
    })
    .await
    .expect("test timed out");
}
