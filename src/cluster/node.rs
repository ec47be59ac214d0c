//! This instance among the others sharing the database: its heartbeat, its IMAP folder leases,
//! the dedupe ledger and the IMAP checkpoints.
//!
//! ```text
//! instance(id PK, host, started_at, heartbeat_at)          one row per instance, renewed every lease/3
//! queue(id PK, ..., lease_owner, lease_until)               the shared spool (spool::postgres); the
//!                                                           heartbeat renews this instance's claims
//! folder_lease(account, folder PK, owner, until, heartbeat_at)
//! imap_seen(account, folder, uidvalidity, uid PK, fingerprint, message_id)   permanent ledger
//! imap_checkpoint(account, folder PK, uidvalidity, last_uid)
//! pacing(destination PK, tokens, refilled_at, paused_until)   shared token buckets, see deliver::throttle
//! ```
//!
//! A folder lease is taken (or renewed) by one statement: insert the row, or update it when
//! this instance already holds it or its `until` has passed. Whoever the statement returns the
//! row to holds the folder until `until`; the holder renews it every `lease / 3`, so a holder
//! that dies is replaced within `lease` plus one retry (`lease / 3`).
//!
//! The instance id is a ULID chosen at start (a restarted process is a new instance and waits
//! for its former self's leases to lapse); `host` says where it runs (`hostname:pid`).
//! Peers are the other instances whose heartbeat is at most three leases old.

use super::{ClusterError, Target};
use crate::config::ClusterConfig;
use deadpool_postgres::Pool;
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::OnceCell;
use tracing::info;

/// One IMAP folder of one account.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FolderKey {
    pub account: String,
    pub folder: String,
}

impl FolderKey {
    pub fn new(account: &str, folder: &str) -> FolderKey {
        FolderKey { account: account.to_string(), folder: folder.to_string() }
    }
}

impl std::fmt::Display for FolderKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.account, self.folder)
    }
}

/// Another instance sharing the database.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Peer {
    pub id: String,
    pub host: String,
    /// Seconds since its last heartbeat.
    pub heartbeat_age_s: f64,
}

/// This instance's handle on the database (see the module documentation). Cheap to share
/// (`Arc`); every call is async and runs on the caller's runtime.
pub struct Node {
    id: String,
    host: String,
    lease: Duration,
    target: Target,
    pool: Pool,
    ready: OnceCell<()>,
    held: Mutex<BTreeSet<FolderKey>>,
    peers: Mutex<Vec<Peer>>,
    /// Messages of the shared queue this instance held at the last heartbeat.
    claims: std::sync::atomic::AtomicU64,
}

impl Node {
    /// The node of `[cluster]`; `base` resolves relative paths (the CA file). Connects lazily:
    /// the database may be away at start. Must be called within a tokio runtime.
    pub fn open(
        cluster: &ClusterConfig,
        base: &dyn Fn(&std::path::Path) -> std::path::PathBuf,
    ) -> Result<Arc<Node>, ClusterError> {
        let target = Target::of(cluster, base)?;
        let pool = target.pool()?;
        let host = format!("{}:{}", hostname(), std::process::id());
        Ok(Arc::new(Node {
            id: ulid::Ulid::generate().to_string(),
            host,
            lease: cluster.lease,
            target,
            pool,
            ready: OnceCell::new(),
            held: Mutex::new(BTreeSet::new()),
            peers: Mutex::new(Vec::new()),
            claims: std::sync::atomic::AtomicU64::new(0),
        }))
    }

    /// This instance's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Where this instance runs (`hostname:pid`).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// `[cluster] lease`.
    pub fn lease(&self) -> Duration {
        self.lease
    }

    /// How often leases and the heartbeat are renewed (and a lease held elsewhere is tried).
    pub fn renew_every(&self) -> Duration {
        self.lease / 3
    }

    /// The folders this instance holds now.
    pub fn held(&self) -> Vec<FolderKey> {
        self.held.lock().unwrap_or_else(|e| e.into_inner()).iter().cloned().collect()
    }

    /// How many messages of the shared queue this instance held (claimed, lease renewed) at
    /// the last heartbeat.
    pub fn claims(&self) -> u64 {
        self.claims.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The peers seen at the last heartbeat.
    pub fn peers(&self) -> Vec<Peer> {
        self.peers.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, ClusterError> {
        self.ready.get_or_try_init(|| self.target.set_up()).await?;
        self.pool.get().await.map_err(|e| self.target.pool_error(e))
    }

    /// Records this instance as alive, renews the leases of the queue's messages it holds,
    /// and refreshes the list of peers.
    pub async fn heartbeat(&self) -> Result<(), ClusterError> {
        let client = self.client().await?;
        let q = |e| self.target.query_error(e);
        let lease = self.lease.as_secs_f64();
        let claims = client
            .execute(
                "UPDATE queue SET lease_until = now() + make_interval(secs => $2)
                 WHERE lease_owner = $1 AND state <> 'dead'",
                &[&self.id, &lease],
            )
            .await
            .map_err(q)?;
        self.claims.store(claims, std::sync::atomic::Ordering::Relaxed);
        client
            .execute(
                "INSERT INTO instance (id, host) VALUES ($1, $2)
                 ON CONFLICT (id) DO UPDATE SET heartbeat_at = now()",
                &[&self.id, &self.host],
            )
            .await
            .map_err(q)?;
        let window = (self.lease * 3).as_secs_f64();
        let rows = client
            .query(
                "SELECT id, host, extract(epoch FROM now() - heartbeat_at)::float8 FROM instance
                 WHERE id <> $1 AND heartbeat_at > now() - make_interval(secs => $2) ORDER BY id",
                &[&self.id, &window],
            )
            .await
            .map_err(q)?;
        let peers = rows
            .iter()
            .map(|r| Peer { id: r.get(0), host: r.get(1), heartbeat_age_s: r.get::<_, f64>(2).max(0.0) })
            .collect();
        *self.peers.lock().unwrap_or_else(|e| e.into_inner()) = peers;
        Ok(())
    }

    /// Leaves the cluster at shutdown: gives up every folder and every claim on the queue's
    /// messages (peers take them at once) and removes the instance row.
    pub async fn leave(&self) -> Result<(), ClusterError> {
        let client = self.client().await?;
        let q = |e| self.target.query_error(e);
        client
            .execute(
                "UPDATE queue SET lease_owner = NULL, lease_until = NULL,
                   state = CASE WHEN state = 'active' THEN 'deferred' ELSE state END
                 WHERE lease_owner = $1",
                &[&self.id],
            )
            .await
            .map_err(q)?;
        self.claims.store(0, std::sync::atomic::Ordering::Relaxed);
        client.execute("DELETE FROM folder_lease WHERE owner = $1", &[&self.id]).await.map_err(q)?;
        client.execute("DELETE FROM instance WHERE id = $1", &[&self.id]).await.map_err(q)?;
        self.held.lock().unwrap_or_else(|e| e.into_inner()).clear();
        Ok(())
    }

    /// Takes `folder`'s lease, or renews it when this instance holds it: `true` when this
    /// instance holds it until now + lease. `false` when another instance holds a lease that
    /// has not passed (this instance then no longer counts it as held).
    pub async fn take_folder(&self, folder: &FolderKey) -> Result<bool, ClusterError> {
        let result = self.try_take(folder).await;
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        match result {
            Ok(true) => held.insert(folder.clone()),
            _ => held.remove(folder),
        };
        result
    }

    async fn try_take(&self, folder: &FolderKey) -> Result<bool, ClusterError> {
        let client = self.client().await?;
        let lease = self.lease.as_secs_f64();
        let row = client
            .query_opt(
                "INSERT INTO folder_lease (account, folder, owner, until, heartbeat_at)
                 VALUES ($1, $2, $3, now() + make_interval(secs => $4), now())
                 ON CONFLICT (account, folder) DO UPDATE
                 SET owner = EXCLUDED.owner, until = EXCLUDED.until, heartbeat_at = now()
                 WHERE folder_lease.owner = EXCLUDED.owner OR folder_lease.until < now()
                 RETURNING owner",
                &[&folder.account, &folder.folder, &self.id, &lease],
            )
            .await
            .map_err(|e| self.target.query_error(e))?;
        Ok(row.is_some())
    }

    /// Gives `folder` up (when this instance holds it), so that a peer takes it at once.
    pub async fn release_folder(&self, folder: &FolderKey) -> Result<(), ClusterError> {
        self.held.lock().unwrap_or_else(|e| e.into_inner()).remove(folder);
        let client = self.client().await?;
        client
            .execute(
                "DELETE FROM folder_lease WHERE account = $1 AND folder = $2 AND owner = $3",
                &[&folder.account, &folder.folder, &self.id],
            )
            .await
            .map_err(|e| self.target.query_error(e))?;
        info!(instance = %self.id, folder = %folder, "IMAP folder lease released");
        Ok(())
    }

    /// Which of `uids` (of `folder` under `uidvalidity`) the ledger already has.
    pub async fn seen_uids(
        &self,
        folder: &FolderKey,
        uidvalidity: u32,
        uids: &[u32],
    ) -> Result<Vec<u32>, ClusterError> {
        let client = self.client().await?;
        let uids: Vec<i64> = uids.iter().map(|&u| i64::from(u)).collect();
        let rows = client
            .query(
                "SELECT uid FROM imap_seen WHERE account = $1 AND folder = $2 AND uidvalidity = $3 AND uid = ANY($4)",
                &[&folder.account, &folder.folder, &i64::from(uidvalidity), &uids],
            )
            .await
            .map_err(|e| self.target.query_error(e))?;
        Ok(rows.iter().filter_map(|r| u32::try_from(r.get::<_, i64>(0)).ok()).collect())
    }

    /// Whether the ledger has a message with this content fingerprint in `folder`, under any
    /// UIDVALIDITY (the same message after the server renumbered the folder).
    pub async fn seen_fingerprint(&self, folder: &FolderKey, fingerprint: &[u8]) -> Result<bool, ClusterError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT 1 FROM imap_seen WHERE account = $1 AND folder = $2 AND fingerprint = $3 LIMIT 1",
                &[&folder.account, &folder.folder, &fingerprint],
            )
            .await
            .map_err(|e| self.target.query_error(e))?;
        Ok(row.is_some())
    }

    /// The folder's checkpoint: `(uidvalidity, last_uid)`, `None` before its first sync.
    pub async fn checkpoint(&self, folder: &FolderKey) -> Result<Option<(u32, u32)>, ClusterError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT uidvalidity, last_uid FROM imap_checkpoint WHERE account = $1 AND folder = $2",
                &[&folder.account, &folder.folder],
            )
            .await
            .map_err(|e| self.target.query_error(e))?;
        Ok(row.map(|r| {
            let (v, u): (i64, i64) = (r.get(0), r.get(1));
            (u32::try_from(v).unwrap_or(0), u32::try_from(u).unwrap_or(0))
        }))
    }

    /// Stores the folder's checkpoint. Under the same UIDVALIDITY it only moves forward (an
    /// instance that lost the folder a moment ago cannot take it back).
    pub async fn store_checkpoint(
        &self,
        folder: &FolderKey,
        uidvalidity: u32,
        last_uid: u32,
    ) -> Result<(), ClusterError> {
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO imap_checkpoint (account, folder, uidvalidity, last_uid) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (account, folder) DO UPDATE SET
                   last_uid = CASE WHEN imap_checkpoint.uidvalidity = EXCLUDED.uidvalidity
                                   THEN GREATEST(imap_checkpoint.last_uid, EXCLUDED.last_uid)
                                   ELSE EXCLUDED.last_uid END,
                   uidvalidity = EXCLUDED.uidvalidity, updated_at = now()",
                &[&folder.account, &folder.folder, &i64::from(uidvalidity), &i64::from(last_uid)],
            )
            .await
            .map_err(|e| self.target.query_error(e))?;
        Ok(())
    }
}

impl Node {
    /// Takes one token from `destination`'s shared bucket (`per_second` `None`: unlimited, only
    /// a pause counts): `None` when taken, otherwise how long to wait before asking again.
    /// One round trip (the `pacing_take` function of the schema).
    pub async fn take_token(
        &self,
        destination: &str,
        capacity: f64,
        per_second: Option<f64>,
    ) -> Result<Option<Duration>, ClusterError> {
        let client = self.client().await?;
        let row = client
            .query_one("SELECT pacing_take($1, $2, $3)", &[&destination, &capacity, &per_second])
            .await
            .map_err(|e| self.target.query_error(e))?;
        let wait: f64 = row.get(0);
        Ok((wait > 0.0).then(|| Duration::from_secs_f64(wait.min(86_400.0))))
    }

    /// Pauses `destination` for every instance for `d` (a receiver answered 429); a longer
    /// pause already set stays. The bucket is emptied, so that sending resumes at the rate.
    pub async fn pause_destination(&self, destination: &str, d: Duration) -> Result<(), ClusterError> {
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO pacing (destination, tokens, refilled_at, paused_until)
                 VALUES ($1, 0, clock_timestamp(), clock_timestamp() + make_interval(secs => $2))
                 ON CONFLICT (destination) DO UPDATE SET tokens = 0, refilled_at = clock_timestamp(),
                   paused_until = greatest(pacing.paused_until, EXCLUDED.paused_until)",
                &[&destination, &d.as_secs_f64()],
            )
            .await
            .map_err(|e| self.target.query_error(e))?;
        Ok(())
    }
}

/// This machine's name, for the `instance` row.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown".to_string())
}
