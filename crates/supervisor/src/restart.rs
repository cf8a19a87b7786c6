//! Restart backoff and restart-intensity limit for one worker slot.
//!
//! After a worker dies the slot waits before spawning again. The wait grows
//! exponentially from `min_delay` (doubling, capped at `max_delay`) with
//! jitter that adds up to one more delay, so every wait lies in
//! `[min_delay, 2 × max_delay)`; the first wait after a healthy run is exactly
//! `min_delay`. The backoff starts again from `min_delay`
//! when the worker that died had been ready for at least `window`.
//!
//! Independently of the backoff, no more than `max_spawns` spawns happen
//! inside any `window`: when the next spawn would exceed that, the slot is
//! quarantined until enough old spawns have left the window.

use std::collections::VecDeque;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use tokio::time::Instant;

/// Shortest wait ever returned, even when `min_delay` is zero.
const SMALLEST_DELAY: Duration = Duration::from_millis(1);

/// Backoff and intensity limits of a [`RestartTracker`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RestartPolicy {
    /// First backoff delay (a zero value is treated as 1 ms).
    pub min_delay: Duration,
    /// Largest backoff delay before jitter; with jitter a wait stays below
    /// twice this.
    pub max_delay: Duration,
    /// Most spawns allowed inside any `window` (0 acts as 1).
    pub max_spawns: usize,
    /// Length of the intensity window, and how long a worker must stay ready
    /// for the backoff to start again from `min_delay`.
    pub window: Duration,
}

impl Default for RestartPolicy {
    /// 100 ms to 60 s backoff, at most 5 spawns in 30 s.
    fn default() -> Self {
        Self {
            min_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(60),
            max_spawns: 5,
            window: Duration::from_secs(30),
        }
    }
}

/// What to do after a worker died.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Spawn again after the backoff delay.
    Restart {
        /// Wait before the next spawn.
        after: Duration,
    },
    /// The slot restarted too often: spawn again only after this longer wait.
    Quarantine {
        /// Wait before the next spawn; at least the backoff delay.
        after: Duration,
    },
}

impl Decision {
    /// Wait before the next spawn, whichever the decision.
    pub fn after(&self) -> Duration {
        match *self {
            Decision::Restart { after } | Decision::Quarantine { after } => after,
        }
    }
}

/// Restart bookkeeping for one worker slot.
#[derive(Debug)]
pub struct RestartTracker {
    policy: RestartPolicy,
    backoff: ExponentialBackoff,
    /// Spawn times still inside the window, oldest first.
    recent_spawns: VecDeque<Instant>,
    total_spawns: u64,
    /// When the current worker became ready; cleared on spawn.
    ready_at: Option<Instant>,
    /// No death since the backoff started over: the next wait is exactly `min_delay`.
    fresh: bool,
}

impl RestartTracker {
    /// A tracker with no spawns yet and the backoff at `min_delay`.
    pub fn new(policy: RestartPolicy) -> Self {
        Self {
            backoff: build_backoff(&policy),
            policy,
            recent_spawns: VecDeque::new(),
            total_spawns: 0,
            ready_at: None,
            fresh: true,
        }
    }

    /// A worker process was spawned for this slot at `now`.
    pub fn on_spawn(&mut self, now: Instant) {
        self.prune(now);
        self.recent_spawns.push_back(now);
        self.total_spawns = self.total_spawns.saturating_add(1);
        self.ready_at = None;
    }

    /// The worker became ready at `now`. If it then stays ready for at least
    /// `window` before it dies, the backoff starts again from `min_delay`.
    pub fn on_ready(&mut self, now: Instant) {
        self.ready_at = Some(now);
    }

    /// The worker died at `now`: how long to wait before the next spawn, and
    /// whether the slot is quarantined (more than `max_spawns` spawns inside
    /// `window` would happen). Never returns a zero wait. Quarantine waits
    /// at least until the oldest spawn leaves the window, and at least the
    /// current backoff delay.
    pub fn next(&mut self, now: Instant) -> Decision {
        if let Some(ready_at) = self.ready_at.take()
            && now.saturating_duration_since(ready_at) >= self.policy.window
        {
            self.backoff = build_backoff(&self.policy);
            self.fresh = true;
        }
        // The first death after a healthy run is restarted after exactly `min_delay`, so a
        // single crash is replaced quickly; jitter spreads the later ones.
        let delay = if std::mem::take(&mut self.fresh) {
            let _ = self.next_delay();
            self.policy.min_delay.max(SMALLEST_DELAY)
        } else {
            self.next_delay()
        };

        self.prune(now);
        // The next spawn must see at most `max_spawns - 1` earlier spawns in
        // its window, so every spawn before the `max_spawns - 1` newest ones
        // must have left it.
        let keep = self.policy.max_spawns.saturating_sub(1);
        let excess = self.recent_spawns.len().saturating_sub(keep);
        let free_at =
            excess.checked_sub(1).and_then(|i| self.recent_spawns.get(i)).map(|&oldest| oldest + self.policy.window);
        match free_at {
            Some(free_at) if free_at > now + delay => Decision::Quarantine { after: free_at - now },
            _ => Decision::Restart { after: delay },
        }
    }

    /// Spawns inside the window ending at `now`.
    pub fn spawns_in_window(&self, now: Instant) -> usize {
        self.recent_spawns.iter().filter(|&&at| self.in_window(at, now)).count()
    }

    /// All spawns recorded for this slot.
    pub fn total_spawns(&self) -> u64 {
        self.total_spawns
    }

    /// Next backoff delay, kept within `[min_delay, 2 × max_delay]`.
    fn next_delay(&mut self) -> Duration {
        let floor = self.policy.min_delay.max(SMALLEST_DELAY);
        let ceiling = self.policy.max_delay.max(floor).saturating_mul(2);
        self.backoff.next().unwrap_or(ceiling).clamp(floor, ceiling)
    }

    /// A spawn at `at` is inside the window ending at `now` until `at + window`.
    fn in_window(&self, at: Instant, now: Instant) -> bool {
        now.saturating_duration_since(at) < self.policy.window
    }

    fn prune(&mut self, now: Instant) {
        while let Some(&oldest) = self.recent_spawns.front() {
            if self.in_window(oldest, now) {
                break;
            }
            self.recent_spawns.pop_front();
        }
    }
}

/// Exponential backoff from `min_delay` doubling up to `max_delay`, with
/// jitter adding up to one more delay, never exhausted.
fn build_backoff(policy: &RestartPolicy) -> ExponentialBackoff {
    let min = policy.min_delay.max(SMALLEST_DELAY);
    ExponentialBuilder::default()
        .with_min_delay(min)
        .with_max_delay(policy.max_delay.max(min))
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::advance;

    const SIM: Duration = Duration::from_secs(600);

    /// Drives a worker that dies `uptime` after each spawn (never ready) for
    /// `total` of simulated time; returns the spawn times and the decisions.
    async fn crash_loop(
        tracker: &mut RestartTracker,
        uptime: Duration,
        total: Duration,
    ) -> (Vec<Instant>, Vec<Decision>) {
        let end = Instant::now() + total;
        let mut spawns = Vec::new();
        let mut decisions = Vec::new();
        while Instant::now() < end {
            tracker.on_spawn(Instant::now());
            spawns.push(Instant::now());
            advance(uptime).await;
            let decision = tracker.next(Instant::now());
            decisions.push(decision);
            advance(decision.after()).await;
        }
        (spawns, decisions)
    }

    fn assert_intensity(spawns: &[Instant], policy: &RestartPolicy) {
        for (i, &start) in spawns.iter().enumerate() {
            let inside = spawns[i..].iter().filter(|&&at| at - start < policy.window).count();
            assert!(inside <= policy.max_spawns, "{inside} spawns in one window");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn delays_stay_within_bounds() {
        let policy = RestartPolicy::default();
        let mut tracker = RestartTracker::new(policy);
        for _ in 0..200 {
            let d = tracker.next_delay();
            assert!(d >= policy.min_delay, "{d:?}");
            assert!(d <= policy.max_delay * 2, "{d:?}");
        }
        // After enough doublings the delay sits at the cap, jitter included.
        let d = tracker.next_delay();
        assert!(d >= policy.max_delay);
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_death_after_a_healthy_run_waits_exactly_the_minimum() {
        let policy = RestartPolicy::default();
        let mut tracker = RestartTracker::new(policy);
        for _ in 0..3 {
            tracker.on_spawn(Instant::now());
            tracker.on_ready(Instant::now());
            advance(policy.window).await;
            assert_eq!(tracker.next(Instant::now()), Decision::Restart { after: policy.min_delay });
        }
        // A quick second death backs off further.
        tracker.on_spawn(Instant::now());
        let d = tracker.next(Instant::now());
        assert!(d.after() >= policy.min_delay * 2, "{d:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn crash_loop_never_spins() {
        let policy = RestartPolicy::default();
        let mut tracker = RestartTracker::new(policy);
        let (spawns, decisions) = crash_loop(&mut tracker, Duration::ZERO, SIM).await;

        assert_intensity(&spawns, &policy);
        assert!(decisions.iter().all(|d| d.after() >= policy.min_delay));
        assert_eq!(tracker.total_spawns(), spawns.len() as u64);

        // Every wait is at least the un-jittered backoff delay, so the spawn
        // count is at most 1 + the number of such delays that fit in SIM.
        let mut bound = 1;
        let (mut elapsed, mut delay) = (Duration::ZERO, policy.min_delay);
        while elapsed + delay < SIM {
            elapsed += delay;
            delay = (delay * 2).min(policy.max_delay);
            bound += 1;
        }
        assert!(spawns.len() <= bound, "{} spawns > bound {bound}", spawns.len());
        assert!(bound <= 20, "bound {bound}");
        // Still restarting: each wait is below 2 × max_delay.
        assert!(spawns.len() >= 5);
    }

    #[tokio::test(start_paused = true)]
    async fn quarantine_when_intensity_exceeded() {
        let policy = RestartPolicy::default();
        let mut tracker = RestartTracker::new(policy);
        let start = Instant::now();
        for _ in 0..4 {
            tracker.on_spawn(Instant::now());
            let d = tracker.next(Instant::now());
            assert!(matches!(d, Decision::Restart { .. }), "{d:?}");
            advance(d.after()).await;
        }
        // Backoff so far is under 3 s, so a sixth spawn after the fifth
        // would fall in the window of the first.
        assert!(Instant::now() - start < Duration::from_secs(3));
        tracker.on_spawn(Instant::now());
        assert_eq!(tracker.spawns_in_window(Instant::now()), 5);
        let now = Instant::now();
        match tracker.next(now) {
            Decision::Quarantine { after } => {
                assert_eq!(now + after, start + policy.window);
            }
            d => panic!("expected quarantine, got {d:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn intensity_holds_with_fast_backoff() {
        // A tiny, flat backoff leaves the intensity limit as the only brake.
        let policy = RestartPolicy {
            min_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(1),
            max_spawns: 3,
            window: Duration::from_secs(10),
        };
        let mut tracker = RestartTracker::new(policy);
        let (spawns, decisions) = crash_loop(&mut tracker, Duration::ZERO, SIM).await;
        assert_intensity(&spawns, &policy);
        assert!(decisions.iter().any(|d| matches!(d, Decision::Quarantine { .. })));
        // 3 per 10 s window over 600 s.
        assert!(spawns.len() <= 3 * 61, "{}", spawns.len());
        assert!(spawns.len() >= 3 * 59, "{}", spawns.len());
    }

    #[tokio::test(start_paused = true)]
    async fn zero_min_delay_never_waits_zero() {
        let policy = RestartPolicy { min_delay: Duration::ZERO, ..RestartPolicy::default() };
        let mut tracker = RestartTracker::new(policy);
        tracker.on_spawn(Instant::now());
        assert!(tracker.next(Instant::now()).after() > Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_restarts_after_long_healthy_run() {
        let policy = RestartPolicy::default();
        let mut tracker = RestartTracker::new(policy);
        crash_loop(&mut tracker, Duration::ZERO, Duration::from_secs(120)).await;
        assert!(tracker.next_delay() >= Duration::from_secs(10));

        tracker.on_spawn(Instant::now());
        tracker.on_ready(Instant::now());
        advance(policy.window).await;
        let d = tracker.next(Instant::now());
        assert!(matches!(d, Decision::Restart { .. }), "{d:?}");
        assert!(d.after() < policy.min_delay * 2, "{d:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn short_ready_run_keeps_backoff() {
        let policy = RestartPolicy::default();
        let mut tracker = RestartTracker::new(policy);
        crash_loop(&mut tracker, Duration::ZERO, Duration::from_secs(120)).await;

        tracker.on_spawn(Instant::now());
        tracker.on_ready(Instant::now());
        advance(policy.window - Duration::from_secs(1)).await;
        assert!(tracker.next(Instant::now()).after() >= Duration::from_secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn spawns_leave_the_window() {
        let policy = RestartPolicy::default();
        let mut tracker = RestartTracker::new(policy);
        tracker.on_spawn(Instant::now());
        advance(Duration::from_secs(10)).await;
        tracker.on_spawn(Instant::now());
        assert_eq!(tracker.spawns_in_window(Instant::now()), 2);
        advance(Duration::from_secs(20)).await;
        assert_eq!(tracker.spawns_in_window(Instant::now()), 1);
        advance(Duration::from_secs(10)).await;
        assert_eq!(tracker.spawns_in_window(Instant::now()), 0);
        assert_eq!(tracker.total_spawns(), 2);
    }
}
