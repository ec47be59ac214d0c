//! `spool.db`: the SQLite database that holds every message, and its single writer thread
//! (group commit: invariant 3 of the module docs).

use super::{SpoolError, State};
use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior, params};
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// The database's file name inside the spool directory.
pub(super) const DB_FILE: &str = "spool.db";

/// Most requests applied in one transaction.
const MAX_BATCH: usize = 512;

/// How long a writer waits for another process's transaction (`mailhook ingest`, `queue`)
/// before it gives up; a reader waits as long for a checkpoint or recovery to finish.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// How often a connection that finds the database locked tries again.
const BUSY_POLL: Duration = Duration::from_millis(1);

/// Waits [`BUSY_POLL`] and tries again, for up to [`BUSY_TIMEOUT`]. SQLite's own busy timeout
/// sleeps longer and longer (up to 100 ms at a time): with a dozen `ingest` processes taking
/// the lock in turn, serve's writer, and the `250`s waiting on it, would lose every race.
fn busy(attempts: i32) -> bool {
    let waited = BUSY_POLL * u32::try_from(attempts).unwrap_or(0);
    if waited >= BUSY_TIMEOUT {
        return false;
    }
    std::thread::sleep(BUSY_POLL);
    true
}

/// Raw messages up to this size are bound to their statement (SQLite copies them once) and read
/// back in one statement; larger ones are written into, and read from, a blob in chunks.
pub(super) const BOUND_RAW: usize = 1 << 20;

/// Bytes copied at a time between a spill file and a blob.
const CHUNK: usize = 256 * 1024;

/// Reader connections kept open for reuse. Two cores keep about two judging at a time; more
/// idle connections would only hold their page caches.
const READERS: usize = 4;

/// Page cache of each connection, in KiB (SQLite's default is 2 MiB each). A row is read once
/// by its key and written at the table's end, so a small cache holds the pages used again
/// (the tree's inner pages, the free list); the rest comes from the kernel's page cache.
const CACHE_KIB: i64 = 512;

/// `message` is the queue, `raw` the bytes of each message (same `seq`). `kept` names the raw
/// bytes of removed messages that stay for the archive (`keep_raw`): the archive refers to a
/// message's raw bytes by its id instead of writing them a second time, and gives them up
/// ([`Op::Release`]) when its retention removes the entry. A new message takes the `seq` its raw
/// row is given, above every row kept, so a kept row's `seq` is never taken again while kept.
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS message (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL,
    meta TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS message_state ON message(state, id);
CREATE TABLE IF NOT EXISTS raw (
    seq INTEGER PRIMARY KEY,
    bytes BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS kept (
    id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL
) WITHOUT ROWID;
";

fn db_error(path: &Path, e: rusqlite::Error) -> SpoolError {
    SpoolError::Db { path: path.to_path_buf(), source: Arc::new(e) }
}

/// Opens a connection on the spool's database with the settings every connection needs.
fn connect(path: &Path, fsync: bool) -> rusqlite::Result<Connection> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags)?;
    conn.busy_handler(Some(busy))?;
    // FULL: a commit is on stable storage when it returns (the WAL is flushed at each commit).
    conn.pragma_update(None, "synchronous", if fsync { "FULL" } else { "OFF" })?;
    // The last connection to close leaves the WAL and its index in place (the writer empties
    // the WAL itself when idle, see `Writer::close_idle`): a database whose `-wal` and `-shm`
    // files exist can still be read where it can no longer be written (a read-only remount).
    conn.set_db_config(rusqlite::config::DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, true)?;
    // A WAL grown by a burst of big messages is cut back to this size once checkpointed.
    conn.pragma_update(None, "journal_size_limit", 64i64 << 20)?;
    conn.pragma_update(None, "cache_size", -CACHE_KIB)?;
    conn.set_prepared_statement_cache_capacity(16);
    Ok(conn)
}

/// Creates the database if need be (`0600`), in WAL mode with its tables, and returns the
/// connection the writer thread will use.
pub(super) fn open(path: &Path, fsync: bool) -> Result<Connection, SpoolError> {
    if !path.exists() {
        // Created here rather than by SQLite, so that it is private whatever the umask; SQLite
        // gives its `-wal` and `-shm` files the same mode.
        super::private_file_keep(path).map_err(|e| SpoolError::io(path, e))?;
    }
    let conn = connect(path, fsync).map_err(|e| db_error(path, e))?;
    // Turning a new database to WAL writes its header in a read transaction made a write one,
    // and SQLite answers a busy upgrade at once, without the busy handler: when `serve` and an
    // `ingest` open a spool that is just being created, the loser tries again as a writer would.
    let mut attempts = 0;
    let mode: String = loop {
        match conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0)) {
            Err(e) if e.sqlite_error_code() == Some(rusqlite::ErrorCode::DatabaseBusy) && busy(attempts) => {
                attempts += 1;
            }
            r => break r.map_err(|e| db_error(path, e))?,
        }
    };
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(SpoolError::io(path, io::Error::other(format!("journal mode {mode}, not wal"))));
    }
    conn.execute_batch(SCHEMA).map_err(|e| db_error(path, e))?;
    Ok(conn)
}

/// Where the raw bytes of a new row come from.
pub(super) enum Raw {
    Bytes(Vec<u8>),
    /// The first `size` bytes of a file (a draft that spilled, or a spool file being drained).
    File {
        path: PathBuf,
        size: u64,
    },
}

/// One mutation of the spool.
pub(super) enum Op {
    /// A new message. With `if_absent`, an id already present (queued, or kept) is left as it is
    /// (an old spool's entry drained a second time after a crash).
    Insert { id: String, state: State, meta: String, raw: Raw, if_absent: bool },
    /// A state change, with new metadata if given; `from == to` only replaces the metadata.
    Move { id: String, from: State, to: State, meta: Option<String> },
    /// A removal. With `keep_raw`, the raw bytes stay, as kept (see [`SCHEMA`]).
    Remove { id: String, from: State },
    /// A removal whatever the state (a row whose state cannot be read, once in `corrupt/`).
    Forget { id: String },
    /// The kept raw bytes of these ids given up (the archive no longer refers to them).
    Release { ids: Vec<String> },
    /// Nothing: it succeeds when the batch's write transaction can begin and commit on a
    /// connection that can write, which one opened read-only (or sharing the WAL index of one)
    /// cannot.
    Probe,
}

struct Job {
    op: Op,
    reply: oneshot::Sender<Result<(), SpoolError>>,
}

/// Why one operation of a batch failed.
enum OpError {
    NotFound(String),
    Db(rusqlite::Error),
    Io(PathBuf, io::Error),
}

impl From<rusqlite::Error> for OpError {
    fn from(e: rusqlite::Error) -> Self {
        OpError::Db(e)
    }
}

/// What the writer thread is sent: work, or word that a reader opened a connection (which
/// the writer thread closes once idle).
enum Msg {
    Job(Job),
    Wake,
}

/// Reader connections not in use, each with when it was last used.
type Pool = Mutex<Vec<(Connection, Instant)>>;

/// The spool's database: the writer thread's handle, and reader connections kept for reuse
/// (WAL lets them read while the writer writes).
///
/// No connection stays open while the spool is idle: the writer thread closes its own, and the
/// readers', after [`IDLE`] without use. A file open for writing (as SQLite holds its database,
/// WAL and shared index) keeps the kernel from remounting the file system read-only; an
/// operator can still do so between bursts of mail, and a connection opened while it was
/// read-only is never kept for later.
pub(super) struct Db {
    path: PathBuf,
    fsync: bool,
    tx: mpsc::Sender<Msg>,
    pool: Arc<Pool>,
    /// Whether the writer thread is waiting with a timeout, to close what is idle (else it
    /// waits for work alone, and a reader that leaves a connection in the pool wakes it).
    watching: Arc<AtomicBool>,
}

/// How long a connection is kept open without use.
pub(super) const IDLE: Duration = Duration::from_millis(25);

impl Db {
    /// Starts the writer thread with `conn`, a connection made by [`open`].
    pub(super) fn start(conn: Connection, path: PathBuf, fsync: bool, keep_raw: bool) -> io::Result<Db> {
        let (tx, rx) = mpsc::channel::<Msg>();
        let pool: Arc<Pool> = Arc::default();
        let watching = Arc::new(AtomicBool::new(true));
        let writer = Writer {
            conn: Some(conn),
            path: path.clone(),
            fsync,
            keep_raw,
            pool: pool.clone(),
            watching: watching.clone(),
        };
        std::thread::Builder::new().name("spool-writer".into()).spawn(move || writer.run(rx))?;
        Ok(Db { path, fsync, tx, pool, watching })
    }

    fn send(&self, op: Op) -> Result<oneshot::Receiver<Result<(), SpoolError>>, SpoolError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Msg::Job(Job { op, reply })).map_err(|_| SpoolError::Stopped)?;
        Ok(rx)
    }

    pub(super) async fn submit(&self, op: Op) -> Result<(), SpoolError> {
        self.send(op)?.await.map_err(|_| SpoolError::Stopped)?
    }

    pub(super) fn submit_blocking(&self, op: Op) -> Result<(), SpoolError> {
        self.send(op)?.blocking_recv().map_err(|_| SpoolError::Stopped)?
    }

    /// Sends every operation before waiting for any: they are applied in as few transactions
    /// as the batch limit allows.
    pub(super) fn submit_all_blocking(&self, ops: Vec<Op>) -> Vec<Result<(), SpoolError>> {
        let sent: Vec<_> = ops.into_iter().map(|op| self.send(op)).collect();
        sent.into_iter().map(|rx| rx.and_then(|rx| rx.blocking_recv().map_err(|_| SpoolError::Stopped)?)).collect()
    }

    /// Runs `f` on a reader connection.
    pub(super) fn read<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T, SpoolError> {
        let pooled = self.pool.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let conn = match pooled {
            Some((c, _)) => c,
            None => connect(&self.path, self.fsync).map_err(|e| db_error(&self.path, e))?,
        };
        let out = f(&conn).map_err(|e| db_error(&self.path, e));
        // A connection opened while the file system was read-only stays read-only: not kept.
        if out.is_ok() && !conn.is_readonly(rusqlite::MAIN_DB).unwrap_or(true) {
            {
                let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
                if pool.len() < READERS {
                    pool.push((conn, Instant::now()));
                }
            }
            // Left in the pool first, then checked: the writer thread either sees it there or
            // is told (it clears `watching` before it looks at the pool).
            if !self.watching.load(Ordering::SeqCst) {
                let _ = self.tx.send(Msg::Wake);
            }
        }
        out
    }
}

/// The writer thread.
struct Writer {
    conn: Option<Connection>,
    path: PathBuf,
    fsync: bool,
    /// Removals keep the raw bytes, for the archive.
    keep_raw: bool,
    pool: Arc<Pool>,
    watching: Arc<AtomicBool>,
}

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Msg>) {
        loop {
            self.watching.store(false, Ordering::SeqCst);
            let open = self.conn.is_some() || !self.pool.lock().unwrap_or_else(|e| e.into_inner()).is_empty();
            if open {
                self.watching.store(true, Ordering::SeqCst);
            }
            let first = if open {
                match rx.recv_timeout(IDLE) {
                    Ok(msg) => msg,
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        self.close_idle();
                        continue;
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => return,
                }
            } else {
                match rx.recv() {
                    Ok(msg) => msg,
                    Err(_) => return,
                }
            };
            let Msg::Job(first) = first else { continue };
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(Msg::Job(job)) => batch.push(job),
                    Ok(Msg::Wake) => {}
                    Err(_) => break,
                }
            }
            let results = self.apply(batch.iter().map(|j| &j.op));
            for (job, r) in batch.into_iter().zip(results) {
                let _ = job.reply.send(r);
            }
        }
    }

    /// Closes the writer's connection (idle for [`IDLE`] now) and the readers' idle as long.
    fn close_idle(&mut self) {
        if let Some(conn) = self.conn.take() {
            // Copies the WAL into the database and empties it, unless another connection is
            // reading (then the next writer carries on with it as it is): a connection opened
            // later has no WAL to read through first. Not waiting for readers is fine.
            let _ = conn.busy_handler(None);
            let _ = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
        }
        let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        pool.retain(|(_, used)| used.elapsed() < IDLE);
    }

    fn apply<'a>(&mut self, ops: impl ExactSizeIterator<Item = &'a Op> + Clone) -> Vec<Result<(), SpoolError>> {
        let n = ops.len();
        if self.conn.is_none() {
            match connect(&self.path, self.fsync) {
                Ok(c) => self.conn = Some(c),
                Err(e) => return all_failed(&self.path, n, e),
            }
        }
        let conn = self.conn.as_mut().expect("connected above");
        // A connection opened on a read-only file system stays read-only when it turns writable
        // again. Its transactions still begin and commit (each write in them failing on its own),
        // so a batch of them is refused at once, and the connection not kept: a new one is
        // opened for the next batch, as after any batch that could not commit.
        let readonly = conn.is_readonly(rusqlite::MAIN_DB).unwrap_or(true);
        let (results, whole) = if readonly {
            let e = rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_READONLY), None);
            (all_failed(&self.path, n, e), false)
        } else {
            apply(conn, &self.path, self.keep_raw, ops)
        };
        if !whole {
            self.conn = None;
        }
        results
    }
}

fn all_failed(path: &Path, n: usize, e: rusqlite::Error) -> Vec<Result<(), SpoolError>> {
    let e = Arc::new(e);
    (0..n).map(|_| Err(SpoolError::Db { path: path.to_path_buf(), source: e.clone() })).collect()
}

/// Applies every operation in one transaction, then commits once: one flush of the WAL for the
/// whole batch. Nothing is answered before that commit. An operation that fails leaves no trace
/// and does not fail the others.
///
/// The operations first run straight in the transaction. One that does not find its message
/// finds it out before it writes anything, so it fails alone and cleanly. Any other failure (a
/// disk error, a constraint) may leave part of that operation's writes: then the transaction is
/// rolled back and the batch applied again with each operation in a savepoint of its own. Not
/// always so, because a savepoint per operation costs two statements parsed and, for each page
/// the operation changes, a copy of that page in the statement journal: the largest part of this
/// thread's time when every operation had one (`docs/benchmarks.md`).
fn apply<'a>(
    conn: &mut Connection,
    path: &Path,
    keep_raw: bool,
    ops: impl ExactSizeIterator<Item = &'a Op> + Clone,
) -> (Vec<Result<(), SpoolError>>, bool) {
    let n = ops.len();
    let mut tx = match conn.transaction_with_behavior(TransactionBehavior::Immediate) {
        Ok(tx) => tx,
        Err(e) => return (all_failed(path, n, e), false),
    };
    let mut results = Vec::with_capacity(n);
    for op in ops.clone() {
        match apply_one(&tx, keep_raw, op) {
            Ok(()) => results.push(Ok(())),
            Err(OpError::NotFound(id)) => results.push(Err(SpoolError::NotFound(id))),
            Err(_) => break,
        }
    }
    if results.len() < n {
        drop(tx);
        tx = match conn.transaction_with_behavior(TransactionBehavior::Immediate) {
            Ok(tx) => tx,
            Err(e) => return (all_failed(path, n, e), false),
        };
        results = ops.map(|op| apply_alone(&mut tx, path, keep_raw, op)).collect();
    }
    if let Err(e) = tx.commit() {
        return (all_failed(path, n, e), false);
    }
    (results, true)
}

/// One operation in a savepoint of its own: rolled back on its own if it fails.
fn apply_alone(tx: &mut rusqlite::Transaction<'_>, path: &Path, keep_raw: bool, op: &Op) -> Result<(), SpoolError> {
    let r = tx.savepoint().map_err(OpError::Db).and_then(|sp| {
        apply_one(&sp, keep_raw, op)?;
        sp.commit().map_err(OpError::Db)?;
        Ok(())
    });
    // Savepoints roll back on drop: `sp` is gone by now whatever happened.
    r.map_err(|e| match e {
        OpError::NotFound(id) => SpoolError::NotFound(id),
        OpError::Db(e) => db_error(path, e),
        OpError::Io(p, e) => SpoolError::io(p, e),
    })
}

fn apply_one(conn: &Connection, keep_raw: bool, op: &Op) -> Result<(), OpError> {
    match op {
        Op::Probe => Ok(()),
        Op::Insert { id, state, meta, raw, if_absent } => {
            // Present means queued, or removed with its raw bytes kept: delivered already.
            if *if_absent
                && conn
                    .prepare_cached("SELECT 1 FROM message WHERE id = ?1 UNION ALL SELECT 1 FROM kept WHERE id = ?1")?
                    .query_row([id], |_| Ok(()))
                    .optional()?
                    .is_some()
            {
                return Ok(());
            }
            // The raw row first: its `seq` is above every raw row, kept ones included.
            let seq = match raw {
                Raw::Bytes(bytes) => {
                    conn.prepare_cached("INSERT INTO raw (bytes) VALUES (?1)")?.execute(params![bytes])?;
                    conn.last_insert_rowid()
                }
                Raw::File { path, size } => copy_file(conn, path, *size)?,
            };
            conn.prepare_cached("INSERT INTO message (seq, id, state, meta) VALUES (?1, ?2, ?3, ?4)")?
                .execute(params![seq, id, state.dir_name(), meta])?;
            Ok(())
        }
        Op::Move { id, from, to, meta } => {
            let changed = conn
                .prepare_cached(
                    "UPDATE message SET state = ?3, meta = coalesce(?4, meta) WHERE id = ?1 AND state = ?2",
                )?
                .execute(params![id, from.dir_name(), to.dir_name(), meta])?;
            if changed == 0 {
                return Err(OpError::NotFound(id.clone()));
            }
            Ok(())
        }
        Op::Remove { .. } | Op::Forget { .. } => {
            let seq: Option<i64> = match op {
                Op::Remove { id, from } => conn
                    .prepare_cached("DELETE FROM message WHERE id = ?1 AND state = ?2 RETURNING seq")?
                    .query_row(params![id, from.dir_name()], |r| r.get(0))
                    .optional()?,
                _ => conn
                    .prepare_cached("DELETE FROM message WHERE id = ?1 RETURNING seq")?
                    .query_row(params![op_id(op)], |r| r.get(0))
                    .optional()?,
            };
            let id = op_id(op);
            let Some(seq) = seq else { return Err(OpError::NotFound(id.to_string())) };
            if keep_raw {
                // An id is never queued again once kept (a new message has a new id, and an old
                // spool's entry drained twice finds it kept), so it is never kept twice.
                conn.prepare_cached("INSERT INTO kept (id, seq) VALUES (?1, ?2)")?.execute(params![id, seq])?;
            } else {
                conn.prepare_cached("DELETE FROM raw WHERE seq = ?1")?.execute([seq])?;
            }
            Ok(())
        }
        Op::Release { ids } => {
            let mut unkeep = conn.prepare_cached("DELETE FROM kept WHERE id = ?1 RETURNING seq")?;
            // Never the bytes of a message in the queue (a kept id cannot be one, but a row
            // the queue uses is not to be lost to a mistake).
            let mut drop_raw = conn.prepare_cached(
                "DELETE FROM raw WHERE seq = ?1 AND NOT EXISTS (SELECT 1 FROM message WHERE seq = ?1)",
            )?;
            for id in ids {
                if let Some(seq) = unkeep.query_row([id], |r| r.get::<_, i64>(0)).optional()? {
                    drop_raw.execute([seq])?;
                }
            }
            Ok(())
        }
    }
}

fn op_id(op: &Op) -> &str {
    match op {
        Op::Insert { id, .. } | Op::Move { id, .. } | Op::Remove { id, .. } | Op::Forget { id } => id,
        Op::Probe | Op::Release { .. } => "",
    }
}

/// Copies the first `size` bytes of the file at `path` into a new raw row, a chunk at a time (a
/// big message is never held whole in memory, nor copied by SQLite as a bound value is), and
/// returns the row's `seq`.
fn copy_file(conn: &Connection, path: &Path, size: u64) -> Result<i64, OpError> {
    let io_err = |e| OpError::Io(path.to_path_buf(), e);
    let mut file = File::open(path).map_err(io_err)?.take(size);
    conn.prepare_cached("INSERT INTO raw (bytes) VALUES (zeroblob(?1))")?.execute(params![size as i64])?;
    let seq = conn.last_insert_rowid();
    let mut blob = conn.blob_open(rusqlite::MAIN_DB, "raw", "bytes", seq, false)?;
    let mut buf = vec![0u8; CHUNK.min(size as usize).max(1)];
    let mut at = 0usize;
    loop {
        let n = file.read(&mut buf).map_err(io_err)?;
        if n == 0 {
            break;
        }
        blob.write_at(&buf[..n], at)?;
        at += n;
    }
    if at as u64 != size {
        return Err(io_err(io::Error::new(io::ErrorKind::UnexpectedEof, format!("{at} bytes of {size}"))));
    }
    Ok(seq)
}

/// Reads the raw bytes of row `seq` of `size` bytes: in one statement when small, else from
/// its blob straight into a buffer of the right size (one copy of the message, not two).
pub(super) fn read_raw(conn: &Connection, seq: i64, size: usize) -> rusqlite::Result<Vec<u8>> {
    if size <= BOUND_RAW {
        return conn.prepare_cached("SELECT bytes FROM raw WHERE seq = ?1")?.query_row([seq], |r| r.get(0));
    }
    let blob = conn.blob_open(rusqlite::MAIN_DB, "raw", "bytes", seq, true)?;
    let mut out = vec![0u8; blob.len()];
    for (i, chunk) in out.chunks_mut(CHUNK).enumerate() {
        blob.read_at_exact(chunk, i * CHUNK)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(conn: &Connection, table: &str) -> i64 {
        conn.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0)).unwrap()
    }

    fn insert(id: &str, if_absent: bool) -> Op {
        let raw = Raw::Bytes(format!("Subject: {id}\r\n\r\nbody\r\n").into_bytes());
        Op::Insert { id: id.into(), state: State::Incoming, meta: "{}".into(), raw, if_absent }
    }

    /// The second insert of an id fails on the message's key after its raw row is written: that
    /// row must go with it, and the operations around it must still be applied.
    #[test]
    fn an_operation_that_fails_halfway_leaves_no_trace_and_fails_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool.db");
        open(&path, false).unwrap();
        let mut conn = connect(&path, false).unwrap();
        let ops = [
            insert("a", false),
            Op::Remove { id: "gone".into(), from: State::Incoming },
            insert("a", false),
            insert("b", false),
        ];
        let (results, whole) = apply(&mut conn, &path, false, ops.iter());
        assert!(whole);
        assert!(results[0].is_ok());
        assert!(matches!(&results[1], Err(SpoolError::NotFound(id)) if id == "gone"), "{:?}", results[1]);
        assert!(matches!(results[2], Err(SpoolError::Db { .. })), "{:?}", results[2]);
        assert!(results[3].is_ok());
        assert_eq!(count(&conn, "message"), 2);
        assert_eq!(count(&conn, "raw"), 2, "no raw row left by the insert that failed");

        // Without a failure, one pass: the same results as the operations alone would give.
        let ops = [insert("c", false), Op::Remove { id: "a".into(), from: State::Incoming }, insert("b", true)];
        let (results, whole) = apply(&mut conn, &path, false, ops.iter());
        assert!(whole && results.iter().all(Result::is_ok), "{results:?}");
        assert_eq!(count(&conn, "message"), 2, "b and c");
        assert_eq!(count(&conn, "raw"), 2);
    }

    /// `serve` and `ingest` may both open a spool whose database does not exist yet: each
    /// must get a working database, never "database is locked".
    #[test]
    fn processes_opening_a_new_spool_at_once_all_get_it() {
        for _ in 0..20 {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("spool.db");
            let barrier = Arc::new(std::sync::Barrier::new(8));
            let openers: Vec<_> = (0..8)
                .map(|_| {
                    let (path, barrier) = (path.clone(), barrier.clone());
                    std::thread::spawn(move || {
                        barrier.wait();
                        open(&path, false).map(|_| ())
                    })
                })
                .collect();
            for opener in openers {
                opener.join().unwrap().unwrap();
            }
        }
    }
}
