//! An optional token-bucket rate limit per API key: `rate` requests per second on average, bursts
//! of up to `burst`.
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Distinct keys remembered at most; the least recently seen are forgotten beyond it.
const MAX_KEYS: usize = 10_000;

pub struct RateLimiter {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, Bucket>>,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

impl RateLimiter {
    /// `rate` > 0 requests per second, `burst` >= 1.
    pub fn new(rate: f64, burst: u32) -> RateLimiter {
        RateLimiter { rate, burst: f64::from(burst.max(1)), buckets: Mutex::new(HashMap::new()) }
    }

    /// Takes one token from `key`'s bucket, or says how long until one is there.
    pub fn check(&self, key: &str, now: Instant) -> Result<(), Duration> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() >= MAX_KEYS && !buckets.contains_key(key) {
            let oldest = buckets.iter().min_by_key(|(_, b)| b.at).map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                buckets.remove(&k);
            }
        }
        let b = buckets.entry(key.to_string()).or_insert(Bucket { tokens: self.burst, at: now });
        b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * self.rate).min(self.burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - b.tokens) / self.rate))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn bursts_then_refills_at_the_rate_per_key() {
        let limiter = RateLimiter::new(2.0, 3);
        let now = Instant::now();
        for _ in 0..3 {
            assert!(limiter.check("a", now).is_ok());
        }
        let wait = limiter.check("a", now).unwrap_err();
        assert_eq!(wait, Duration::from_millis(500));
        // Another key has its own bucket.
        assert!(limiter.check("b", now).is_ok());
        tokio::time::advance(Duration::from_millis(500)).await;
        assert!(limiter.check("a", Instant::now()).is_ok());
        assert!(limiter.check("a", Instant::now()).is_err());
        // Never more than the burst, however long the pause.
        tokio::time::advance(Duration::from_secs(60)).await;
        for _ in 0..3 {
            assert!(limiter.check("a", Instant::now()).is_ok());
        }
        assert!(limiter.check("a", Instant::now()).is_err());
    }
}
