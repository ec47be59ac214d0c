//! Pacing of one destination: a token bucket (`rate`) and a pause that a 429 imposes on the
//! whole destination. The retry schedule is [`crate::backoff`].

use crate::config::Rate;
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

/// Token bucket with a pause. Burst: one second's worth of tokens (at least one).
pub struct Bucket {
    per_second: Option<f64>,
    state: Mutex<BucketState>,
}

struct BucketState {
    tokens: f64,
    last: Instant,
    paused_until: Option<Instant>,
}

impl Bucket {
    pub fn new(rate: Rate) -> Bucket {
        let per_second = rate.per_second();
        Bucket {
            per_second,
            state: Mutex::new(BucketState { tokens: capacity(per_second), last: Instant::now(), paused_until: None }),
        }
    }

    /// Waits for a token (and for any pause to end).
    pub async fn acquire(&self) {
        loop {
            let wait = {
                let mut s = self.state.lock().expect("bucket lock");
                let now = Instant::now();
                match s.paused_until {
                    Some(until) if until > now => Some(until - now),
                    _ => {
                        s.paused_until = None;
                        match self.per_second {
                            None => return,
                            Some(rate) => {
                                let elapsed = now.duration_since(s.last).as_secs_f64();
                                s.tokens = (s.tokens + elapsed * rate).min(capacity(self.per_second));
                                s.last = now;
                                if s.tokens >= 1.0 {
                                    s.tokens -= 1.0;
                                    return;
                                }
                                Some(Duration::from_secs_f64((1.0 - s.tokens) / rate))
                            }
                        }
                    }
                }
            };
            if let Some(d) = wait {
                tokio::time::sleep(d).await;
            }
        }
    }

    /// Stops all sending to this destination for `d` (a 429 told us to slow down).
    pub fn pause(&self, d: Duration) {
        let mut s = self.state.lock().expect("bucket lock");
        let until = Instant::now() + d;
        s.paused_until = Some(s.paused_until.map_or(until, |u| u.max(until)));
        s.tokens = 0.0;
    }

    /// Time left of the current pause.
    pub fn paused_for(&self) -> Option<Duration> {
        let s = self.state.lock().expect("bucket lock");
        s.paused_until.and_then(|u| u.checked_duration_since(Instant::now()))
    }
}

fn capacity(per_second: Option<f64>) -> f64 {
    per_second.map_or(f64::INFINITY, |r| r.max(1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn bucket_paces_to_the_rate() {
        let b = Bucket::new(Rate::per_minute(600.0)); // 10/s, burst 10
        let start = Instant::now();
        for _ in 0..30 {
            b.acquire().await;
        }
        let elapsed = start.elapsed().as_secs_f64();
        assert!((1.9..=2.1).contains(&elapsed), "30 tokens at 10/s with a burst of 10 took {elapsed}s");
    }

    #[tokio::test(start_paused = true)]
    async fn pause_holds_everyone() {
        let b = Bucket::new(Rate::unlimited());
        b.acquire().await;
        b.pause(Duration::from_secs(2));
        let start = Instant::now();
        b.acquire().await;
        assert!(start.elapsed() >= Duration::from_secs(2));
        assert!(b.paused_for().is_none());
    }
}
