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
async fn under_load(pool: &Arc<mlx_serving_supervisor::Pool>, n: usize, max_tokens: usize, during: impl AsyncFnOnce()) -> Vec<(String, Outcome)> {
    let mut tasks = Vec::new();
    for i in 0..n {
        let pool = pool.clone();
        let text = format!("Request {i} wants {}", "words ".repeat(i % 7 + 1));
        tasks.push((text.clone(), tokio::spawn(async move { collect(&pool, request(&format!("r{i}"), &text, max_tokens)).await })));
    }
    during().await;
    let mut out = Vec::new();
    for (text, t) in tasks {
        out.push((text, t.await.unwrap()));
    }
    out
}

/// Every request that had not streamed a token completed, with the tokens it gets alone;
/// the others ended with a typed mid-stream error. Returns how many were cut mid-stream.
async fn check_outcomes(pool: &Arc<mlx_serving_supervisor::Pool>, outcomes: &[(String, Outcome)], max_tokens: usize) -> usize {
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
        let moved = pool.status().moved_requests;
        eprintln!("{cut} of 32 streams were cut mid-stream, {moved} moved to another worker");
        assert!(moved > 0, "no request was moved: the kill came too late to test anything");

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
        let quarantined = eventually(Duration::from_secs(20), || pool.status().workers[0].state == WorkerState::Quarantined).await;
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
