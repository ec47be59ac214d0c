//! store: the message archive, behind one boundary ([`Archive`]) that more than one backend can
//! implement. [`sqlite`] is the embedded default; [`postgres`] is the archive several
//! instances share (`[cluster]`); the [`conformance`] suite states what every backend must do
//! and runs against any of them.
//!
//! ```text
//! pipeline ──(message done: delivered, dropped, dead)──► writer thread ──► Archive::write_batch
//!          ──(each delivery attempt)────────────────────┘
//! console / API ──► Archive::{list, get, raw, counts_by_state, ...}
//! ```
//!
//! The archive is a record of what happened, never the queue: a message is acknowledged,
//! retried and dropped through the spool only. The pipeline hands entries to [`ArchiveWriter`]
//! once the spool has recorded the message's new state, and a thread of the writer's own commits
//! them in batches (one transaction each). A crash loses at most the entries handed over and not
//! yet committed: the attempts and the final entry of messages whose round ended in the last
//! moments (see `docs/design.md`, "Archive").
//!
//! Ids are spool ids: ULIDs, checked by [`is_id`] before any use. Lists are newest first, in the
//! order messages were archived (a dead letter retried and delivered moves to the top); a
//! page's cursor is opaque to callers.

pub mod conformance;
pub mod postgres;
pub mod sqlite;
mod writer;

use crate::model::Envelope;
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;
use std::time::{Duration, SystemTime};

pub use writer::{ArchiveWriter, Finished, TailEvent};

/// The most messages a page may hold.
pub const MAX_PAGE: usize = 500;

/// How much of a message's text is indexed for search.
pub const TEXT_INDEXED: usize = 64 * 1024;

/// Whether `id` is a spool id (a ULID in its canonical 26-character form): the only ids that
/// the archive, and any path built from an id, accept. The spool's own check.
pub use crate::spool::is_id;

/// How a message ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ArchiveState {
    /// Every destination took it.
    Delivered,
    /// A rule (or the `unmatched = "drop"` policy) dropped it.
    Dropped,
    /// A dead letter: no rule, a field missing, or a destination that failed for good.
    Dead,
}

impl ArchiveState {
    pub const ALL: [ArchiveState; 3] = [ArchiveState::Delivered, ArchiveState::Dropped, ArchiveState::Dead];

    pub fn as_str(self) -> &'static str {
        match self {
            ArchiveState::Delivered => "delivered",
            ArchiveState::Dropped => "dropped",
            ArchiveState::Dead => "dead",
        }
    }

    pub fn parse(s: &str) -> Option<ArchiveState> {
        ArchiveState::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

/// What a finished message leaves in the archive.
#[derive(Debug, Clone, PartialEq)]
pub struct ArchivedMessage {
    pub id: String,
    pub state: ArchiveState,
    pub envelope: Envelope,
    /// When the message ended (RFC 3339).
    pub finished_at: String,
    /// The header `From` address (lowercase), else the envelope sender.
    pub sender: String,
    pub subject: String,
    /// The message's text (plain text, or the HTML's text), for search.
    pub text: String,
    pub rule: Option<String>,
    /// The rule's fields (the `fields` of a default payload).
    pub fields: Option<Json>,
    /// The payload sent (compact JSON), when there was one.
    pub payload: Option<String>,
    pub destinations: Vec<String>,
    /// Why it is a dead letter.
    pub reason: Option<String>,
    /// The message exactly as received; empty when the spool keeps it (`raw_kept`).
    pub raw: Vec<u8>,
    /// `Some(size)`: the raw message (`size` bytes) is kept by the spool, which the archive
    /// reads it from ([`RawKeeper`]), instead of being written into the archive again.
    pub raw_kept: Option<u64>,
}

/// What the archive indexes of a message for search: its sender, subject and text. The
/// pipeline takes it from the email it has just parsed to judge, so that the archive need not
/// parse the message again.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Searchable {
    /// The header `From` address (lowercase), else the envelope sender.
    pub sender: String,
    pub subject: String,
    /// The text (plain text, or the HTML's text), at most [`TEXT_INDEXED`] bytes.
    pub text: String,
}

impl Searchable {
    pub fn of(email: &crate::model::Email, envelope: &Envelope) -> Searchable {
        let sender = email
            .from
            .first()
            .map(|a| a.address.to_lowercase())
            .or_else(|| envelope.mail_from.as_ref().map(|m| m.to_lowercase()))
            .unwrap_or_default();
        // Cut before it is copied: the text of a 25 MB message is 25 MB, and only its first
        // TEXT_INDEXED bytes are indexed.
        let text = if email.text.is_empty() && !email.html.is_empty() {
            crate::deliver::cut(&crate::parse::html_to_text(&email.html, &mut Vec::new()), TEXT_INDEXED).to_string()
        } else {
            crate::deliver::cut(&email.text, TEXT_INDEXED).to_string()
        };
        Searchable { sender, subject: email.subject.clone(), text }
    }
}

impl ArchivedMessage {
    /// Builds the entry of a finished message, reading subject, sender and text from `raw`.
    #[allow(clippy::too_many_arguments)]
    pub fn build(
        state: ArchiveState,
        envelope: Envelope,
        raw: Vec<u8>,
        rule: Option<String>,
        payload: Option<String>,
        destinations: Vec<String>,
        reason: Option<String>,
        finished_at: SystemTime,
    ) -> ArchivedMessage {
        let search = Searchable::of(&crate::parse::parse(&raw), &envelope);
        ArchivedMessage::with(state, envelope, raw, search, rule, payload, destinations, reason, finished_at)
    }

    /// [`ArchivedMessage::build`] with what was read of the message already.
    #[allow(clippy::too_many_arguments)]
    pub fn with(
        state: ArchiveState,
        envelope: Envelope,
        raw: Vec<u8>,
        search: Searchable,
        rule: Option<String>,
        payload: Option<String>,
        destinations: Vec<String>,
        reason: Option<String>,
        finished_at: SystemTime,
    ) -> ArchivedMessage {
        // Only `fields` is read back: the rest of the payload (its text, often most of it) is
        // skipped over, not built into a value.
        #[derive(Deserialize)]
        struct Fields {
            fields: Option<Json>,
        }
        let fields = payload
            .as_deref()
            .and_then(|p| serde_json::from_str::<Fields>(p).ok())
            .and_then(|p| p.fields)
            .filter(Json::is_object);
        ArchivedMessage {
            id: envelope.id.clone(),
            state,
            finished_at: crate::spool::format_time(finished_at),
            sender: search.sender,
            subject: search.subject,
            text: search.text,
            rule,
            fields,
            payload,
            destinations,
            reason,
            envelope,
            raw,
            raw_kept: None,
        }
    }

    /// The same entry, referring to the raw message the spool keeps (`size` bytes) instead of
    /// holding it.
    pub fn raw_in_spool(mut self, size: u64) -> ArchivedMessage {
        self.raw = Vec::new();
        self.raw_kept = Some(size);
        self
    }

    /// The raw message's size.
    pub fn size(&self) -> u64 {
        self.raw_kept.unwrap_or(self.raw.len() as u64)
    }
}

/// The raw messages that the spool keeps for the archive (`SpoolOptions::keep_raw`): an entry
/// refers to its message's raw bytes there, by id, rather than holding a second copy.
pub trait RawKeeper: Send + Sync {
    /// The raw bytes kept for `id` (or still queued), if any.
    fn read(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Up to `limit` ids whose raw bytes are kept, in order, after `after` (`""`: the first).
    fn kept(&self, after: &str, limit: usize) -> Result<Vec<String>, StoreError>;
    /// Gives up the raw bytes kept for `ids`.
    fn release(&self, ids: Vec<String>) -> Result<(), StoreError>;
}

impl RawKeeper for crate::spool::Spool {
    fn read(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.read_any_raw(id)?)
    }

    fn kept(&self, after: &str, limit: usize) -> Result<Vec<String>, StoreError> {
        Ok(crate::spool::Spool::kept(self, after, limit)?)
    }

    fn release(&self, ids: Vec<String>) -> Result<(), StoreError> {
        Ok(crate::spool::Spool::release(self, ids)?)
    }
}

/// One delivery attempt to one destination.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AttemptRecord {
    /// The message's id.
    pub message_id: String,
    /// When it started (RFC 3339, milliseconds).
    pub at: String,
    pub destination: String,
    /// `delivered`, `deferred` or `dead`.
    pub outcome: String,
    /// HTTP status, when the destination speaks HTTP.
    pub status: Option<u16>,
    /// SMTP reply, or the error when there was no answer.
    pub reply: Option<String>,
    /// The first 2 KB of the response body.
    pub body: Option<String>,
    pub duration_ms: u64,
}

/// One line of a message list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    pub id: String,
    pub state: ArchiveState,
    pub received_at: String,
    pub from: String,
    pub subject: String,
    pub rule: Option<String>,
    pub destinations: Vec<String>,
}

/// A whole archived message except its raw bytes ([`Archive::raw`]).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    #[serde(flatten)]
    pub summary: Summary,
    pub envelope: Envelope,
    pub finished_at: String,
    pub size: u64,
    pub reason: Option<String>,
    pub fields: Option<Json>,
    pub payload: Option<Json>,
    pub attempts: Vec<AttemptRecord>,
}

/// Which messages to list: every filter given must hold. Newest first (most recently archived).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MessageQuery {
    /// Words to find in the subject or the text (each word must appear; a word matches as a prefix).
    pub q: Option<String>,
    pub state: Option<ArchiveState>,
    pub rule: Option<String>,
    pub destination: Option<String>,
    /// Sender address (case does not matter).
    pub from: Option<String>,
    /// Recipient address (envelope; case does not matter).
    pub to: Option<String>,
    /// `smtp`, `lmtp`, `stdin`, `imap`.
    pub source: Option<String>,
    pub since: Option<SystemTime>,
    pub until: Option<SystemTime>,
    /// At most this many (1..=[`MAX_PAGE`]; 0 means 50).
    pub limit: usize,
    /// The `next` of the previous page (opaque).
    pub cursor: Option<String>,
}

impl MessageQuery {
    pub fn page_size(&self) -> usize {
        match self.limit {
            0 => 50,
            n => n.min(MAX_PAGE),
        }
    }
}

/// One page of a list, and the cursor of the next one (`None`: this is the last).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Page {
    pub items: Vec<Summary>,
    pub next: Option<String>,
}

/// A rule's matches, and for each of its fields how many of them had it filled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RuleStats {
    pub rule: String,
    pub matches: u64,
    pub filled: Vec<(String, u64)>,
}

/// The last attempt to a destination.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DestinationStatus {
    pub destination: String,
    pub last: AttemptRecord,
    /// The last attempt that did not deliver, if any.
    pub last_error: Option<AttemptRecord>,
}

/// What retention removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retention {
    pub removed: u64,
    /// The archive's size afterwards, in bytes.
    pub size: u64,
}

/// An entry for [`Archive::write_batch`].
#[derive(Debug, Clone)]
pub enum Entry {
    Message(Box<ArchivedMessage>),
    Attempt(AttemptRecord),
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("archive {path}: {source}")]
    Open { path: String, source: rusqlite::Error },
    #[error("archive: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("archive: {0}")]
    Io(#[from] std::io::Error),
    #[error("archive: not a message id: {0:?}")]
    BadId(String),
    #[error("archive: stored entry {id} is unreadable: {reason}")]
    Corrupt { id: String, reason: String },
    /// The spool, which keeps the raw messages.
    #[error("archive: {0}")]
    Spool(#[from] crate::spool::SpoolError),
    /// The PostgreSQL archive's database (`[cluster]`).
    #[error("archive: {0}")]
    Database(Box<postgres::ClusterError>),
}

/// The archive's boundary: what the pipeline writes and the console reads. Calls block; async
/// callers run them on the blocking pool.
pub trait Archive: Send + Sync {
    /// Stores a finished message; a message stored again (a dead letter retried, then
    /// delivered) replaces its earlier entry, keeping its attempts.
    fn record(&self, message: &ArchivedMessage) -> Result<(), StoreError>;
    /// Stores one delivery attempt (the message may not be recorded yet).
    fn add_attempt(&self, attempt: &AttemptRecord) -> Result<(), StoreError>;
    /// Stores several entries at once (a backend may make it one transaction).
    fn write_batch(&self, entries: &[Entry]) -> Result<(), StoreError> {
        for entry in entries {
            match entry {
                Entry::Message(m) => self.record(m)?,
                Entry::Attempt(a) => self.add_attempt(a)?,
            }
        }
        Ok(())
    }
    /// Lets go of what `entries`, which could not be written, hold outside the archive (the raw
    /// messages the spool keeps for them).
    fn give_up(&self, entries: &[Entry]) -> Result<(), StoreError> {
        let _ = entries;
        Ok(())
    }
    /// The message `id` with its attempts (oldest first), or `None`.
    fn get(&self, id: &str) -> Result<Option<Record>, StoreError>;
    /// The raw message `id` exactly as received, or `None`.
    fn raw(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// A page of messages, newest first.
    fn list(&self, query: &MessageQuery) -> Result<Page, StoreError>;
    /// How many messages are in each state (every state, zeros included).
    fn counts_by_state(&self) -> Result<Vec<(ArchiveState, u64)>, StoreError>;
    /// Messages received per hour since `since`: (hour start, Unix seconds; count), oldest first,
    /// hours without messages left out.
    fn hourly(&self, since: SystemTime) -> Result<Vec<(u64, u64)>, StoreError>;
    /// Per rule, messages received since `since` and how often each field was filled.
    fn rule_stats(&self, since: SystemTime) -> Result<Vec<RuleStats>, StoreError>;
    /// The last attempt (and last failure) of each destination.
    fn destinations(&self) -> Result<Vec<DestinationStatus>, StoreError>;
    /// Removes messages (and their attempts) received before `now - keep`, then the oldest
    /// until the archive takes at most `max_size` bytes.
    fn enforce_retention(&self, keep: Duration, max_size: u64, now: SystemTime) -> Result<Retention, StoreError>;
    /// Bytes the archive takes.
    fn size(&self) -> Result<u64, StoreError>;
}

/// Unix milliseconds of `t` (0 before 1970).
pub fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// The smallest ULID of the millisecond `t`: every id received at or after `t` sorts after it.
pub fn id_floor(t: SystemTime) -> String {
    ulid::Ulid::from_parts(unix_ms(t).max(0) as u64, 0).to_string()
}
