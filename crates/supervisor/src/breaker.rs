//! Circuit breaker per worker: closed, open, half-open.
//!
//! A closed breaker lets every request through and counts consecutive
//! failures. After `failure_threshold` consecutive failures it opens (ejects
//! the worker) for `min(base_ejection × n, max_ejection)`, where `n` counts
//! ejections starting at 1. When that time is up the breaker is half-open and
//! lets exactly one probe through: a successful probe closes it, a failed probe
//! reopens it with `n + 1`. `n` returns to 0 once the breaker has stayed closed
//! for `max_ejection` without a failure.

use std::time::Duration;

use tokio::time::Instant;

/// Thresholds and ejection durations of a [`Breaker`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Consecutive failures that open a closed breaker.
    pub failure_threshold: u32,
    /// Duration of the first ejection; ejection `n` lasts `base_ejection × n`.
    pub base_ejection: Duration,
    /// Upper bound of any ejection, and how long a closed breaker must stay
    /// free of failures before the ejection count returns to 0.
    pub max_ejection: Duration,
}

impl Default for BreakerConfig {
    /// 5 failures, 30 s base ejection, 300 s maximum ejection.
    fn default() -> Self {
        Self { failure_threshold: 5, base_ejection: Duration::from_secs(30), max_ejection: Duration::from_secs(300) }
    }
}

/// State of a [`Breaker`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerState {
    /// Requests flow; consecutive failures are counted.
    Closed,
    /// The worker is ejected until `until`.
    Open {
        /// When the ejection ends and the breaker becomes half-open.
        until: Instant,
    },
    /// One probe request at a time decides whether to close or reopen.
    HalfOpen,
}

/// Result of one request, as seen by the breaker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The worker served the request.
    Success,
    /// The worker failed the request (crash, timeout, internal error).
    Failure,
    /// Overload refusals and client errors: never counted.
    Ignored,
}

/// Circuit breaker for one worker.
#[derive(Clone, Debug)]
pub struct Breaker {
    config: BreakerConfig,
    state: BreakerState,
    consecutive_failures: u32,
    ejections: u32,
    probe_in_flight: bool,
    /// Start of the current failure-free closed stretch.
    healthy_since: Option<Instant>,
}

impl Breaker {
    /// A closed breaker with no failures and no ejections.
    pub fn new(config: BreakerConfig) -> Self {
        Self {
            config,
            state: BreakerState::Closed,
            consecutive_failures: 0,
            ejections: 0,
            probe_in_flight: false,
            healthy_since: None,
        }
    }

    /// Current state; an Open whose time is up becomes HalfOpen here.
    ///
    /// Also returns the ejection count to 0 once the breaker has been closed
    /// for `max_ejection` without a failure.
    pub fn state(&mut self, now: Instant) -> BreakerState {
        match self.state {
            BreakerState::Open { until } if now >= until => {
                self.state = BreakerState::HalfOpen;
                self.probe_in_flight = false;
            }
            BreakerState::Closed => {
                if let Some(since) = self.healthy_since
                    && now.saturating_duration_since(since) >= self.config.max_ejection
                {
                    self.ejections = 0;
                    self.healthy_since = None;
                }
            }
            _ => {}
        }
        self.state
    }

    /// Whether a request may be sent now: Closed yes; Open no; HalfOpen:
    /// exactly one probe at a time (returns true once and marks a probe in
    /// flight until its outcome is recorded).
    pub fn try_acquire(&mut self, now: Instant) -> bool {
        match self.state(now) {
            BreakerState::Closed => true,
            BreakerState::Open { .. } => false,
            BreakerState::HalfOpen => {
                if self.probe_in_flight {
                    false
                } else {
                    self.probe_in_flight = true;
                    true
                }
            }
        }
    }

    /// Records the outcome of a request.
    ///
    /// `may_open`: the pool says whether ejecting this worker keeps ejected
    /// workers at or below half the pool. If false the breaker does not open:
    /// a closed breaker stays closed and keeps counting failures, so it opens
    /// at the next failure once allowed; a half-open breaker stays half-open
    /// and frees its probe slot. Outcomes that arrive while the breaker is
    /// open (requests sent before it opened) change nothing.
    pub fn record(&mut self, outcome: Outcome, now: Instant, may_open: bool) {
        match (self.state(now), outcome) {
            (_, Outcome::Ignored) => self.probe_in_flight = false,
            (BreakerState::Open { .. }, _) => {}
            (BreakerState::Closed, Outcome::Success) => self.consecutive_failures = 0,
            (BreakerState::Closed, Outcome::Failure) => {
                self.consecutive_failures = self.consecutive_failures.saturating_add(1);
                self.healthy_since = Some(now);
                if may_open && self.consecutive_failures >= self.config.failure_threshold {
                    self.open(now);
                }
            }
            (BreakerState::HalfOpen, Outcome::Success) => {
                self.state = BreakerState::Closed;
                self.consecutive_failures = 0;
                self.probe_in_flight = false;
                self.healthy_since = Some(now);
            }
            (BreakerState::HalfOpen, Outcome::Failure) => {
                self.consecutive_failures = self.consecutive_failures.saturating_add(1);
                self.probe_in_flight = false;
                if may_open {
                    self.open(now);
                }
            }
        }
    }

    /// Consecutive failures counted since the last success or opening.
    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures
    }

    /// Ejections so far (`n`); returns to 0 after a long failure-free stretch.
    pub fn ejections(&self) -> u32 {
        self.ejections
    }

    /// Name for status output: "closed" | "open" | "half_open".
    pub fn name(&mut self, now: Instant) -> &'static str {
        match self.state(now) {
            BreakerState::Closed => "closed",
            BreakerState::Open { .. } => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }

    /// Opens for ejection number `n + 1`: `min(base_ejection × n, max_ejection)`.
    fn open(&mut self, now: Instant) {
        self.ejections = self.ejections.saturating_add(1);
        let duration = self.config.base_ejection.saturating_mul(self.ejections).min(self.config.max_ejection);
        self.state = BreakerState::Open { until: now + duration };
        self.consecutive_failures = 0;
        self.probe_in_flight = false;
        self.healthy_since = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::advance;

    fn breaker() -> Breaker {
        Breaker::new(BreakerConfig::default())
    }

    fn fail(b: &mut Breaker, times: u32) {
        for _ in 0..times {
            b.record(Outcome::Failure, Instant::now(), true);
        }
    }

    /// Opens the breaker from closed and returns how long it stays open.
    fn open_duration(b: &mut Breaker) -> Duration {
        fail(b, 5);
        let now = Instant::now();
        match b.state(now) {
            BreakerState::Open { until } => until - now,
            other => panic!("expected open, got {other:?}"),
        }
    }

    /// Lets the ejection run out and fails the probe; returns the next duration.
    async fn fail_probe(b: &mut Breaker) -> Duration {
        if let BreakerState::Open { until } = b.state(Instant::now()) {
            advance(until - Instant::now()).await;
        }
        assert!(b.try_acquire(Instant::now()));
        b.record(Outcome::Failure, Instant::now(), true);
        let now = Instant::now();
        match b.state(now) {
            BreakerState::Open { until } => until - now,
            other => panic!("expected open, got {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_exactly_threshold_failures() {
        let mut b = breaker();
        fail(&mut b, 4);
        assert_eq!(b.state(Instant::now()), BreakerState::Closed);
        assert_eq!(b.consecutive_failures(), 4);
        assert!(b.try_acquire(Instant::now()));
        fail(&mut b, 1);
        assert!(matches!(b.state(Instant::now()), BreakerState::Open { .. }));
        assert_eq!(b.name(Instant::now()), "open");
        assert!(!b.try_acquire(Instant::now()));
        assert_eq!(b.ejections(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn ignored_neither_resets_nor_counts() {
        let mut b = breaker();
        fail(&mut b, 3);
        for _ in 0..10 {
            b.record(Outcome::Ignored, Instant::now(), true);
        }
        assert_eq!(b.consecutive_failures(), 3);
        fail(&mut b, 1);
        b.record(Outcome::Ignored, Instant::now(), true);
        assert_eq!(b.name(Instant::now()), "closed");
        fail(&mut b, 1);
        assert_eq!(b.name(Instant::now()), "open");
    }

    #[tokio::test(start_paused = true)]
    async fn success_resets_the_count() {
        let mut b = breaker();
        fail(&mut b, 4);
        b.record(Outcome::Success, Instant::now(), true);
        assert_eq!(b.consecutive_failures(), 0);
        fail(&mut b, 4);
        assert_eq!(b.name(Instant::now()), "closed");
    }

    #[tokio::test(start_paused = true)]
    async fn ejection_grows_linearly_and_caps() {
        let mut b = breaker();
        let mut durations = vec![open_duration(&mut b)];
        for _ in 0..11 {
            durations.push(fail_probe(&mut b).await);
        }
        let secs: Vec<u64> = durations.iter().map(Duration::as_secs).collect();
        assert_eq!(secs, [30, 60, 90, 120, 150, 180, 210, 240, 270, 300, 300, 300]);
        assert_eq!(b.ejections(), 12);
    }

    #[tokio::test(start_paused = true)]
    async fn open_turns_half_open_when_time_is_up() {
        let mut b = breaker();
        fail(&mut b, 5);
        advance(Duration::from_secs(29)).await;
        assert_eq!(b.name(Instant::now()), "open");
        advance(Duration::from_secs(1)).await;
        assert_eq!(b.state(Instant::now()), BreakerState::HalfOpen);
        assert_eq!(b.name(Instant::now()), "half_open");
    }

    #[tokio::test(start_paused = true)]
    async fn half_open_allows_exactly_one_probe() {
        let mut b = breaker();
        fail(&mut b, 5);
        advance(Duration::from_secs(30)).await;
        assert!(b.try_acquire(Instant::now()));
        assert!(!b.try_acquire(Instant::now()));
        assert!(!b.try_acquire(Instant::now()));
        // An ignored outcome frees the slot without deciding anything.
        b.record(Outcome::Ignored, Instant::now(), true);
        assert_eq!(b.name(Instant::now()), "half_open");
        assert!(b.try_acquire(Instant::now()));
        assert!(!b.try_acquire(Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn probe_success_closes_and_keeps_n() {
        let mut b = breaker();
        fail(&mut b, 5);
        advance(Duration::from_secs(30)).await;
        assert!(b.try_acquire(Instant::now()));
        b.record(Outcome::Success, Instant::now(), true);
        assert_eq!(b.name(Instant::now()), "closed");
        assert_eq!(b.consecutive_failures(), 0);
        assert_eq!(b.ejections(), 1);
        assert!(b.try_acquire(Instant::now()));
        assert!(b.try_acquire(Instant::now()));
        // Next opening is the second one: 60 s.
        assert_eq!(open_duration(&mut b), Duration::from_secs(60));
    }

    #[tokio::test(start_paused = true)]
    async fn probe_failure_reopens_longer() {
        let mut b = breaker();
        fail(&mut b, 5);
        assert_eq!(fail_probe(&mut b).await, Duration::from_secs(60));
        assert_eq!(b.ejections(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn may_open_false_keeps_it_closed() {
        let mut b = breaker();
        for _ in 0..8 {
            b.record(Outcome::Failure, Instant::now(), false);
        }
        assert_eq!(b.name(Instant::now()), "closed");
        assert_eq!(b.consecutive_failures(), 8);
        assert_eq!(b.ejections(), 0);
        b.record(Outcome::Failure, Instant::now(), true);
        assert_eq!(b.name(Instant::now()), "open");
    }

    #[tokio::test(start_paused = true)]
    async fn may_open_false_keeps_half_open_from_reopening() {
        let mut b = breaker();
        fail(&mut b, 5);
        advance(Duration::from_secs(30)).await;
        assert!(b.try_acquire(Instant::now()));
        b.record(Outcome::Failure, Instant::now(), false);
        assert_eq!(b.name(Instant::now()), "half_open");
        assert_eq!(b.ejections(), 1);
        assert!(b.try_acquire(Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn n_resets_after_max_ejection_of_health() {
        let mut b = breaker();
        fail(&mut b, 5);
        advance(Duration::from_secs(30)).await;
        assert!(b.try_acquire(Instant::now()));
        b.record(Outcome::Success, Instant::now(), true);

        advance(Duration::from_secs(299)).await;
        assert_eq!(b.name(Instant::now()), "closed");
        assert_eq!(b.ejections(), 1);
        advance(Duration::from_secs(1)).await;
        assert_eq!(b.name(Instant::now()), "closed");
        assert_eq!(b.ejections(), 0);
        assert_eq!(open_duration(&mut b), Duration::from_secs(30));
    }

    #[tokio::test(start_paused = true)]
    async fn a_failure_restarts_the_healthy_stretch() {
        let mut b = breaker();
        fail(&mut b, 5);
        advance(Duration::from_secs(30)).await;
        assert!(b.try_acquire(Instant::now()));
        b.record(Outcome::Success, Instant::now(), true);
        advance(Duration::from_secs(200)).await;
        fail(&mut b, 1);
        b.record(Outcome::Success, Instant::now(), true);
        advance(Duration::from_secs(200)).await;
        b.record(Outcome::Success, Instant::now(), true);
        assert_eq!(b.ejections(), 1);
        advance(Duration::from_secs(100)).await;
        assert_eq!(open_duration(&mut b), Duration::from_secs(30));
    }
}
