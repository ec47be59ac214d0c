//! Pacing of one destination: a token bucket (`rate`) and a pause that a 429 imposes on the
//! whole destination. The retry schedule is [`crate::backoff`].
//!
//! Alone, an instance paces with its own [`Bucket`]. With `[cluster]` ([`Pacer::share`]),
//! the bucket and the pause live in PostgreSQL (the `pacing` table), because the receiver
//! counts requests per account, not per instance:
//!
//! - Each send takes one token with one statement (`pacing_take`: refill, take, or say how
//!   long to wait, under the row's lock). One token per round trip, not a batch: a pause
//!   written by another instance is then seen before the very next send, and no instance
//!   holds tokens it may not use. The round trip is a few hundred microseconds against a
//!   request of tens of milliseconds, and per instance only one task of a destination asks at
//!   a time (the others queue behind it), so a waiting instance polls at most at the rate.
//! - A 429 pauses this instance at once and writes `paused_until` for the others (the
//!   pipeline pauses for `Retry-After`, or for the first backoff when a 429 gives no delay).
//! - When the database cannot be reached, the instance paces alone with its share of the
//!   rate (rate / live instances, from the last heartbeat), says so once, tries the database
//!   again every [`RETRY_SHARED`], and says once that shared pacing is back.

use crate::cluster::Node;
use crate::config::Rate;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::time::Instant;
use tracing::{info, warn};

/// How long an instance pacing alone waits before trying the database again.
pub const RETRY_SHARED: Duration = Duration::from_secs(5);

/// How long a send waits for the database's answer (a token, or a pause written) before it
/// paces alone: a database that does not answer (a host gone from the network) must not hold
/// delivery for the pool's connection timeout.
pub const SHARED_WAIT: Duration = Duration::from_secs(2);

/// The pacing of one destination: local, or shared by the instances of a cluster.
pub struct Pacer {
    rate: Rate,
    local: Bucket,
    shared: OnceLock<Shared>,
}

struct Shared {
    node: Arc<Node>,
    destination: String,
    /// This instance's own pause (a 429 it was answered), kept whatever the database does.
    hold: Bucket,
    /// One task of this instance asks the database at a time.
    asking: tokio::sync::Mutex<()>,
    /// Pacing alone while the database is away: the share's bucket, and when to try again.
    alone: Mutex<Option<(Arc<Bucket>, Instant)>>,
}

impl Pacer {
    pub fn new(rate: Rate) -> Pacer {
        Pacer { rate, local: Bucket::new(rate), shared: OnceLock::new() }
    }

    /// Shares this destination's pacing with every instance of `node`'s cluster, under the
    /// name `destination` (before the first send; a second call is ignored).
    pub fn share(&self, node: Arc<Node>, destination: &str) {
        let _ = self.shared.set(Shared {
            node,
            destination: destination.to_string(),
            hold: Bucket::new(Rate::unlimited()),
            asking: tokio::sync::Mutex::new(()),
            alone: Mutex::new(None),
        });
    }

    /// Waits for a token (and for any pause to end).
    pub async fn acquire(&self) {
        match self.shared.get() {
            None => self.local.acquire().await,
            Some(shared) => shared.acquire(self.rate).await,
        }
    }

    /// Stops all sending to this destination for `d` (a 429 told us to slow down): this
    /// instance at once, and, when shared, every instance.
    pub async fn pause(&self, d: Duration) {
        let Some(shared) = self.shared.get() else { return self.local.pause(d) };
        shared.hold.pause(d);
        let written = tokio::time::timeout(SHARED_WAIT, shared.node.pause_destination(&shared.destination, d)).await;
        let error = match written {
            Ok(Ok(())) => return,
            Ok(Err(e)) => e.to_string(),
            Err(_) => no_answer(),
        };
        warn!(destination = %shared.destination, error, "could not share the pause with the other instances");
    }

    /// Whether this destination's pacing is shared with a cluster.
    pub fn is_shared(&self) -> bool {
        self.shared.get().is_some()
    }

    /// Time left of this instance's current pause.
    pub fn paused_for(&self) -> Option<Duration> {
        match self.shared.get() {
            None => self.local.paused_for(),
            Some(shared) => shared.hold.paused_for(),
        }
    }
}

impl Shared {
    async fn acquire(&self, rate: Rate) {
        let per_second = rate.per_second();
        let capacity = capacity(per_second);
        let _asking = self.asking.lock().await;
        loop {
            self.hold.acquire().await;
            if let Some(alone) = self.alone_until_retry() {
                return alone.acquire().await;
            }
            let taken =
                tokio::time::timeout(SHARED_WAIT, self.node.take_token(&self.destination, capacity, per_second));
            match taken.await.map_err(|_| no_answer()).and_then(|r| r.map_err(|e| e.to_string())) {
                Ok(wait) => {
                    if self.alone.lock().unwrap_or_else(|e| e.into_inner()).take().is_some() {
                        info!(destination = %self.destination, "database back: pacing shared with the other instances again");
                    }
                    match wait {
                        None => return,
                        Some(d) => tokio::time::sleep(d).await,
                    }
                }
                Err(e) => return self.go_alone(rate, &e).acquire().await,
            }
        }
    }

    /// The bucket to pace alone with, while the database is away and not yet to be tried again.
    fn alone_until_retry(&self) -> Option<Arc<Bucket>> {
        let alone = self.alone.lock().unwrap_or_else(|e| e.into_inner());
        alone.as_ref().filter(|(_, retry)| Instant::now() < *retry).map(|(b, _)| b.clone())
    }

    /// Paces alone with this instance's share of `rate`; logs when it starts.
    fn go_alone(&self, rate: Rate, e: &dyn std::fmt::Display) -> Arc<Bucket> {
        let mut alone = self.alone.lock().unwrap_or_else(|e| e.into_inner());
        let retry = Instant::now() + RETRY_SHARED;
        if let Some((bucket, at)) = alone.as_mut() {
            *at = retry;
            return bucket.clone();
        }
        let instances = self.node.peers().len() + 1;
        let share = rate.per_second().map_or(Rate::unlimited(), |r| Rate::per_minute(r * 60.0 / instances as f64));
        warn!(
            destination = %self.destination, error = %e, instances,
            "database unreachable: pacing alone with this instance's share of the rate until it is back"
        );
        let bucket = Arc::new(Bucket::new(share));
        *alone = Some((bucket.clone(), retry));
        bucket
    }
}

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

/// What a database that did not answer within [`SHARED_WAIT`] is reported as.
fn no_answer() -> String {
    format!("the database did not answer within {}s", SHARED_WAIT.as_secs())
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
