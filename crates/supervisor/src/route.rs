//! Least-busy worker choice, with a preference for the worker that holds the
//! longest prefix of the request's prompt in its KV cache.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use rand::Rng;

/// A worker that may take the request.
#[derive(Clone, Debug)]
pub struct Candidate {
    /// Worker id.
    pub id: u64,
    /// Outstanding work: in-flight requests (guards held until the stream
    /// ends) plus the worker's queue depth and active sequences from
    /// heartbeats, combined as the caller decides.
    pub load: usize,
    /// How much of this request's prompt the worker is known to hold in its
    /// KV cache (messages or blocks, `prefix::PrefixMemory::longest`); 0 for
    /// nothing.
    pub prefix: usize,
}

/// What [`pick`] chose.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Picked {
    pub id: u64,
    /// The prefix rule decided: the worker holds the longest known prefix.
    pub by_prefix: bool,
}

/// Picks a worker. Among candidates whose load is within `prefix_slack` of
/// the minimum, the one holding the longest prefix of the request wins
/// (least loaded among equal prefixes, ties random). When none holds any,
/// the least-loaded candidate wins, ties broken uniformly at random with
/// `rng`. None when empty.
pub fn pick(candidates: &[Candidate], prefix_slack: usize, rng: &mut impl Rng) -> Option<Picked> {
    let min_load = candidates.iter().map(|c| c.load).min()?;
    let allowed = min_load.saturating_add(prefix_slack);
    let longest = candidates.iter().filter(|c| c.load <= allowed).map(|c| c.prefix).max().unwrap_or(0);
    if longest > 0 {
        let cached = candidates.iter().filter(|c| c.prefix == longest && c.load <= allowed);
        if let Some(id) = least_loaded(cached, rng) {
            return Some(Picked { id, by_prefix: true });
        }
    }
    least_loaded(candidates.iter(), rng).map(|id| Picked { id, by_prefix: false })
}

/// Least-loaded id among `candidates`, ties broken uniformly at random
/// (reservoir sampling over the tied ids).
fn least_loaded<'a>(candidates: impl Iterator<Item = &'a Candidate>, rng: &mut impl Rng) -> Option<u64> {
    let mut best: Option<(usize, u64)> = None;
    let mut tied = 0u32;
    for c in candidates {
        match best {
            Some((load, _)) if c.load > load => {}
            Some((load, _)) if c.load == load => {
                tied += 1;
                if rng.random_range(0..tied) == 0 {
                    best = Some((load, c.id));
                }
            }
            _ => {
                best = Some((c.load, c.id));
                tied = 1;
            }
        }
    }
    best.map(|(_, id)| id)
}

/// Counts one request against a worker until dropped.
#[derive(Debug)]
pub struct InFlight {
    counter: Arc<AtomicUsize>,
}

impl InFlight {
    /// Increments `counter` now; the drop decrements it.
    pub fn new(counter: Arc<AtomicUsize>) -> Self {
        counter.fetch_add(1, Ordering::AcqRel);
        Self { counter }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.counter.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::SmallRng;
    use std::collections::HashMap;

    fn c(id: u64, load: usize, prefix_hit: bool) -> Candidate {
        Candidate { id, load, prefix: usize::from(prefix_hit) }
    }

    fn p(id: u64, load: usize, prefix: usize) -> Candidate {
        Candidate { id, load, prefix }
    }

    fn id(picked: Option<Picked>) -> Option<u64> {
        picked.map(|p| p.id)
    }

    fn rng(seed: u64) -> SmallRng {
        SmallRng::seed_from_u64(seed)
    }

    #[test]
    fn empty_gives_none() {
        assert_eq!(pick(&[], 2, &mut rng(1)), None);
    }

    #[test]
    fn picks_minimum() {
        let cs = [c(1, 5, false), c(2, 2, false), c(3, 9, false), c(4, 3, false)];
        for seed in 0..50 {
            assert_eq!(id(pick(&cs, 0, &mut rng(seed))), Some(2));
        }
    }

    #[test]
    fn ties_deterministic_for_a_seed() {
        let cs = [c(1, 1, false), c(2, 1, false), c(3, 4, false), c(4, 1, false)];
        for seed in 0..20 {
            assert_eq!(pick(&cs, 0, &mut rng(seed)), pick(&cs, 0, &mut rng(seed)));
        }
    }

    #[test]
    fn ties_spread_over_all_tied_ids() {
        let cs = [c(1, 1, false), c(2, 1, false), c(3, 4, false), c(4, 1, false)];
        let mut counts: HashMap<u64, usize> = HashMap::new();
        for seed in 0..3000 {
            let id = id(pick(&cs, 0, &mut rng(seed)));
            *counts.entry(id.unwrap_or(0)).or_default() += 1;
        }
        assert_eq!(counts.get(&3), None);
        for id in [1, 2, 4] {
            let n = counts.get(&id).copied().unwrap_or(0);
            assert!((800..1200).contains(&n), "id {id}: {n}");
        }
    }

    #[test]
    fn prefix_hit_wins_within_slack() {
        let cs = [c(1, 2, false), c(2, 4, true), c(3, 5, true)];
        assert_eq!(id(pick(&cs, 2, &mut rng(1))), Some(2));
        assert_eq!(id(pick(&cs, 3, &mut rng(1))), Some(2));
    }

    #[test]
    fn prefix_hit_loses_beyond_slack() {
        let cs = [c(1, 2, false), c(2, 5, true)];
        assert_eq!(id(pick(&cs, 2, &mut rng(1))), Some(1));
        assert_eq!(id(pick(&cs, 0, &mut rng(1))), Some(1));
    }

    #[test]
    fn prefix_ties_broken_among_hits_only() {
        let cs = [c(1, 0, false), c(2, 1, true), c(3, 1, true), c(4, 1, false)];
        let mut seen = [false; 5];
        for seed in 0..200 {
            match id(pick(&cs, 1, &mut rng(seed))) {
                Some(id @ (2 | 3)) => seen[id as usize] = true,
                other => panic!("picked {other:?}"),
            }
        }
        assert!(seen[2] && seen[3]);
    }

    #[test]
    fn the_longest_prefix_within_slack_wins() {
        // Worker 3 knows more of the prompt than worker 2; both are within the slack.
        let cs = [p(1, 0, 0), p(2, 1, 2), p(3, 2, 5)];
        assert_eq!(pick(&cs, 2, &mut rng(1)), Some(Picked { id: 3, by_prefix: true }));
        // Beyond the slack, the next longest prefix within it wins.
        assert_eq!(pick(&cs, 1, &mut rng(1)), Some(Picked { id: 2, by_prefix: true }));
        // No prefix within the slack: the least loaded, not by prefix.
        assert_eq!(pick(&cs, 0, &mut rng(1)), Some(Picked { id: 1, by_prefix: false }));
        let none = [p(1, 3, 0), p(2, 1, 0)];
        assert_eq!(pick(&none, 2, &mut rng(1)), Some(Picked { id: 2, by_prefix: false }));
    }

    #[test]
    fn a_conversation_stays_on_its_worker_until_it_is_over_the_bound() {
        // Worker 1 holds the conversation; each new turn goes there until its load exceeds the
        // least busy worker's by more than the slack.
        let mut load = [0usize, 0];
        for turn in 0..3 {
            let cs = [p(1, load[0], 4), p(2, load[1], 0)];
            let picked = pick(&cs, 2, &mut rng(turn)).unwrap();
            assert_eq!(picked, Picked { id: 1, by_prefix: true }, "turn {turn}");
            load[0] += 1;
        }
        let cs = [p(1, load[0], 4), p(2, load[1], 0)];
        assert_eq!(pick(&cs, 2, &mut rng(9)), Some(Picked { id: 2, by_prefix: false }));
    }

    #[test]
    fn in_flight_counts_until_dropped() {
        let counter = Arc::new(AtomicUsize::new(0));
        let a = InFlight::new(Arc::clone(&counter));
        let b = InFlight::new(Arc::clone(&counter));
        assert_eq!(counter.load(Ordering::Acquire), 2);
        drop(a);
        assert_eq!(counter.load(Ordering::Acquire), 1);
        drop(b);
        assert_eq!(counter.load(Ordering::Acquire), 0);
    }
}
