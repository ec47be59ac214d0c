//! The archive's writer thread: the pipeline hands entries over and goes on; the thread builds
//! each entry (parsing the raw message for its subject, sender and text) and commits what has
//! gathered in one transaction.

use super::{Archive, ArchiveState, ArchivedMessage, AttemptRecord, Entry};
use crate::model::Envelope;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::{OwnedSemaphorePermit, broadcast, mpsc};
use tracing::warn;

/// Entries waiting for the writer before the pipeline waits for it. Each holds its message's raw
/// bytes, search text and payload (about 8 KB for a 2 KB message): with the batch being written,
/// at most `QUEUE + BATCH` of them are in memory. 50 ms of mail at several thousand messages a
/// second fits; a longer lag is the writer's pace, and the pipeline waits rather than piling up.
const QUEUE: usize = 256;

/// Entries committed in one transaction at most.
const BATCH: usize = 256;

/// How long the writer gathers entries before it commits them.
const LINGER: Duration = Duration::from_millis(50);

/// The memory budget (in the pipeline's units, KiB) that the raw messages gathered may hold
/// before the writer stops gathering and commits them.
const LINGER_HOLD: usize = 4096;

/// How often failing writes are reported, at most.
const SKIP_LOG: Duration = Duration::from_secs(60);

/// A finished message, as the pipeline knows it.
#[derive(Debug)]
pub struct Finished {
    pub state: ArchiveState,
    pub envelope: Envelope,
    /// The raw message, unless the spool keeps it and `search` is given (then empty).
    pub raw: Vec<u8>,
    /// `Some(size)`: the spool keeps the raw message, and the entry refers to it.
    pub raw_kept: Option<u64>,
    /// What was read of the message when it was judged this round; `None`: read it from `raw`.
    pub search: Option<super::Searchable>,
    pub rule: Option<String>,
    pub payload: Option<String>,
    pub destinations: Vec<String>,
    pub reason: Option<String>,
    pub at: SystemTime,
    /// The share of the pipeline's memory budget that `raw` stands for: held until the entry
    /// is committed, so that raw messages waiting for the writer count against the budget.
    pub memory: Option<OwnedSemaphorePermit>,
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
                // Entries not kept since the last warning, and when it was given.
                let (mut skipped, mut said) = (0usize, None);
                while let Some(first) = rx.blocking_recv() {
                    // Gather for a moment before committing: one transaction for many entries
                    // writes each index page once instead of once per entry. A flush (shutdown,
                    // or a reader that wants what was handed over) commits at once.
                    let mut entries = Vec::new();
                    // The budget shares of the raw messages in this batch, released once written.
                    let mut memory = Vec::new();
                    let until = Instant::now() + LINGER;
                    let mut job = Some(first);
                    loop {
                        match job.take() {
                            Some(Job::Finished(mut f)) => {
                                memory.extend(f.memory.take());
                                entries.push(Entry::Message(Box::new(build(*f))));
                            }
                            Some(Job::Attempt(a)) => entries.push(Entry::Attempt(a)),
                            Some(Job::Flush(done)) => flushes.push(done),
                            None => {}
                        }
                        // Big raw messages hold the pipeline's memory budget: write them at once.
                        let held: usize = memory.iter().map(OwnedSemaphorePermit::num_permits).sum();
                        if entries.len() >= BATCH || !flushes.is_empty() || held >= LINGER_HOLD {
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
                                if skipped > 0 {
                                    warn!(entries = skipped, "cannot write the archive; these entries are not kept");
                                }
                                (skipped, said) = (0, None);
                                if tail_tx.receiver_count() > 0 {
                                    for entry in &entries {
                                        let _ = tail_tx.send(TailEvent::of(entry));
                                    }
                                }
                            }
                            Err(e) => {
                                skipped += entries.len();
                                // Should this fail too (the same disk), the next start does it.
                                let _ = archive.give_up(&entries);
                                // Said at once, then at most once a minute while it lasts.
                                if said.is_none_or(|t: Instant| t.elapsed() >= SKIP_LOG) {
                                    warn!(error = %e, entries = skipped, "cannot write the archive; these entries are not kept");
                                    said = Some(Instant::now());
                                    skipped = 0;
                                }
                            }
                        }
                    }
                    drop(entries);
                    drop(memory);
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
    let built = match f.search {
        Some(search) => {
            ArchivedMessage::with(f.state, f.envelope, f.raw, search, f.rule, f.payload, f.destinations, f.reason, f.at)
        }
        None => ArchivedMessage::build(f.state, f.envelope, f.raw, f.rule, f.payload, f.destinations, f.reason, f.at),
    };
    match f.raw_kept {
        Some(size) => built.raw_in_spool(size),
        None => built,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Source;
    use crate::store::sqlite::SqliteArchive;
    use std::time::Duration;
    use tokio::sync::Semaphore;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_raw_message_holds_its_memory_share_until_it_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let archive: Arc<dyn Archive> = Arc::new(SqliteArchive::open(&dir.path().join("archive.db")).unwrap());
        let writer = ArchiveWriter::start(archive.clone());
        // Keep the writer busy: it waits to hand this flush's answer over until it is taken.
        let (busy, release) = std::sync::mpsc::sync_channel(0);
        assert!(writer.tx.send(Job::Flush(busy)).await.is_ok());
        tokio::time::sleep(Duration::from_millis(200)).await;

        let budget = Arc::new(Semaphore::new(10));
        let share = budget.clone().acquire_many_owned(4).await.unwrap();
        let envelope = Envelope::new(Source::Stdin);
        let id = envelope.id.clone();
        writer
            .finished(Finished {
                state: ArchiveState::Delivered,
                envelope,
                raw: b"Subject: big\r\n\r\nbody\r\n".to_vec(),
                raw_kept: None,
                search: None,
                rule: None,
                payload: None,
                destinations: vec!["sink".into()],
                reason: None,
                at: SystemTime::now(),
                memory: Some(share),
            })
            .await;
        assert_eq!(budget.available_permits(), 6, "the raw bytes wait for the writer: their share is held");

        release.recv().unwrap();
        writer.flush().await;
        assert_eq!(budget.available_permits(), 10, "written: the share is given back");
        assert_eq!(archive.raw(&id).unwrap().as_deref(), Some(&b"Subject: big\r\n\r\nbody\r\n"[..]));
    }
}
