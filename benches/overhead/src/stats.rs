//! Percentiles, and a bootstrap interval for a difference of percentiles.
use serde::Serialize;

/// Linear interpolation between the closest ranks (numpy's default).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = p / 100.0 * (sorted.len() - 1) as f64;
    let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - lo as f64)
}

fn sorted(values: &[f64]) -> Vec<f64> {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v
}

#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub n: usize,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
}

pub fn summary(values: &[f64]) -> Summary {
    let s = sorted(values);
    Summary { n: s.len(), p50: percentile(&s, 50.0), p90: percentile(&s, 90.0), p99: percentile(&s, 99.0) }
}

/// `b - a` at each percentile, with a 95 % bootstrap interval for the median's difference.
#[derive(Clone, Debug, Serialize)]
pub struct Added {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p50_ci95: [f64; 2],
}

pub fn added(a: &[f64], b: &[f64]) -> Added {
    let (sa, sb) = (summary(a), summary(b));
    Added {
        p50: sb.p50 - sa.p50,
        p90: sb.p90 - sa.p90,
        p99: sb.p99 - sa.p99,
        p50_ci95: bootstrap_median_diff(a, b, 1000),
    }
}

/// Percentile interval of the difference of medians over `rounds` resamples of each side.
fn bootstrap_median_diff(a: &[f64], b: &[f64], rounds: usize) -> [f64; 2] {
    if a.is_empty() || b.is_empty() {
        return [f64::NAN, f64::NAN];
    }
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move |n: usize| {
        // xorshift64*
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        (state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 33) as usize % n
    };
    let mut diffs = Vec::with_capacity(rounds);
    let (mut ra, mut rb) = (vec![0.0; a.len()], vec![0.0; b.len()]);
    for _ in 0..rounds {
        ra.iter_mut().for_each(|x| *x = a[next(a.len())]);
        rb.iter_mut().for_each(|x| *x = b[next(b.len())]);
        ra.sort_by(f64::total_cmp);
        rb.sort_by(f64::total_cmp);
        diffs.push(percentile(&rb, 50.0) - percentile(&ra, 50.0));
    }
    diffs.sort_by(f64::total_cmp);
    [percentile(&diffs, 2.5), percentile(&diffs, 97.5)]
}
