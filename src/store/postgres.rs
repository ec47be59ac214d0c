//! The archive in PostgreSQL, for several instances sharing one database (`[cluster]`).
//!
//! ```text
//! message(seq identity PK, id UNIQUE, state, received_ms, finished_at, source, sender, subject,
//!         rule, destinations JSONB, envelope JSONB, fields JSONB, payload, reason, size,
//!         footprint, search TSVECTOR)
//!   indexes: (state, seq) (rule, seq) (sender, seq) (source, seq) (received_ms), GIN (search)
//! message_raw(seq PK → message ON DELETE CASCADE, bytes BYTEA)
//! address(seq → message ON DELETE CASCADE, kind 'to'|'dest', value)   index (kind, value, seq)
//! attempt(n identity PK, message_id, at, destination, outcome, status, reply, body, duration_ms)
//! ```
//!
//! The connection, the pool and the schema migrations (with the `synchronous_commit` check)
//! are [`crate::cluster`]'s, shared with the IMAP watchers' coordination.
//!
//! Search: the subject and text are indexed as a `tsvector` (the `simple` configuration: no
//! stemming, so a word matches as typed, as with SQLite's FTS5); a query is each typed word,
//! letters and digits only, as a prefix (`word:*`), all required. Nothing a user types reaches
//! the query as an operator.
//!
//! [`Archive::size`] is what the messages take (raw bytes, text, payload, envelope: the
//! `footprint` column), not the files PostgreSQL keeps: PostgreSQL reuses the space of removed
//! rows after autovacuum rather than giving it back, so the file size would never fall below
//! `[archive] max_size` once it had gone over.
//!
//! The [`Archive`] trait is synchronous (the writer thread and `spawn_blocking` call it): each
//! archive owns a small tokio runtime (one worker thread, where the pool's connections run), and
//! each call is `block_on` of the async query on it (inside `block_in_place` when the caller
//! is an async task of a multi-threaded runtime).
//!
//! The database may be away. Opening the archive while it is unreachable does not fail: the
//! archive sets itself up (migrations, checks) on its first call that reaches the database.
//! Reads fail at once with an error saying the database is unreachable. Writes (the writer
//! thread's batches) wait for the database and retry, logging once when it goes away and once
//! when it is back: nothing handed to the writer is lost to an outage shorter than
//! [`OUTAGE_WAIT`]. Past it, writes fail at once until the database answers (the writer logs and
//! skips their entries), so that delivery, which waits for the writer once its queue is full,
//! never waits for a database that is gone.

use super::{
    Archive, ArchiveState, ArchivedMessage, AttemptRecord, DestinationStatus, Entry, MessageQuery, Page, Record,
    Retention, RuleStats, StoreError, Summary, id_floor, is_id, unix_ms,
};
pub use crate::cluster::{ClusterError, schema_version, verify};
use crate::cluster::{Target, runtime};
use crate::config::ClusterConfig;
use deadpool_postgres::Pool;
use serde_json::Value as Json;
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};
use tokio_postgres::types::ToSql;
use tracing::{info, warn};

/// How long a write waits between tries while the database is away, at most.
const RETRY_MAX: Duration = Duration::from_secs(5);

/// How often a write still waiting for the database says so.
const RETRY_LOG: Duration = Duration::from_secs(60);

/// How long writes wait for a database that went away. Past it, a write tries once and fails
/// at once while the database stays away (its entries are logged and skipped by the writer),
/// so that a long outage never holds up delivery.
pub const OUTAGE_WAIT: Duration = Duration::from_secs(60);

/// The PostgreSQL archive (see the module documentation).
pub struct PostgresArchive {
    /// `None` only while dropping.
    rt: Option<tokio::runtime::Runtime>,
    pool: Pool,
    target: Target,
    /// Whether [`Target::set_up`] has succeeded.
    ready: AtomicBool,
    /// Serialises set-up attempts.
    setting_up: Mutex<()>,
    /// Since when writes have found the database away (`None` while it answers).
    away_since: Mutex<Option<Instant>>,
    /// How long writes wait for it ([`OUTAGE_WAIT`]).
    outage_wait: Duration,
}

impl PostgresArchive {
    /// Opens the archive of `[cluster]`; `base` resolves relative paths (the CA file). Sets the
    /// database up now when it is reachable; when it is not, returns the archive anyway (it
    /// sets itself up once the database answers). A database that answers with something that
    /// waiting does not cure (`synchronous_commit = off`, a newer schema, a failed migration)
    /// is an error.
    pub fn open(
        cluster: &ClusterConfig,
        base: &dyn Fn(&std::path::Path) -> std::path::PathBuf,
    ) -> Result<PostgresArchive, ClusterError> {
        let target = Target::of(cluster, base)?;
        let rt = runtime()?;
        let pool = {
            let _guard = rt.enter();
            target.pool()?
        };
        let archive = PostgresArchive {
            rt: Some(rt),
            pool,
            target,
            ready: AtomicBool::new(false),
            setting_up: Mutex::new(()),
            away_since: Mutex::new(None),
            outage_wait: OUTAGE_WAIT,
        };
        match archive.ensure_ready() {
            Ok(()) => info!(database = %archive.target.host, schema = schema_version(), "archive database ready"),
            Err(e) if e.is_unreachable() => {
                warn!(error = %e, "archive database unreachable at start; mail is spooled and delivered, the archive catches up once it answers")
            }
            Err(e) => return Err(e),
        }
        Ok(archive)
    }

    /// How long writes wait for a database that went away (tests shorten it).
    pub fn with_outage_wait(mut self, wait: Duration) -> PostgresArchive {
        self.outage_wait = wait;
        self
    }

    /// Where the database is (`host:port`), for logs.
    pub fn host(&self) -> &str {
        &self.target.host
    }

    /// Runs `f` on the archive's runtime and waits for it. From an async task of a
    /// multi-threaded runtime (the pipeline's rules check before judging may shadow-run new
    /// rules over the archive), the wait first hands the task's other work to another thread
    /// (`block_in_place`), as a blocking call there must.
    fn block_on<T>(&self, f: impl Future<Output = T>) -> T {
        let rt = self.rt.as_ref().expect("runtime lives until drop");
        match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(|| rt.block_on(f))
            }
            _ => rt.block_on(f),
        }
    }

    /// Sets the database up if it has not been yet.
    fn ensure_ready(&self) -> Result<(), ClusterError> {
        if self.ready.load(Ordering::Acquire) {
            return Ok(());
        }
        let _one = self.setting_up.lock().unwrap_or_else(|e| e.into_inner());
        if self.ready.load(Ordering::Acquire) {
            return Ok(());
        }
        self.block_on(self.target.set_up())?;
        self.ready.store(true, Ordering::Release);
        Ok(())
    }

    /// Runs `f` with a pooled connection (after set-up).
    fn with<T>(
        &self,
        f: impl AsyncFnOnce(&mut deadpool_postgres::Object) -> Result<T, tokio_postgres::Error>,
    ) -> Result<T, StoreError> {
        self.ensure_ready()?;
        self.block_on(async {
            let mut client = self.pool.get().await.map_err(|e| self.target.pool_error(e))?;
            f(&mut client).await.map_err(|e| self.target.query_error(e))
        })
        .map_err(StoreError::from)
    }

    /// One transaction writing `entries`.
    fn try_write(&self, entries: &[Entry]) -> Result<(), StoreError> {
        self.with(async |client| {
            let tx = client.transaction().await?;
            for entry in entries {
                match entry {
                    // One bad entry (an id that is no ULID) must not cost the others their place.
                    Entry::Message(m) if !is_id(&m.id) => warn!(id = %m.id, "not archived: not a spool id"),
                    Entry::Attempt(a) if !is_id(&a.message_id) => {
                        warn!(id = %a.message_id, "not archived: not a spool id")
                    }
                    Entry::Message(m) => insert_message(&tx, m).await?,
                    Entry::Attempt(a) => insert_attempt(&tx, a).await?,
                }
            }
            tx.commit().await
        })
    }
}

impl Drop for PostgresArchive {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which a runtime's own thread may not do; this may be one.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl From<ClusterError> for StoreError {
    fn from(e: ClusterError) -> StoreError {
        StoreError::Database(Box::new(e))
    }
}

/// What the archive keeps of a message, in bytes (see `footprint`).
fn footprint(m: &ArchivedMessage, envelope: &str) -> i64 {
    (m.raw.len() + m.subject.len() + m.text.len() + m.payload.as_ref().map_or(0, String::len) + envelope.len()) as i64
}

async fn insert_message(
    tx: &deadpool_postgres::Transaction<'_>,
    m: &ArchivedMessage,
) -> Result<(), tokio_postgres::Error> {
    // Archived again (a dead letter retried): the new entry replaces the old one and goes to
    // the top; its raw bytes and addresses go with the old row, its attempts stay.
    // Every statement is prepared once per connection (`prepare_cached`): an unprepared one
    // costs a round trip and a parse and plan in the server each time.
    let delete = tx.prepare_cached("DELETE FROM message WHERE id = $1").await?;
    tx.execute(&delete, &[&m.id]).await?;
    let received_ms = ulid::Ulid::from_string(&m.id).map(|u| u.timestamp_ms() as i64).unwrap_or(0);
    let envelope = serde_json::to_string(&m.envelope).expect("an envelope serialises");
    let destinations = serde_json::to_string(&m.destinations).expect("names serialise");
    let fields = m.fields.as_ref().map(|f| f.to_string());
    let size = m.raw.len() as i64;
    let footprint = footprint(m, &envelope);
    let stmt = tx
        .prepare_cached(
            "INSERT INTO message (id, state, received_ms, finished_at, source, sender, subject, rule, destinations,
                 envelope, fields, payload, reason, size, footprint, search)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9::text::jsonb, $10::text::jsonb, $11::text::jsonb, $12, $13,
                 $14, $15, to_tsvector('simple', $7) || to_tsvector('simple', $16::text))
             RETURNING seq",
        )
        .await?;
    let row = tx
        .query_one(
            &stmt,
            &[
                &m.id,
                &m.state.as_str(),
                &received_ms,
                &m.finished_at,
                &m.envelope.source.protocol(),
                &m.sender,
                &m.subject,
                &m.rule,
                &destinations,
                &envelope,
                &fields,
                &m.payload,
                &m.reason,
                &size,
                &footprint,
                &m.text,
            ],
        )
        .await?;
    let seq: i64 = row.get(0);
    let raw = tx.prepare_cached("INSERT INTO message_raw (seq, bytes) VALUES ($1, $2)").await?;
    tx.execute(&raw, &[&seq, &m.raw]).await?;
    let recipients: Vec<String> = m.envelope.recipients.iter().map(|r| r.to_lowercase()).collect();
    let addresses = tx
        .prepare_cached(
            "INSERT INTO address (seq, kind, value)
             SELECT $1::bigint, 'to', v FROM unnest($2::text[]) v UNION ALL SELECT $1::bigint, 'dest', v FROM unnest($3::text[]) v",
        )
        .await?;
    tx.execute(&addresses, &[&seq, &recipients, &m.destinations]).await?;
    Ok(())
}

async fn insert_attempt(
    tx: &deadpool_postgres::Transaction<'_>,
    a: &AttemptRecord,
) -> Result<(), tokio_postgres::Error> {
    let stmt = tx
        .prepare_cached(
            "INSERT INTO attempt (message_id, at, destination, outcome, status, reply, body, duration_ms)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .await?;
    let status = a.status.map(i32::from);
    tx.execute(
        &stmt,
        &[&a.message_id, &a.at, &a.destination, &a.outcome, &status, &a.reply, &a.body, &(a.duration_ms as i64)],
    )
    .await?;
    Ok(())
}

/// The tsquery for what a user typed: each word (letters and digits only) as a prefix, every
/// word required. `None` when nothing is left.
fn ts_query(q: &str) -> Option<String> {
    let words: Vec<String> = q
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(|w| format!("{}:*", w.to_lowercase()))
        .collect();
    (!words.is_empty()).then(|| words.join(" & "))
}

const SUMMARY_COLUMNS: &str = "m.seq, m.id, m.state, m.received_ms, m.sender, m.subject, m.rule, m.destinations::text";
const ATTEMPT_COLUMNS: &str = "message_id, at, destination, outcome, status, reply, body, duration_ms";

fn summary(r: &tokio_postgres::Row) -> Summary {
    let state: String = r.get("state");
    let destinations: String = r.get("destinations");
    let received_ms: i64 = r.get("received_ms");
    Summary {
        id: r.get("id"),
        state: ArchiveState::parse(&state).unwrap_or(ArchiveState::Dead),
        received_at: crate::spool::format_time(
            SystemTime::UNIX_EPOCH + Duration::from_millis(received_ms.max(0) as u64),
        ),
        from: r.get("sender"),
        subject: r.get("subject"),
        rule: r.get("rule"),
        destinations: serde_json::from_str(&destinations).unwrap_or_default(),
    }
}

fn attempt(r: &tokio_postgres::Row) -> AttemptRecord {
    AttemptRecord {
        message_id: r.get("message_id"),
        at: r.get("at"),
        destination: r.get("destination"),
        outcome: r.get("outcome"),
        status: r.get::<_, Option<i32>>("status").and_then(|s| u16::try_from(s).ok()),
        reply: r.get("reply"),
        body: r.get("body"),
        duration_ms: r.get::<_, i64>("duration_ms").max(0) as u64,
    }
}

impl Archive for PostgresArchive {
    fn record(&self, message: &ArchivedMessage) -> Result<(), StoreError> {
        if !is_id(&message.id) {
            return Err(StoreError::BadId(message.id.clone()));
        }
        self.try_write(&[Entry::Message(Box::new(message.clone()))])
    }

    fn add_attempt(&self, attempt: &AttemptRecord) -> Result<(), StoreError> {
        if !is_id(&attempt.message_id) {
            return Err(StoreError::BadId(attempt.message_id.clone()));
        }
        self.try_write(&[Entry::Attempt(attempt.clone())])
    }

    /// Waits for the database while it is unreachable, up to `outage_wait` from when it went
    /// away (see the module documentation).
    fn write_batch(&self, entries: &[Entry]) -> Result<(), StoreError> {
        let mut pause = Duration::from_millis(250);
        let mut said = Instant::now();
        loop {
            match self.try_write(entries) {
                Ok(()) => {
                    if let Some(since) = self.away_since.lock().unwrap_or_else(|e| e.into_inner()).take() {
                        info!(database = %self.target.host, waited_s = since.elapsed().as_secs(), entries = entries.len(), "archive database back; archived what waited");
                    }
                    return Ok(());
                }
                Err(StoreError::Database(e)) if e.is_unreachable() => {
                    let since = *self.away_since.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert_with(|| {
                        warn!(error = %e, entries = entries.len(), "archive database unreachable; delivery goes on, the archive waits for it");
                        said = Instant::now();
                        Instant::now()
                    });
                    if since.elapsed() >= self.outage_wait {
                        return Err(StoreError::Database(e));
                    }
                    if said.elapsed() >= RETRY_LOG {
                        said = Instant::now();
                        warn!(error = %e, waited_s = since.elapsed().as_secs(), "archive database still unreachable");
                    }
                    std::thread::sleep(pause.min(self.outage_wait.saturating_sub(since.elapsed())));
                    pause = (pause * 2).min(RETRY_MAX);
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn get(&self, id: &str) -> Result<Option<Record>, StoreError> {
        if !is_id(id) {
            return Ok(None);
        }
        let rows = self.with(async |c| {
            let message = c
                .query_opt(
                    &format!(
                        "SELECT {SUMMARY_COLUMNS}, m.envelope::text AS envelope, m.finished_at, m.size, m.reason,
                            m.fields::text AS fields, m.payload FROM message m WHERE m.id = $1"
                    ),
                    &[&id],
                )
                .await?;
            let attempts = c
                .query(&format!("SELECT {ATTEMPT_COLUMNS} FROM attempt WHERE message_id = $1 ORDER BY n"), &[&id])
                .await?;
            Ok((message, attempts))
        })?;
        let (Some(row), attempts) = rows else { return Ok(None) };
        let corrupt = |e: serde_json::Error| StoreError::Corrupt { id: id.to_string(), reason: e.to_string() };
        let envelope = serde_json::from_str(row.get::<_, &str>("envelope")).map_err(corrupt)?;
        let json = |column: &str| row.get::<_, Option<&str>>(column).map(serde_json::from_str::<Json>).transpose();
        Ok(Some(Record {
            summary: summary(&row),
            envelope,
            finished_at: row.get("finished_at"),
            size: row.get::<_, i64>("size").max(0) as u64,
            reason: row.get("reason"),
            fields: json("fields").map_err(corrupt)?,
            payload: json("payload").map_err(corrupt)?,
            attempts: attempts.iter().map(attempt).collect(),
        }))
    }

    fn raw(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        if !is_id(id) {
            return Ok(None);
        }
        self.with(async |c| {
            let row = c
                .query_opt("SELECT r.bytes FROM message_raw r JOIN message m USING (seq) WHERE m.id = $1", &[&id])
                .await?;
            Ok(row.map(|r| r.get::<_, Vec<u8>>(0)))
        })
    }

    fn list(&self, query: &MessageQuery) -> Result<Page, StoreError> {
        let mut clauses: Vec<String> = Vec::new();
        let mut args: Vec<Box<dyn ToSql + Sync + Send>> = Vec::new();
        let mut arg = |v: Box<dyn ToSql + Sync + Send>| {
            args.push(v);
            format!("${}", args.len())
        };
        if let Some(q) = query.q.as_deref().and_then(ts_query) {
            clauses.push(format!("m.search @@ to_tsquery('simple', {})", arg(Box::new(q))));
        }
        if let Some(s) = query.state {
            clauses.push(format!("m.state = {}", arg(Box::new(s.as_str().to_string()))));
        }
        if let Some(r) = &query.rule {
            clauses.push(format!("m.rule = {}", arg(Box::new(r.clone()))));
        }
        if let Some(f) = &query.from {
            clauses.push(format!("m.sender = {}", arg(Box::new(f.trim().to_lowercase()))));
        }
        if let Some(s) = &query.source {
            clauses.push(format!("m.source = {}", arg(Box::new(s.clone()))));
        }
        if let Some(t) = &query.to {
            clauses.push(format!(
                "m.seq IN (SELECT seq FROM address WHERE kind = 'to' AND value = {})",
                arg(Box::new(t.trim().to_lowercase()))
            ));
        }
        if let Some(d) = &query.destination {
            clauses.push(format!(
                "m.seq IN (SELECT seq FROM address WHERE kind = 'dest' AND value = {})",
                arg(Box::new(d.clone()))
            ));
        }
        if let Some(since) = query.since {
            clauses.push(format!("m.received_ms >= {}", arg(Box::new(unix_ms(since)))));
        }
        if let Some(until) = query.until {
            clauses.push(format!("m.received_ms < {}", arg(Box::new(unix_ms(until)))));
        }
        if let Some(cursor) = &query.cursor {
            let seq: i64 = cursor.parse().map_err(|_| StoreError::BadId(cursor.clone()))?;
            clauses.push(format!("m.seq < {}", arg(Box::new(seq))));
        }
        let size = query.page_size();
        let limit = arg(Box::new(size as i64 + 1));
        let filter = if clauses.is_empty() { String::new() } else { format!("WHERE {}", clauses.join(" AND ")) };
        let sql = format!("SELECT {SUMMARY_COLUMNS} FROM message m {filter} ORDER BY m.seq DESC LIMIT {limit}");
        let rows = self.with(async |c| {
            let params: Vec<&(dyn ToSql + Sync)> = args.iter().map(|a| a.as_ref() as &(dyn ToSql + Sync)).collect();
            c.query(&sql, &params).await
        })?;
        let mut items: Vec<(i64, Summary)> = rows.iter().map(|r| (r.get::<_, i64>("seq"), summary(r))).collect();
        let next = if items.len() > size {
            items.truncate(size);
            items.last().map(|(seq, _)| seq.to_string())
        } else {
            None
        };
        Ok(Page { items: items.into_iter().map(|(_, s)| s).collect(), next })
    }

    fn counts_by_state(&self) -> Result<Vec<(ArchiveState, u64)>, StoreError> {
        let rows = self.with(async |c| c.query("SELECT state, count(*) FROM message GROUP BY state", &[]).await)?;
        let counts: BTreeMap<String, i64> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        Ok(ArchiveState::ALL
            .into_iter()
            .map(|s| (s, counts.get(s.as_str()).copied().unwrap_or(0).max(0) as u64))
            .collect())
    }

    fn hourly(&self, since: SystemTime) -> Result<Vec<(u64, u64)>, StoreError> {
        let rows = self.with(async |c| {
            c.query(
                "SELECT received_ms / 3600000 AS hour, count(*) FROM message WHERE received_ms >= $1 GROUP BY hour ORDER BY hour",
                &[&unix_ms(since)],
            )
            .await
        })?;
        Ok(rows.iter().map(|r| (r.get::<_, i64>(0).max(0) as u64 * 3600, r.get::<_, i64>(1).max(0) as u64)).collect())
    }

    fn rule_stats(&self, since: SystemTime) -> Result<Vec<RuleStats>, StoreError> {
        let since = unix_ms(since);
        let (matches, filled) = self.with(async |c| {
            let matches = c
                .query(
                    "SELECT rule, count(*) FROM message WHERE rule IS NOT NULL AND received_ms >= $1 GROUP BY rule",
                    &[&since],
                )
                .await?;
            let filled = c
                .query(
                    "SELECT m.rule, f.key, count(*) FROM message m, jsonb_each(m.fields) f
                     WHERE m.rule IS NOT NULL AND jsonb_typeof(m.fields) = 'object' AND m.received_ms >= $1
                       AND jsonb_typeof(f.value) <> 'null'
                       AND NOT (jsonb_typeof(f.value) = 'string' AND btrim(f.value #>> '{}') = '')
                     GROUP BY m.rule, f.key ORDER BY m.rule, f.key",
                    &[&since],
                )
                .await?;
            Ok((matches, filled))
        })?;
        let mut stats: BTreeMap<String, RuleStats> = BTreeMap::new();
        for r in &matches {
            let rule: String = r.get(0);
            stats.insert(
                rule.clone(),
                RuleStats { rule, matches: r.get::<_, i64>(1).max(0) as u64, filled: Vec::new() },
            );
        }
        for r in &filled {
            if let Some(s) = stats.get_mut(r.get::<_, &str>(0)) {
                s.filled.push((r.get(1), r.get::<_, i64>(2).max(0) as u64));
            }
        }
        Ok(stats.into_values().collect())
    }

    fn destinations(&self) -> Result<Vec<DestinationStatus>, StoreError> {
        let (last, failed) = self.with(async |c| {
            let last = c
                .query(
                    &format!(
                        "SELECT DISTINCT ON (destination) {ATTEMPT_COLUMNS} FROM attempt ORDER BY destination, at DESC, n DESC"
                    ),
                    &[],
                )
                .await?;
            let failed = c
                .query(
                    &format!(
                        "SELECT DISTINCT ON (destination) {ATTEMPT_COLUMNS} FROM attempt WHERE outcome <> 'delivered'
                         ORDER BY destination, at DESC, n DESC"
                    ),
                    &[],
                )
                .await?;
            Ok((last, failed))
        })?;
        let mut failed: BTreeMap<String, AttemptRecord> =
            failed.iter().map(attempt).map(|a| (a.destination.clone(), a)).collect();
        Ok(last
            .iter()
            .map(attempt)
            .map(|l| DestinationStatus {
                destination: l.destination.clone(),
                last_error: failed.remove(&l.destination),
                last: l,
            })
            .collect())
    }

    fn enforce_retention(&self, keep: Duration, max_size: u64, now: SystemTime) -> Result<Retention, StoreError> {
        let cutoff = now.checked_sub(keep).unwrap_or(SystemTime::UNIX_EPOCH);
        let floor = id_floor(cutoff);
        let cutoff_at = crate::spool::format_time(cutoff);
        let max_size = i64::try_from(max_size).unwrap_or(i64::MAX);
        let removed = self.with(async |c| {
            let tx = c.transaction().await?;
            // Too old, then the oldest of the rest until what is left fits in `max_size`.
            let old: Vec<String> =
                tx.query("DELETE FROM message WHERE id < $1 RETURNING id", &[&floor]).await?.iter().map(|r| r.get(0)).collect();
            let over: Vec<String> = tx
                .query(
                    "DELETE FROM message WHERE seq IN (
                         SELECT seq FROM (SELECT seq, sum(footprint) OVER (ORDER BY id DESC) AS kept FROM message) x
                         WHERE kept > $1::bigint)
                     RETURNING id",
                    &[&max_size],
                )
                .await?
                .iter()
                .map(|r| r.get(0))
                .collect();
            let gone: Vec<&String> = old.iter().chain(&over).collect();
            tx.execute("DELETE FROM attempt WHERE message_id = ANY($1)", &[&gone]).await?;
            // Attempts of messages that never reached the archive go by the same clock.
            tx.execute(
                "DELETE FROM attempt a WHERE a.at < $1 AND NOT EXISTS (SELECT 1 FROM message m WHERE m.id = a.message_id)",
                &[&cutoff_at],
            )
            .await?;
            tx.commit().await?;
            Ok(gone.len() as u64)
        })?;
        Ok(Retention { removed, size: self.size()? })
    }

    fn size(&self) -> Result<u64, StoreError> {
        let row =
            self.with(async |c| c.query_one("SELECT coalesce(sum(footprint), 0)::bigint FROM message", &[]).await)?;
        Ok(row.get::<_, i64>(0).max(0) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_words_never_become_query_operators() {
        assert_eq!(ts_query("Invoice 42").as_deref(), Some("invoice:* & 42:*"));
        assert_eq!(ts_query("a | b & !c").as_deref(), Some("a:* & b:* & c:*"));
        assert_eq!(ts_query("'x':* <-> (y)").as_deref(), Some("x:* & y:*"));
        assert_eq!(ts_query("  ()  "), None);
    }

    #[test]
    fn schema_version_is_the_newest_migration() {
        assert_eq!(schema_version(), 4);
    }
}
