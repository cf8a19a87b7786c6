//! Operations on a live pool with real workers: rolling restart under load, drain, prefetch,
//! unload, idle unload, scaling, the spread of workers over GPUs.
mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

use common::*;
use mlx_serving_protocol::FinishReason;
use mlx_serving_supervisor::worker::slot::WorkerState;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_under_load_fails_no_request() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let pool = started(config(2)).await;
        let stop = Arc::new(AtomicBool::new(false));
        let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let mut clients = Vec::new();
        for c in 0..4 {
            let (pool, stop, ok, failed) = (pool.clone(), stop.clone(), ok.clone(), failed.clone());
            clients.push(tokio::spawn(async move {
                let mut i = 0;
                while !stop.load(Relaxed) {
                    let o = collect(&pool, request(&format!("c{c}-{i}"), &format!("client {c} request {i}"), 16)).await;
                    match o.last {
                        Ok(f) if f.finish_reason == FinishReason::Length => ok.fetch_add(1, Relaxed),
                        other => {
                            eprintln!("failed: {other:?}");
                            failed.fetch_add(1, Relaxed)
                        }
                    };
                    i += 1;
                }
            }));
        }
        // Ready capacity is sampled all along: it never drops below 2.
        let watching = Arc::new(AtomicBool::new(true));
        let min_ready = Arc::new(AtomicUsize::new(usize::MAX));
        let watcher = {
            let (pool, watching, min_ready) = (pool.clone(), watching.clone(), min_ready.clone());
            tokio::spawn(async move {
                while watching.load(Relaxed) {
                    min_ready.fetch_min(pool.ready_count(), Relaxed);
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        let old: Vec<u64> = pool.status().workers.iter().map(|w| w.id).collect();
        let replaced = pool.rolling_restart().await.expect("rolling restart");
        assert_eq!(replaced, old);
        tokio::time::sleep(Duration::from_millis(300)).await;
        stop.store(true, Relaxed);
        for c in clients {
            c.await.unwrap();
        }
        watching.store(false, Relaxed);
        watcher.await.unwrap();
        let status = pool.status();
        assert_eq!(failed.load(Relaxed), 0, "requests failed during the rolling restart");
        assert!(ok.load(Relaxed) > 8, "too little load to mean anything: {}", ok.load(Relaxed));
        assert!(min_ready.load(Relaxed) >= 2, "ready capacity fell to {}", min_ready.load(Relaxed));
        let now: Vec<u64> = status.workers.iter().map(|w| w.id).collect();
        assert_eq!(now.len(), 2);
        assert!(now.iter().all(|id| !old.contains(id)), "old workers remain: {now:?}");
        assert!(status.workers.iter().all(|w| w.state == WorkerState::Ready && w.models.iter().any(|m| m.name == "m")));
        pool.shutdown(Duration::from_secs(5)).await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_prefetch_unload_and_idle_unload_show_in_status() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let mut c = config(2);
        c.models[1].keep_alive_s = 1;
        let pool = started(c).await;

        // Drain: no new work goes to worker 0.
        pool.drain(0).unwrap();
        assert_eq!(pool.status().workers[0].state, WorkerState::Draining);
        for i in 0..4 {
            let o = collect(&pool, request(&format!("d{i}"), "while draining", 4)).await;
            assert!(o.last.is_ok());
        }
        assert_eq!(pool.status().workers[0].progress.unwrap().decoded_tokens, 0, "a drained worker got work");
        pool.undrain(0).unwrap();
        assert_eq!(pool.status().workers[0].state, WorkerState::Ready);
        assert!(pool.drain(99).unwrap_err().to_string().contains("no worker with id 99"));

        // Prefetch m2 on worker 1 only.
        let memory_of =
            |id: u64| pool.status().workers.iter().find(|w| w.id == id).and_then(|w| w.memory).map_or(0, |m| m.active);
        // A baseline from after the last request's memory is gone: two heartbeats 300 ms apart
        // that agree.
        let mut before = memory_of(1);
        for _ in 0..50 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let now = memory_of(1);
            if now == before {
                break;
            }
            before = now;
        }
        assert_eq!(pool.prefetch("m2", Some(vec![1])).await.unwrap(), vec![1]);
        let models = |id: u64| -> Vec<String> {
            pool.status().workers.iter().find(|w| w.id == id).unwrap().models.iter().map(|m| m.name.clone()).collect()
        };
        assert_eq!(models(1), ["m", "m2"]);
        assert_eq!(models(0), ["m"]);
        let m2_bytes = pool.status().workers[1].models.iter().find(|m| m.name == "m2").unwrap().weight_bytes;
        assert!(m2_bytes > 1_000_000);
        assert!(
            eventually(Duration::from_secs(5), || memory_of(1) >= before + m2_bytes).await,
            "MLX memory did not grow by the model's weights after the load: before {before} now {} m2 {m2_bytes}",
            memory_of(1)
        );
        let loaded = memory_of(1);

        // Unload: the model leaves status and the worker's memory falls by its weights.
        assert_eq!(pool.unload("m2", Some(vec![1])).await.unwrap(), vec![1]);
        assert_eq!(models(1), ["m"]);
        assert!(
            eventually(Duration::from_secs(5), || memory_of(1) + m2_bytes <= loaded).await,
            "memory did not fall after unload: {} then {}",
            loaded,
            memory_of(1)
        );
        assert!(pool.prefetch("nope", None).await.unwrap_err().to_string().contains("`nope` is not configured"));

        // On demand, then idle unload after the 1 s keep-alive.
        let mut r = request("m2-req", "hello", 4);
        r.model = "m2".into();
        assert!(collect(&pool, r).await.last.is_ok());
        let holders = || pool.status().workers.iter().filter(|w| w.models.iter().any(|m| m.name == "m2")).count();
        assert_eq!(holders(), 1, "m2 was loaded on demand on one worker");
        assert!(eventually(Duration::from_secs(10), || holders() == 0).await, "m2 was not unloaded when idle");
        pool.shutdown(Duration::from_secs(5)).await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaling_adds_and_removes_workers() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let pool = started(config(1)).await;
        assert_eq!(pool.scale(3).await.unwrap(), 3);
        assert!(pool.wait_ready(3, Duration::from_secs(60)).await);
        assert_eq!(pool.scale(1).await.unwrap(), 1);
        let status = pool.status();
        assert_eq!(status.workers.len(), 1);
        assert_eq!(status.target_workers, 1);
        assert!(collect(&pool, request("after", "scaled down", 4)).await.last.is_ok());
        pool.shutdown(Duration::from_secs(5)).await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_budget_evicts_the_least_recently_used_idle_model() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let mut c = config(1);
        // Room for the preloaded m (1.4 MB) or m2 (1.3 MB), not both.
        c.pool.memory_budget_bytes = 2_000_000;
        let pool = started(c).await;
        let models = || -> Vec<String> { pool.status().workers[0].models.iter().map(|m| m.name.clone()).collect() };
        assert_eq!(models(), ["m"]);
        pool.prefetch("m2", None).await.unwrap();
        assert_eq!(models(), ["m2"], "m was not evicted to make room");
        // A request for m brings it back, evicting m2.
        assert!(collect(&pool, request("back", "hello", 4)).await.last.is_ok());
        assert_eq!(models(), ["m"]);
        pool.shutdown(Duration::from_secs(5)).await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_requests_are_served_by_priority_then_arrival() {
    use mlx_serving_supervisor::Priority;
    tokio::time::timeout(TEST_TIMEOUT, async {
        let mut c = config(1);
        // One request at a time on the worker: the rest wait in the supervisor.
        c.pool.worker_command.extend(["--max-sequences".into(), "1".into()]);
        let pool = started(c).await;
        let busy = {
            let pool = pool.clone();
            tokio::spawn(async move { collect(&pool, request("busy", "keep the worker busy", 200)).await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        let order = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for (class, priority) in
            [("background", Priority::Background), ("default", Priority::Default), ("urgent", Priority::Urgent)]
        {
            for i in 0..3 {
                let (pool, order) = (pool.clone(), order.clone());
                let name = format!("{class}-{i}");
                let mut rx = pool.generate_with(request(&name, "short", 2), priority);
                tasks.push(tokio::spawn(async move {
                    while let Some(item) = rx.recv().await {
                        if let Ok(mlx_serving_supervisor::PoolEvent::Started) = item {
                            order.lock().unwrap().push(name.clone());
                        }
                    }
                }));
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert!(busy.await.unwrap().last.is_ok());
        let order = order.lock().unwrap().clone();
        assert_eq!(
            order,
            [
                "urgent-0",
                "urgent-1",
                "urgent-2",
                "default-0",
                "default-1",
                "default-2",
                "background-0",
                "background-1",
                "background-2"
            ]
        );
        pool.shutdown(Duration::from_secs(5)).await;
    })
    .await
    .expect("test timed out");
}

/// The `CUDA_VISIBLE_DEVICES` a worker process runs with, read from the process itself where
/// the system shows it (Linux); otherwise the supervisor's record of it.
fn visible_devices_of(pid: Option<u32>, recorded: Option<&str>) -> Option<String> {
    #[cfg(target_os = "linux")]
    {
        let environ = std::fs::read(format!("/proc/{}/environ", pid.expect("a running worker"))).unwrap();
        let _ = recorded;
        environ
            .split(|&b| b == 0)
            .find_map(|kv| kv.strip_prefix(b"CUDA_VISIBLE_DEVICES="))
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = pid;
        recorded.map(str::to_string)
    }
}

/// Each worker's id and `CUDA_VISIBLE_DEVICES` entry, as status shows them and as the running
/// process has it.
fn placement(pool: &mlx_serving_supervisor::Pool) -> Vec<(u64, Option<String>)> {
    pool.status()
        .workers
        .iter()
        .map(|w| {
            let seen = visible_devices_of(w.pid, w.cuda_visible_devices.as_deref());
            assert_eq!(seen, w.cuda_visible_devices, "worker {} runs with another value than status shows", w.id);
            (w.id, seen)
        })
        .collect()
}

fn gpus(v: &[(u64, &str)]) -> Vec<(u64, Option<String>)> {
    v.iter().map(|(id, d)| (*id, Some(d.to_string()))).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_are_spread_over_the_listed_gpus_and_keep_theirs_across_restarts() {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    tokio::time::timeout(TEST_TIMEOUT, async {
        let mut c = config(2);
        c.pool.cuda_visible_devices = vec!["0".into(), "1".into()];
        let pool = started(c.clone()).await;
        assert_eq!(placement(&pool), gpus(&[(0, "0"), (1, "1")]));

        // A worker killed with SIGKILL comes back on its own GPU.
        let victim = pool.status().workers[1].pid.unwrap();
        kill(Pid::from_raw(victim as i32), Signal::SIGKILL).unwrap();
        assert!(
            eventually(Duration::from_secs(30), || pool.status().workers[1].generation == 2).await,
            "the worker was not replaced"
        );
        assert!(pool.wait_ready(2, Duration::from_secs(60)).await);
        assert_eq!(placement(&pool), gpus(&[(0, "0"), (1, "1")]));

        // Scaling in removes the newest; scaling out fills the least used GPU first.
        assert_eq!(pool.scale(1).await.unwrap(), 1);
        assert_eq!(pool.scale(3).await.unwrap(), 3);
        assert!(pool.wait_ready(3, Duration::from_secs(60)).await);
        assert_eq!(placement(&pool), gpus(&[(0, "0"), (2, "1"), (3, "0")]));

        // A reload that drops GPU 0 moves its workers at their next start: a restart.
        c.pool.workers = 3;
        c.pool.cuda_visible_devices = vec!["1".into(), "2".into()];
        assert_eq!(pool.reload(c).await.unwrap(), 3);
        let recorded: Vec<_> = pool.status().workers.iter().map(|w| (w.id, w.cuda_visible_devices.clone())).collect();
        assert_eq!(recorded, gpus(&[(0, "2"), (2, "1"), (3, "1")]));
        for id in [0, 3] {
            pool.restart(id).unwrap();
        }
        assert!(
            eventually(Duration::from_secs(60), || {
                let s = pool.status();
                s.ready_workers == 3 && s.workers.iter().filter(|w| w.generation == 2).count() == 2
            })
            .await,
            "the restarted workers did not come back: {:?}",
            pool.status().workers
        );
        assert_eq!(placement(&pool), gpus(&[(0, "2"), (2, "1"), (3, "1")]));
        assert!(collect(&pool, request("placed", "on the listed GPUs", 4)).await.last.is_ok());
        pool.shutdown(Duration::from_secs(5)).await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_that_reads_nothing_holds_back_neither_its_worker_nor_other_requests() {
    use mlx_serving_protocol::GenerateEvent;
    use mlx_serving_supervisor::PoolEvent;
    tokio::time::timeout(TEST_TIMEOUT, async {
        let pool = started(config(1)).await;
        // More events than the caller's channel holds, and none of them read yet.
        let mut stalled = pool.generate(request("stalled", "read nothing for a while", 600));
        let other = collect(&pool, request("other", "beside it", 32)).await;
        assert_eq!(other.tokens.len(), 32, "{other:?}");
        assert!(other.last.is_ok(), "{other:?}");
        // The worker generates the unread request to its end.
        let finished = eventually(Duration::from_secs(120), || {
            let w = &pool.status().workers[0];
            w.active_sequences == 0 && w.queue_depth == 0
        })
        .await;
        assert!(finished, "the worker did not finish the unread request: {:?}", pool.status());
        // Then the caller reads every token.
        let mut tokens = 0;
        let last = loop {
            match stalled.recv().await.expect("a final event or an error") {
                Ok(PoolEvent::Started) => {}
                Ok(PoolEvent::Event(GenerateEvent::Token(t))) => tokens += t.token_ids.len(),
                Ok(PoolEvent::Event(GenerateEvent::Final(f))) => break Ok(f),
                Err(e) => break Err(e),
            }
        };
        let last = last.expect("the unread request finished");
        assert_eq!((tokens, last.usage.completion_tokens, last.finish_reason), (600, 600, FinishReason::Length));
    })
    .await
    .expect("the test timed out");
}
