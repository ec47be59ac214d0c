//! imap: watches IMAP folders and hands every new message to the spool.
//!
//! One watcher per `[[imap]]` folder, each with its own connection (IMAP selects one folder
//! per connection, and IDLE watches only the selected one):
//!
//! ```text
//! connect ─► SELECT ─► sync: UID SEARCH past the checkpoint ─► UID FETCH BODY.PEEK[] in batches
//!    ▲                        ─► spool commit (fsync) ─► checkpoint ─► after-action (seen/delete/move)
//!    │                  ◄── IDLE until the server announces mail, or `poll` passes (then sync again)
//!    └── backoff with jitter on any error, server BYE or silence
//! ```
//!
//! Nothing is acknowledged to the server (flagged, moved or deleted) before it is durable in the
//! spool, and the checkpoint (`UIDVALIDITY` + last UID handled, see [`checkpoint`]) is written
//! before the after-action, so a failed after-action or a crash at any point never sends a
//! message twice from one folder. A message committed to the spool just before a crash, too
//! late for the checkpoint (or just after a batch failed on a later message), is fetched again
//! by the next connection, whose first sync recognises it by its content
//! fingerprint (added to the folder's list the moment its commit returns, before the pipeline
//! can deliver it); only a crash between those two steps can send it twice (at-least-once,
//! like every other way in). With `delete` or `move:`, a message left in the folder at or below
//! the checkpoint (its after-action cut short by a crash, or failed) gets its after-action at the
//! next connection.
//!
//! The first sync of a folder (no checkpoint yet) takes every message when the after-action
//! removes messages (`delete`, `move:`), and the unread ones for `seen`. When the server
//! changes `UIDVALIDITY`, the folder is read again from the start and messages already spooled
//! from it (by content fingerprint) are not sent again.
//!
//! Health (connected, last sync, last error, reconnects) goes to [`FolderHealth`] for
//! `/healthz` and `/metrics`.

pub mod checkpoint;
pub mod connect;

use crate::backoff::backoff;
use crate::cluster::{ClusterError, FolderKey, Node};
use crate::config::{After, BackoffConfig, Config, ImapConfig, ImapTls};
use crate::metrics::{FolderHealth, Metrics};
use crate::model::{Envelope, Source};
use crate::spool::Spool;
use crate::spool::postgres::Seen;
use crate::spool::{Fresh, Inbox};
use async_imap::types::Fetch;
use checkpoint::{Checkpoint, Position, fingerprint};
use connect::{CaFileError, ConnectError, Connector, ImapSession, within};
use futures_util::StreamExt;
use std::collections::{HashSet, VecDeque};
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, error, info, warn};

/// How long one IMAP command (or connect, or one FETCH response) may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// Messages fetched per `UID FETCH`: a backlog is worked through in batches this size, each
/// checkpointed before the next.
const BATCH: usize = 100;

/// Bytes of fetched messages waiting for their spool commit at once (bounds memory when a
/// batch holds large messages).
const MAX_PENDING_BYTES: usize = 32 * 1024 * 1024;

/// Messages up to this size are handed to the pipeline in memory (as the SMTP listener does).
const KEEP_COPY: usize = 64 * 1024;

/// IDLE is re-issued at least this often (RFC 2177 asks for less than 29 minutes).
const MAX_IDLE: Duration = Duration::from_secs(25 * 60);

/// An IDLE connection on which the server has said nothing (not even a keep-alive; Dovecot
/// sends one every 2 minutes) for this long is checked with a command: a connection that died
/// without a reset is found within this time plus [`COMMAND_TIMEOUT`], even with a long `poll`.
const IDLE_QUIET: Duration = Duration::from_secs(5 * 60);

/// Reconnect delays: exponential from 1 s to 2 min, with jitter.
const RECONNECT: BackoffConfig = BackoffConfig { initial: Duration::from_secs(1), max: Duration::from_secs(120) };

/// Why the watchers could not be built: `serve` refuses to start.
#[derive(Debug, thiserror::Error)]
pub enum WatchersError {
    #[error("imap account {account:?}: {source}")]
    CaFile {
        account: String,
        #[source]
        source: CaFileError,
    },
    #[error("imap account {account:?} folder {folder:?}: fingerprints: {source}")]
    Fingerprints {
        account: String,
        folder: String,
        #[source]
        source: std::io::Error,
    },
}

/// Why a session ended. The watcher reconnects after every one of them; [`is_temporary`]
/// says whether that alone can help.
///
/// [`is_temporary`]: WatchError::is_temporary
#[derive(Debug, thiserror::Error)]
enum WatchError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("{command}: {source}")]
    Imap {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("during IDLE: {0}")]
    Idle(#[source] async_imap::error::Error),
    #[error("{0}")]
    Protocol(String),
    #[error("spool: UID {uid}: {source}")]
    Spool {
        uid: u32,
        #[source]
        source: StoreError,
    },
    #[error("checkpoint: {0}")]
    Checkpoint(#[source] std::io::Error),
    #[error("cluster: {0}")]
    Cluster(#[from] ClusterError),
    #[error("the folder's lease is lost: {0}")]
    LeaseLost(String),
}

impl WatchError {
    /// Refused or unavailable credentials need an operator; anything else may pass.
    fn is_temporary(&self) -> bool {
        match self {
            WatchError::Connect(e) => e.is_temporary(),
            _ => true,
        }
    }
}

/// Why one fetched message did not reach the spool (the server keeps it; it is fetched again).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Spool(#[from] crate::spool::SpoolError),
    #[error("{0}")]
    Write(#[source] std::io::Error),
    #[error("spool task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

fn imap_err(what: &str) -> impl Fn(std::io::Error) -> WatchError + '_ {
    move |source| WatchError::Imap { command: what.to_string(), source }
}

/// One watched folder.
pub struct Watcher {
    account: String,
    folder: String,
    user: String,
    tls: bool,
    after: After,
    idle: bool,
    poll: Duration,
    connector: Connector,
    spool: Spool,
    inbox: Arc<Inbox>,
    checkpoint: Checkpoint,
    health: Arc<FolderHealth>,
    /// With `[cluster]`: the folder is leased, deduplicated and checkpointed in the database.
    cluster: Option<Arc<Node>>,
    key: FolderKey,
}

/// Builds a watcher for every folder of every `[[imap]]` account. Fails (naming the account) on
/// an unreadable `ca_file`.
///
/// `spooled` are the fingerprints of the messages recovery found in the spool, by source: each
/// folder remembers its own before its first sync (one spooled just before a crash, before its
/// watcher noted it, is then recognised instead of spooled again).
pub fn watchers(
    config: &Config,
    spool: &Spool,
    inbox: &Arc<Inbox>,
    metrics: &Metrics,
    spooled: &[(Source, String)],
    cluster: Option<&Arc<Node>>,
) -> Result<Vec<Watcher>, WatchersError> {
    let mut out = Vec::new();
    for account in &config.imap {
        let ca = account.ca_file.as_ref().map(|p| config.resolve(p));
        let mut resolved: ImapConfig = account.clone();
        resolved.token_file = account.token_file.as_ref().map(|p| config.resolve(p));
        let connector = Connector::new(&resolved, ca.as_deref(), COMMAND_TIMEOUT)
            .map_err(|source| WatchersError::CaFile { account: account.name.clone(), source })?;
        for folder in &account.folders {
            let checkpoint = Checkpoint::new(spool.dir(), &account.name, folder, config.spool.fsync);
            let ours: Vec<&String> = spooled
                .iter()
                .filter(|(source, _)| {
                    matches!(source, Source::Imap { account: a, folder: f } if *a == account.name && f == folder)
                })
                .map(|(_, fp)| fp)
                .collect();
            if !ours.is_empty() {
                let cannot = |source| WatchersError::Fingerprints {
                    account: account.name.clone(),
                    folder: folder.clone(),
                    source,
                };
                let seen = checkpoint.seen().map_err(cannot)?;
                let new: Vec<String> = ours.into_iter().filter(|fp| !seen.contains(*fp)).cloned().collect();
                checkpoint.remember(&new).map_err(cannot)?;
            }
            out.push(Watcher {
                account: account.name.clone(),
                folder: folder.clone(),
                user: account.user.clone(),
                tls: account.tls != ImapTls::None,
                after: account.after.clone(),
                idle: account.idle,
                poll: account.poll,
                connector: connector.clone(),
                spool: spool.clone(),
                inbox: inbox.clone(),
                checkpoint,
                health: metrics.folder(&account.name, folder, account.poll.min(MAX_IDLE)),
                cluster: cluster.cloned(),
                key: FolderKey::new(&account.name, folder),
            });
        }
    }
    Ok(out)
}

/// What the server supports, read once per connection.
struct Caps {
    idle: bool,
    mv: bool,
    uidplus: bool,
}

/// How a wait between syncs ended.
#[derive(PartialEq)]
enum Woken {
    Sync,
    Shutdown,
}

impl Watcher {
    /// Watches the folder until `shutdown` turns true, reconnecting after any failure.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut failures = 0u32;
        info!(account = %self.account, folder = %self.folder, server = %self.connector.server(), "watching IMAP folder");
        loop {
            if *shutdown.borrow() {
                break;
            }
            let result = match &self.cluster {
                None => self.session(&mut failures, &mut shutdown).await,
                Some(node) => {
                    if !self.take_lease(node, &mut shutdown).await {
                        break;
                    }
                    tokio::select! {
                        r = self.session(&mut failures, &mut shutdown) => r,
                        lost = keep_lease(node, &self.key) => Err(lost),
                    }
                }
            };
            let error = match result {
                Ok(()) => break,
                Err(WatchError::LeaseLost(why)) => {
                    // Stop fetching at once (the session is dropped); the lease is tried again.
                    warn!(account = %self.account, folder = %self.folder, reason = %why, "IMAP folder lease lost; not fetching from it");
                    self.health.set_connected(false);
                    continue;
                }
                Err(e) => e,
            };
            if let Some(node) = &self.cluster {
                // A peer may reach the server where this instance cannot: let it take over.
                if let Err(e) = node.release_folder(&self.key).await {
                    debug!(account = %self.account, folder = %self.folder, error = %e, "cannot release the folder lease; it lapses");
                }
            }
            self.health.failed(&error.to_string());
            failures = failures.saturating_add(1);
            let delay = backoff(&RECONNECT, failures);
            let retry_in = humantime::format_duration(Duration::from_secs(delay.as_secs().max(1)));
            if error.is_temporary() {
                warn!(
                    account = %self.account, folder = %self.folder, error = %error, retry_in = %retry_in,
                    "IMAP connection lost; reconnecting"
                );
            } else {
                error!(
                    account = %self.account, folder = %self.folder, error = %error, retry_in = %retry_in,
                    "IMAP login failed; check the account's user and password or token"
                );
            }
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.changed() => break,
            }
            self.health.reconnecting();
        }
        self.health.set_connected(false);
        if let Some(node) = &self.cluster
            && node.held().contains(&self.key)
            && let Err(e) = node.release_folder(&self.key).await
        {
            debug!(account = %self.account, folder = %self.folder, error = %e, "cannot release the folder lease; it lapses");
        }
        debug!(account = %self.account, folder = %self.folder, "IMAP watcher stopped");
    }

    /// Waits until this instance holds the folder's lease, trying every `lease / 3`: `false`
    /// at shutdown. While a peer holds it, the folder counts as watched (by the peer).
    async fn take_lease(&self, node: &Node, shutdown: &mut watch::Receiver<bool>) -> bool {
        let (mut waiting, mut failing) = (false, false);
        loop {
            match node.take_folder(&self.key).await {
                Ok(true) => {
                    info!(account = %self.account, folder = %self.folder, instance = %node.id(), "IMAP folder lease taken");
                    return true;
                }
                Ok(false) => {
                    if !waiting {
                        info!(account = %self.account, folder = %self.folder, "IMAP folder leased to another instance; standing by");
                    }
                    waiting = true;
                    self.health.synced();
                }
                Err(e) => {
                    if !failing {
                        warn!(account = %self.account, folder = %self.folder, error = %e, "cannot take the IMAP folder lease; trying again every lease/3");
                    }
                    failing = true;
                    self.health.failed(&e.to_string());
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(node.renew_every()) => {}
                _ = shutdown.changed() => return false,
            }
        }
    }

    /// The stored position: in the database with `[cluster]`, else the checkpoint file.
    async fn load_position(&self) -> Result<Option<Position>, WatchError> {
        match &self.cluster {
            Some(node) => {
                Ok(node.checkpoint(&self.key).await?.map(|(uidvalidity, last_uid)| Position { uidvalidity, last_uid }))
            }
            None => self.checkpoint.load().map_err(WatchError::Checkpoint),
        }
    }

    async fn store_position(&self, position: Position) -> Result<(), WatchError> {
        match &self.cluster {
            Some(node) => Ok(node.store_checkpoint(&self.key, position.uidvalidity, position.last_uid).await?),
            None => self.checkpoint.store(position).map_err(WatchError::Checkpoint),
        }
    }

    /// One connection: sync, wait for news, sync again, until shutdown (`Ok`) or an error.
    async fn session(&self, failures: &mut u32, shutdown: &mut watch::Receiver<bool>) -> Result<(), WatchError> {
        let mut session = self.connector.connect().await?;
        let caps = within(COMMAND_TIMEOUT, session.capabilities()).await.map_err(imap_err("CAPABILITY"))?;
        let caps = Caps { idle: caps.has_str("IDLE"), mv: caps.has_str("MOVE"), uidplus: caps.has_str("UIDPLUS") };
        if let After::Move(target) = &self.after {
            // Creating a folder that exists fails harmlessly; any other problem shows at MOVE.
            let _ = within(COMMAND_TIMEOUT, session.create(target)).await;
        }
        // A SELECT cut short by a server going down can come back without UIDVALIDITY: that
        // is an error like any other, and the next connection selects again.
        let mailbox = within(COMMAND_TIMEOUT, session.select(&self.folder))
            .await
            .map_err(imap_err(&format!("SELECT {:?}", self.folder)))?;
        let uidvalidity = mailbox
            .uid_validity
            .ok_or_else(|| WatchError::Protocol(format!("the server gave no UIDVALIDITY for {:?}", self.folder)))?;
        self.health.set_connected(true);

        let stored = self.load_position().await?;
        let (mut position, mut scan) = match stored {
            Some(p) if p.uidvalidity == uidvalidity => (p, Scan::Resume),
            Some(p) => {
                warn!(
                    account = %self.account, folder = %self.folder, old = p.uidvalidity, new = uidvalidity,
                    "UIDVALIDITY changed; reading the folder again, skipping messages already spooled"
                );
                (Position { uidvalidity, last_uid: 0 }, Scan::Again)
            }
            None => (Position { uidvalidity, last_uid: 0 }, Scan::First { uid_next: mailbox.uid_next }),
        };
        info!(
            account = %self.account, folder = %self.folder, messages = mailbox.exists, last_uid = position.last_uid,
            idle = self.idle && caps.idle, "IMAP folder selected"
        );

        loop {
            if self.sync(&mut session, &caps, &mut position, scan, shutdown).await? == Woken::Shutdown {
                break;
            }
            scan = Scan::New;
            self.health.synced();
            *failures = 0;
            while session.unsolicited_responses.try_recv().is_ok() {}

            let woken = if self.idle && caps.idle {
                let (s, woken) = self.idle_wait(session, shutdown).await?;
                session = s;
                woken
            } else {
                tokio::select! {
                    _ = tokio::time::sleep(self.poll) => Woken::Sync,
                    _ = shutdown.changed() => Woken::Shutdown,
                }
            };
            if matches!(woken, Woken::Shutdown) {
                break;
            }
        }
        let _ = within(Duration::from_secs(5), session.logout()).await;
        Ok(())
    }

    /// IDLE until the server sends something, `poll` passes, the server has been quiet for
    /// [`IDLE_QUIET`] (each ends in a resync, which doubles as the heartbeat: a dead connection
    /// fails it), or shutdown.
    async fn idle_wait(
        &self,
        session: ImapSession,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(ImapSession, Woken), WatchError> {
        let mut handle = session.idle();
        within(COMMAND_TIMEOUT, handle.init()).await.map_err(imap_err("IDLE"))?;
        let limit = self.poll.min(MAX_IDLE);
        let woken = {
            // `_stop` must stay alive while waiting: dropping it ends the wait at once.
            let (wait, _stop) = handle.wait_with_timeout(limit.min(IDLE_QUIET));
            tokio::select! {
                r = tokio::time::timeout(limit, wait) => match r {
                    Ok(Err(e)) => return Err(WatchError::Idle(e)),
                    Ok(Ok(_)) | Err(_) => Woken::Sync,
                },
                _ = shutdown.changed() => Woken::Shutdown,
            }
        };
        let session = within(COMMAND_TIMEOUT, handle.done()).await.map_err(imap_err("IDLE DONE"))?;
        Ok((session, woken))
    }

    /// Spools every message past the checkpoint, batch by batch, each batch checkpointed and
    /// then acknowledged to the server with the after-action.
    async fn sync(
        &self,
        session: &mut ImapSession,
        caps: &Caps,
        position: &mut Position,
        scan: Scan,
        shutdown: &watch::Receiver<bool>,
    ) -> Result<Woken, WatchError> {
        let already = match scan {
            Scan::Again | Scan::Resume => Some(self.checkpoint.seen().map_err(WatchError::Checkpoint)?),
            _ => None,
        };
        let unseen_only = matches!(scan, Scan::First { .. }) && self.after == After::Seen;
        if matches!(scan, Scan::Resume) {
            self.catch_up(session, caps, position).await?;
        }
        loop {
            let next = position.last_uid.saturating_add(1);
            let query = if unseen_only { format!("UID {next}:* UNSEEN") } else { format!("UID {next}:*") };
            let found = within(COMMAND_TIMEOUT, session.uid_search(&query)).await.map_err(imap_err("UID SEARCH"))?;
            // `n:*` always includes the highest UID, even one below n.
            let mut uids: Vec<u32> = found.into_iter().filter(|&u| u >= next).collect();
            uids.sort_unstable();
            if uids.is_empty() {
                break;
            }
            for batch in uids.chunks(BATCH) {
                self.batch(session, caps, batch, position, already.as_ref()).await?;
                if *shutdown.borrow() {
                    return Ok(Woken::Shutdown);
                }
            }
        }
        match scan {
            Scan::New | Scan::Resume => {}
            // The first sync records UIDVALIDITY even for an empty folder; read mail present at
            // the first start is left alone for `seen`, and new mail is not.
            Scan::First { uid_next } => {
                position.last_uid = position.last_uid.max(uid_next.unwrap_or(1).saturating_sub(1));
                self.store_position(*position).await?;
            }
            Scan::Again => self.store_position(*position).await?,
        }
        Ok(Woken::Sync)
    }

    /// With `delete` or `move:`, runs the after-action on the messages still in the folder at or
    /// below the checkpoint: each was spooled (or skipped) and checkpointed, but a crash or a
    /// failure came before its after-action, and the folder would hold it for ever. (With `seen`
    /// a message left unread is left alone: a reader may have marked it so.)
    async fn catch_up(&self, session: &mut ImapSession, caps: &Caps, position: &Position) -> Result<(), WatchError> {
        if self.after == After::Seen || position.last_uid == 0 {
            return Ok(());
        }
        let query = format!("UID 1:{}", position.last_uid);
        let found = within(COMMAND_TIMEOUT, session.uid_search(&query)).await.map_err(imap_err("UID SEARCH"))?;
        let mut left: Vec<u32> = found.into_iter().filter(|&u| u <= position.last_uid).collect();
        if left.is_empty() {
            return Ok(());
        }
        left.sort_unstable();
        info!(account = %self.account, folder = %self.folder, messages = left.len(), "acknowledging messages spooled before a restart");
        for batch in left.chunks(BATCH) {
            if let Err(e) = self.after_action(session, caps, batch).await {
                warn!(account = %self.account, folder = %self.folder, error = %e, "after-action failed; the messages stay on the server until the next connection");
                break;
            }
        }
        Ok(())
    }

    /// Fetches one batch of UIDs (ascending), spools them, advances the checkpoint past every
    /// UID that is durable (or skipped, or gone from the server), then runs the after-action.
    async fn batch(
        &self,
        session: &mut ImapSession,
        caps: &Caps,
        batch: &[u32],
        position: &mut Position,
        already: Option<&HashSet<String>>,
    ) -> Result<(), WatchError> {
        let mut pending: VecDeque<Pending> = VecDeque::new();
        let mut done: Vec<(u32, Result<Option<String>, StoreError>)> = Vec::new();
        let mut skipped: Vec<u32> = Vec::new();
        let mut pending_bytes = 0usize;
        let mut fetch = batch.to_vec();
        if let Some(node) = &self.cluster {
            // Already spooled from this folder (by any instance): acknowledged, not fetched.
            let known = node.seen_uids(&self.key, position.uidvalidity, batch).await?;
            if !known.is_empty() {
                info!(account = %self.account, folder = %self.folder, count = known.len(), "already in the dedupe ledger; not sent again");
            }
            fetch.retain(|u| !known.contains(u));
            skipped.extend(known);
        }
        if !fetch.is_empty() {
            let mut stream = within(COMMAND_TIMEOUT, session.uid_fetch(uid_set(&fetch), "(UID BODY.PEEK[])"))
                .await
                .map_err(imap_err("UID FETCH"))?;
            loop {
                let item = tokio::time::timeout(COMMAND_TIMEOUT, stream.next())
                    .await
                    .map_err(|_| WatchError::Protocol("UID FETCH: no data within 1m".into()))?;
                let fetch: Fetch = match item {
                    None => break,
                    Some(Ok(f)) => f,
                    Some(Err(e)) => return Err(imap_err("UID FETCH")(std::io::Error::other(e))),
                };
                let Some(uid) = fetch.uid.filter(|u| batch.binary_search(u).is_ok()) else { continue };
                let Some(body) = fetch.body() else {
                    return Err(WatchError::Protocol(format!("the server sent no body for UID {uid}")));
                };
                let fp = fingerprint(body);
                if already.is_some_and(|seen| seen.contains(&fp)) {
                    info!(account = %self.account, folder = %self.folder, uid, "already spooled from this folder; not sent again");
                    skipped.push(uid);
                    continue;
                }
                let ledger = match &self.cluster {
                    Some(node) => {
                        let bytes = fingerprint_bytes(&fp);
                        if node.seen_fingerprint(&self.key, &bytes).await? {
                            info!(account = %self.account, folder = %self.folder, uid, "same content already in the dedupe ledger; not sent again");
                            skipped.push(uid);
                            continue;
                        }
                        Some(Seen {
                            account: self.key.account.clone(),
                            folder: self.key.folder.clone(),
                            uidvalidity: position.uidvalidity,
                            uid,
                            fingerprint: bytes,
                        })
                    }
                    None => None,
                };
                pending_bytes += body.len();
                let job = tokio::spawn(store(
                    self.spool.clone(),
                    self.inbox.clone(),
                    self.envelope(),
                    body.to_vec(),
                    (self.checkpoint.clone(), fp),
                    ledger,
                ));
                pending.push_back((uid, body.len(), job));
                while pending_bytes > MAX_PENDING_BYTES {
                    let Some((uid, len, job)) = pending.pop_front() else { break };
                    pending_bytes -= len;
                    done.push((uid, join(job).await));
                }
            }
        }
        for (uid, _, job) in pending {
            done.push((uid, join(job).await));
        }

        // Advance over every UID of the batch up to the first that failed to commit.
        done.sort_by_key(|(uid, _)| *uid);
        let limit = done.iter().find(|(_, r)| r.is_err()).map_or(u32::MAX, |(uid, _)| *uid);
        let mut received = 0;
        for (uid, result) in &done {
            if let Ok(Some(id)) = result {
                // One past a failure is durable too (and its fingerprint known): the next
                // connection fetches it again and recognises it.
                info!(id = %id, account = %self.account, folder = %self.folder, uid, "received");
                received += u64::from(*uid < limit);
            }
        }
        let mut acknowledged: Vec<u32> =
            skipped.into_iter().chain(done.iter().filter(|(_, r)| r.is_ok()).map(|(uid, _)| *uid)).collect();
        acknowledged.retain(|&u| u < limit);
        acknowledged.sort_unstable();
        if let Some(last) = batch.iter().copied().filter(|&u| u < limit).max() {
            // Each message's fingerprint was added as soon as it was durable (see `store`).
            self.checkpoint.settle().map_err(WatchError::Checkpoint)?;
            position.last_uid = position.last_uid.max(last);
            self.store_position(*position).await?;
            self.health.fetched(received);
        }
        if let Err(e) = self.after_action(session, caps, &acknowledged).await {
            // The checkpoint already keeps these from being fetched again; a broken connection
            // shows at the next command.
            warn!(account = %self.account, folder = %self.folder, error = %e, "after-action failed; the messages stay on the server but will not be fetched again (delete and move: tried again at the next connection)");
        }
        match done.into_iter().find_map(|(uid, r)| r.err().map(|source| WatchError::Spool { uid, source })) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Acknowledges spooled messages to the server: flag seen, delete, or move.
    async fn after_action(&self, session: &mut ImapSession, caps: &Caps, uids: &[u32]) -> Result<(), WatchError> {
        if uids.is_empty() {
            return Ok(());
        }
        let set = uid_set(uids);
        match &self.after {
            After::Seen => store_flags(session, &set, "+FLAGS.SILENT (\\Seen)").await,
            After::Delete => {
                store_flags(session, &set, "+FLAGS.SILENT (\\Deleted)").await?;
                expunge(session, caps, &set).await
            }
            After::Move(target) if caps.mv => {
                within(COMMAND_TIMEOUT, session.uid_mv(&set, target)).await.map_err(imap_err("UID MOVE"))
            }
            After::Move(target) => {
                within(COMMAND_TIMEOUT, session.uid_copy(&set, target)).await.map_err(imap_err("UID COPY"))?;
                store_flags(session, &set, "+FLAGS.SILENT (\\Deleted)").await?;
                expunge(session, caps, &set).await
            }
        }
    }

    fn envelope(&self) -> Envelope {
        let mut envelope = Envelope::new(Source::Imap { account: self.account.clone(), folder: self.folder.clone() });
        envelope.recipients = vec![self.user.clone()];
        envelope.tls = self.tls;
        envelope
    }
}

/// A message fetched and being committed: UID, size, the commit (its spool id; `None` when
/// another instance had spooled it).
type Pending = (u32, usize, JoinHandle<Result<Option<String>, StoreError>>);

/// Which messages a sync considers.
#[derive(Debug, Clone, Copy)]
enum Scan {
    /// Past the checkpoint.
    New,
    /// Past the checkpoint, at the first sync of a connection: a message spooled just before
    /// a crash or a failed batch, too late for the checkpoint, is recognised by its fingerprint.
    Resume,
    /// No checkpoint yet: the folder's backlog (unread ones only for `seen`).
    First { uid_next: Option<u32> },
    /// UIDVALIDITY changed: everything, minus what was spooled before.
    Again,
}

/// Writes one message to the spool and commits it, then at once remembers its fingerprint (the
/// pipeline may deliver and remove it long before the batch is checkpointed; if the process
/// dies meanwhile, the fingerprint keeps the next start from spooling it again); returns its
/// spool id. With `[cluster]`, `seen` is its row of the dedupe ledger, committed in the same
/// transaction as the message; `Ok(None)` when the ledger had it already (another instance
/// spooled it first), and nothing was stored.
async fn store(
    spool: Spool,
    inbox: Arc<Inbox>,
    envelope: Envelope,
    raw: Vec<u8>,
    (checkpoint, fp): (Checkpoint, String),
    seen: Option<Seen>,
) -> Result<Option<String>, StoreError> {
    let fingerprint = fp.clone();
    let (draft, raw) = tokio::task::spawn_blocking(move || {
        let mut draft = spool.draft()?;
        draft.set_fingerprint(fingerprint);
        draft.write_all(&raw).map_err(StoreError::Write)?;
        Ok::<_, StoreError>((draft, raw))
    })
    .await??;
    let meta = match seen {
        Some(seen) => {
            let (uid, folder) = (seen.uid, format!("{}/{}", seen.account, seen.folder));
            match draft.commit_seen(envelope, seen).await? {
                Some(meta) => meta,
                None => {
                    warn!(folder = %folder, uid, "already in the dedupe ledger: another instance spooled this message; not spooled again");
                    return Ok(None);
                }
            }
        }
        None => draft.commit(envelope).await?,
    };
    let id = meta.id.clone();
    if let Err(e) = checkpoint.remember_now(&fp) {
        // Only a crash before the checkpoint could then send it twice.
        warn!(id = %id, error = %e, "cannot remember the fingerprint of a spooled message");
    }
    let raw = (raw.len() <= KEEP_COPY).then_some(raw);
    inbox.push(Fresh { meta, raw });
    Ok(Some(id))
}

/// The bytes of a hex fingerprint (as the ledger stores them).
fn fingerprint_bytes(hex: &str) -> Vec<u8> {
    (0..hex.len() / 2).filter_map(|i| u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()).collect()
}

/// Renews the folder's lease every `lease / 3`; returns when it is lost (a peer holds it, or
/// the renewal failed: this instance can no longer be sure it is the only one fetching).
async fn keep_lease(node: &Node, key: &FolderKey) -> WatchError {
    loop {
        tokio::time::sleep(node.renew_every()).await;
        match node.take_folder(key).await {
            Ok(true) => {}
            Ok(false) => return WatchError::LeaseLost(format!("another instance holds {key}")),
            Err(e) => return WatchError::LeaseLost(format!("cannot renew it: {e}")),
        }
    }
}

async fn join(job: JoinHandle<Result<Option<String>, StoreError>>) -> Result<Option<String>, StoreError> {
    job.await.unwrap_or_else(|e| Err(e.into()))
}

async fn store_flags(session: &mut ImapSession, set: &str, flags: &str) -> Result<(), WatchError> {
    within(COMMAND_TIMEOUT, async {
        let mut responses = session.uid_store(set, flags).await?;
        while let Some(r) = responses.next().await {
            r?;
        }
        Ok::<_, async_imap::error::Error>(())
    })
    .await
    .map_err(imap_err("UID STORE"))
}

async fn expunge(session: &mut ImapSession, caps: &Caps, set: &str) -> Result<(), WatchError> {
    within(COMMAND_TIMEOUT, async {
        if caps.uidplus {
            let mut gone = std::pin::pin!(session.uid_expunge(set).await?);
            while let Some(r) = gone.next().await {
                r?;
            }
        } else {
            let mut gone = std::pin::pin!(session.expunge().await?);
            while let Some(r) = gone.next().await {
                r?;
            }
        }
        Ok::<_, async_imap::error::Error>(())
    })
    .await
    .map_err(imap_err("EXPUNGE"))
}

/// An IMAP sequence set for ascending UIDs, with runs collapsed: `1:3,7,9:10`.
fn uid_set(uids: &[u32]) -> String {
    let mut out = String::new();
    let mut i = 0;
    while i < uids.len() {
        let start = uids[i];
        let mut end = start;
        while i + 1 < uids.len() && uids[i + 1] == end + 1 {
            i += 1;
            end = uids[i];
        }
        if !out.is_empty() {
            out.push(',');
        }
        if start == end {
            out.push_str(&start.to_string());
        } else {
            out.push_str(&format!("{start}:{end}"));
        }
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uid_sets_collapse_runs() {
        assert_eq!(uid_set(&[1]), "1");
        assert_eq!(uid_set(&[1, 2, 3, 7, 9, 10]), "1:3,7,9:10");
        assert_eq!(uid_set(&[4, 6, 8]), "4,6,8");
        assert_eq!(uid_set(&[]), "");
    }

    #[test]
    fn fingerprints_are_stored_as_their_bytes() {
        let hex = fingerprint(b"Subject: x\r\n\r\nx\r\n");
        let bytes = fingerprint_bytes(&hex);
        assert_eq!(bytes.len(), 32);
        assert_eq!(bytes.iter().map(|b| format!("{b:02x}")).collect::<String>(), hex);
        assert_eq!(fingerprint_bytes("00ff10"), vec![0x00, 0xff, 0x10]);
    }
}
