//! The archive's writer thread: the pipeline hands entries over and goes on; the thread builds
//! each entry (parsing the raw message for its subject, sender and text) and commits what has
//! gathered in one transaction.

use super::{Archive, ArchiveState, ArchivedMessage, AttemptRecord, Entry};
use crate::model::Envelope;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::{broadcast, mpsc};
use tracing::warn;

/// Entries waiting for the writer before the pipeline waits for it.
const QUEUE: usize = 4096;

/// Entries committed in one transaction at most.
const BATCH: usize = 1024;

/// How long the writer gathers entries before it commits them.
const LINGER: Duration = Duration::from_millis(50);

/// A finished message, as the pipeline knows it.
#[derive(Debug)]
pub struct Finished {
    pub state: ArchiveState,
    pub envelope: Envelope,
    pub raw: Vec<u8>,
    /// What was read of the message when it was judged this round; `None`: read it from `raw`.
    pub search: Option<super::Searchable>,
    pub rule: Option<String>,
    pub payload: Option<String>,
    pub destinations: Vec<String>,
    pub reason: Option<String>,
    pub at: SystemTime,
}

enum Job {
    Finished(Box<Finished>),
    Attempt(AttemptRecord),
    Flush(std::sync::mpsc::SyncSender<()>),
}

/// A handle on the writer thread; cheap to clone. The thread ends when every handle is gone,
/// after committing what it was given.
#[derive(Clone)]
pub struct ArchiveWriter {
    tx: mpsc::Sender<Job>,
    tail: broadcast::Sender<TailEvent>,
}

/// What the live tail shows: a message finished, or an attempt made, once it is in the archive.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TailEvent {
    /// `message` or `attempt`.
    pub kind: &'static str,
    pub id: String,
    /// The message's state, or the attempt's outcome.
    pub state: String,
    pub subject: String,
    pub from: String,
    pub rule: Option<String>,
    pub destination: Option<String>,
    pub status: Option<u16>,
    pub at: String,
}

impl TailEvent {
    fn of(entry: &Entry) -> TailEvent {
        match entry {
            Entry::Message(m) => TailEvent {
                kind: "message",
                id: m.id.clone(),
                state: m.state.as_str().to_string(),
                subject: m.subject.clone(),
                from: m.sender.clone(),
                rule: m.rule.clone(),
                destination: None,
                status: None,
                at: m.finished_at.clone(),
            },
            Entry::Attempt(a) => TailEvent {
                kind: "attempt",
                id: a.message_id.clone(),
                state: a.outcome.clone(),
                subject: String::new(),
                from: String::new(),
                rule: None,
                destination: Some(a.destination.clone()),
                status: a.status,
                at: a.at.clone(),
            },
        }
    }
}

impl ArchiveWriter {
    pub fn start(archive: Arc<dyn Archive>) -> ArchiveWriter {
        let (tx, mut rx) = mpsc::channel::<Job>(QUEUE);
        let (tail, _) = broadcast::channel(1024);
        let tail_tx = tail.clone();
        std::thread::Builder::new()
            .name("archive".into())
            .spawn(move || {
                let mut flushes = Vec::new();
                while let Some(first) = rx.blocking_recv() {
                    // Gather for a moment before committing: one transaction for many entries
                    // writes each index page once instead of once per entry. A flush (shutdown,
                    // or a reader that wants what was handed over) commits at once.
                    let mut entries = Vec::new();
                    let until = Instant::now() + LINGER;
                    let mut job = Some(first);
                    loop {
                        match job.take() {
                            Some(Job::Finished(f)) => entries.push(Entry::Message(Box::new(build(*f)))),
                            Some(Job::Attempt(a)) => entries.push(Entry::Attempt(a)),
                            Some(Job::Flush(done)) => flushes.push(done),
                            None => {}
                        }
                        if entries.len() >= BATCH || !flushes.is_empty() {
                            break;
                        }
                        match rx.try_recv() {
                            Ok(next) => job = Some(next),
                            Err(TryRecvError::Empty) => match until.checked_duration_since(Instant::now()) {
                                Some(left) => std::thread::sleep(left.min(LINGER / 10)),
                                None => break,
                            },
                            Err(TryRecvError::Disconnected) => break,
                        }
                    }
                    if !entries.is_empty() {
                        match archive.write_batch(&entries) {
                            Ok(()) => {
                                if tail_tx.receiver_count() > 0 {
                                    for entry in &entries {
                                        let _ = tail_tx.send(TailEvent::of(entry));
                                    }
                                }
                            }
                            Err(e) => {
                                warn!(error = %e, entries = entries.len(), "cannot write the archive; these entries are not kept")
                            }
                        }
                    }
                    for done in flushes.drain(..) {
                        let _ = done.send(());
                    }
                }
            })
            .expect("spawn the archive thread");
        ArchiveWriter { tx, tail }
    }

    /// The live tail: every entry committed from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<TailEvent> {
        self.tail.subscribe()
    }

    /// Hands a finished message over (waits only when the writer is far behind).
    pub async fn finished(&self, finished: Finished) {
        let _ = self.tx.send(Job::Finished(Box::new(finished))).await;
    }

    /// Hands one delivery attempt over.
    pub async fn attempt(&self, attempt: AttemptRecord) {
        let _ = self.tx.send(Job::Attempt(attempt)).await;
    }

    /// Returns once everything handed over before has been committed (or failed).
    pub async fn flush(&self) {
        let (done, wait) = std::sync::mpsc::sync_channel(1);
        if self.tx.send(Job::Flush(done)).await.is_ok() {
            let _ = tokio::task::spawn_blocking(move || wait.recv()).await;
        }
    }
}

fn build(f: Finished) -> ArchivedMessage {
    match f.search {
        Some(search) => {
            ArchivedMessage::with(f.state, f.envelope, f.raw, search, f.rule, f.payload, f.destinations, f.reason, f.at)
        }
        None => ArchivedMessage::build(f.state, f.envelope, f.raw, f.rule, f.payload, f.destinations, f.reason, f.at),
    }
}
