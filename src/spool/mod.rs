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
//!   lock              flock(2)ed by the one `mailhook serve` that works this spool
//!   tmp/              files being written: new messages, new metadata
//!   incoming/ID.msg   accepted: the raw message followed by its first metadata (see `file.rs`);
//!                     judged and sent a first time from here
//!   incoming/ID.json  newer metadata of a message in line again (`queue retry`, recovery)
//!   msg/ID.msg        the message file of a message whose metadata is in another state
//!   active/ID.json    claimed by the running server for a retry round
//!   deferred/ID.json  judged; some destination still to be tried at `next_attempt`
//!   dead/ID.json      dead letter: kept with its reason for `queue retry` / `replay`
//!   corrupt/          entries that could not be read; moved here, never deleted
//! ```
//!
//! `ID` is a ULID (time-ordered). Every public function that takes an id checks it is one
//! ([`check_id`]) before it makes a path of it, so an id from a command line, a form or an API
//! can never name a file outside the spool.
//!
//! The spool is private, as Postfix keeps its queue: directories are created `0700` (and an
//! existing spool directory is narrowed to it), files `0600`, whatever the umask. A message's [`Meta`] (envelope, size, attempts, next
//! attempt, the rules' decision — rule, payload, the status of each destination — and the last
//! error) is its `ID.json` where it has one, else the metadata inside its `incoming/ID.msg`. A
//! delivered (or dropped) message is removed: a message delivered at once from `incoming/` is
//! one file written, flushed, renamed and removed.
//!
//! Spools written before the message file existed hold `incoming/ID.json` and a bare raw
//! message `msg/ID.eml`; both are still read, moved and removed.
//!
//! # Invariants
//!
//! 1. **A message's state is the directory its `ID.json` is in**, or `incoming/` when it has
//!    none and its `ID.msg` is there. A state change is one `rename(2)` of the `ID.json` (a
//!    message leaving `incoming/` for the first time gets its `ID.json` in the new state first;
//!    its `ID.msg` then moves to `msg/`, and recovery finishes that second step if a crash
//!    came in between).
//! 2. **Nothing is acknowledged before it is durable.** Every write goes to `tmp/`, is flushed,
//!    then renamed into place, and the directory is flushed; only then does the call return.
//!    An `ID.json` never appears before its message file is in place.
//! 3. **The raw message is never rewritten**; replays and retries read it again.
//! 4. **Group commit**: one thread applies every mutation (removals have a thread of their own,
//!    so that slow `unlink(2)`s never hold up a commit). It takes all the requests waiting,
//!    writes their files, flushes them all at once (`fdatasync(2)` from several threads, which
//!    the file system's journal commits together), does the renames, flushes each directory
//!    touched once, then answers them all. Under load the cost of a flush is shared by every
//!    message in the batch.
//! 5. **Recovery** (before any listener starts): `tmp/` leftovers older than
//!    [`TMP_GRACE`] are deleted (nothing in `tmp/` was ever acknowledged); an `incoming/ID.msg`
//!    whose `ID.json` is in another state moves to `msg/`; `active/` entries go back in line
//!    (`incoming/`, or `deferred/` due now when already judged); metadata that cannot be read
//!    and metadata without its message file are moved to `corrupt/`; a message file in `msg/`
//!    without metadata (a removal cut short) is removed, and a bare `ID.eml` without metadata
//!    is moved to `corrupt/` once older than [`TMP_GRACE`].

pub mod actions;
mod committer;
mod file;
mod inbox;
mod meta;
pub mod postgres;

use crate::model::{Envelope, Source};
use committer::{Body, Committer, Op};
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

pub use inbox::{Fresh, INBOX_LIMIT, Inbox};
pub use meta::{Decision, DestState, DestStatus, Meta, format_time, parse_time};

/// `tmp/` files younger than this are left alone by recovery: an `ingest` may be writing them.
pub const TMP_GRACE: Duration = Duration::from_secs(600);

/// Whether `id` is a spool id: a ULID in its canonical form (see [`check_id`]). Anything else
/// (`../x`, an empty string) is never looked up on disk.
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
/// the spool names its files), so that it is safe to make a file name of.
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

/// What is wrong with a spool file that cannot be read back.
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

/// Options of [`Spool::open`].
#[derive(Debug, Clone, Copy)]
pub struct SpoolOptions {
    /// Flush to stable storage before acknowledging. Only benchmarks turn this off.
    pub fsync: bool,
}

impl Default for SpoolOptions {
    fn default() -> Self {
        SpoolOptions { fsync: true }
    }
}

/// A handle on a spool directory. Cheap to clone; all clones share one writer thread.
#[derive(Clone)]
pub struct Spool {
    inner: Arc<Inner>,
    /// With `[cluster]`: the queue in PostgreSQL, which every public call below goes to.
    pg: Option<Arc<postgres::PgQueue>>,
}

struct Inner {
    dir: PathBuf,
    committer: Committer,
    seq: AtomicU64,
    /// This process's id, part of every `tmp/` name (read once: it is a system call).
    pid: u32,
}

/// What [`Spool::recover`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovery {
    pub tmp_removed: usize,
    pub requeued: usize,
    /// Message files whose metadata was already removed (a removal cut short), now removed.
    pub removals_finished: usize,
    pub corrupt: Vec<String>,
    /// The source and fingerprint of every message in the spool that has one.
    pub fingerprints: Vec<(Source, String)>,
}

impl Spool {
    /// Opens (creating if needed) the spool at `dir`. Fails if it is not a writable directory.
    pub fn open(dir: &Path, options: SpoolOptions) -> Result<Spool, SpoolError> {
        private_dir(dir).map_err(|e| SpoolError::io(dir, e))?;
        for sub in ["tmp", "msg", "incoming", "active", "deferred", "dead", "corrupt"] {
            let p = dir.join(sub);
            private_dir(&p).map_err(|e| SpoolError::io(&p, e))?;
        }
        // Prove the spool is writable now rather than at the first message.
        probe(dir)?;
        let committer = Committer::start(options.fsync).map_err(|e| SpoolError::io(dir, e))?;
        Ok(Spool {
            inner: Arc::new(Inner {
                dir: dir.to_path_buf(),
                committer,
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
        let committer = Committer::start(false).map_err(|e| SpoolError::io(dir, e))?;
        Ok(Spool {
            inner: Arc::new(Inner {
                dir: dir.to_path_buf(),
                committer,
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

    /// Whether the spool can be written now: creates and removes a file in `tmp/`.
    pub fn probe(&self) -> Result<(), SpoolError> {
        if let Some(pg) = &self.pg {
            return pg.probe();
        }
        probe(&self.inner.dir)
    }

    /// [`probe`](Self::probe) from async code.
    pub async fn probe_async(&self) -> Result<(), SpoolError> {
        if let Some(pg) = &self.pg {
            return pg.probe_async().await;
        }
        self.probe()
    }

    /// Takes the spool's exclusive lock, held until the returned value is dropped.
    ///
    /// The lock file is held open read-only (`flock(2)` needs no more): a file open for writing
    /// for the life of `serve` would keep the spool's file system from being remounted
    /// read-only, and an operator from doing so.
    pub fn lock(&self) -> Result<SpoolLock, SpoolError> {
        if self.pg.is_some() {
            // Instances share the queue: nothing to hold alone.
            return Ok(SpoolLock { _file: None });
        }
        let path = self.inner.dir.join("lock");
        if !path.exists() {
            use std::os::unix::fs::OpenOptionsExt;
            File::options()
                .create(true)
                .truncate(false)
                .write(true)
                .mode(0o600)
                .open(&path)
                .map_err(|e| SpoolError::io(&path, e))?;
        }
        let file = File::open(&path).map_err(|e| SpoolError::io(&path, e))?;
        match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(SpoolLock { _file: Some(file) }),
            Err(e) if e == rustix::io::Errno::WOULDBLOCK => Err(SpoolError::Locked(self.inner.dir.clone())),
            Err(e) => Err(SpoolError::io(&path, e.into())),
        }
    }

    fn path(&self, state: State, id: &str) -> PathBuf {
        self.inner.dir.join(state.dir_name()).join(format!("{id}.json"))
    }

    /// The message file of `id` while it is in line in `incoming/`.
    fn incoming_file(&self, id: &str) -> PathBuf {
        self.inner.dir.join("incoming").join(format!("{id}.msg"))
    }

    /// The message file of `id` once its metadata is elsewhere.
    fn moved_file(&self, id: &str) -> PathBuf {
        self.inner.dir.join("msg").join(format!("{id}.msg"))
    }

    /// The bare raw message of a spool written before message files existed.
    fn legacy_raw(&self, id: &str) -> PathBuf {
        self.inner.dir.join("msg").join(format!("{id}.eml"))
    }

    /// Where the raw bytes of `id` are, if anywhere: `(path, is a message file)`.
    fn raw_location(&self, id: &str) -> Option<(PathBuf, bool)> {
        [(self.moved_file(id), true), (self.incoming_file(id), true), (self.legacy_raw(id), false)]
            .into_iter()
            .find(|(p, _)| p.is_file())
    }

    fn tmp_path(&self, id: &str, ext: &str) -> PathBuf {
        let seq = self.inner.seq.fetch_add(1, Ordering::Relaxed);
        self.inner.dir.join("tmp").join(format!("{id}.{}.{seq}.{ext}", self.inner.pid))
    }

    /// Starts a new message: a file in `tmp/` to stream the raw bytes into.
    pub fn draft(&self) -> Result<Draft, SpoolError> {
        let id = ulid::Ulid::generate().to_string();
        if self.pg.is_some() {
            // Buffered in memory: the row is written whole at commit.
            return Ok(Draft {
                spool: self.clone(),
                id,
                path: PathBuf::new(),
                file: None,
                size: 0,
                fingerprint: None,
                buffer: Some(Vec::new()),
            });
        }
        let path = self.tmp_path(&id, "msg");
        let file = private_file(&path).map_err(|e| SpoolError::io(&path, e))?;
        Ok(Draft {
            spool: self.clone(),
            id,
            path,
            file: Some(io::BufWriter::with_capacity(64 * 1024, file)),
            size: 0,
            fingerprint: None,
            buffer: None,
        })
    }

    /// Stores a whole message durably; returns its id. Blocking: not for async contexts.
    pub fn store(&self, envelope: Envelope, raw: &[u8]) -> Result<String, SpoolError> {
        let mut draft = self.draft()?;
        draft.write_all(raw).map_err(|e| SpoolError::io(&draft.path, e))?;
        draft.commit_blocking(envelope).map(|meta| meta.id)
    }

    /// What the spool holds, for `/metrics` and the console: a directory listing per state (no
    /// metadata is read: a spool id is a ULID, which carries the time the message was received).
    pub fn gauges(&self) -> Result<crate::metrics::SpoolGauges, SpoolError> {
        if let Some(pg) = &self.pg {
            return pg.gauges();
        }
        let deferred = self.list(State::Deferred)?;
        let oldest_deferred_age = deferred
            .first()
            .and_then(|id| ulid::Ulid::from_string(id).ok())
            .map(|u| SystemTime::now().duration_since(u.datetime()).unwrap_or_default());
        Ok(crate::metrics::SpoolGauges {
            incoming: self.list(State::Incoming)?.len() as u64 + self.list(State::Active)?.len() as u64,
            deferred: deferred.len() as u64,
            oldest_deferred_age,
            dead: self.list(State::Dead)?.len() as u64,
        })
    }

    /// Ids in `state`, oldest first.
    pub fn list(&self, state: State) -> Result<Vec<String>, SpoolError> {
        if let Some(pg) = &self.pg {
            return pg.list(state);
        }
        let dir = self.inner.dir.join(state.dir_name());
        let incoming = state == State::Incoming;
        let mut ids: Vec<String> = fs::read_dir(&dir)
            .map_err(|e| SpoolError::io(&dir, e))?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name();
                let name = name.to_str()?;
                name.strip_suffix(".json")
                    .or_else(|| name.strip_suffix(".msg").filter(|_| incoming))
                    .map(str::to_string)
            })
            .collect();
        ids.sort();
        ids.dedup();
        Ok(ids)
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
        State::ALL
            .into_iter()
            .find(|s| self.path(*s, id).exists())
            .or_else(|| self.incoming_file(id).exists().then_some(State::Incoming))
    }

    pub fn read_meta(&self, state: State, id: &str) -> Result<Meta, SpoolError> {
        self.read_meta_with_raw(state, id, 0).map(|(meta, _)| meta)
    }

    /// [`read_meta`](Self::read_meta), and the raw message too when it comes in the same read:
    /// a message in its `incoming/` file of at most `raw_up_to` bytes.
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
        let path = self.path(state, id);
        let not_found = |path: &Path, e: io::Error| match e.kind() {
            io::ErrorKind::NotFound => SpoolError::NotFound(id.to_string()),
            _ => SpoolError::io(path, e),
        };
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(|meta| (meta, None))
                .map_err(|e| SpoolError::Corrupt { id: id.to_string(), reason: e.into() }),
            Err(e) if e.kind() == io::ErrorKind::NotFound && state == State::Incoming => {
                let file = self.incoming_file(id);
                file::read(&file, id, raw_up_to).map_err(|e| not_found(&file, e))?
            }
            Err(e) => Err(not_found(&path, e)),
        }
    }

    pub fn read_raw(&self, id: &str) -> Result<Vec<u8>, SpoolError> {
        check_id(id)?;
        if let Some(pg) = &self.pg {
            return pg.read_raw(id);
        }
        let (path, message_file) = self.raw_location(id).ok_or_else(|| SpoolError::NotFound(id.to_string()))?;
        let bytes = fs::read(&path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => SpoolError::NotFound(id.to_string()),
            _ => SpoolError::io(&path, e),
        })?;
        if message_file { file::split(bytes, id).map(|(raw, _)| raw) } else { Ok(bytes) }
    }

    fn encode(meta: &Meta) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(meta).expect("metadata serialises");
        v.push(b'\n');
        v
    }

    /// Moves `id` from one state to another, durably, with new metadata if given (written in
    /// place first, then renamed: a crash in between leaves the new content in the old state).
    /// With `from == to` it only replaces the metadata.
    pub async fn transition(&self, id: &str, from: State, to: State, meta: Option<&Meta>) -> Result<(), SpoolError> {
        if let Some(pg) = &self.pg {
            check_id(id)?;
            return pg.transition(id, from, to, meta).await;
        }
        self.inner.committer.submit(self.transition_op(id, from, to, meta)?).await
    }

    /// [`transition`](Self::transition) for non-async callers.
    pub fn transition_blocking(&self, id: &str, from: State, to: State, meta: Option<&Meta>) -> Result<(), SpoolError> {
        if let Some(pg) = &self.pg {
            check_id(id)?;
            return pg.transition_blocking(id, from, to, meta);
        }
        self.inner.committer.submit_blocking(self.transition_op(id, from, to, meta)?)
    }

    fn transition_op(&self, id: &str, from: State, to: State, meta: Option<&Meta>) -> Result<Op, SpoolError> {
        check_id(id)?;
        let from_path = self.path(from, id);
        let body = (from == State::Incoming).then(|| Body {
            at: self.incoming_file(id),
            carry_to: (to != State::Incoming).then(|| self.moved_file(id)),
        });
        let meta = match meta {
            Some(m) => Some(Self::encode(m)),
            // Still only in its message file: the new state gets a copy of that metadata.
            None if from == State::Incoming && !from_path.exists() => {
                Some(Self::encode(&self.read_meta(State::Incoming, id)?))
            }
            None => None,
        };
        Ok(Op::Move {
            write: meta.map(|m| (self.tmp_path(id, "json"), m)),
            from: from_path,
            to: self.path(to, id),
            body,
        })
    }

    fn remove_op(&self, id: &str, from: State) -> Result<Op, SpoolError> {
        check_id(id)?;
        Ok(Op::Remove {
            meta: self.path(from, id),
            body: (from == State::Incoming).then(|| self.incoming_file(id)),
            raw: [self.moved_file(id), self.incoming_file(id), self.legacy_raw(id)],
        })
    }

    /// Deletes a message (delivered, dropped, or `queue drop`), durably.
    pub async fn remove(&self, id: &str, from: State) -> Result<(), SpoolError> {
        if let Some(pg) = &self.pg {
            check_id(id)?;
            return pg.remove(id, from).await;
        }
        self.inner.committer.submit(self.remove_op(id, from)?).await
    }

    /// [`remove`](Self::remove) for non-async callers.
    pub fn remove_blocking(&self, id: &str, from: State) -> Result<(), SpoolError> {
        if let Some(pg) = &self.pg {
            check_id(id)?;
            return pg.remove_blocking(id, from);
        }
        self.inner.committer.submit_blocking(self.remove_op(id, from)?)
    }

    /// The recovery pass of invariant 5. Call with the lock held, before serving.
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

        // A move out of incoming/ cut short: the metadata is in its new state, the message
        // file not yet in msg/.
        let incoming = self.inner.dir.join("incoming");
        for entry in fs::read_dir(&incoming).map_err(|e| SpoolError::io(&incoming, e))?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(id) = name.strip_suffix(".msg") else { continue };
            if !self.path(State::Incoming, id).exists()
                && State::ALL.iter().any(|s| *s != State::Incoming && self.path(*s, id).exists())
            {
                let dest = self.moved_file(id);
                fs::rename(entry.path(), &dest).map_err(|e| SpoolError::io(&dest, e))?;
                for dir in [&incoming, &self.inner.dir.join("msg")] {
                    committer::sync_dir(dir).map_err(|e| SpoolError::io(dir, e))?;
                }
            }
        }

        let mut known = std::collections::HashSet::new();
        for state in State::ALL {
            for id in self.list(state)? {
                // The file that holds the metadata, and how a report names it: only needed for
                // an entry that goes to corrupt/.
                let head = || {
                    let json = self.path(state, &id);
                    let head = if json.exists() { json } else { self.incoming_file(&id) };
                    let label =
                        format!("{}/{}", state.dir_name(), head.file_name().unwrap_or_default().to_string_lossy());
                    (head, label)
                };
                match self.read_meta(state, &id) {
                    Ok(mut meta) if self.raw_location(&id).is_some() => {
                        known.insert(id.clone());
                        if let Some(fp) = meta.fingerprint.take() {
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
                    Ok(_) => {
                        let (head, label) = head();
                        self.quarantine(&head)?;
                        report.corrupt.push(format!("{label}: its raw message is missing"));
                    }
                    Err(SpoolError::Corrupt { reason, .. }) => {
                        let (head, label) = head();
                        self.quarantine(&head)?;
                        while let Some((raw, _)) = self.raw_location(&id) {
                            self.quarantine(&raw)?;
                        }
                        report.corrupt.push(format!("{label}: {reason}"));
                    }
                    Err(SpoolError::NotFound(_)) => {} // removed meanwhile (queue drop)
                    Err(e) => return Err(e),
                }
            }
        }
        let msg = self.inner.dir.join("msg");
        for entry in fs::read_dir(&msg).map_err(|e| SpoolError::io(&msg, e))?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let (id, bare) = match (name.strip_suffix(".msg"), name.strip_suffix(".eml")) {
                (Some(id), _) => (id, false),
                (None, Some(id)) => (id, true),
                (None, None) => continue,
            };
            if known.contains(id) || self.find(id).is_some() {
                continue;
            }
            if !bare {
                // A message file gets here only after its metadata is in place, and its
                // metadata goes first when it is removed: this is a removal cut short.
                let path = entry.path();
                fs::remove_file(&path).map_err(|e| SpoolError::io(&path, e))?;
                committer::sync_dir(&msg).map_err(|e| SpoolError::io(&msg, e))?;
                report.removals_finished += 1;
            } else if older_than(&entry, now, TMP_GRACE) {
                // A young bare raw message may be an older `ingest` committing right now,
                // between its two renames: only older ones are orphans for sure.
                self.quarantine(&entry.path())?;
                report.corrupt.push(format!("msg/{name}: no metadata"));
            }
        }
        Ok(report)
    }

    fn quarantine(&self, path: &Path) -> Result<(), SpoolError> {
        let name = path.file_name().unwrap_or_default();
        let dest = self.inner.dir.join("corrupt").join(name);
        fs::rename(path, &dest).map_err(|e| SpoolError::io(path, e))?;
        committer::sync_dir(&self.inner.dir.join("corrupt")).map_err(|e| SpoolError::io(&dest, e))
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

/// A message being received: raw bytes stream into `tmp/`, then [`Draft::commit`] makes it
/// durable and visible in `incoming/`. Dropping a draft without committing deletes it.
pub struct Draft {
    spool: Spool,
    id: String,
    path: PathBuf,
    file: Option<io::BufWriter<File>>,
    size: u64,
    fingerprint: Option<String>,
    /// With `[cluster]`: the raw bytes so far, in memory.
    buffer: Option<Vec<u8>>,
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

    /// The metadata and raw bytes of a draft held in memory.
    fn finish_buffer(&mut self, mut envelope: Envelope) -> Result<(Meta, Vec<u8>), SpoolError> {
        let raw = self.buffer.take().ok_or(SpoolError::Stopped)?;
        envelope.id = self.id.clone();
        let mut meta = Meta::new(envelope, self.size);
        meta.fingerprint = self.fingerprint.take();
        Ok((meta, raw))
    }

    fn finish(&mut self, mut envelope: Envelope) -> Result<(Op, Meta), SpoolError> {
        let mut file = self.file.take().ok_or(SpoolError::Stopped)?;
        envelope.id = self.id.clone();
        let mut meta = Meta::new(envelope, self.size);
        meta.fingerprint = self.fingerprint.take();
        // The metadata follows the raw bytes in the same file, written here by the producer:
        // the spool's writer thread only has to flush and rename it.
        file::write_tail(&mut file, &meta, self.size).map_err(|e| SpoolError::io(&self.path, e))?;
        let file = file.into_inner().map_err(|e| SpoolError::io(&self.path, e.into_error()))?;
        let op = Op::Commit { file: Some(file), draft: self.path.clone(), dest: self.spool.incoming_file(&self.id) };
        Ok((op, meta))
    }

    /// Makes the message durable in `incoming/` and returns its metadata (`meta.id` is the
    /// spool id). Only after `Ok` may the sender be told.
    pub async fn commit(mut self, envelope: Envelope) -> Result<Meta, SpoolError> {
        if let Some(pg) = self.spool.pg.clone() {
            let (meta, raw) = self.finish_buffer(envelope)?;
            pg.insert(meta.clone(), raw).await?;
            return Ok(meta);
        }
        let (op, meta) = self.finish(envelope)?;
        self.spool.inner.committer.submit(op).await?;
        self.path = PathBuf::new(); // committed: nothing to clean up
        Ok(meta)
    }

    /// [`commit`](Self::commit) for non-async callers.
    pub fn commit_blocking(mut self, envelope: Envelope) -> Result<Meta, SpoolError> {
        if let Some(pg) = self.spool.pg.clone() {
            let (meta, raw) = self.finish_buffer(envelope)?;
            pg.insert_blocking(meta.clone(), raw)?;
            return Ok(meta);
        }
        let (op, meta) = self.finish(envelope)?;
        self.spool.inner.committer.submit_blocking(op)?;
        self.path = PathBuf::new();
        Ok(meta)
    }
}

impl Write for Draft {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some(b) = &mut self.buffer {
            b.extend_from_slice(buf);
            self.size += buf.len() as u64;
            return Ok(buf.len());
        }
        let n = self.file.as_mut().ok_or_else(|| io::Error::other("draft already committed"))?.write(buf)?;
        self.size += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.as_mut().map_or(Ok(()), |f| f.flush())
    }
}

impl Drop for Draft {
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty() {
            self.file.take();
            let _ = fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests;
