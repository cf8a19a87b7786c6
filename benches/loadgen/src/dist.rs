//! Length distributions for prompts and `max_tokens`: `fixed:64` (or just `64`), `uniform:32-256`
//! (both ends included), `normal:128,32` (mean and standard deviation, rounded, at least 1).
use std::fmt;
use std::str::FromStr;

use rand::Rng;

/// A distribution of positive integer lengths.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Dist {
    Fixed(u32),
    Uniform { min: u32, max: u32 },
    Normal { mean: f64, sd: f64 },
}

impl Dist {
    /// One draw, always at least 1.
    pub fn sample(&self, rng: &mut impl Rng) -> u32 {
        match *self {
            Dist::Fixed(n) => n,
            Dist::Uniform { min, max } => rng.random_range(min..=max),
            Dist::Normal { mean, sd } => {
                let x = mean + sd * standard_normal(rng);
                x.round().clamp(1.0, u32::MAX as f64) as u32
            }
        }
    }

    /// The largest value a draw can take, where there is one.
    pub fn max(&self) -> Option<u32> {
        match *self {
            Dist::Fixed(n) => Some(n),
            Dist::Uniform { max, .. } => Some(max),
            Dist::Normal { .. } => None,
        }
    }
}

/// A standard normal draw (Box-Muller).
fn standard_normal(rng: &mut impl Rng) -> f64 {
    // random::<f64>() is in [0, 1): 1 - u is in (0, 1], so the logarithm is finite.
    let u1 = 1.0 - rng.random::<f64>();
    let u2 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

fn positive(s: &str, what: &str, spec: &str) -> Result<u32, String> {
    match s.trim().parse::<u32>() {
        Ok(0) => Err(format!("`{spec}`: the {what} must be at least 1")),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("`{spec}`: the {what} `{s}` is not a positive integer")),
    }
}

fn number(s: &str, what: &str, spec: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(x) if x.is_finite() => Ok(x),
        _ => Err(format!("`{spec}`: the {what} `{s}` is not a number")),
    }
}

const FORMS: &str = "expected `fixed:N` (or `N`), `uniform:MIN-MAX` or `normal:MEAN,SD`";

impl FromStr for Dist {
    type Err = String;

    fn from_str(spec: &str) -> Result<Dist, String> {
        let (kind, args) = spec.split_once(':').unwrap_or(("fixed", spec));
        match kind.trim() {
            "fixed" => Ok(Dist::Fixed(positive(args, "value", spec)?)),
            "uniform" => {
                let (lo, hi) = args.split_once('-').ok_or_else(|| format!("`{spec}`: {FORMS}"))?;
                let (min, max) = (positive(lo, "minimum", spec)?, positive(hi, "maximum", spec)?);
                if min > max {
                    return Err(format!("`{spec}`: the minimum {min} is above the maximum {max}"));
                }
                Ok(Dist::Uniform { min, max })
            }
            "normal" => {
                let (m, s) = args.split_once(',').ok_or_else(|| format!("`{spec}`: {FORMS}"))?;
                let (mean, sd) = (number(m, "mean", spec)?, number(s, "standard deviation", spec)?);
                if mean < 1.0 {
                    return Err(format!("`{spec}`: the mean must be at least 1"));
                }
                if sd < 0.0 {
                    return Err(format!("`{spec}`: the standard deviation must not be negative"));
                }
                Ok(Dist::Normal { mean, sd })
            }
            other => Err(format!("`{spec}`: unknown distribution `{other}`; {FORMS}")),
        }
    }
}

impl fmt::Display for Dist {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dist::Fixed(n) => write!(f, "fixed:{n}"),
            Dist::Uniform { min, max } => write!(f, "uniform:{min}-{max}"),
            Dist::Normal { mean, sd } => write!(f, "normal:{mean},{sd}"),
        }
    }
}

impl serde::Serialize for Dist {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::SmallRng;

    #[test]
    fn parses_every_form_and_prints_it_back() {
        for (spec, want) in [
            ("fixed:64", Dist::Fixed(64)),
            ("64", Dist::Fixed(64)),
            ("uniform:32-256", Dist::Uniform { min: 32, max: 256 }),
            ("uniform:8-8", Dist::Uniform { min: 8, max: 8 }),
            ("normal:128,32", Dist::Normal { mean: 128.0, sd: 32.0 }),
            ("normal:10.5,0", Dist::Normal { mean: 10.5, sd: 0.0 }),
        ] {
            let d: Dist = spec.parse().unwrap();
            assert_eq!(d, want, "{spec}");
            assert_eq!(d.to_string().parse::<Dist>().unwrap(), d);
        }
    }

    #[test]
    fn bad_specs_are_refused_with_the_reason() {
        for (spec, needle) in [
            ("fixed:0", "at least 1"),
            ("fixed:-3", "not a positive integer"),
            ("uniform:9-3", "minimum 9 is above the maximum 3"),
            ("uniform:5", "uniform:MIN-MAX"),
            ("uniform:a-9", "minimum `a`"),
            ("normal:10", "normal:MEAN,SD"),
            ("normal:10,-1", "must not be negative"),
            ("normal:0,1", "mean must be at least 1"),
            ("normal:x,1", "mean `x` is not a number"),
            ("zipf:1", "unknown distribution `zipf`"),
            ("", "not a positive integer"),
        ] {
            let e = spec.parse::<Dist>().unwrap_err();
            assert!(e.contains(needle), "{spec}: {e}");
        }
    }

    #[test]
    fn draws_stay_in_range_and_follow_the_seed() {
        let mut rng = SmallRng::seed_from_u64(7);
        let u = Dist::Uniform { min: 3, max: 6 };
        let draws: Vec<u32> = (0..1000).map(|_| u.sample(&mut rng)).collect();
        assert!(draws.iter().all(|x| (3..=6).contains(x)));
        for v in 3..=6 {
            assert!(draws.contains(&v), "{v} never drawn");
        }
        let mut a = SmallRng::seed_from_u64(1);
        let mut b = SmallRng::seed_from_u64(1);
        let n = Dist::Normal { mean: 100.0, sd: 15.0 };
        assert_eq!(
            (0..50).map(|_| n.sample(&mut a)).collect::<Vec<_>>(),
            (0..50).map(|_| n.sample(&mut b)).collect::<Vec<_>>()
        );
        assert_eq!(Dist::Fixed(9).sample(&mut rng), 9);
    }

    #[test]
    fn normal_draws_have_the_asked_mean_and_spread_and_never_go_below_one() {
        let mut rng = SmallRng::seed_from_u64(3);
        let n = Dist::Normal { mean: 200.0, sd: 20.0 };
        let xs: Vec<f64> = (0..20000).map(|_| n.sample(&mut rng) as f64).collect();
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        let sd = (xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / xs.len() as f64).sqrt();
        assert!((mean - 200.0).abs() < 1.0, "mean {mean}");
        assert!((sd - 20.0).abs() < 1.0, "sd {sd}");
        let low = Dist::Normal { mean: 1.0, sd: 50.0 };
        assert!((0..1000).all(|_| low.sample(&mut rng) >= 1));
    }
}
