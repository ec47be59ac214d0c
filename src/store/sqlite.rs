//! The embedded archive: one SQLite database (WAL), with FTS5 over subject and text.
//!
//! ```text
//! message(seq PK, id UNIQUE, state, received_ms, finished_at, source, sender, subject, rule,
//!         destinations JSON, envelope JSON, fields JSON, payload, reason, size, raw_kept)
//!   indexes: (state) (rule) (sender) (source), each ending in seq (the rowid); a time range is
//!   an id range (a spool id is a ULID, which sorts by the time it was received)
//! address(kind 'to'|'dest', value, seq)      key (kind, value, seq): recipients, destinations
//! raw(seq PK, bytes BLOB)                    the message exactly as received, same transaction
//!                                            (none when raw_kept = 1: the spool keeps it)
//! total('raw_kept', bytes)                   the size of the raw messages the spool keeps
//! attempt(message_id, at, destination, outcome, status, reply, body, duration_ms)
//! message_fts(subject, text)                 FTS5, contentless, rowid = message.seq
//! ```
//!
//! Lists are in the order messages were archived, newest first (`seq` descending): every index
//! ends in `seq`, and FTS5 walks its matches in `rowid` (= `seq`) order, so a page stops after
//! its rows however many messages match. The cursor of a page is the last `seq` it showed.
//!
//! The raw message lives in the spool when it keeps it for the archive (`keep_raw`, as `serve`
//! runs): the spool wrote it once, durably, before the `250`, and keeps it when the message is
//! removed; the entry refers to it by id (`raw_kept`), and retention gives it back to the spool
//! ([`RawKeeper::release`]) once the entry is gone. An entry whose raw bytes the spool does not
//! keep (written by another backend's caller, or before the spool kept them) holds them in a
//! table of its own (a list never reads it), written in the entry's transaction. `auto_vacuum = INCREMENTAL` gives the pages of
//! removed messages back to the file system after each retention pass.

use super::{
    Archive, ArchiveState, ArchivedMessage, AttemptRecord, DestinationStatus, Entry, MessageQuery, Page, RawKeeper,
    Record, Retention, RuleStats, StoreError, Summary, id_floor, is_id, unix_ms,
};
use rusqlite::{Connection, OptionalExtension, Transaction, params, params_from_iter};
use serde_json::Value as Json;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS message (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL,
    received_ms INTEGER NOT NULL,
    finished_at TEXT NOT NULL,
    source TEXT NOT NULL,
    sender TEXT NOT NULL,
    subject TEXT NOT NULL,
    rule TEXT,
    destinations TEXT NOT NULL,
    envelope TEXT NOT NULL,
    fields TEXT,
    payload TEXT,
    reason TEXT,
    size INTEGER NOT NULL,
    raw_kept INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS message_state ON message(state);
CREATE INDEX IF NOT EXISTS message_rule ON message(rule);
CREATE INDEX IF NOT EXISTS message_sender ON message(sender);
CREATE INDEX IF NOT EXISTS message_source ON message(source);
DROP INDEX IF EXISTS message_received;
CREATE TABLE IF NOT EXISTS address (
    kind TEXT NOT NULL,
    value TEXT NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (kind, value, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS address_seq ON address(seq);
CREATE TABLE IF NOT EXISTS raw (
    seq INTEGER PRIMARY KEY,
    bytes BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS attempt (
    message_id TEXT NOT NULL,
    at TEXT NOT NULL,
    destination TEXT NOT NULL,
    outcome TEXT NOT NULL,
    status INTEGER,
    reply TEXT,
    body TEXT,
    duration_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS attempt_message ON attempt(message_id);
CREATE INDEX IF NOT EXISTS attempt_destination ON attempt(destination, at);
CREATE TABLE IF NOT EXISTS total (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
INSERT OR IGNORE INTO total (name, value) VALUES ('raw_kept', 0);
CREATE VIRTUAL TABLE IF NOT EXISTS message_fts USING fts5(subject, text, content='', contentless_delete=1, detail=none);
";

/// Raw messages up to this size are bound to their statement (SQLite copies them once); larger
/// ones are written into a blob made for them, without that copy.
const BOUND_RAW: usize = 1 << 20;

/// The page size of a new archive (`docs/benchmarks.md`: a third less disk per entry).
const PAGE_SIZE: i64 = 8192;

/// Page cache of the writer's connection, in KiB (SQLite's default is 2 MiB): enough for the
/// full-text index's pages that a batch of messages writes again and again.
const WRITER_CACHE_KIB: i64 = 1024;

/// Page cache of the reader's connection, in KiB: pages and searches read a few pages each.
const READER_CACHE_KIB: i64 = 512;

/// Messages removed per statement when the archive is over its size.
const SIZE_BATCH: i64 = 500;

/// The SQLite archive. One connection writes, one reads (WAL lets them run side by side).
pub struct SqliteArchive {
    path: PathBuf,
    writer: Mutex<Connection>,
    reader: Mutex<Connection>,
    /// Where the raw messages of entries with `raw_kept` are.
    keeper: Option<Arc<dyn RawKeeper>>,
}

/// Kept ids looked at per step of [`SqliteArchive::sweep_kept`].
const SWEEP_PAGE: usize = 1000;

impl SqliteArchive {
    /// Opens (creating if need be) the archive at `path`.
    pub fn open(path: &Path) -> Result<SqliteArchive, StoreError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let open_error = |source| StoreError::Open { path: path.display().to_string(), source };
        let writer = Connection::open(path).map_err(open_error)?;
        // The page size and auto_vacuum must be set before the first table is created; an
        // archive that exists keeps its own. Pages of 8 KiB: an entry of a 2 KB message (its
        // payload carries the text) is about 2.5 KB, and a 4 KiB page holds one of them with
        // 1.5 KB left empty; 8 KiB pages hold three. The WAL is folded into the database every
        // 2,000 pages (16 MB).
        writer
            .execute_batch(&format!(
                "PRAGMA page_size = {PAGE_SIZE}; PRAGMA auto_vacuum = INCREMENTAL; PRAGMA journal_mode = WAL;
                 PRAGMA synchronous = NORMAL; PRAGMA wal_autocheckpoint = 2000;"
            ))
            .map_err(open_error)?;
        writer.execute_batch(SCHEMA).map_err(open_error)?;
        // An archive made before the spool kept raw messages has no `raw_kept` column.
        let has_kept: bool = writer
            .query_row("SELECT count(*) FROM pragma_table_info('message') WHERE name = 'raw_kept'", [], |r| r.get(0))
            .map_err(open_error)?;
        if !has_kept {
            writer
                .execute_batch("ALTER TABLE message ADD COLUMN raw_kept INTEGER NOT NULL DEFAULT 0")
                .map_err(open_error)?;
        }
        let reader = Connection::open(path).map_err(open_error)?;
        reader.busy_timeout(Duration::from_secs(5)).map_err(open_error)?;
        writer.busy_timeout(Duration::from_secs(5)).map_err(open_error)?;
        writer.set_prepared_statement_cache_capacity(32);
        writer.pragma_update(None, "cache_size", -WRITER_CACHE_KIB).map_err(open_error)?;
        reader.pragma_update(None, "cache_size", -READER_CACHE_KIB).map_err(open_error)?;
        Ok(SqliteArchive {
            path: path.to_path_buf(),
            writer: Mutex::new(writer),
            reader: Mutex::new(reader),
            keeper: None,
        })
    }

    /// The archive, reading the raw messages the spool keeps from `keeper` and giving them back
    /// to it when retention removes their entries.
    pub fn with_keeper(mut self, keeper: Arc<dyn RawKeeper>) -> SqliteArchive {
        self.keeper = Some(keeper);
        self
    }

    /// Gives back to the spool the raw messages it keeps that no entry refers to: those of
    /// messages whose entry a crash lost before it was written, or whose entry retention
    /// removed just before a crash. Run it before any entry is handed to the archive (at
    /// start): an entry on its way to the archive has no row yet. Returns how many.
    pub fn sweep_kept(&self) -> Result<u64, StoreError> {
        let Some(keeper) = &self.keeper else { return Ok(0) };
        let (mut after, mut released) = (String::new(), 0u64);
        loop {
            let ids = keeper.kept(&after, SWEEP_PAGE)?;
            let Some(last) = ids.last() else { return Ok(released) };
            after = last.clone();
            let orphans = self.unreferenced(ids)?;
            released += orphans.len() as u64;
            keeper.release(orphans)?;
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write<T>(&self, f: impl FnOnce(&Transaction<'_>) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let mut conn = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let tx = conn.transaction()?;
        let out = f(&tx)?;
        tx.commit()?;
        Ok(out)
    }

    fn read<T>(&self, f: impl FnOnce(&Connection) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let conn = self.reader.lock().unwrap_or_else(|e| e.into_inner());
        f(&conn)
    }
}

/// Inserts an entry; returns the size of the raw message it refers to in the spool (0 when it
/// holds its own), which the caller adds to the running total once per transaction.
fn insert_message(tx: &Transaction<'_>, m: &ArchivedMessage) -> Result<u64, StoreError> {
    if !is_id(&m.id) {
        return Err(StoreError::BadId(m.id.clone()));
    }
    // An entry replaced refers to the same raw message as the new one: nothing to give back.
    // Looked up first: `delete_ids`'s `IN (subquery)` builds a temporary table each time, a
    // seventh of an entry's cost for what is nearly always no row.
    let replaced: Option<i64> = tx
        .prepare_cached("SELECT seq FROM message WHERE id = ?1")?
        .query_row(params![m.id], |r| r.get(0))
        .optional()?;
    if let Some(seq) = replaced {
        delete_ids(tx, "SELECT ?1", params![seq], false)?;
    }
    let received_ms = ulid::Ulid::from_string(&m.id).map(|u| u.timestamp_ms() as i64).unwrap_or(0);
    let envelope = serde_json::to_string(&m.envelope).expect("an envelope serialises");
    let destinations = serde_json::to_string(&m.destinations).expect("names serialise");
    let fields = m.fields.as_ref().map(|f| f.to_string());
    tx.prepare_cached(
        "INSERT INTO message (id, state, received_ms, finished_at, source, sender, subject, rule, destinations,
             envelope, fields, payload, reason, size, raw_kept)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
    )?
    .execute(params![
        m.id,
        m.state.as_str(),
        received_ms,
        m.finished_at,
        m.envelope.source.protocol(),
        m.sender,
        m.subject,
        m.rule,
        destinations,
        envelope,
        fields,
        m.payload,
        m.reason,
        m.size() as i64,
        m.raw_kept.is_some()
    ])?;
    let seq = tx.last_insert_rowid();
    if m.raw_kept.is_some() {
        // Counted by the caller.
    } else if m.raw.len() <= BOUND_RAW {
        tx.prepare_cached("INSERT INTO raw (seq, bytes) VALUES (?1, ?2)")?.execute(params![seq, m.raw])?;
    } else {
        // Room first, then the bytes written into it: a bound blob is copied whole by SQLite
        // first, one more copy of a message that may be 25 MB.
        tx.prepare_cached("INSERT INTO raw (seq, bytes) VALUES (?1, zeroblob(?2))")?
            .execute(params![seq, m.raw.len() as i64])?;
        tx.blob_open(rusqlite::MAIN_DB, "raw", "bytes", seq, false)?.write_at(&m.raw, 0)?;
    }
    tx.prepare_cached("INSERT INTO message_fts (rowid, subject, text) VALUES (?1, ?2, ?3)")?.execute(params![
        seq,
        m.subject,
        distinct_words(&m.text)
    ])?;
    let mut addr = tx.prepare_cached("INSERT OR IGNORE INTO address (seq, kind, value) VALUES (?1, ?2, ?3)")?;
    for r in &m.envelope.recipients {
        addr.execute(params![seq, "to", r.to_lowercase()])?;
    }
    for d in &m.destinations {
        addr.execute(params![seq, "dest", d])?;
    }
    Ok(m.raw_kept.unwrap_or(0))
}

/// Adds `bytes` of raw messages kept by the spool to the running total that `max_size` reads.
fn count_kept(tx: &Transaction<'_>, bytes: u64) -> Result<(), StoreError> {
    if bytes > 0 {
        tx.prepare_cached("UPDATE total SET value = value + ?1 WHERE name = 'raw_kept'")?
            .execute(params![bytes as i64])?;
    }
    Ok(())
}

/// `text` with each whitespace-separated word once, in the order first seen. The full-text
/// index keeps which messages hold a word, not where or how often (`detail=none`), so it finds
/// the same messages either way; a word repeated costs the tokenizer and the index's insert
/// again for nothing, and machine-written mail repeats most of its words (a report's lines, a
/// log). Whitespace never falls inside one of the tokenizer's words, so none is cut or joined.
/// The hasher is not keyed against collisions: the words are the message's own, and the most a
/// sender could gain by choosing them is a slower insert of its own message.
fn distinct_words(text: &str) -> String {
    // ASCII whitespace only: cheaper to find, and a word holding other whitespace is still
    // whole, only less often repeated.
    let mut seen = std::collections::HashSet::with_capacity_and_hasher(64, foldhash::fast::RandomState::default());
    let mut out = String::with_capacity(text.len().min(4096));
    for word in text.split_ascii_whitespace() {
        if seen.insert(word) {
            if !out.is_empty() {
                out.push(' ');
            }
            out.push_str(word);
        }
    }
    out
}

fn insert_attempt(tx: &Transaction<'_>, a: &AttemptRecord) -> Result<(), StoreError> {
    if !is_id(&a.message_id) {
        return Err(StoreError::BadId(a.message_id.clone()));
    }
    tx.prepare_cached(
        "INSERT INTO attempt (message_id, at, destination, outcome, status, reply, body, duration_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?
    .execute(params![
        a.message_id,
        a.at,
        a.destination,
        a.outcome,
        a.status,
        a.reply,
        a.body,
        a.duration_ms as i64
    ])?;
    Ok(())
}

/// Deletes the messages whose `seq`s `select` returns (with their raw bytes, addresses, index
/// entries, and, when `attempts`, their attempts). Returns how many, and the ids of those whose
/// raw bytes the spool keeps.
fn delete_ids(
    tx: &Transaction<'_>,
    select: &str,
    args: impl rusqlite::Params,
    attempts: bool,
) -> Result<(u64, Vec<String>), StoreError> {
    let rows: Vec<(i64, String, Option<i64>)> = {
        let sql = format!("SELECT seq, id, CASE WHEN raw_kept THEN size END FROM message WHERE seq IN ({select})");
        let mut stmt = tx.prepare_cached(&sql)?;
        stmt.query_map(args, |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?.collect::<Result<_, _>>()?
    };
    let mut kept = Vec::new();
    for (seq, id, kept_size) in &rows {
        tx.prepare_cached("DELETE FROM message_fts WHERE rowid = ?1")?.execute(params![seq])?;
        match kept_size {
            Some(size) => {
                tx.prepare_cached("UPDATE total SET value = value - ?1 WHERE name = 'raw_kept'")?
                    .execute(params![size])?;
                kept.push(id.clone());
            }
            None => {
                tx.prepare_cached("DELETE FROM raw WHERE seq = ?1")?.execute(params![seq])?;
            }
        }
        tx.prepare_cached("DELETE FROM address WHERE seq = ?1")?.execute(params![seq])?;
        tx.prepare_cached("DELETE FROM message WHERE seq = ?1")?.execute(params![seq])?;
        if attempts {
            tx.prepare_cached("DELETE FROM attempt WHERE message_id = ?1")?.execute(params![id])?;
        }
    }
    Ok((rows.len() as u64, kept))
}

/// The FTS5 query for what a user typed: each word quoted (so no word is read as an operator)
/// and matched as a prefix; every word must appear. Words are split where the index splits
/// them (at anything not a letter or digit): `ORD-2231` is `ORD` and `2231`. The index keeps no
/// positions (`detail=none`: smaller, and cheaper to write), so there are no phrase queries.
fn fts_query(q: &str) -> Option<String> {
    let words: Vec<String> = q
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(|w| format!("\"{}\"*", w.replace('"', "\"\"")))
        .collect();
    (!words.is_empty()).then(|| words.join(" "))
}

fn summary(r: &rusqlite::Row<'_>) -> rusqlite::Result<Summary> {
    let state: String = r.get("state")?;
    let destinations: String = r.get("destinations")?;
    let id: String = r.get("id")?;
    let received_ms: i64 = r.get("received_ms")?;
    Ok(Summary {
        state: ArchiveState::parse(&state).unwrap_or(ArchiveState::Dead),
        received_at: crate::spool::format_time(SystemTime::UNIX_EPOCH + Duration::from_millis(received_ms as u64)),
        from: r.get("sender")?,
        subject: r.get("subject")?,
        rule: r.get("rule")?,
        destinations: serde_json::from_str(&destinations).unwrap_or_default(),
        id,
    })
}

fn attempt(r: &rusqlite::Row<'_>) -> rusqlite::Result<AttemptRecord> {
    Ok(AttemptRecord {
        message_id: r.get("message_id")?,
        at: r.get("at")?,
        destination: r.get("destination")?,
        outcome: r.get("outcome")?,
        status: r.get("status")?,
        reply: r.get("reply")?,
        body: r.get("body")?,
        duration_ms: r.get::<_, i64>("duration_ms")?.max(0) as u64,
    })
}

const ATTEMPT_COLUMNS: &str = "message_id, at, destination, outcome, status, reply, body, duration_ms";

impl Archive for SqliteArchive {
    fn record(&self, message: &ArchivedMessage) -> Result<(), StoreError> {
        self.write(|tx| count_kept(tx, insert_message(tx, message)?))
    }

    fn add_attempt(&self, attempt: &AttemptRecord) -> Result<(), StoreError> {
        self.write(|tx| insert_attempt(tx, attempt))
    }

    fn write_batch(&self, entries: &[Entry]) -> Result<(), StoreError> {
        self.write(|tx| {
            let mut kept = 0;
            for entry in entries {
                // One bad entry (an id that is no ULID) must not cost the others their place.
                let result = match entry {
                    Entry::Message(m) => insert_message(tx, m),
                    Entry::Attempt(a) => insert_attempt(tx, a).map(|()| 0),
                };
                match result {
                    Ok(bytes) => kept += bytes,
                    Err(StoreError::BadId(id)) => tracing::warn!(id = %id, "not archived: not a spool id"),
                    Err(e) => return Err(e),
                }
            }
            count_kept(tx, kept)
        })
    }

    fn give_up(&self, entries: &[Entry]) -> Result<(), StoreError> {
        let kept: Vec<String> = entries
            .iter()
            .filter_map(|e| match e {
                Entry::Message(m) if m.raw_kept.is_some() => Some(m.id.clone()),
                _ => None,
            })
            .collect();
        // Not those an earlier entry of the same message refers to (a dead letter retried).
        let orphans = self.unreferenced(kept)?;
        self.release(orphans)
    }

    fn get(&self, id: &str) -> Result<Option<Record>, StoreError> {
        if !is_id(id) {
            return Ok(None);
        }
        self.read(|c| {
            let row = c
                .query_row("SELECT * FROM message WHERE id = ?1", params![id], |r| {
                    Ok((
                        summary(r)?,
                        r.get::<_, String>("envelope")?,
                        r.get::<_, String>("finished_at")?,
                        r.get::<_, i64>("size")?,
                        r.get::<_, Option<String>>("reason")?,
                        r.get::<_, Option<String>>("fields")?,
                        r.get::<_, Option<String>>("payload")?,
                    ))
                })
                .optional()?;
            let Some((summary, envelope, finished_at, size, reason, fields, payload)) = row else {
                return Ok(None);
            };
            let corrupt = |e: serde_json::Error| StoreError::Corrupt { id: id.to_string(), reason: e.to_string() };
            let envelope = serde_json::from_str(&envelope).map_err(corrupt)?;
            let fields = fields.map(|f| serde_json::from_str::<Json>(&f)).transpose().map_err(corrupt)?;
            let payload = payload.map(|p| serde_json::from_str::<Json>(&p)).transpose().map_err(corrupt)?;
            let mut stmt = c.prepare_cached(&format!(
                "SELECT {ATTEMPT_COLUMNS} FROM attempt WHERE message_id = ?1 ORDER BY rowid"
            ))?;
            let attempts = stmt.query_map(params![id], attempt)?.collect::<Result<Vec<_>, _>>()?;
            Ok(Some(Record {
                summary,
                envelope,
                finished_at,
                size: size.max(0) as u64,
                reason,
                fields,
                payload,
                attempts,
            }))
        })
    }

    fn raw(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        if !is_id(id) {
            return Ok(None);
        }
        let row: Option<(bool, Option<Vec<u8>>)> = self.read(|c| {
            Ok(c.query_row(
                "SELECT m.raw_kept, r.bytes FROM message m LEFT JOIN raw r USING (seq) WHERE m.id = ?1",
                params![id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?)
        })?;
        match row {
            Some((true, _)) => match &self.keeper {
                Some(keeper) => keeper.read(id),
                None => Err(StoreError::Corrupt {
                    id: id.to_string(),
                    reason: "its raw message is kept by the spool, and the archive was opened without it".into(),
                }),
            },
            Some((false, bytes)) => Ok(bytes),
            None => Ok(None),
        }
    }

    fn list(&self, query: &MessageQuery) -> Result<Page, StoreError> {
        let mut clauses: Vec<String> = Vec::new();
        let mut args: Vec<rusqlite::types::Value> = Vec::new();
        let mut arg = |v: rusqlite::types::Value| {
            args.push(v);
            format!("?{}", args.len())
        };
        use rusqlite::types::Value as V;
        // A search walks the full-text index newest first and joins each match.
        let fts = query.q.as_deref().and_then(fts_query);
        let key = if fts.is_some() { "f.rowid" } else { "m.seq" };
        if let Some(q) = fts {
            clauses.push(format!("message_fts MATCH {}", arg(V::Text(q))));
        }
        if let Some(s) = query.state {
            clauses.push(format!("m.state = {}", arg(V::Text(s.as_str().into()))));
        }
        if let Some(r) = &query.rule {
            clauses.push(format!("m.rule = {}", arg(V::Text(r.clone()))));
        }
        if let Some(f) = &query.from {
            clauses.push(format!("m.sender = {}", arg(V::Text(f.trim().to_lowercase()))));
        }
        if let Some(s) = &query.source {
            clauses.push(format!("m.source = {}", arg(V::Text(s.clone()))));
        }
        if let Some(t) = &query.to {
            clauses.push(format!(
                "m.seq IN (SELECT seq FROM address WHERE kind = 'to' AND value = {})",
                arg(V::Text(t.trim().to_lowercase()))
            ));
        }
        if let Some(d) = &query.destination {
            clauses.push(format!(
                "m.seq IN (SELECT seq FROM address WHERE kind = 'dest' AND value = {})",
                arg(V::Text(d.clone()))
            ));
        }
        // Time bounds filter the newest-first walk (`+`: no index of their own, which would
        // have every message since then sorted).
        if let Some(since) = query.since {
            clauses.push(format!("+m.received_ms >= {}", arg(V::Integer(unix_ms(since)))));
        }
        if let Some(until) = query.until {
            clauses.push(format!("+m.received_ms < {}", arg(V::Integer(unix_ms(until)))));
        }
        if let Some(cursor) = &query.cursor {
            let seq: i64 = cursor.parse().map_err(|_| StoreError::BadId(cursor.clone()))?;
            clauses.push(format!("{key} < {}", arg(V::Integer(seq))));
        }
        let size = query.page_size();
        let limit = arg(V::Integer(size as i64 + 1));
        let filter = if clauses.is_empty() { String::new() } else { format!("WHERE {}", clauses.join(" AND ")) };
        let from = if key == "f.rowid" { "message_fts f JOIN message m ON m.seq = f.rowid" } else { "message m" };
        let sql = format!(
            "SELECT m.seq, m.id, m.state, m.received_ms, m.sender, m.subject, m.rule, m.destinations FROM {from} {filter} ORDER BY {key} DESC LIMIT {limit}"
        );
        self.read(|c| {
            let mut stmt = c.prepare_cached(&sql)?;
            let rows = stmt.query_map(params_from_iter(args.iter()), |r| Ok((r.get::<_, i64>("seq")?, summary(r)?)))?;
            let mut rows = rows.collect::<Result<Vec<_>, _>>()?;
            let next = if rows.len() > size {
                rows.truncate(size);
                rows.last().map(|(seq, _)| seq.to_string())
            } else {
                None
            };
            Ok(Page { items: rows.into_iter().map(|(_, s)| s).collect(), next })
        })
    }

    fn counts_by_state(&self) -> Result<Vec<(ArchiveState, u64)>, StoreError> {
        self.read(|c| {
            let mut stmt = c.prepare_cached("SELECT count(*) FROM message WHERE state = ?1")?;
            ArchiveState::ALL
                .into_iter()
                .map(|s| Ok((s, stmt.query_row(params![s.as_str()], |r| r.get::<_, i64>(0))?.max(0) as u64)))
                .collect()
        })
    }

    fn hourly(&self, since: SystemTime) -> Result<Vec<(u64, u64)>, StoreError> {
        self.read(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT received_ms / 3600000 AS hour, count(*) FROM message WHERE id >= ?1 GROUP BY hour ORDER BY hour",
            )?;
            let rows = stmt.query_map(params![id_floor(since)], |r| {
                Ok((r.get::<_, i64>(0)?.max(0) as u64 * 3600, r.get::<_, i64>(1)?.max(0) as u64))
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
    }

    fn rule_stats(&self, since: SystemTime) -> Result<Vec<RuleStats>, StoreError> {
        self.read(|c| {
            let mut stats: BTreeMap<String, RuleStats> = BTreeMap::new();
            let mut stmt = c.prepare_cached(
                "SELECT rule, count(*) FROM message WHERE id >= ?1 AND rule IS NOT NULL GROUP BY rule",
            )?;
            for row in
                stmt.query_map(params![id_floor(since)], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?
            {
                let (rule, n) = row?;
                stats.insert(rule.clone(), RuleStats { rule, matches: n.max(0) as u64, filled: Vec::new() });
            }
            let mut stmt = c.prepare_cached(
                "SELECT m.rule, f.key, count(*) FROM message m, json_each(m.fields) f
                 WHERE m.id >= ?1 AND m.rule IS NOT NULL AND m.fields IS NOT NULL
                   AND f.type != 'null' AND NOT (f.type = 'text' AND trim(f.value) = '')
                 GROUP BY m.rule, f.key ORDER BY m.rule, f.key",
            )?;
            let rows = stmt.query_map(params![id_floor(since)], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, i64>(2)?))
            })?;
            for row in rows {
                let (rule, key, n) = row?;
                if let Some(s) = stats.get_mut(&rule) {
                    s.filled.push((key, n.max(0) as u64));
                }
            }
            Ok(stats.into_values().collect())
        })
    }

    fn destinations(&self) -> Result<Vec<DestinationStatus>, StoreError> {
        self.read(|c| {
            let names: Vec<String> = c
                .prepare_cached("SELECT DISTINCT destination FROM attempt ORDER BY destination")?
                .query_map([], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            let mut last = c.prepare_cached(&format!(
                "SELECT {ATTEMPT_COLUMNS} FROM attempt WHERE destination = ?1 ORDER BY at DESC, rowid DESC LIMIT 1"
            ))?;
            let mut failed = c.prepare_cached(&format!(
                "SELECT {ATTEMPT_COLUMNS} FROM attempt WHERE destination = ?1 AND outcome != 'delivered' ORDER BY at DESC, rowid DESC LIMIT 1"
            ))?;
            let mut out = Vec::new();
            for name in names {
                let Some(l) = last.query_row(params![name], attempt).optional()? else { continue };
                let e = failed.query_row(params![name], attempt).optional()?;
                out.push(DestinationStatus { destination: name, last: l, last_error: e });
            }
            Ok(out)
        })
    }

    fn enforce_retention(&self, keep: Duration, max_size: u64, now: SystemTime) -> Result<Retention, StoreError> {
        let cutoff = now.checked_sub(keep).unwrap_or(SystemTime::UNIX_EPOCH);
        let floor = id_floor(cutoff);
        let (mut removed, kept) = self.write(|tx| {
            let removed = delete_ids(tx, "SELECT seq FROM message WHERE id < ?1", params![floor], true)?;
            // Attempts of messages that never reached the archive (still queued long ago, or
            // lost by a crash) go by the same clock.
            tx.execute(
                "DELETE FROM attempt WHERE at < ?1 AND message_id NOT IN (SELECT id FROM message)",
                params![crate::spool::format_time(cutoff)],
            )?;
            Ok(removed)
        })?;
        self.release(kept)?;
        self.vacuum()?;
        loop {
            let size = self.size()?;
            if size <= max_size {
                return Ok(Retention { removed, size });
            }
            // Enough of the oldest to get under the limit at the average size, and one more.
            let (n, kept) = self.write(|tx| {
                let count: i64 = tx.query_row("SELECT count(*) FROM message", [], |r| r.get(0))?;
                let average = (size / count.max(1) as u64).max(1);
                let batch = (((size - max_size) / average) as i64 + 1).clamp(1, SIZE_BATCH);
                delete_ids(tx, "SELECT seq FROM message ORDER BY id LIMIT ?1", params![batch], true)
            })?;
            self.release(kept)?;
            self.vacuum()?;
            if n == 0 {
                // Nothing left to remove: what remains is the empty schema.
                return Ok(Retention { removed, size: self.size()? });
            }
            removed += n;
        }
    }

    /// The database's pages in use, and the raw messages the spool keeps for it.
    fn size(&self) -> Result<u64, StoreError> {
        self.read(|c| {
            let pages: i64 = c.query_row("PRAGMA page_count", [], |r| r.get(0))?;
            let free: i64 = c.query_row("PRAGMA freelist_count", [], |r| r.get(0))?;
            let page: i64 = c.query_row("PRAGMA page_size", [], |r| r.get(0))?;
            let kept: i64 = c.query_row("SELECT value FROM total WHERE name = 'raw_kept'", [], |r| r.get(0))?;
            Ok(((pages - free).max(0) * page + kept.max(0)) as u64)
        })
    }
}

impl SqliteArchive {
    /// Those of `ids` that no entry refers to as a raw message the spool keeps.
    fn unreferenced(&self, ids: Vec<String>) -> Result<Vec<String>, StoreError> {
        self.read(|c| {
            let mut stmt = c.prepare_cached("SELECT 1 FROM message WHERE id = ?1 AND raw_kept = 1")?;
            let mut orphans = Vec::new();
            for id in ids {
                if stmt.query_row(params![id], |_| Ok(())).optional()?.is_none() {
                    orphans.push(id);
                }
            }
            Ok(orphans)
        })
    }

    /// Gives the raw messages of removed entries back to the spool. Should a crash come between
    /// the entries' removal and this, [`SqliteArchive::sweep_kept`] gives them back at the next
    /// start.
    fn release(&self, ids: Vec<String>) -> Result<(), StoreError> {
        match &self.keeper {
            Some(keeper) if !ids.is_empty() => keeper.release(ids),
            _ => Ok(()),
        }
    }

    /// Gives the free pages back to the file system and folds the WAL into the database.
    fn vacuum(&self) -> Result<(), StoreError> {
        let conn = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        conn.execute_batch("PRAGMA incremental_vacuum;")?;
        conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distinct_words_keeps_each_word_once_in_the_order_first_seen() {
        assert_eq!(distinct_words("b a b\tc\r\na  b"), "b a c");
        assert_eq!(distinct_words("Word word, word"), "Word word, word", "words as written, not as indexed");
        assert_eq!(distinct_words("Ablage\u{a0}Zürich Ablage\u{a0}Zürich"), "Ablage\u{a0}Zürich");
        assert_eq!(distinct_words(" \r\n "), "");
    }

    /// The running total of the raw bytes the spool keeps for the archive's entries.
    fn kept_total(archive: &SqliteArchive) -> i64 {
        archive.read(|c| Ok(c.query_row("SELECT value FROM total WHERE name = 'raw_kept'", [], |r| r.get(0))?)).unwrap()
    }

    #[test]
    fn a_batch_counts_each_raw_message_the_spool_keeps_against_max_size() {
        let dir = tempfile::tempdir().unwrap();
        let archive = SqliteArchive::open(&dir.path().join("archive.db")).unwrap();
        let empty = archive.size().unwrap();
        let now = SystemTime::now();
        let entry = |n: u64| {
            let id = crate::store::conformance::id_at(now, n);
            crate::store::conformance::message(&id, ArchiveState::Delivered, "kept", "a@example.com", "body")
        };
        let entries = vec![
            Entry::Message(Box::new(entry(1).raw_in_spool(1000))),
            Entry::Message(Box::new(entry(2).raw_in_spool(234))),
            // Its own raw bytes: in the database's pages, not in the total.
            Entry::Message(Box::new(entry(3))),
        ];
        archive.write_batch(&entries).unwrap();
        assert_eq!(kept_total(&archive), 1234);
        assert!(archive.size().unwrap() >= empty + 1234);
    }

    #[test]
    fn a_new_archive_has_pages_of_8_kib_and_an_old_one_keeps_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let page_size =
            |a: &SqliteArchive| -> i64 { a.read(|c| Ok(c.query_row("PRAGMA page_size", [], |r| r.get(0))?)).unwrap() };
        let new = SqliteArchive::open(&dir.path().join("new.db")).unwrap();
        assert_eq!(page_size(&new), 8192);

        let old_path = dir.path().join("old.db");
        rusqlite::Connection::open(&old_path)
            .unwrap()
            .execute_batch("PRAGMA page_size = 4096; PRAGMA journal_mode = WAL; CREATE TABLE t (x);")
            .unwrap();
        let old = SqliteArchive::open(&old_path).unwrap();
        assert_eq!(page_size(&old), 4096);
        let id = crate::store::conformance::id_at(SystemTime::now(), 1);
        old.record(&crate::store::conformance::message(&id, ArchiveState::Delivered, "old", "a@b.c", "x")).unwrap();
        assert!(old.get(&id).unwrap().is_some());
    }

    #[test]
    fn words_beside_whitespace_that_is_not_ascii_are_found() {
        let dir = tempfile::tempdir().unwrap();
        let archive = SqliteArchive::open(&dir.path().join("archive.db")).unwrap();
        let id = crate::store::conformance::id_at(SystemTime::now(), 1);
        let text = "Ablage\u{a0}Zürich\u{2003}Lager Ablage\u{a0}Zürich\u{2003}Lager\r\n".repeat(5);
        archive
            .record(&crate::store::conformance::message(&id, ArchiveState::Delivered, "stock", "a@b.c", &text))
            .unwrap();
        for word in ["ablage", "zurich", "Zürich", "lager"] {
            let found = archive.list(&MessageQuery { q: Some(word.into()), ..Default::default() }).unwrap();
            assert_eq!(found.items.len(), 1, "{word}");
        }
    }

    #[test]
    fn sqlite_meets_the_archive_contract() {
        let dir = tempfile::tempdir().unwrap();
        let n = std::cell::Cell::new(0);
        let fresh = || -> Box<dyn Archive> {
            n.set(n.get() + 1);
            Box::new(SqliteArchive::open(&dir.path().join(format!("a{}.db", n.get()))).unwrap())
        };
        crate::store::conformance::run_all(&fresh);
    }

    fn keeping_spool(dir: &Path) -> crate::spool::Spool {
        let options = crate::spool::SpoolOptions { fsync: false, keep_raw: true };
        crate::spool::Spool::open(&dir.join("spool"), options).unwrap()
    }

    /// A message delivered and removed from a spool that keeps raw messages: the entry holds
    /// no copy, yet its raw bytes read back; the size counts them; retention gives them back.
    #[test]
    fn an_entry_refers_to_the_raw_message_the_spool_keeps() {
        let dir = tempfile::tempdir().unwrap();
        let spool = keeping_spool(dir.path());
        let raw = b"From: a@example.com\r\nSubject: kept\r\n\r\nbody\r\n";
        let id = spool.store(crate::model::Envelope::new(crate::model::Source::Stdin), raw).unwrap();
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(spool.remove(&id, crate::spool::State::Incoming))
            .unwrap();
        let archive = SqliteArchive::open(&dir.path().join("archive.db")).unwrap().with_keeper(Arc::new(spool.clone()));
        let empty = archive.size().unwrap();
        let mut entry =
            crate::store::conformance::message(&id, ArchiveState::Delivered, "kept", "a@example.com", "body");
        entry.raw = raw.to_vec();
        archive.record(&entry.raw_in_spool(raw.len() as u64)).unwrap();

        let in_raw_table: i64 =
            archive.read(|c| Ok(c.query_row("SELECT count(*) FROM raw", [], |r| r.get(0))?)).unwrap();
        assert_eq!(in_raw_table, 0, "no second copy");
        assert_eq!(archive.raw(&id).unwrap().as_deref(), Some(&raw[..]));
        assert_eq!(archive.get(&id).unwrap().unwrap().size, raw.len() as u64);
        assert_eq!(archive.size().unwrap(), empty + raw.len() as u64, "the kept bytes count against max_size");

        // Opened without the spool, the archive says where the bytes are rather than "none".
        let blind = SqliteArchive::open(&dir.path().join("archive.db")).unwrap();
        assert!(matches!(blind.raw(&id), Err(StoreError::Corrupt { .. })));

        // Retention removes the entry and gives the bytes back.
        let future = SystemTime::now() + Duration::from_secs(3600);
        let done = archive.enforce_retention(Duration::from_secs(1), u64::MAX, future).unwrap();
        assert_eq!(done.removed, 1);
        assert_eq!(spool.read_any_raw(&id).unwrap(), None, "released to the spool");
        assert!(spool.kept("", 10).unwrap().is_empty());
        assert_eq!(kept_total(&archive), 0);
    }

    /// At start, raw messages the spool keeps with no entry (lost by a crash before it was
    /// written) are given back; those an entry refers to stay.
    #[test]
    fn the_sweep_releases_only_raw_messages_no_entry_refers_to() {
        let dir = tempfile::tempdir().unwrap();
        let spool = keeping_spool(dir.path());
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let archive = SqliteArchive::open(&dir.path().join("archive.db")).unwrap().with_keeper(Arc::new(spool.clone()));
        let mut ids = Vec::new();
        for n in 0..2500 {
            let raw = format!("Subject: {n}\r\n\r\n{n}\r\n");
            let id = spool.store(crate::model::Envelope::new(crate::model::Source::Stdin), raw.as_bytes()).unwrap();
            rt.block_on(spool.remove(&id, crate::spool::State::Incoming)).unwrap();
            // Every third one's entry was lost.
            if n % 3 != 0 {
                let entry = crate::store::conformance::message(&id, ArchiveState::Delivered, "s", "a@example.com", "b");
                archive.record(&entry.raw_in_spool(raw.len() as u64)).unwrap();
            }
            ids.push(id);
        }
        // One entry holds its own bytes: it refers to nothing kept.
        let own = &ids[1];
        archive
            .record(&crate::store::conformance::message(own, ArchiveState::Delivered, "s", "a@example.com", "b"))
            .unwrap();
        assert_eq!(archive.sweep_kept().unwrap(), 834 + 1);
        for (n, id) in ids.iter().enumerate() {
            let kept = spool.read_any_raw(id).unwrap().is_some();
            assert_eq!(kept, n % 3 != 0 && n != 1, "message {n}");
        }
        assert_eq!(archive.sweep_kept().unwrap(), 0, "nothing more the second time");
    }

    /// An archive made before the spool kept raw messages opens, and its entries read as before.
    #[test]
    fn an_archive_without_the_kept_column_is_brought_up_to_date() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("archive.db");
        let id = crate::model::Envelope::new(crate::model::Source::Stdin).id;
        {
            let archive = SqliteArchive::open(&path).unwrap();
            let entry = crate::store::conformance::message(&id, ArchiveState::Delivered, "old", "a@example.com", "b");
            archive.record(&entry).unwrap();
            let conn = archive.writer.lock().unwrap();
            conn.execute_batch("ALTER TABLE message DROP COLUMN raw_kept; DROP TABLE total;").unwrap();
        }
        let archive = SqliteArchive::open(&path).unwrap();
        assert!(archive.raw(&id).unwrap().is_some_and(|r| !r.is_empty()));
        assert_eq!(archive.list(&MessageQuery::default()).unwrap().items.len(), 1);
        archive
            .enforce_retention(Duration::from_secs(1), u64::MAX, SystemTime::now() + Duration::from_secs(3600))
            .unwrap();
        assert!(archive.get(&id).unwrap().is_none());
    }

    #[test]
    fn user_words_never_become_fts_operators() {
        assert_eq!(fts_query("invoice 42").as_deref(), Some("\"invoice\"* \"42\"*"));
        assert_eq!(fts_query("a OR b").as_deref(), Some("\"a\"* \"OR\"* \"b\"*"));
        assert_eq!(fts_query("\"x\" NEAR(y) *"), Some("\"x\"* \"NEAR\"* \"y\"*".to_string()));
        assert_eq!(fts_query("  ()  "), None);
    }
}
