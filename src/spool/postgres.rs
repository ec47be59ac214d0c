//! The spool in PostgreSQL, for several instances sharing one database (`[cluster]`).
//!
//! ```text
//! queue(id PK, state 'incoming'|'active'|'deferred'|'dead', meta TEXT, raw BYTEA,
//!       next_attempt_at, lease_owner, lease_until, updated_at)
//! ```
//!
//! The same states and the same [`Spool`](super::Spool) calls as the files, one row per
//! message: a state change is one `UPDATE` of the row's `state` (and metadata), a new message
//! one `INSERT` committed before [`Draft::commit`](super::Draft::commit) returns (so an SMTP
//! `250`, an IMAP flag or an `ingest` exit 0 follow the commit), a delivered message one
//! `DELETE`. The raw bytes are in the row: any instance can deliver or show any message.
//!
//! # Claims
//!
//! A row is worked on by one instance at a time: the one named in `lease_owner`, until
//! `lease_until`. The instance that accepts a message inserts it already claimed by itself and
//! delivers it at once (the in-memory inbox, as with files). Every round of the pipeline claims
//! due rows with [`PgQueue::claim`]: `UPDATE … WHERE id IN (SELECT … FOR UPDATE SKIP LOCKED
//! LIMIT n) RETURNING`, which takes rows nobody holds, rows whose lease has passed (their
//! instance died or lost the database), and rows this instance holds but is not working on. A
//! claimed row that was deferred becomes `active`. The cluster's heartbeat renews the leases of
//! the rows an instance holds (`cluster::node`). A row leaving `active`/`incoming` for
//! `deferred` or `dead` is released; a state change by a serving instance applies only to a row
//! it holds or that nobody holds (a late round of an instance whose claim was taken over
//! changes nothing: it finds the row gone).
//!
//! # Runtime
//!
//! Every query runs on the queue's own small tokio runtime, where the pool's connections live:
//! the async calls await a task spawned there, the blocking ones wait for it (inside
//! `block_in_place` on a multi-threaded runtime's worker). So the same queue serves
//! `mailhook serve` and the one-shot commands.
//!
//! # Database down
//!
//! Every call fails with [`SpoolError::Database`] while the database is unreachable (the pool
//! gives up after ten seconds): the SMTP listener answers `451 4.3.0`, `ingest` exits 75, the
//! IMAP watcher does not flag the message. Nothing is kept in memory for later: what was not
//! committed was not acknowledged. The pool reconnects by itself once the database is back.

use super::{Meta, SpoolError, State, parse_time};
use crate::cluster::{ClusterError, Target};
use crate::config::ClusterConfig;
use deadpool_postgres::Pool;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::Weak;
use std::time::SystemTime;
use tokio::sync::{OnceCell, mpsc, oneshot};

/// A write waiting for its batch, and where its outcome goes.
struct Job<T> {
    what: T,
    reply: oneshot::Sender<Result<(), SpoolError>>,
}

/// Writes handed over at most in one transaction.
const MAX_BATCH: usize = 256;

/// One writer (of new messages, or of removals): takes every write waiting, does them in one
/// statement and one transaction, answers each, and starts again with what came meanwhile. While
/// one batch commits the next gathers, so under load a commit (and its WAL flush) serves many
/// messages, and the writes never compete for the pool's connections. `many` answers, per
/// write, whether it was done (a removal of a message not there is `NotFound`); when the batch
/// as a whole fails, each write is tried alone (`one`), so that each gets its own error, unless
/// the database is away (then each gets that answer at once).
async fn write_batches<T, M, O>(shared: Weak<Shared>, mut rx: mpsc::UnboundedReceiver<Job<T>>, many: M, one: O)
where
    T: Send + 'static,
    M: for<'a> AsyncFn(&'a Shared, &'a [Job<T>]) -> Result<Vec<bool>, SpoolError>,
    O: for<'a> AsyncFn(&'a Shared, &'a T) -> Result<(), SpoolError>,
{
    let mut jobs = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut jobs, MAX_BATCH).await > 0 {
        let Some(shared) = shared.upgrade() else { return };
        match many(&shared, &jobs).await {
            Ok(done) => {
                for (job, done) in jobs.drain(..).zip(done) {
                    let _ = job.reply.send(if done { Ok(()) } else { Err(SpoolError::NotFound(String::new())) });
                }
            }
            Err(e) if jobs.len() == 1 => {
                if let Some(job) = jobs.pop() {
                    let _ = job.reply.send(Err(e));
                }
            }
            // The database away: trying each write alone would only wait for it once per write.
            Err(SpoolError::Database(e)) if e.is_unreachable() => {
                let reason = e.to_string();
                for job in jobs.drain(..) {
                    let away = ClusterError::Pool { host: shared.target.host.clone(), reason: reason.clone() };
                    let _ = job.reply.send(Err(SpoolError::Database(away)));
                }
            }
            Err(_) => {
                for job in jobs.drain(..) {
                    let result = one(&shared, &job.what).await;
                    let _ = job.reply.send(result);
                }
            }
        }
    }
}

/// Connections the queue keeps open at most: enough for concurrent commits to share one WAL
/// flush (PostgreSQL's own group commit).
const POOL_SIZE: usize = 16;

/// Worker threads of the queue's runtime.
const THREADS: usize = 2;

/// A message claimed by a round: its state, metadata and raw bytes.
pub struct Claimed {
    pub state: State,
    pub meta: Meta,
    pub raw: Vec<u8>,
}

/// The spool's PostgreSQL backend (see the module documentation).
pub struct PgQueue {
    /// `None` only while dropping.
    rt: Option<tokio::runtime::Runtime>,
    shared: Arc<Shared>,
}

/// A message's row in the cluster's permanent IMAP dedupe ledger (`imap_seen`), written in the
/// same transaction as the message ([`PgQueue::insert_seen`]).
#[derive(Debug, Clone)]
pub struct Seen {
    pub account: String,
    pub folder: String,
    pub uidvalidity: u32,
    pub uid: u32,
    /// The content fingerprint (sha256), as bytes.
    pub fingerprint: Vec<u8>,
}

struct Shared {
    /// New messages waiting for the insert writer ([`write_batches`]).
    inserts: mpsc::UnboundedSender<Job<(Meta, Vec<u8>)>>,
    /// Removals waiting for the removal writer.
    removes: mpsc::UnboundedSender<Job<(String, State)>>,
    pool: Pool,
    target: Target,
    ready: OnceCell<()>,
    /// The serving instance that claims rows; `None` for the commands.
    owner: Option<String>,
    /// Seconds a claim holds.
    lease: f64,
    /// The local directory `serve` keeps its own state in (not messages).
    dir: PathBuf,
}

fn state_name(s: State) -> &'static str {
    s.dir_name()
}

fn state_of(s: &str) -> State {
    match s {
        "incoming" => State::Incoming,
        "active" => State::Active,
        "deferred" => State::Deferred,
        _ => State::Dead,
    }
}

impl PgQueue {
    /// The queue of `[cluster]`. `owner` is the serving instance's id (`None` for the commands,
    /// which claim nothing); `dir` the local directory for what is not shared. Connects lazily.
    pub fn open(
        cluster: &ClusterConfig,
        base: &dyn Fn(&Path) -> PathBuf,
        owner: Option<String>,
        dir: &Path,
    ) -> Result<PgQueue, SpoolError> {
        let target = Target::of(cluster, base)?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(THREADS)
            .thread_name("spool-postgres")
            .enable_all()
            .build()
            .map_err(|e| SpoolError::Database(ClusterError::Runtime(e)))?;
        let pool = {
            let _guard = rt.enter();
            target.pool_of(POOL_SIZE)?
        };
        let (inserts, new) = mpsc::unbounded_channel();
        let (removes, gone) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            inserts,
            removes,
            pool,
            target,
            ready: OnceCell::new(),
            owner,
            lease: cluster.lease.as_secs_f64(),
            dir: dir.to_path_buf(),
        });
        // The writers hold the queue only weakly: they end with it.
        rt.spawn(write_batches(Arc::downgrade(&shared), new, Shared::insert_many, Shared::insert_one));
        rt.spawn(write_batches(Arc::downgrade(&shared), gone, Shared::remove_many, Shared::remove_one));
        Ok(PgQueue { rt: Some(rt), shared })
    }

    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// The serving instance that claims rows.
    pub fn owner(&self) -> Option<&str> {
        self.shared.owner.as_deref()
    }

    fn rt(&self) -> &tokio::runtime::Runtime {
        self.rt.as_ref().expect("runtime lives until drop")
    }

    /// Runs `fut` on the queue's runtime, from async code.
    async fn spawn<T: Send + 'static>(
        &self,
        fut: impl Future<Output = Result<T, SpoolError>> + Send + 'static,
    ) -> Result<T, SpoolError> {
        self.rt().spawn(fut).await.map_err(|_| SpoolError::Stopped)?
    }

    /// Runs `fut` on the queue's runtime and waits for it, from blocking code (or, politely,
    /// from an async task of a multi-threaded runtime).
    fn wait<T: Send + 'static>(
        &self,
        fut: impl Future<Output = Result<T, SpoolError>> + Send + 'static,
    ) -> Result<T, SpoolError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.rt().spawn(async move {
            let _ = tx.send(fut.await);
        });
        let recv = move || rx.recv().map_err(|_| SpoolError::Stopped)?;
        match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(recv)
            }
            _ => recv(),
        }
    }

    /// Inserts a new message, committed (and claimed by the serving instance) when it returns.
    pub async fn insert(&self, meta: Meta, raw: Vec<u8>) -> Result<(), SpoolError> {
        let s = self.shared.clone();
        self.spawn(async move { s.insert(&meta, &raw).await }).await
    }

    /// Inserts a message fetched from an IMAP folder together with its row of the permanent
    /// dedupe ledger, in one transaction: either both are committed or neither. `Ok(false)`,
    /// with nothing inserted, when the ledger already holds that (account, folder,
    /// UIDVALIDITY, UID): another instance spooled the message first.
    pub async fn insert_seen(&self, meta: Meta, raw: Vec<u8>, seen: Seen) -> Result<bool, SpoolError> {
        let s = self.shared.clone();
        self.spawn(async move { s.insert_seen(&meta, &raw, &seen).await }).await
    }

    /// [`insert`](Self::insert) for non-async callers.
    pub fn insert_blocking(&self, meta: Meta, raw: Vec<u8>) -> Result<(), SpoolError> {
        let s = self.shared.clone();
        self.wait(async move { s.insert(&meta, &raw).await })
    }

    pub fn list(&self, state: State) -> Result<Vec<String>, SpoolError> {
        let s = self.shared.clone();
        self.wait(async move {
            let c = s.client().await?;
            let rows = c
                .query("SELECT id FROM queue WHERE state = $1 ORDER BY id", &[&state_name(state)])
                .await
                .map_err(|e| s.q(e))?;
            Ok(rows.iter().map(|r| r.get(0)).collect())
        })
    }

    /// Which state `id` is in; `Ok(None)` when it is not in the queue.
    pub fn find(&self, id: &str) -> Result<Option<State>, SpoolError> {
        let (s, id) = (self.shared.clone(), id.to_string());
        self.wait(async move {
            let c = s.client().await?;
            let row = c.query_opt("SELECT state FROM queue WHERE id = $1", &[&id]).await.map_err(|e| s.q(e))?;
            Ok(row.map(|r| state_of(r.get(0))))
        })
    }

    pub fn read_meta_with_raw(
        &self,
        state: State,
        id: &str,
        raw_up_to: u64,
    ) -> Result<(Meta, Option<Vec<u8>>), SpoolError> {
        let (s, id) = (self.shared.clone(), id.to_string());
        let up_to = i64::try_from(raw_up_to).unwrap_or(i64::MAX);
        self.wait(async move {
            let c = s.client().await?;
            let row = c
                .query_opt(
                    "SELECT meta, CASE WHEN octet_length(raw) <= $3::bigint THEN raw END FROM queue WHERE id = $1 AND state = $2",
                    &[&id, &state_name(state), &up_to],
                )
                .await
                .map_err(|e| s.q(e))?
                .ok_or_else(|| SpoolError::NotFound(id.clone()))?;
            Ok((decode(&id, row.get(0))?, row.get(1)))
        })
    }

    pub fn read_raw(&self, id: &str) -> Result<Vec<u8>, SpoolError> {
        let (s, id) = (self.shared.clone(), id.to_string());
        self.wait(async move {
            let c = s.client().await?;
            let row = c.query_opt("SELECT raw FROM queue WHERE id = $1", &[&id]).await.map_err(|e| s.q(e))?;
            row.map(|r| r.get(0)).ok_or(SpoolError::NotFound(id))
        })
    }

    pub async fn transition(&self, id: &str, from: State, to: State, meta: Option<&Meta>) -> Result<(), SpoolError> {
        let (s, id, meta) = (self.shared.clone(), id.to_string(), meta.cloned());
        self.spawn(async move { s.transition(&id, from, to, meta.as_ref()).await }).await
    }

    pub fn transition_blocking(&self, id: &str, from: State, to: State, meta: Option<&Meta>) -> Result<(), SpoolError> {
        let (s, id, meta) = (self.shared.clone(), id.to_string(), meta.cloned());
        self.wait(async move { s.transition(&id, from, to, meta.as_ref()).await })
    }

    pub async fn remove(&self, id: &str, from: State) -> Result<(), SpoolError> {
        let (s, id) = (self.shared.clone(), id.to_string());
        self.spawn(async move { s.remove(&id, from).await }).await
    }

    pub fn remove_blocking(&self, id: &str, from: State) -> Result<(), SpoolError> {
        let (s, id) = (self.shared.clone(), id.to_string());
        self.wait(async move { s.remove(&id, from).await })
    }

    /// Claims up to `n` due messages for this instance (see the module documentation), leaving
    /// out `busy` (the ids this instance is working on already). Only a serving instance claims.
    pub async fn claim(&self, n: usize, busy: Vec<String>) -> Result<Vec<Claimed>, SpoolError> {
        let s = self.shared.clone();
        self.spawn(async move { s.claim(n, &busy).await }).await
    }

    /// Whether the database answers.
    pub fn probe(&self) -> Result<(), SpoolError> {
        let s = self.shared.clone();
        self.wait(async move { s.ping().await })
    }

    /// [`probe`](Self::probe) from async code.
    pub async fn probe_async(&self) -> Result<(), SpoolError> {
        let s = self.shared.clone();
        self.spawn(async move { s.ping().await }).await
    }

    pub fn gauges(&self) -> Result<crate::metrics::SpoolGauges, SpoolError> {
        let s = self.shared.clone();
        self.wait(async move {
            let c = s.client().await?;
            let rows =
                c.query("SELECT state, count(*), min(id) FROM queue GROUP BY state", &[]).await.map_err(|e| s.q(e))?;
            let mut g = crate::metrics::SpoolGauges::default();
            for r in rows {
                let n = r.get::<_, i64>(1).max(0) as u64;
                match state_of(r.get(0)) {
                    State::Incoming | State::Active => g.incoming += n,
                    State::Deferred => {
                        g.deferred = n;
                        g.oldest_deferred_age = r
                            .get::<_, Option<String>>(2)
                            .and_then(|id| ulid::Ulid::from_string(&id).ok())
                            .map(|u| SystemTime::now().duration_since(u.datetime()).unwrap_or_default());
                    }
                    State::Dead => g.dead = n,
                }
            }
            Ok(g)
        })
    }
}

impl Drop for PgQueue {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which a runtime's own thread may not do; this may be one.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

fn decode(id: &str, text: &str) -> Result<Meta, SpoolError> {
    serde_json::from_str(text).map_err(|e| SpoolError::Corrupt { id: id.to_string(), reason: e.into() })
}

fn encode(meta: &Meta) -> String {
    serde_json::to_string(meta).expect("metadata serialises")
}

/// When a message with `meta` is due.
fn due(meta: &Meta) -> SystemTime {
    meta.next_attempt.as_deref().and_then(parse_time).unwrap_or_else(SystemTime::now)
}

/// One new message, claimed by the serving instance (`$4`, for `$5` seconds) when there is one.
const INSERT_ONE: &str = "INSERT INTO queue (id, state, meta, raw, next_attempt_at, lease_owner, lease_until)
     VALUES ($1, 'incoming', $2, $3, now(), $4::text,
             CASE WHEN $4::text IS NULL THEN NULL ELSE now() + make_interval(secs => $5) END)";

impl Shared {
    async fn client(&self) -> Result<deadpool_postgres::Object, SpoolError> {
        self.ready.get_or_try_init(|| self.target.set_up()).await?;
        self.pool.get().await.map_err(|e| SpoolError::Database(self.target.pool_error(e)))
    }

    fn q(&self, e: tokio_postgres::Error) -> SpoolError {
        SpoolError::Database(self.target.query_error(e))
    }

    async fn ping(&self) -> Result<(), SpoolError> {
        self.client().await?.simple_query("SELECT 1").await.map_err(|e| self.q(e))?;
        Ok(())
    }

    async fn insert_seen(&self, meta: &Meta, raw: &[u8], seen: &Seen) -> Result<bool, SpoolError> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(|e| self.q(e))?;
        let recorded = tx
            .execute(
                "INSERT INTO imap_seen (account, folder, uidvalidity, uid, fingerprint, message_id)
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
                &[
                    &seen.account,
                    &seen.folder,
                    &i64::from(seen.uidvalidity),
                    &i64::from(seen.uid),
                    &seen.fingerprint,
                    &meta.id,
                ],
            )
            .await
            .map_err(|e| self.q(e))?;
        if recorded == 0 {
            // Dropping the transaction rolls it back: nothing was written.
            return Ok(false);
        }
        let stmt = tx.prepare_cached(INSERT_ONE).await.map_err(|e| self.q(e))?;
        tx.execute(&stmt, &[&meta.id, &encode(meta), &raw, &self.owner, &self.lease]).await.map_err(|e| self.q(e))?;
        tx.commit().await.map_err(|e| self.q(e))?;
        Ok(true)
    }

    /// Hands a new message to the insert writer; returns once its batch committed.
    async fn insert(&self, meta: &Meta, raw: &[u8]) -> Result<(), SpoolError> {
        let (reply, rx) = oneshot::channel();
        self.inserts.send(Job { what: (meta.clone(), raw.to_vec()), reply }).map_err(|_| SpoolError::Stopped)?;
        rx.await.map_err(|_| SpoolError::Stopped)?
    }

    /// Hands a removal to the removal writer; returns once its batch committed.
    async fn remove(&self, id: &str, from: State) -> Result<(), SpoolError> {
        let (reply, rx) = oneshot::channel();
        self.removes.send(Job { what: (id.to_string(), from), reply }).map_err(|_| SpoolError::Stopped)?;
        rx.await.map_err(|_| SpoolError::Stopped)?.map_err(|e| match e {
            SpoolError::NotFound(_) => SpoolError::NotFound(id.to_string()),
            other => other,
        })
    }

    /// New messages in one statement (one transaction).
    async fn insert_many(&self, jobs: &[Job<(Meta, Vec<u8>)>]) -> Result<Vec<bool>, SpoolError> {
        let c = self.client().await?;
        let stmt = c
            .prepare_cached(
                "INSERT INTO queue (id, state, meta, raw, next_attempt_at, lease_owner, lease_until)
                 SELECT id, 'incoming', meta, raw, now(), $4::text,
                        CASE WHEN $4::text IS NULL THEN NULL ELSE now() + make_interval(secs => $5) END
                 FROM unnest($1::text[], $2::text[], $3::bytea[]) AS m(id, meta, raw)",
            )
            .await
            .map_err(|e| self.q(e))?;
        let ids: Vec<&str> = jobs.iter().map(|j| j.what.0.id.as_str()).collect();
        let metas: Vec<String> = jobs.iter().map(|j| encode(&j.what.0)).collect();
        let raws: Vec<&[u8]> = jobs.iter().map(|j| j.what.1.as_slice()).collect();
        c.execute(&stmt, &[&ids, &metas, &raws, &self.owner, &self.lease]).await.map_err(|e| self.q(e))?;
        Ok(vec![true; jobs.len()])
    }

    async fn insert_one(&self, (meta, raw): &(Meta, Vec<u8>)) -> Result<(), SpoolError> {
        let c = self.client().await?;
        let stmt = c.prepare_cached(INSERT_ONE).await.map_err(|e| self.q(e))?;
        c.execute(&stmt, &[&meta.id, &encode(meta), &raw, &self.owner, &self.lease]).await.map_err(|e| self.q(e))?;
        Ok(())
    }

    /// The condition a serving instance's change of a row adds (`$2` is its id): it holds the
    /// row, or nobody does, or its holder's lease has passed. The commands (no owner) act on any
    /// row, as on files.
    fn mine(&self) -> &'static str {
        if self.owner.is_some() { " AND (lease_owner IS NULL OR lease_owner = $2 OR lease_until < now())" } else { "" }
    }

    async fn transition(&self, id: &str, from: State, to: State, meta: Option<&Meta>) -> Result<(), SpoolError> {
        let c = self.client().await?;
        // To active: claimed by this instance. Staying put: the claim is kept. Elsewhere: the
        // row is released, for whoever's round finds it due.
        let lease = if to == State::Active {
            ", lease_owner = $2, lease_until = now() + make_interval(secs => $7)"
        } else if to == from {
            ""
        } else {
            ", lease_owner = NULL, lease_until = NULL"
        };
        let sql = format!(
            "UPDATE queue SET state = $4, meta = coalesce($5, meta), next_attempt_at = coalesce($6, next_attempt_at),
               updated_at = now(){lease}
             WHERE id = $1 AND state = $3{}",
            self.mine()
        );
        use tokio_postgres::types::Type;
        let types = [Type::TEXT, Type::TEXT, Type::TEXT, Type::TEXT, Type::TEXT, Type::TIMESTAMPTZ, Type::FLOAT8];
        let stmt = c.prepare_typed_cached(&sql, &types).await.map_err(|e| self.q(e))?;
        let text = meta.map(encode);
        let at = meta.map(due);
        let n = c
            .execute(&stmt, &[&id, &self.owner, &state_name(from), &state_name(to), &text, &at, &self.lease])
            .await
            .map_err(|e| self.q(e))?;
        if n == 0 {
            return Err(SpoolError::NotFound(id.to_string()));
        }
        Ok(())
    }

    /// Removals in one statement (one transaction): which were done.
    async fn remove_many(&self, jobs: &[Job<(String, State)>]) -> Result<Vec<bool>, SpoolError> {
        let c = self.client().await?;
        let sql = format!(
            "DELETE FROM queue USING unnest($1::text[], $3::text[]) AS r(id, state)
             WHERE queue.id = r.id AND queue.state = r.state{}
             RETURNING queue.id",
            self.mine()
        );
        use tokio_postgres::types::Type;
        let stmt = c
            .prepare_typed_cached(&sql, &[Type::TEXT_ARRAY, Type::TEXT, Type::TEXT_ARRAY])
            .await
            .map_err(|e| self.q(e))?;
        let ids: Vec<&str> = jobs.iter().map(|j| j.what.0.as_str()).collect();
        let states: Vec<&str> = jobs.iter().map(|j| state_name(j.what.1)).collect();
        let rows = c.query(&stmt, &[&ids, &self.owner, &states]).await.map_err(|e| self.q(e))?;
        // A row removed once answers one removal of it: a second one of the same batch found
        // nothing.
        let mut removed: std::collections::HashSet<String> = rows.iter().map(|r| r.get(0)).collect();
        Ok(jobs.iter().map(|j| removed.remove(&j.what.0)).collect())
    }

    async fn remove_one(&self, (id, from): &(String, State)) -> Result<(), SpoolError> {
        let (id, from) = (id.as_str(), *from);
        let c = self.client().await?;
        let sql = format!("DELETE FROM queue WHERE id = $1 AND state = $3{}", self.mine());
        use tokio_postgres::types::Type;
        let stmt = c.prepare_typed_cached(&sql, &[Type::TEXT, Type::TEXT, Type::TEXT]).await.map_err(|e| self.q(e))?;
        let n = c.execute(&stmt, &[&id, &self.owner, &state_name(from)]).await.map_err(|e| self.q(e))?;
        if n == 0 {
            return Err(SpoolError::NotFound(id.to_string()));
        }
        Ok(())
    }

    async fn claim(&self, n: usize, busy: &[String]) -> Result<Vec<Claimed>, SpoolError> {
        let Some(owner) = &self.owner else { return Ok(Vec::new()) };
        if n == 0 {
            return Ok(Vec::new());
        }
        let c = self.client().await?;
        let stmt = c
            .prepare_cached(
                "UPDATE queue SET lease_owner = $1, lease_until = now() + make_interval(secs => $2),
                   state = CASE WHEN state = 'deferred' THEN 'active' ELSE state END, updated_at = now()
                 WHERE id IN (
                   SELECT id FROM queue
                   WHERE state <> 'dead' AND next_attempt_at <= now()
                     AND (lease_until IS NULL OR lease_until < now() OR lease_owner = $1)
                     AND NOT (id = ANY($3))
                   ORDER BY next_attempt_at LIMIT $4 FOR UPDATE SKIP LOCKED)
                 RETURNING id, state, meta, raw",
            )
            .await
            .map_err(|e| self.q(e))?;
        let rows = c.query(&stmt, &[owner, &self.lease, &busy, &(n as i64)]).await.map_err(|e| self.q(e))?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let id: String = r.get(0);
            match decode(&id, r.get(2)) {
                Ok(meta) => out.push(Claimed { state: state_of(r.get(1)), meta, raw: r.get(3) }),
                Err(e) => {
                    // Kept where it is, for an operator: moved to dead with the reason.
                    tracing::error!(id = %id, error = %e, "unreadable metadata in the queue; it stays there");
                }
            }
        }
        Ok(out)
    }
}
