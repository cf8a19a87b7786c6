//! Retry budget and retry backoff.
//!
//! Retries in progress across the pool stay within
//! `max(floor, ratio × active requests)`, so a failing pool cannot multiply
//! its own load. The wait before a retry is drawn with full jitter.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rand::Rng;

/// Budget and backoff settings for retries.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RetryConfig {
    /// Retries allowed per active request (0.2 = one retry per five requests).
    pub ratio: f64,
    /// Retries always allowed, however few requests are active.
    pub floor: usize,
    /// Upper bound of the wait before the first retry.
    pub base: Duration,
    /// Upper bound of the wait before any retry.
    pub cap: Duration,
}

impl Default for RetryConfig {
    /// 20 % of active requests, at least 3; waits up to 25 ms doubling to 250 ms.
    fn default() -> Self {
        Self { ratio: 0.2, floor: 3, base: Duration::from_millis(25), cap: Duration::from_millis(250) }
    }
}

/// Shared (Arc) by all requests of the pool; lock-free (atomics).
#[derive(Debug)]
pub struct RetryBudget {
    config: RetryConfig,
    active: AtomicUsize,
    retrying: AtomicUsize,
}

impl RetryBudget {
    /// A budget with no active requests and no retries in progress.
    pub fn new(config: RetryConfig) -> Self {
        Self { config, active: AtomicUsize::new(0), retrying: AtomicUsize::new(0) }
    }

    /// The settings this budget was made with.
    pub fn config(&self) -> &RetryConfig {
        &self.config
    }

    /// Counts a request as active until the guard drops.
    pub fn start_request(self: &Arc<Self>) -> ActiveGuard {
        self.active.fetch_add(1, Ordering::AcqRel);
        ActiveGuard { budget: Arc::clone(self) }
    }

    /// A permit for one retry if retries in progress stay within
    /// `max(floor, ratio × active requests)`; None when the budget is spent.
    /// The permit releases on drop.
    pub fn try_retry(self: &Arc<Self>) -> Option<RetryPermit> {
        let limit = self.limit();
        self.retrying
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |retrying| (retrying < limit).then_some(retrying + 1))
            .ok()?;
        Some(RetryPermit { budget: Arc::clone(self) })
    }

    /// Requests currently active.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    /// Retries currently in progress (permits held).
    pub fn retrying(&self) -> usize {
        self.retrying.load(Ordering::Acquire)
    }

    /// Retries allowed at once: `max(floor, ⌊ratio × active⌋)`.
    fn limit(&self) -> usize {
        // A negative or NaN ratio converts to 0; a huge product saturates.
        let scaled = (self.config.ratio * self.active() as f64) as usize;
        scaled.max(self.config.floor)
    }
}

/// Keeps one request counted as active; releases it on drop.
#[derive(Debug)]
pub struct ActiveGuard {
    budget: Arc<RetryBudget>,
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.budget.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One retry in progress; releases its place in the budget on drop.
#[derive(Debug)]
pub struct RetryPermit {
    budget: Arc<RetryBudget>,
}

impl Drop for RetryPermit {
    fn drop(&mut self) {
        self.budget.retrying.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Full-jitter backoff before retry number `attempt` (1-based; 0 counts as
/// 1): uniform in `[0, min(cap, base × 2^(attempt-1))]`, drawn from `rng`.
pub fn retry_delay(config: &RetryConfig, attempt: u32, rng: &mut impl Rng) -> Duration {
    let doublings = attempt.saturating_sub(1);
    let factor = 2u32.checked_pow(doublings).unwrap_or(u32::MAX);
    let ceiling = config.base.saturating_mul(factor).min(config.cap);
    let ceiling_nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(rng.random_range(0..=ceiling_nanos))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::SmallRng;

    fn budget() -> Arc<RetryBudget> {
        Arc::new(RetryBudget::new(RetryConfig::default()))
    }

    fn drain(budget: &Arc<RetryBudget>) -> Vec<RetryPermit> {
        std::iter::from_fn(|| budget.try_retry()).take(10_000).collect()
    }

    #[test]
    fn floor_applies_with_few_requests() {
        let b = budget();
        assert_eq!(drain(&b).len(), 3);
        let _active: Vec<_> = (0..5).map(|_| b.start_request()).collect();
        assert_eq!(b.active(), 5);
        assert_eq!(drain(&b).len(), 3);
    }

    #[test]
    fn ratio_of_active_requests() {
        let b = budget();
        let _active: Vec<_> = (0..100).map(|_| b.start_request()).collect();
        let permits = drain(&b);
        assert_eq!(permits.len(), 20);
        assert_eq!(b.retrying(), 20);
        assert!(b.try_retry().is_none());
    }

    #[test]
    fn permits_and_guards_release_on_drop() {
        let b = budget();
        let mut permits = drain(&b);
        assert!(b.try_retry().is_none());
        permits.pop();
        assert_eq!(b.retrying(), 2);
        let again = b.try_retry();
        assert!(again.is_some());
        drop(again);
        drop(permits);
        assert_eq!(b.retrying(), 0);

        let guard = b.start_request();
        assert_eq!(b.active(), 1);
        drop(guard);
        assert_eq!(b.active(), 0);
    }

    #[test]
    fn budget_shrinks_as_requests_finish() {
        let b = budget();
        let mut active: Vec<_> = (0..50).map(|_| b.start_request()).collect();
        let permits = drain(&b);
        assert_eq!(permits.len(), 10);
        active.truncate(20);
        // In-flight permits stay valid; new ones wait until retries drop below 4.
        assert!(b.try_retry().is_none());
        drop(permits);
        assert_eq!(drain(&b).len(), 4);
    }

    #[test]
    fn delays_within_bounds() {
        let config = RetryConfig::default();
        let mut rng = SmallRng::seed_from_u64(7);
        for attempt in 0..40 {
            let ceiling = match attempt {
                0 | 1 => Duration::from_millis(25),
                2 => Duration::from_millis(50),
                3 => Duration::from_millis(100),
                4 => Duration::from_millis(200),
                _ => Duration::from_millis(250),
            };
            let mut longest = Duration::ZERO;
            for _ in 0..200 {
                let d = retry_delay(&config, attempt, &mut rng);
                assert!(d <= ceiling, "attempt {attempt}: {d:?}");
                longest = longest.max(d);
            }
            // The draws cover the range, not just its low end.
            assert!(longest > ceiling / 2, "attempt {attempt}: {longest:?}");
        }
    }

    #[test]
    fn delays_deterministic_for_a_seed() {
        let config = RetryConfig::default();
        let draw = |seed| {
            let mut rng = SmallRng::seed_from_u64(seed);
            (1..=6).map(|a| retry_delay(&config, a, &mut rng)).collect::<Vec<_>>()
        };
        assert_eq!(draw(42), draw(42));
        assert_ne!(draw(42), draw(43));
    }
}
