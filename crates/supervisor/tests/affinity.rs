//! Prefix-affinity routing with two real workers: the turns of a conversation go back to the
//! worker that has its earlier turns, until that worker is busier than the least busy one by
//! more than `pool.prefix_affinity_slack`.
mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use mlx_serving_protocol::{GenerateRequest, Message, Prompt};
use mlx_serving_supervisor::worker::slot::WorkerState;
use mlx_serving_supervisor::{Pool, PoolEvent};

fn msg(role: &str, content: &str) -> Message {
    Message { role: role.into(), content: content.into() }
}

fn chat(id: &str, messages: &[Message], max_tokens: usize) -> GenerateRequest {
    GenerateRequest {
        ignore_eos: true,
        ..GenerateRequest::new(id, "m", Prompt::Messages(messages.to_vec()), max_tokens)
    }
}

/// Requests each worker has accepted since it started, by worker id.
async fn accepted(pool: &Pool) -> BTreeMap<u64, u64> {
    let mut out = BTreeMap::new();
    for slot in pool.slots() {
        let Some(conn) = slot.lock().conn.clone() else { continue };
        out.insert(slot.id, conn.client.stats().await.expect("stats").requests.accepted);
    }
    out
}

/// Runs a request to its end; returns the worker that ran it.
async fn served_by(pool: &std::sync::Arc<Pool>, request: GenerateRequest) -> u64 {
    let before = accepted(pool).await;
    let o = collect(pool, request).await;
    assert!(o.last.is_ok(), "{:?}", o.last);
    let after = accepted(pool).await;
    let ran: Vec<u64> = after.iter().filter(|(id, n)| before.get(id) != Some(n)).map(|(id, _)| *id).collect();
    assert_eq!(ran.len(), 1, "{before:?} {after:?}");
    ran[0]
}

/// Waits until a worker's heartbeats say it runs and queues nothing.
async fn quiet(pool: &Pool, id: u64) {
    let quiet = || {
        pool.status()
            .workers
            .iter()
            .any(|w| w.id == id && w.in_flight == 0 && w.active_sequences == 0 && w.queue_depth == 0)
    };
    assert!(eventually(Duration::from_secs(30), quiet).await, "worker {id} stays busy: {:?}", pool.status().workers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_up_turns_stay_on_their_worker_until_it_is_over_the_bound() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let mut c = config(2);
        // Requests held open below have a worker that finished them and stands still.
        c.pool.stall_timeout_ms = 120_000;
        assert_eq!(c.pool.prefix_affinity_slack, 2);
        let pool = started(c).await;
        // Two conversations with the same system prompt, started on different workers.
        let system = msg("system", "You answer in one line.");
        let mut a = vec![system.clone(), msg("user", "Conversation A begins.")];
        let mut b = vec![system.clone(), msg("user", "Conversation B begins.")];
        pool.drain(1).unwrap();
        assert_eq!(served_by(&pool, chat("a0", &a, 4)).await, 0);
        pool.undrain(1).unwrap();
        pool.drain(0).unwrap();
        assert_eq!(served_by(&pool, chat("b0", &b, 4)).await, 1);
        pool.undrain(0).unwrap();

        // Both workers know the system prompt; each follow-up turn goes to the worker that knows
        // its conversation, while the load is even.
        for turn in 1..4 {
            for (conversation, name, home) in [(&mut a, "A", 0), (&mut b, "B", 1)] {
                conversation.push(msg("assistant", &format!("Reply {turn}.")));
                conversation.push(msg("user", &format!("{name}, turn {turn}.")));
                assert_eq!(
                    served_by(&pool, chat(&format!("{name}{turn}"), conversation, 4)).await,
                    home,
                    "turn {turn} of {name}"
                );
            }
        }
        let status = pool.status();
        assert_eq!(status.prefix_routed_requests, 6);
        assert!(status.workers.iter().all(|w| w.prefix_keys > 0), "{:?}", status.workers);

        // Three turns of A held open (read no further than their start): each goes to worker 0
        // while its load is within 2 of worker 1's.
        let mut held = Vec::new();
        for i in 0..3 {
            let mut m = a.clone();
            m.push(msg("assistant", "Reply."));
            m.push(msg("user", &format!("Held {i}.")));
            let mut rx = pool.generate(chat(&format!("held{i}"), &m, 600));
            assert_eq!(rx.recv().await, Some(Ok(PoolEvent::Started)));
            held.push(rx);
        }
        let in_flight = |id: u64| pool.status().workers.iter().find(|w| w.id == id).unwrap().in_flight;
        assert_eq!((in_flight(0), in_flight(1)), (3, 0));
        // Worker 0 is now 3 busier than worker 1: the next turn of A goes to worker 1.
        quiet(&pool, 1).await;
        a.push(msg("assistant", "Reply 4."));
        a.push(msg("user", "A, turn 5."));
        assert_eq!(
            served_by(&pool, chat("A5", &a, 4)).await,
            1,
            "over the bound, the turn goes to the least busy worker"
        );
        drop(held);

        // A restarted worker's KV cache is gone, and so are its keys: worker 1, which ran the
        // last turn, now knows the conversation best.
        quiet(&pool, 0).await;
        pool.restart(0).unwrap();
        let back =
            || pool.status().workers.iter().any(|w| w.id == 0 && w.generation == 2 && w.state == WorkerState::Ready);
        assert!(eventually(Duration::from_secs(60), back).await, "worker 0 did not come back");
        assert_eq!(pool.status().workers[0].prefix_keys, 0);
        a.push(msg("assistant", "Reply 5."));
        a.push(msg("user", "A, turn 6."));
        assert_eq!(served_by(&pool, chat("A6", &a, 4)).await, 1);
        pool.shutdown(Duration::from_secs(5)).await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_prefix_keys_there_is_no_affinity() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let mut c = config(2);
        c.pool.prefix_affinity_keys = 0;
        let pool = started(c).await;
        let mut conversation = vec![msg("user", "Hello.")];
        for turn in 0..4 {
            collect(&pool, chat(&format!("t{turn}"), &conversation, 2)).await.last.unwrap();
            conversation.push(msg("assistant", "Hi."));
            conversation.push(msg("user", &format!("Turn {turn}.")));
        }
        let status = pool.status();
        assert_eq!(status.prefix_routed_requests, 0);
        assert!(status.workers.iter().all(|w| w.prefix_keys == 0), "{:?}", status.workers);
        pool.shutdown(Duration::from_secs(5)).await;
    })
    .await
    .expect("test timed out");
}
