//! spool: the durable queue on disk, and the only owner of message state.
//!
//! ```text
//! ingest ──► spool ──► pipeline (parse ─► rules ─► deliver) ──► spool (done / deferred / dead)
//! ```
//!
//! With `[cluster]` the same states and the same calls are kept in PostgreSQL instead, shared by
//! every instance, with claims and leases ([`postgres`]; [`Spool::open_cluster`]): each public
//! call below goes there when the spool was opened so. What follows describes the files.
//!
//! # On-disk format
//!
//! ```text
//! SPOOL/
//!   lock           flock(2)ed by the one `mailhook serve` that works this spool
//!   spool.db       SQLite (WAL mode, synchronous = FULL): every message, whatever its state
//!   spool.db-wal   its write-ahead log, and spool.db-shm its shared index (SQLite's own)
//!   tmp/           drafts of big messages being received (past 1 MiB), and `/healthz` probes
//!   corrupt/       entries that could not be read; moved here, never deleted
//! ```
//!
//! ```text
//! message(seq INTEGER PRIMARY KEY, id TEXT UNIQUE, state TEXT, meta TEXT)   index (state, id)
//! raw(seq INTEGER PRIMARY KEY, bytes BLOB)                                  same seq as message
//! ```
//!
//! `id` is the spool id, a ULID (time-ordered); `state` is `incoming`, `active`, `deferred` or
//! `dead`; `meta` is the message's [`Meta`] as JSON (envelope, size, attempts, next attempt,
//! the rules' decision — rule, payload, the status of each destination — and the last error);
//! `raw` holds the message exactly as received, in a table of its own so that a state change
//! (an `UPDATE` of `message`) never rewrites it. A delivered (or dropped) message is deleted.
//! `sqlite3 SPOOL/spool.db "SELECT id, state FROM message"` shows the queue; `mailhook queue`
//! is the supported way to act on it. To back the spool up, copy it with SQLite
//! (`sqlite3 SPOOL/spool.db ".backup copy.db"`), never the files alone while it runs.
//!
//! Every public function that takes an id checks it is one ([`check_id`]) before using it.
//!
//! The spool is private, as Postfix keeps its queue: directories are created `0700` (and an
//! existing spool directory is narrowed to it), files `0600`, whatever the umask.
//!
//! Other processes work the same database while `serve` runs: `mailhook ingest` inserts its
//! message, `queue` and `replay` change states; WAL lets them read while one writes, and a
//! writer waits for another's transaction (busy timeout). `serve` sees their changes at its
//! next scan, as it saw new files before.
//!
//! Spools in the two file formats written before the database (`incoming/ID.msg` message files
//! with `STATE/ID.json` metadata, and the older `incoming/ID.json` + `msg/ID.eml`; see
//! `legacy.rs`) are drained into it by [`Spool::recover`].
//!
//! # Invariants
//!
//! 1. **A message's state is its row's `state`**, and a state change is one `UPDATE`, made
//!    only if the message is in the state the caller says it leaves (else `NotFound`).
//! 2. **Nothing is acknowledged before it is durable.** A message's row and its raw bytes are
//!    inserted in one transaction; a call returns only once the transaction that holds its
//!    change is committed and the WAL flushed.
//! 3. **Group commit**: one thread applies every mutation. It takes all the requests waiting
//!    (up to 512), applies them in one transaction (one that fails does not fail the others:
//!    see `db::apply`), commits once — one `fsync` of the WAL for the whole batch —
//!    then answers them all. A new message costs no file created, renamed or removed: it is
//!    appended to the WAL with the others of its batch.
//! 4. **The raw message is never rewritten**; replays and retries read it again.
//! 5. **Big messages, flat memory**: a [`Draft`] keeps up to [`SPILL`] bytes in memory and
//!    spills past it to a file in `tmp/`; the writer copies that file into the row's blob a
//!    chunk at a time, and [`Spool::read_raw`] reads a big blob straight into one buffer.
//! 6. **Recovery** (before any listener starts): SQLite rolls back a transaction cut short
//!    (torn writes at the end of the WAL are ignored); `tmp/` leftovers older than
//!    [`TMP_GRACE`] are deleted (nothing in `tmp/` was ever acknowledged); an old spool's files
//!    are drained into the database (each entry inserted in its state, committed, then its files
//!    removed: a crash in between inserts nothing twice, as the id is the key); `active` rows go
//!    back in line (`incoming`, or `deferred` due now when already judged); a row whose metadata
//!    cannot be read is written to `corrupt/` (`ID.json` and `ID.eml`) and deleted.

pub mod actions;
mod db;
mod file;
mod inbox;
mod legacy;
mod meta;
pub mod postgres;

use crate::model::{Envelope, Source};
use db::{Db, Op, Raw};
use rusqlite::OptionalExtension;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

pub use inbox::{Fresh, INBOX_LIMIT, Inbox};
pub use meta::{Decision, DestState, DestStatus, Meta, format_time, parse_time};

/// `tmp/` files younger than this are left alone by recovery: another process may be writing them.
pub const TMP_GRACE: Duration = Duration::from_secs(600);

/// A draft larger than this is spilled to a file in `tmp/` rather than kept in memory.
pub const SPILL: usize = 1 << 20;

/// Whether `id` is a spool id: a ULID in its canonical form (see [`check_id`]). Anything else
/// (`../x`, an empty string) is never looked up.
pub fn is_id(id: &str) -> bool {
    check_id(id).is_ok()
}

/// Where a message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum State {
    Incoming,
    Active,
    Deferred,
    Dead,
}

impl State {
    pub const ALL: [State; 4] = [State::Incoming, State::Active, State::Deferred, State::Dead];

    pub fn dir_name(self) -> &'static str {
        match self {
            State::Incoming => "incoming",
            State::Active => "active",
            State::Deferred => "deferred",
            State::Dead => "dead",
        }
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.dir_name())
    }
}

/// Spool errors. Every one of them means "not durable": the caller must not acknowledge.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("spool {path}: {source}")]
    Db {
        path: PathBuf,
        #[source]
        source: Arc<rusqlite::Error>,
    },
    #[error("spool {0}: is locked by another running mailhook serve")]
    Locked(PathBuf),
    #[error("message {0} is not in the spool")]
    NotFound(String),
    #[error("message {id}: unreadable metadata: {reason}")]
    Corrupt {
        id: String,
        #[source]
        reason: Damage,
    },
    #[error("spool writer has stopped")]
    Stopped,
    #[error("{0:?} is not a message id (a ULID such as 01JD4Z6W8Q2M3N4P5R6S7T8V9X)")]
    BadId(String),
    /// The queue in PostgreSQL (`[cluster]`) could not be read or written.
    #[error("spool: {0}")]
    Database(#[from] crate::cluster::ClusterError),
}

/// Checks that `id` is a ULID in its canonical form (26 characters of Crockford's base 32, as
/// the spool writes them), so that it is safe to look up and to make a file name of.
pub fn check_id(id: &str) -> Result<(), SpoolError> {
    let canonical = id.len() == 26 && id.bytes().all(|b| b.is_ascii_digit() || b.is_ascii_uppercase());
    match ulid::Ulid::from_string(id) {
        Ok(_) if canonical => Ok(()),
        _ => Err(SpoolError::BadId(id.chars().take(64).collect())),
    }
}

/// Creates `dir` (and its parents) with mode 0700, and narrows it to 0700 if it already exists.
pub(crate) fn private_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    let mode = fs::metadata(dir)?.permissions().mode();
    if mode & 0o077 != 0 {
        fs::set_permissions(dir, fs::Permissions::from_mode(mode & 0o700))?;
    }
    Ok(())
}

/// Creates (truncating) a file readable and writable by its owner only.
pub(crate) fn private_file(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    File::options().write(true).create(true).truncate(true).mode(0o600).open(path)
}

/// Creates a file readable and writable by its owner only, keeping it as it is if it exists.
fn private_file_keep(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    File::options().write(true).create(true).truncate(false).mode(0o600).open(path)
}

/// What is wrong with a spool entry that cannot be read back.
#[derive(Debug, thiserror::Error)]
pub enum Damage {
    #[error("too short for a spool file")]
    TooShort,
    #[error("no spool footer at its end")]
    NoFooter,
    #[error("its footer gives a size of {0} bytes, past its end")]
    SizePastEnd(u64),
    #[error("{0}")]
    Metadata(#[from] serde_json::Error),
}

impl SpoolError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: io::Error) -> SpoolError {
        SpoolError::Io { path: path.into(), source }
    }
}

/// The `seq` and length of a queued message's raw bytes.
const RAW_QUEUED: &str = "SELECT seq, length(bytes) FROM raw WHERE seq = (SELECT seq FROM message WHERE id = ?1)";

/// The same for the raw bytes the spool keeps after removing the message, else a queued one's.
const RAW_ANY: &str = "SELECT seq, length(bytes) FROM raw
     WHERE seq = coalesce((SELECT seq FROM kept WHERE id = ?1), (SELECT seq FROM message WHERE id = ?1))";

/// Options of [`Spool::open`].
#[derive(Debug, Clone, Copy)]
pub struct SpoolOptions {
    /// Flush to stable storage before acknowledging. Only benchmarks turn this off.
    pub fsync: bool,
    /// Keep the raw bytes of removed messages for the archive, which refers to them instead of
    /// writing them again ([`Spool::read_any_raw`], [`Spool::release`]). Every process that
    /// opens one spool must say the same: `[archive]` on, without `[cluster]`.
    pub keep_raw: bool,
}

impl Default for SpoolOptions {
    fn default() -> Self {
        SpoolOptions { fsync: true, keep_raw: false }
    }
}

impl SpoolOptions {
    /// The options `config` gives.
    pub fn of(config: &crate::config::Config) -> SpoolOptions {
        SpoolOptions {
            fsync: config.spool.fsync,
            keep_raw: config.cluster.is_none() && config.archive_path().is_some(),
        }
    }
}

/// A handle on a spool. Cheap to clone; all clones share one writer thread.
#[derive(Clone)]
pub struct Spool {
    inner: Arc<Inner>,
    /// With `[cluster]`: the queue in PostgreSQL, which every public call below goes to.
    pg: Option<Arc<postgres::PgQueue>>,
}

struct Inner {
    dir: PathBuf,
    keep_raw: bool,
    /// The local database; `None` with `[cluster]`, whose queue is in PostgreSQL.
    db: Option<Db>,
    seq: AtomicU64,
    /// This process's id, part of every `tmp/` name (read once: it is a system call).
    pid: u32,
}

/// What [`Spool::recover`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovery {
    pub tmp_removed: usize,
    pub requeued: usize,
    /// Message files of an old spool whose metadata was already removed (a removal cut short),
    /// now removed.
    pub removals_finished: usize,
    /// Entries of an old spool's files moved into the database.
    pub drained: usize,
    pub corrupt: Vec<String>,
    /// The source and fingerprint of every message in the spool that has one.
    pub fingerprints: Vec<(Source, String)>,
}

impl Spool {
    /// Opens (creating if needed) the spool at `dir`. Fails if it is not a writable directory.
    pub fn open(dir: &Path, options: SpoolOptions) -> Result<Spool, SpoolError> {
        private_dir(dir).map_err(|e| SpoolError::io(dir, e))?;
        for sub in ["tmp", "corrupt"] {
            let p = dir.join(sub);
            private_dir(&p).map_err(|e| SpoolError::io(&p, e))?;
        }
        // Prove the spool is writable now rather than at the first message.
        probe(dir)?;
        let path = dir.join(db::DB_FILE);
        let conn = db::open(&path, options.fsync)?;
        let db = Db::start(conn, path, options.fsync, options.keep_raw).map_err(|e| SpoolError::io(dir, e))?;
        Ok(Spool {
            inner: Arc::new(Inner {
                dir: dir.to_path_buf(),
                keep_raw: options.keep_raw,
                db: Some(db),
                seq: AtomicU64::new(0),
                pid: std::process::id(),
            }),
            pg: None,
        })
    }

    /// The spool of `[cluster]`: the queue in PostgreSQL (see [`postgres`]). `owner` is the
    /// serving instance's id (it claims messages; `None` for the commands); `dir` the local
    /// directory `dir()` names (for what an instance keeps of its own). Connects lazily.
    pub fn open_cluster(
        cluster: &crate::config::ClusterConfig,
        base: &dyn Fn(&Path) -> PathBuf,
        owner: Option<String>,
        dir: &Path,
    ) -> Result<Spool, SpoolError> {
        let pg = postgres::PgQueue::open(cluster, base, owner, dir)?;
        // No local database: every call goes to PostgreSQL (a draft stays in memory). The
        // directory stays, for what an instance keeps of its own (the drift state).
        private_dir(dir).map_err(|e| SpoolError::io(dir, e))?;
        Ok(Spool {
            inner: Arc::new(Inner {
                dir: dir.to_path_buf(),
                keep_raw: false,
                db: None,
                seq: AtomicU64::new(0),
                pid: std::process::id(),
            }),
            pg: Some(Arc::new(pg)),
        })
    }

    /// The queue in PostgreSQL, when the spool is shared by a cluster.
    pub fn shared(&self) -> Option<&postgres::PgQueue> {
        self.pg.as_deref()
    }

    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// The spool's database file.
    pub fn db_path(&self) -> PathBuf {
        self.inner.dir.join(db::DB_FILE)
    }

    /// The local database. With `[cluster]` there is none, and every public call has gone to
    /// PostgreSQL before it would be needed.
    fn db(&self) -> Result<&Db, SpoolError> {
        self.inner
            .db
            .as_ref()
            .ok_or_else(|| SpoolError::io(self.db_path(), io::Error::other("no local spool database with [cluster]")))
    }

    /// Whether the spool can be written now: creates and removes a file in `tmp/`, then has the
    /// writer begin and commit a write transaction. The file alone is not enough: once a file
    /// system turns writable again, a database connection opened while it was read-only (and
    /// any connection sharing its WAL index) still cannot write until it is closed.
    pub fn probe(&self) -> Result<(), SpoolError> {
        if let Some(pg) = &self.pg {
            return pg.probe();
        }
        probe(&self.inner.dir)?;
        self.db()?.submit_blocking(Op::Probe)
    }

    /// [`probe`](Self::probe) from async code.
    pub async fn probe_async(&self) -> Result<(), SpoolError> {
        if let Some(pg) = &self.pg {
            return pg.probe_async().await;
        }
        probe(&self.inner.dir)?;
        self.db()?.submit(Op::Probe).await
    }

    /// Takes the spool's exclusive lock, held until the returned value is dropped.
    ///
    /// The lock file is held open read-only (`flock(2)` needs no more).
    pub fn lock(&self) -> Result<SpoolLock, SpoolError> {
        if self.pg.is_some() {
            // Instances share the queue: nothing to hold alone.
            return Ok(SpoolLock { _file: None });
        }
        let path = self.inner.dir.join("lock");
        if !path.exists() {
            private_file_keep(&path).map_err(|e| SpoolError::io(&path, e))?;
        }
        let file = File::open(&path).map_err(|e| SpoolError::io(&path, e))?;
        match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(SpoolLock { _file: Some(file) }),
            Err(e) if e == rustix::io::Errno::WOULDBLOCK => Err(SpoolError::Locked(self.inner.dir.clone())),
            Err(e) => Err(SpoolError::io(&path, e.into())),
        }
    }

    fn tmp_path(&self, id: &str, ext: &str) -> PathBuf {
        let seq = self.inner.seq.fetch_add(1, Ordering::Relaxed);
        self.inner.dir.join("tmp").join(format!("{id}.{}.{seq}.{ext}", self.inner.pid))
    }

    /// Starts a new message: its raw bytes are written into the draft, then
    /// [`Draft::commit`] stores it. Nothing touches the disk before that (for a message of
    /// at most [`SPILL`] bytes).
    pub fn draft(&self) -> Result<Draft, SpoolError> {
        Ok(Draft {
            spool: self.clone(),
            id: ulid::Ulid::generate().to_string(),
            buf: Vec::new(),
            spill: None,
            size: 0,
            fingerprint: None,
        })
    }

    /// Stores a whole message durably; returns its id. Blocking: not for async contexts.
    pub fn store(&self, envelope: Envelope, raw: &[u8]) -> Result<String, SpoolError> {
        let mut draft = self.draft()?;
        draft.write_all(raw).map_err(|e| SpoolError::io(self.db_path(), e))?;
        draft.commit_blocking(envelope).map(|meta| meta.id)
    }

    /// What the spool holds, for `/metrics` and the console (no metadata is read: a spool id
    /// is a ULID, which carries the time the message was received).
    pub fn gauges(&self) -> Result<crate::metrics::SpoolGauges, SpoolError> {
        if let Some(pg) = &self.pg {
            return pg.gauges();
        }
        let (counts, oldest) = self.db()?.read(|c| {
            let mut stmt = c.prepare_cached("SELECT state, count(*) FROM message GROUP BY state")?;
            let counts: Vec<(String, i64)> =
                stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<Result<_, _>>()?;
            let oldest: Option<String> = c
                .prepare_cached("SELECT min(id) FROM message WHERE state = 'deferred'")?
                .query_row([], |r| r.get(0))?;
            Ok((counts, oldest))
        })?;
        let count = |s: State| counts.iter().find(|(n, _)| n == s.dir_name()).map_or(0, |(_, c)| *c as u64);
        let oldest_deferred_age = oldest
            .and_then(|id| ulid::Ulid::from_string(&id).ok())
            .map(|u| SystemTime::now().duration_since(u.datetime()).unwrap_or_default());
        Ok(crate::metrics::SpoolGauges {
            incoming: count(State::Incoming) + count(State::Active),
            deferred: count(State::Deferred),
            oldest_deferred_age,
            dead: count(State::Dead),
        })
    }

    /// Ids in `state`, oldest first.
    pub fn list(&self, state: State) -> Result<Vec<String>, SpoolError> {
        if let Some(pg) = &self.pg {
            return pg.list(state);
        }
        self.db()?.read(|c| {
            let mut stmt = c.prepare_cached("SELECT id FROM message WHERE state = ?1 ORDER BY id")?;
            stmt.query_map([state.dir_name()], |r| r.get(0))?.collect()
        })
    }

    /// [`find`](Self::find), telling a spool that cannot be read (the cluster's database away)
    /// from a message that is not there.
    pub fn lookup(&self, id: &str) -> Result<Option<State>, SpoolError> {
        match &self.pg {
            Some(pg) if is_id(id) => pg.find(id),
            _ => Ok(self.find(id)),
        }
    }

    /// Which state `id` is in, if it is in the spool.
    pub fn find(&self, id: &str) -> Option<State> {
        check_id(id).ok()?;
        if let Some(pg) = &self.pg {
            return pg.find(id).unwrap_or_else(|e| {
                tracing::warn!(id, error = %e, "cannot look the message up in the queue");
                None
            });
        }
        let name: Option<String> = self
            .db()
            .ok()?
            .read(|c| {
                c.prepare_cached("SELECT state FROM message WHERE id = ?1")?.query_row([id], |r| r.get(0)).optional()
            })
            .ok()
            .flatten();
        name.and_then(|n| State::ALL.into_iter().find(|s| s.dir_name() == n))
    }

    pub fn read_meta(&self, state: State, id: &str) -> Result<Meta, SpoolError> {
        self.read_meta_with_raw(state, id, 0).map(|(meta, _)| meta)
    }

    /// [`read_meta`](Self::read_meta), and the raw message too when it is at most `raw_up_to`
    /// bytes: one read for a message about to be judged.
    pub fn read_meta_with_raw(
        &self,
        state: State,
        id: &str,
        raw_up_to: u64,
    ) -> Result<(Meta, Option<Vec<u8>>), SpoolError> {
        check_id(id)?;
        if let Some(pg) = &self.pg {
            return pg.read_meta_with_raw(state, id, raw_up_to);
        }
        let limit = raw_up_to.min(db::BOUND_RAW as u64) as i64;
        let row: Option<(String, Option<Vec<u8>>)> = self.db()?.read(|c| {
            c.prepare_cached(
                "SELECT m.meta, CASE WHEN length(r.bytes) <= ?3 THEN r.bytes END
                 FROM message m LEFT JOIN raw r ON r.seq = m.seq WHERE m.id = ?1 AND m.state = ?2",
            )?
            .query_row(rusqlite::params![id, state.dir_name(), limit], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()
        })?;
        let (json, raw) = row.ok_or_else(|| SpoolError::NotFound(id.to_string()))?;
        let meta =
            serde_json::from_str(&json).map_err(|e| SpoolError::Corrupt { id: id.to_string(), reason: e.into() })?;
        Ok((meta, raw))
    }

    /// The message exactly as received.
    pub fn read_raw(&self, id: &str) -> Result<Vec<u8>, SpoolError> {
        check_id(id)?;
        if let Some(pg) = &self.pg {
            return pg.read_raw(id);
        }
        self.raw_at(RAW_QUEUED, id)?.ok_or_else(|| SpoolError::NotFound(id.to_string()))
    }

    /// The raw bytes of the row that `sql` (given the id; answering its `seq` and length)
    /// finds, if any.
    fn raw_at(&self, sql: &str, id: &str) -> Result<Option<Vec<u8>>, SpoolError> {
        self.db()?.read(|c| {
            let row: Option<(i64, i64)> =
                c.prepare_cached(sql)?.query_row([id], |r| Ok((r.get(0)?, r.get(1)?))).optional()?;
            row.map(|(seq, len)| db::read_raw(c, seq, len as usize)).transpose()
        })
    }

    /// Whether removed messages keep their raw bytes, for the archive ([`SpoolOptions::keep_raw`]).
    pub fn keeps_raw(&self) -> bool {
        self.inner.keep_raw
    }

    /// The raw bytes of `id`, whether it is in the queue or removed with its bytes kept; `None`
    /// when they are in neither.
    pub fn read_any_raw(&self, id: &str) -> Result<Option<Vec<u8>>, SpoolError> {
        check_id(id)?;
        self.raw_at(RAW_ANY, id)
    }

    /// Up to `limit` ids whose raw bytes are kept, in order, after `after`.
    pub fn kept(&self, after: &str, limit: usize) -> Result<Vec<String>, SpoolError> {
        self.db()?.read(|c| {
            let mut stmt = c.prepare_cached("SELECT id FROM kept WHERE id > ?1 ORDER BY id LIMIT ?2")?;
            stmt.query_map(rusqlite::params![after, limit as i64], |r| r.get(0))?.collect()
        })
    }

    /// Gives up the kept raw bytes of `ids`, durably (ids not kept are passed over).
    pub fn release(&self, ids: Vec<String>) -> Result<(), SpoolError> {
        if ids.is_empty() {
            return Ok(());
        }
        self.db()?.submit_blocking(Op::Release { ids })
    }

    /// Gives up every raw message kept (the archive was turned off): returns how many.
    pub fn release_all_kept(&self) -> Result<u64, SpoolError> {
        let mut released = 0u64;
        loop {
            let ids = self.kept("", 1000)?;
            if ids.is_empty() {
                return Ok(released);
            }
            released += ids.len() as u64;
            self.release(ids)?;
        }
    }

    fn encode(meta: &Meta) -> String {
        serde_json::to_string(meta).expect("metadata serialises")
    }

    /// Moves `id` from one state to another, durably, with new metadata if given. With
    /// `from == to` it only replaces the metadata. `NotFound` when `id` is not in `from`.
    pub async fn transition(&self, id: &str, from: State, to: State, meta: Option<&Meta>) -> Result<(), SpoolError> {
        if let Some(pg) = &self.pg {
            check_id(id)?;
            return pg.transition(id, from, to, meta).await;
        }
        self.db()?.submit(Self::transition_op(id, from, to, meta)?).await
    }

    /// [`transition`](Self::transition) for non-async callers.
    pub fn transition_blocking(&self, id: &str, from: State, to: State, meta: Option<&Meta>) -> Result<(), SpoolError> {
        if let Some(pg) = &self.pg {
            check_id(id)?;
            return pg.transition_blocking(id, from, to, meta);
        }
        self.db()?.submit_blocking(Self::transition_op(id, from, to, meta)?)
    }

    fn transition_op(id: &str, from: State, to: State, meta: Option<&Meta>) -> Result<Op, SpoolError> {
        check_id(id)?;
        Ok(Op::Move { id: id.to_string(), from, to, meta: meta.map(Self::encode) })
    }

    fn remove_op(id: &str, from: State) -> Result<Op, SpoolError> {
        check_id(id)?;
        Ok(Op::Remove { id: id.to_string(), from })
    }

    /// Deletes a message (delivered, dropped, or `queue drop`), durably.
    pub async fn remove(&self, id: &str, from: State) -> Result<(), SpoolError> {
        if let Some(pg) = &self.pg {
            check_id(id)?;
            return pg.remove(id, from).await;
        }
        self.db()?.submit(Self::remove_op(id, from)?).await
    }

    /// [`remove`](Self::remove) for non-async callers.
    pub fn remove_blocking(&self, id: &str, from: State) -> Result<(), SpoolError> {
        if let Some(pg) = &self.pg {
            check_id(id)?;
            return pg.remove_blocking(id, from);
        }
        self.db()?.submit_blocking(Self::remove_op(id, from)?)
    }

    /// The recovery pass of invariant 6. Call with the lock held, before serving.
    pub fn recover(&self) -> Result<Recovery, SpoolError> {
        if self.pg.is_some() {
            // Nothing to repair: a row is written in one transaction, and the claims of an
            // instance that stopped lapse with their leases.
            return Ok(Recovery::default());
        }
        let mut report = Recovery::default();
        let tmp = self.inner.dir.join("tmp");
        let now = SystemTime::now();
        for entry in fs::read_dir(&tmp).map_err(|e| SpoolError::io(&tmp, e))?.flatten() {
            if older_than(&entry, now, TMP_GRACE) && fs::remove_file(entry.path()).is_ok() {
                report.tmp_removed += 1;
            }
        }
        legacy::drain(self, now, &mut report)?;

        let rows: Vec<(String, String, String)> = self.db()?.read(|c| {
            let mut stmt = c.prepare("SELECT id, state, meta FROM message ORDER BY id")?;
            stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?.collect()
        })?;
        for (id, state_name, json) in rows {
            let state = State::ALL.into_iter().find(|s| s.dir_name() == state_name);
            let parsed = serde_json::from_str::<Meta>(&json);
            let (state, mut meta) = match (state, parsed) {
                (Some(state), Ok(meta)) => (state, meta),
                (_, parsed) => {
                    let reason = match parsed {
                        Err(e) => e.to_string(),
                        Ok(_) => format!("unknown state {state_name:?}"),
                    };
                    self.quarantine_row(&id, &json)?;
                    report.corrupt.push(format!("{state_name}/{id}: {reason}"));
                    continue;
                }
            };
            if let Some(fp) = meta.fingerprint.clone() {
                report.fingerprints.push((meta.envelope.source.clone(), fp));
            }
            if state == State::Active {
                let to = if meta.decision.is_some() {
                    meta.next_attempt = Some(format_time(now));
                    State::Deferred
                } else {
                    State::Incoming
                };
                self.transition_blocking(&id, State::Active, to, Some(&meta))?;
                report.requeued += 1;
            }
        }
        Ok(report)
    }

    /// Writes a row that cannot be read to `corrupt/` (its metadata as `ID.json`, its raw
    /// message as `ID.eml`), flushed, then deletes it from the database.
    fn quarantine_row(&self, id: &str, json: &str) -> Result<(), SpoolError> {
        let corrupt = self.inner.dir.join("corrupt");
        let write = |name: String, bytes: &[u8]| -> Result<(), SpoolError> {
            let path = corrupt.join(name);
            let mut f = private_file(&path).map_err(|e| SpoolError::io(&path, e))?;
            f.write_all(bytes).and_then(|()| f.sync_all()).map_err(|e| SpoolError::io(&path, e))
        };
        write(format!("{id}.json"), json.as_bytes())?;
        match self.read_raw(id) {
            Ok(raw) => write(format!("{id}.eml"), &raw)?,
            Err(SpoolError::NotFound(_)) => {}
            Err(e) => return Err(e),
        }
        File::open(&corrupt).and_then(|d| d.sync_all()).map_err(|e| SpoolError::io(&corrupt, e))?;
        self.db()?.submit_blocking(Op::Forget { id: id.to_string() })
    }
}

fn probe(dir: &Path) -> Result<(), SpoolError> {
    let probe = dir.join("tmp").join(format!(".probe-{}", std::process::id()));
    private_file(&probe).and_then(|_| fs::remove_file(&probe)).map_err(|e| SpoolError::io(dir, e))
}

/// Whether `entry` was last modified at least `age` before `now` (or cannot tell).
fn older_than(entry: &fs::DirEntry, now: SystemTime, age: Duration) -> bool {
    entry
        .metadata()
        .and_then(|m| m.modified())
        .map(|t| now.duration_since(t).unwrap_or_default() >= age)
        .unwrap_or(true)
}

/// Holds the spool's exclusive lock.
pub struct SpoolLock {
    _file: Option<File>,
}

/// A message being received: raw bytes are kept in memory, or past [`SPILL`] bytes streamed to
/// a file in `tmp/`; then [`Draft::commit`] makes it durable in `incoming`. Dropping a draft
/// without committing leaves nothing.
pub struct Draft {
    spool: Spool,
    id: String,
    buf: Vec<u8>,
    spill: Option<Spill>,
    size: u64,
    fingerprint: Option<String>,
}

/// The file a big draft is streamed to.
struct Spill {
    path: PathBuf,
    file: Option<io::BufWriter<File>>,
}

impl Draft {
    /// The spool id this message will have.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Bytes written so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Records the message's fingerprint ([`Meta::fingerprint`]) with it.
    pub fn set_fingerprint(&mut self, fingerprint: String) {
        self.fingerprint = Some(fingerprint);
    }

    /// The metadata and raw bytes of a draft for the cluster's queue (held in memory whole).
    fn finish_buffer(&mut self, mut envelope: Envelope) -> Result<(Meta, Vec<u8>), SpoolError> {
        let raw = std::mem::take(&mut self.buf);
        envelope.id = self.id.clone();
        let mut meta = Meta::new(envelope, self.size);
        meta.fingerprint = self.fingerprint.take();
        Ok((meta, raw))
    }

    fn finish(&mut self, mut envelope: Envelope) -> Result<(Op, Meta), SpoolError> {
        envelope.id = self.id.clone();
        let mut meta = Meta::new(envelope, self.size);
        meta.fingerprint = self.fingerprint.take();
        let raw = match &mut self.spill {
            None => Raw::Bytes(std::mem::take(&mut self.buf)),
            Some(spill) => {
                let file = spill.file.take().ok_or(SpoolError::Stopped)?;
                file.into_inner().map_err(|e| SpoolError::io(&spill.path, e.into_error()))?;
                Raw::File { path: spill.path.clone(), size: self.size }
            }
        };
        let op = Op::Insert {
            id: self.id.clone(),
            state: State::Incoming,
            meta: Spool::encode(&meta),
            raw,
            if_absent: false,
        };
        Ok((op, meta))
    }

    /// Makes the message durable in `incoming` and returns its metadata (`meta.id` is the
    /// spool id). Only after `Ok` may the sender be told.
    pub async fn commit(mut self, envelope: Envelope) -> Result<Meta, SpoolError> {
        if let Some(pg) = self.spool.pg.clone() {
            let (meta, raw) = self.finish_buffer(envelope)?;
            pg.insert(meta.clone(), raw).await?;
            return Ok(meta);
        }
        let (op, meta) = self.finish(envelope)?;
        self.spool.db()?.submit(op).await?;
        Ok(meta)
    }

    /// [`commit`](Self::commit) of a message fetched from an IMAP folder, with its row of the
    /// cluster's dedupe ledger in the same transaction: `Ok(None)`, with nothing stored, when
    /// the ledger already had it (another instance spooled it). A local spool has no ledger
    /// (its folder checkpoints keep the fingerprints): the message is committed as by
    /// [`commit`](Self::commit).
    pub async fn commit_seen(mut self, envelope: Envelope, seen: postgres::Seen) -> Result<Option<Meta>, SpoolError> {
        match self.spool.pg.clone() {
            Some(pg) => {
                let (meta, raw) = self.finish_buffer(envelope)?;
                Ok(pg.insert_seen(meta.clone(), raw, seen).await?.then_some(meta))
            }
            None => self.commit(envelope).await.map(Some),
        }
    }

    /// [`commit`](Self::commit) for non-async callers.
    pub fn commit_blocking(mut self, envelope: Envelope) -> Result<Meta, SpoolError> {
        if let Some(pg) = self.spool.pg.clone() {
            let (meta, raw) = self.finish_buffer(envelope)?;
            pg.insert_blocking(meta.clone(), raw)?;
            return Ok(meta);
        }
        let (op, meta) = self.finish(envelope)?;
        self.spool.db()?.submit_blocking(op)?;
        Ok(meta)
    }

    fn spill(&mut self) -> io::Result<&mut io::BufWriter<File>> {
        if self.spill.is_none() {
            let path = self.spool.tmp_path(&self.id, "msg");
            let file = private_file(&path)?;
            let mut file = io::BufWriter::with_capacity(64 * 1024, file);
            let spill = Spill { path, file: None };
            self.spill = Some(spill);
            file.write_all(&std::mem::take(&mut self.buf))?;
            self.spill.as_mut().expect("just set").file = Some(file);
        }
        self.spill.as_mut().and_then(|s| s.file.as_mut()).ok_or_else(|| io::Error::other("draft already committed"))
    }
}

impl Write for Draft {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // The cluster's queue takes the message whole: a draft for it never spills.
        if self.spool.pg.is_some() || (self.spill.is_none() && self.buf.len() + buf.len() <= SPILL) {
            self.buf.extend_from_slice(buf);
        } else {
            self.spill()?.write_all(buf)?;
        }
        self.size += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        match self.spill.as_mut().and_then(|s| s.file.as_mut()) {
            Some(f) => f.flush(),
            None => Ok(()),
        }
    }
}

impl Drop for Draft {
    fn drop(&mut self) {
        // Committed or not, the spill file is not needed any more: a committed message's bytes
        // are in the database.
        if let Some(spill) = self.spill.take() {
            drop(spill.file);
            let _ = fs::remove_file(&spill.path);
        }
    }
}

#[cfg(test)]
mod tests;
