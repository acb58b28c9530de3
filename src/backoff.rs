//! Restart delays: pure arithmetic over [`Backoff`] settings, plus the small random source
//! that supplies jitter. No clock is read here.

use std::time::Duration;

use crate::config::Backoff;

/// The delay before restart number `crash` of a run of consecutive quick crashes (1-based):
/// `initial × multiplier^(crash−1)`, capped at `max`, then moved by up to ±`jitter` of itself.
///
/// `sample` is a number in [-1, 1] (see [`Jitter`]); the result never exceeds `max × (1 + jitter)`
/// and is never negative.
pub fn delay(b: &Backoff, crash: u32, sample: f64) -> Duration {
    if crash == 0 {
        return Duration::ZERO;
    }
    let initial = b.initial.as_secs_f64();
    let max = b.max.as_secs_f64();
    // powi saturates to infinity for large exponents, and min() then caps it.
    let exponent = i32::try_from(crash - 1).unwrap_or(i32::MAX);
    let base = (initial * b.multiplier.powi(exponent)).min(max);
    let jittered = base * (1.0 + b.jitter * sample.clamp(-1.0, 1.0));
    Duration::from_secs_f64(jittered.max(0.0))
}

/// A xorshift generator: jitter needs spread, not cryptographic quality, and the master
/// must not depend on an entropy source at every restart.
#[derive(Debug, Clone)]
pub struct Jitter(u64);

impl Jitter {
    pub fn new(seed: u64) -> Self {
        // Zero is the one state xorshift cannot leave.
        Jitter(seed | 1)
    }

    /// Seeded from the clock and the pid, so two masters started together differ.
    pub fn from_entropy() -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        Jitter::new(nanos ^ (u64::from(std::process::id()) << 32))
    }

    /// A number in [-1, 1].
    pub fn sample(&mut self) -> f64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        (x >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn settings(initial: u64, max: u64, multiplier: f64, jitter: f64) -> Backoff {
        Backoff {
            initial: ms(initial),
            max: ms(max),
            multiplier,
            jitter,
        }
    }

    #[test]
    fn grows_geometrically_then_caps() {
        let b = settings(100, 1000, 2.0, 0.0);
        let seq: Vec<_> = (1..=6).map(|k| delay(&b, k, 0.0)).collect();
        assert_eq!(
            seq,
            vec![ms(100), ms(200), ms(400), ms(800), ms(1000), ms(1000)]
        );
    }

    #[test]
    fn zero_crashes_means_no_delay() {
        assert_eq!(
            delay(&settings(100, 1000, 2.0, 0.5), 0, 1.0),
            Duration::ZERO
        );
    }

    #[test]
    fn multiplier_one_is_constant() {
        let b = settings(250, 30_000, 1.0, 0.0);
        assert!((1..50).all(|k| delay(&b, k, 0.0) == ms(250)));
    }

    #[test]
    fn huge_crash_counts_stay_capped() {
        let b = settings(100, 30_000, 2.0, 0.0);
        assert_eq!(delay(&b, u32::MAX, 0.0), ms(30_000));
    }

    #[test]
    fn jitter_moves_within_its_fraction() {
        let b = settings(1000, 1000, 2.0, 0.1);
        assert_eq!(delay(&b, 1, 1.0), ms(1100));
        assert_eq!(delay(&b, 1, -1.0), ms(900));
        let mut j = Jitter::new(42);
        for _ in 0..10_000 {
            let d = delay(&b, 3, j.sample());
            assert!(d >= ms(900) && d <= ms(1100), "{d:?}");
        }
    }

    #[test]
    fn jitter_samples_spread_over_the_range() {
        let mut j = Jitter::new(7);
        let samples: Vec<f64> = (0..10_000).map(|_| j.sample()).collect();
        assert!(samples.iter().all(|s| (-1.0..=1.0).contains(s)));
        assert!(samples.iter().any(|&s| s < -0.9));
        assert!(samples.iter().any(|&s| s > 0.9));
        let mean = samples.iter().sum::<f64>() / samples.len() as f64;
        assert!(mean.abs() < 0.05, "mean {mean}");
    }
}
