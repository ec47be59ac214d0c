//! backoff: how long to wait before trying again, for a delivery that failed or an IMAP
//! connection that dropped. Exponential from `initial`, capped at `max`, with jitter so that
//! many waiters do not retry in step.

use crate::config::BackoffConfig;
use std::time::Duration;

/// The delay before retry number `attempt` (1 = the first retry): exponential from
/// `initial`, capped at `max`, with jitter (a random value in the upper half of the delay,
/// so retries of many messages spread out without collapsing to zero).
pub fn backoff(config: &BackoffConfig, attempt: u32) -> Duration {
    let exp = config.initial.as_secs_f64() * 2f64.powi(attempt.saturating_sub(1).min(32) as i32);
    let capped = exp.min(config.max.as_secs_f64());
    Duration::from_secs_f64(capped * (0.5 + fastrand::f64() * 0.5))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_exponentially_with_jitter_and_a_cap() {
        let c = BackoffConfig { initial: Duration::from_secs(5), max: Duration::from_secs(60) };
        for _ in 0..100 {
            let d1 = backoff(&c, 1).as_secs_f64();
            assert!((2.5..=5.0).contains(&d1), "{d1}");
            let d3 = backoff(&c, 3).as_secs_f64();
            assert!((10.0..=20.0).contains(&d3), "{d3}");
            let d10 = backoff(&c, 10).as_secs_f64();
            assert!((30.0..=60.0).contains(&d10), "{d10}");
            assert!(backoff(&c, u32::MAX).as_secs_f64() <= 60.0);
        }
    }
}
