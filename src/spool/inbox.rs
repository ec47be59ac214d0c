//! The hand-over from ingest to delivery: a listener that has just committed a message puts it
//! here, in memory, so that the delivery workers need not read back from disk what they were
//! just given. Losing the inbox loses nothing: every message in it is already in `incoming/`.

use super::Meta;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::sync::Notify;

/// A message a listener has just committed, handed over in memory so that the pipeline need not
/// read back from disk what it was just given.
pub struct Fresh {
    pub meta: Meta,
    /// The raw message, when it is small enough to have been kept.
    pub raw: Option<Vec<u8>>,
}

/// Where listeners drop fresh messages; the pipeline takes them from there. Bounded: when it is
/// full, a message is only announced, and the pipeline reads it from `incoming/` as usual.
#[derive(Default)]
pub struct Inbox {
    queue: std::sync::Mutex<VecDeque<Fresh>>,
    notify: Notify,
    /// A message was only announced: `incoming/` must be read to find it.
    overflow: AtomicBool,
}

/// Fresh messages kept in the inbox at most.
pub const INBOX_LIMIT: usize = 1024;

impl Inbox {
    /// Hands over a committed message (or only wakes the pipeline when the inbox is full).
    pub fn push(&self, fresh: Fresh) {
        {
            let mut q = self.queue.lock().expect("inbox lock");
            if q.len() < INBOX_LIMIT {
                q.push_back(fresh);
            } else {
                self.overflow.store(true, Ordering::SeqCst);
            }
        }
        self.notify.notify_one();
    }

    /// Whether a message was only announced since the last [`Inbox::clear_overflow`].
    pub fn overflowed(&self) -> bool {
        self.overflow.load(Ordering::SeqCst)
    }

    /// Forgets the overflow, once `incoming/` is about to be read.
    pub fn clear_overflow(&self) {
        self.overflow.store(false, Ordering::SeqCst);
    }

    /// Waits until something is handed over.
    pub async fn notified(&self) {
        self.notify.notified().await
    }

    /// Takes every message handed over so far.
    pub fn take(&self) -> VecDeque<Fresh> {
        std::mem::take(&mut *self.queue.lock().expect("inbox lock"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Envelope, Source};

    fn fresh(n: usize) -> Fresh {
        let mut envelope = Envelope::new(Source::Stdin);
        envelope.id = format!("01FRESH{n:05}");
        Fresh { meta: Meta::new(envelope, 1), raw: None }
    }

    #[test]
    fn an_inbox_that_overflows_says_so_and_keeps_what_fits() {
        let inbox = Inbox::default();
        for n in 0..INBOX_LIMIT {
            inbox.push(fresh(n));
        }
        assert!(!inbox.overflowed(), "everything fitted: no directory scan needed");
        inbox.push(fresh(INBOX_LIMIT));
        assert!(inbox.overflowed(), "one was only announced: incoming/ must be read");
        let taken = inbox.take();
        assert_eq!(taken.len(), INBOX_LIMIT);
        assert_eq!(taken.back().unwrap().meta.id, format!("01FRESH{:05}", INBOX_LIMIT - 1));
    }
}
