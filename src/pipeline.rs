//! pipeline: the delivery workers of `mailhook serve`.
//!
//! ```text
//! spool incoming ─► parse ─► rules ─► decision ─────────────────────────────► deliver each destination
//!        deferred (due) ─► active (claimed)  ──────────────────────────────────┘       │
//!                         ◄── deferred (some destination to retry at next_attempt) ◄──┤
//!                             dead (failed for good, or no rule, or a required field missing)
//!                             removed (every destination took it, or a rule dropped it)
//! ```
//!
//! The rules' decision is made once, when a new message is first picked up from `incoming`,
//! and stored with the state of each destination when the message moves on (to `deferred` or
//! `dead`; a message that every destination took is just removed). Every later round reads it
//! back and tries only the destinations
//! still pending, each with its own attempts, backoff and last error. A destination has a
//! token bucket (`rate`), a concurrency cap, and is paused as a whole when a receiver asks for
//! a delay (429 with `Retry-After`).
//!
//! With `[cluster]` the spool is the queue in PostgreSQL, shared by every instance: instead of
//! reading `incoming/` and `deferred/`, the loop claims due messages (new ones nobody holds,
//! deferred ones now due, those of an instance whose lease passed; see `spool::postgres`) for
//! its free places every `SCAN_INTERVAL` (a second), and starts each with what the claim
//! returned. The messages this instance accepted are handed over in memory and delivered at
//! once, as without it.
//!
//! When a round cannot write the spool (a read-only or failing file system), no round starts
//! until a probe write succeeds: a message delivered but not recorded as such is still in
//! `incoming`, and would otherwise be sent again at every scan for as long as the trouble
//! lasts. It is sent again once, when the spool is writable again.

use crate::backoff::backoff;
use crate::config::{BackoffConfig, Config, DeliveryConfig, DestinationConfig, Rate};
use crate::deliver::throttle::Pacer;
use crate::deliver::{Attempt, BuildError, Destination, Reply, shrink};
use crate::lifecycle::Observer;
use crate::metrics::{Delivery, Metrics};
use crate::model::{Action, Payload};
use crate::parse::parse;
use crate::rules::RuleSet;
use crate::spool::{
    Decision, DestState, DestStatus, Fresh, Inbox, Meta, Spool, SpoolError, State, format_time, parse_time,
};
use crate::store::{ArchiveState, ArchiveWriter, AttemptRecord, Finished as Archived, Searchable};
use serde_json::Value as Json;
use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;
use tracing::{debug, error, info, warn};

/// How often the spool directories are re-read for messages put there by other processes
/// (`mailhook ingest`, `queue retry`, `replay`).
const SCAN_INTERVAL: Duration = Duration::from_secs(1);

/// Messages being worked on at once (bounds memory).
const MAX_IN_FLIGHT: usize = 256;

/// Megabytes of memory that the messages being worked on may take at once (see
/// [`MemoryBudget`]): what bounds `serve`'s memory under a burst of large messages.
const MEMORY_BUDGET_MB: u32 = 64;

/// Messages up to this size are parsed and judged on the worker itself; larger ones on the
/// blocking pool, so that a long parse never stalls the other tasks.
const INLINE_JUDGE_SIZE: u64 = 64 * 1024;

/// How long shutdown waits for rounds in flight.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

/// The memory the messages being worked on may take at once, counted in KiB. A round takes its
/// share before it reads a message: [`RuleSet::judge_peak`] times the message's size when it is
/// to be judged, its size once otherwise. Once judged, the round gives back all but its size
/// once: the raw bytes it keeps for the archive, which hand that share to the archive's writer,
/// so that raw messages waiting to be written count too (when the spool keeps the raw bytes for
/// the archive, the round holds none, and gives the share back when it hands the entry over).
/// A message whose share is larger than the whole budget takes all of it, alone. Judging also takes a megabyte beyond its multiple (the
/// parsed message, the rules' work), which is what bounds small mail; a raw message kept for the
/// archive holds only its own size, so that thousands of small ones waiting for the archive's
/// writer never hold up the rounds.
struct MemoryBudget {
    kib: Arc<Semaphore>,
    /// The whole budget, in KiB.
    total: u32,
}

/// What judging takes beyond [`RuleSet::judge_peak`] times the message, in KiB.
const JUDGE_OVERHEAD_KIB: u32 = 1024;

impl MemoryBudget {
    fn new(megabytes: u32) -> MemoryBudget {
        let total = megabytes.saturating_mul(1024);
        MemoryBudget { kib: Arc::new(Semaphore::new(total as usize)), total }
    }

    /// The share, in KiB, of a message of `size` bytes when it takes `factor` times its size and
    /// `overhead` KiB more.
    fn share(&self, size: u64, factor: u64, overhead: u32) -> u32 {
        let kib = u32::try_from(size.saturating_mul(factor).div_ceil(1024)).unwrap_or(u32::MAX);
        kib.saturating_add(overhead).max(1).min(self.total)
    }

    /// Waits until the share of judging a message of `size` bytes fits; `None` only if the
    /// budget were closed (it never is).
    async fn acquire(&self, size: u64, factor: u64) -> Option<OwnedSemaphorePermit> {
        self.kib.clone().acquire_many_owned(self.share(size, factor, JUDGE_OVERHEAD_KIB)).await.ok()
    }

    /// Gives back what judging took beyond the message's size once.
    fn settle(&self, permit: &mut Option<OwnedSemaphorePermit>, size: u64) {
        let keep = self.share(size, 1, 0) as usize;
        if let Some(p) = permit
            && p.num_permits() > keep
        {
            drop(p.split(p.num_permits() - keep));
        }
    }
}

/// A destination with its pacing and limits.
pub struct PacedDestination {
    pub name: String,
    destination: Destination,
    bucket: Pacer,
    /// Paced by this instance alone, even in a cluster (a file of this machine).
    local: bool,
    permits: Semaphore,
    timeout: Duration,
    retry_for: Duration,
    backoff: BackoffConfig,
    max_body: usize,
}

/// The ids of the last [`RECENT_LIMIT`] messages whose round ended.
#[derive(Default)]
struct Recent {
    order: VecDeque<String>,
    ids: HashSet<String>,
}

/// More than the inbox can hold, so a stale hand-over is always recognised.
const RECENT_LIMIT: usize = 4 * crate::spool::INBOX_LIMIT;

impl Recent {
    fn insert(&mut self, id: String) {
        if self.ids.insert(id.clone()) {
            self.order.push_back(id);
            if self.order.len() > RECENT_LIMIT
                && let Some(old) = self.order.pop_front()
            {
                self.ids.remove(&old);
            }
        }
    }

    fn contains(&self, id: &str) -> bool {
        self.ids.contains(id)
    }
}

/// Shared, swappable rules: a message is always judged by one consistent set.
pub type SharedRules = Arc<RwLock<Arc<RuleSet>>>;

/// Called before a message from `incoming` is judged, so that the rules in force are the
/// rules on disk at that moment (serve's reloader checks the rules directory): a mail sent
/// right after a rules file was saved is judged by the new rules, not by the old ones until
/// the watcher's debounced reload.
pub type BeforeJudging = Arc<dyn Fn() + Send + Sync>;

pub struct Pipeline {
    rules: SharedRules,
    before_judging: Option<BeforeJudging>,
    inbox: Arc<Inbox>,
    work: Arc<Work>,
}

/// What every round needs, shared by all of them.
struct Work {
    spool: Spool,
    targets: HashMap<String, Arc<PacedDestination>>,
    memory: MemoryBudget,
    metrics: Arc<Metrics>,
    /// Set when a round could not write the spool; see [`Pipeline::paused`].
    spool_trouble: AtomicBool,
    /// Where finished messages and attempts are recorded, when the archive is on.
    archive: Option<ArchiveWriter>,
    /// Told of each new message and its outcome (trial rules, drift alarms).
    observer: Option<Arc<Observer>>,
}

/// How a round left a message.
#[derive(Debug)]
enum Finished {
    Removed,
    Deferred(SystemTime),
    Dead,
    /// Gone or not ours (dropped by an operator meanwhile), or a spool error (logged).
    Released,
}

impl Pipeline {
    pub fn new(
        config: &Config,
        spool: Spool,
        rules: SharedRules,
        metrics: Arc<Metrics>,
    ) -> Result<Pipeline, BuildError> {
        let mut targets = HashMap::new();
        for (name, d) in &config.destination {
            let destination = Destination::build(name, d, config)?;
            metrics.destination(name);
            let delivery = &config.delivery;
            let rate = pace(d, delivery);
            let local = matches!(d, DestinationConfig::File(_));
            let d = d.pacing();
            targets.insert(
                name.clone(),
                Arc::new(PacedDestination {
                    name: name.clone(),
                    destination,
                    bucket: Pacer::new(rate),
                    local,
                    permits: Semaphore::new(d.concurrency.unwrap_or(delivery.concurrency)),
                    timeout: d.timeout.unwrap_or(delivery.timeout),
                    retry_for: d.retry_for.unwrap_or(delivery.retry_for),
                    backoff: d.backoff.unwrap_or(delivery.backoff),
                    max_body: d.max_body.unwrap_or(delivery.max_body).as_u64() as usize,
                }),
            );
        }
        Ok(Pipeline {
            rules,
            before_judging: None,
            inbox: Arc::new(Inbox::default()),
            work: Arc::new(Work {
                spool,
                targets,
                memory: MemoryBudget::new(MEMORY_BUDGET_MB),
                metrics,
                spool_trouble: AtomicBool::new(false),
                archive: None,
                observer: None,
            }),
        })
    }

    /// Sets what runs before each new message is judged (see [`BeforeJudging`]).
    pub fn before_judging(mut self, hook: BeforeJudging) -> Pipeline {
        self.before_judging = Some(hook);
        self
    }

    /// Shares every destination's pacing (rate and 429 pauses) with the other instances of
    /// `node`'s cluster (before [`Pipeline::run`]).
    pub fn with_cluster(self, node: &Arc<crate::cluster::Node>) -> Pipeline {
        for (name, target) in self.work.targets.iter().filter(|(_, t)| !t.local) {
            target.bucket.share(node.clone(), name);
        }
        self
    }

    /// Records every finished message and every attempt in `archive` (before [`Pipeline::run`]).
    pub fn with_archive(mut self, archive: ArchiveWriter) -> Pipeline {
        Arc::get_mut(&mut self.work).expect("set before the pipeline runs").archive = Some(archive);
        self
    }

    /// Tells `observer` of every new message and its outcome (before [`Pipeline::run`]).
    pub fn with_observer(mut self, observer: Arc<Observer>) -> Pipeline {
        Arc::get_mut(&mut self.work).expect("set before the pipeline runs").observer = Some(observer);
        self
    }

    /// Where listeners hand over the messages they commit, so they are picked up at once.
    pub fn inbox(&self) -> Arc<Inbox> {
        self.inbox.clone()
    }

    /// Works the spool until `shutdown` turns true, then lets rounds in flight finish (up to
    /// [`SHUTDOWN_GRACE`]); what is still unfinished stays in `active` for the next start.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut tasks: JoinSet<(String, Finished)> = JoinSet::new();
        let mut in_flight: HashSet<String> = HashSet::new();
        // Deferred messages by due time, and what we know of each.
        let mut schedule: BTreeSet<(SystemTime, String)> = BTreeSet::new();
        let mut due_of: HashMap<String, SystemTime> = HashMap::new();
        let mut last_scan: Option<tokio::time::Instant> = None;
        // New messages found in incoming and not started yet, oldest first.
        let mut backlog: VecDeque<String> = VecDeque::new();
        let mut queued: HashSet<String> = HashSet::new();
        // Messages whose round ended lately: a fresh hand-over of one of them that arrives after
        // a directory scan already picked it up and finished it must not start it again.
        let mut finished = Recent::default();
        let mut pause_logged = false;
        // With `[cluster]` the queue is shared: messages are claimed, never just listed.
        let shared = self.work.spool.shared().is_some();

        loop {
            if *shutdown.borrow() {
                break;
            }
            let paused = self.paused(&mut pause_logged).await;
            let limit = if paused { 0 } else { MAX_IN_FLIGHT };
            let interval = last_scan.is_none_or(|t| t.elapsed() >= SCAN_INTERVAL);
            // Between scans, incoming is read only when the inbox overflowed: every other new
            // message was handed over in memory, and a scan would find those committed but not
            // yet taken from the inbox, and read them back from disk.
            if interval || (backlog.is_empty() && self.inbox.overflowed()) {
                self.inbox.clear_overflow();
                last_scan = Some(tokio::time::Instant::now());
                if shared {
                    self.claim(&mut tasks, &mut in_flight, &queued, limit).await;
                } else {
                    self.scan_incoming(&mut backlog, &mut queued, &in_flight);
                }
            }
            if interval && !shared {
                self.scan_deferred(&mut schedule, &mut due_of, &in_flight);
            }
            while in_flight.len() < limit {
                let Some(id) = backlog.pop_front() else { break };
                queued.remove(&id);
                self.start(&mut tasks, &mut in_flight, id, State::Incoming);
            }
            let now = SystemTime::now();
            while in_flight.len() < limit {
                let Some((due, id)) = schedule.first().cloned() else {
                    break;
                };
                if due > now {
                    break;
                }
                schedule.remove(&(due, id.clone()));
                due_of.remove(&id);
                self.start(&mut tasks, &mut in_flight, id, State::Deferred);
            }

            let next_due = schedule.first().map(|(due, _)| due.duration_since(now).unwrap_or_default());
            let wait = if paused { SCAN_INTERVAL } else { next_due.unwrap_or(SCAN_INTERVAL).min(SCAN_INTERVAL) };
            tokio::select! {
                _ = self.inbox.notified() => {
                    for fresh in self.inbox.take() {
                        let id = fresh.meta.id.clone();
                        if in_flight.contains(&id) || queued.contains(&id) || finished.contains(&id) {
                            continue;
                        }
                        if in_flight.len() < limit {
                            self.start_with(&mut tasks, &mut in_flight, id, State::Incoming, Some(fresh));
                        } else {
                            queued.insert(id.clone());
                            backlog.push_back(id);
                        }
                    }
                }
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => {}
                Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                    if let Ok((id, outcome)) = done {
                        in_flight.remove(&id);
                        finished.insert(id.clone());
                        if let Finished::Deferred(due) = outcome
                            && !shared
                        {
                            schedule.insert((due, id.clone()));
                            due_of.insert(id, due);
                        }
                    }
                }
            }
        }

        info!(in_flight = tasks.len(), "stopping delivery; letting rounds in flight finish");
        let drain = async { while tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(SHUTDOWN_GRACE, drain).await.is_err() {
            warn!(left = tasks.len(), "grace period over; unfinished messages stay in active for the next start");
            tasks.abort_all();
        }
    }

    /// Whether no round may start: one could not write the spool, and a probe write still fails.
    /// A message delivered whose removal (or move to deferred) failed is still in incoming;
    /// starting rounds again would send it once more at every scan, as long as the spool stays
    /// read-only or broken. Paused, it is sent again once, when the spool is writable again.
    async fn paused(&self, logged: &mut bool) -> bool {
        if !self.work.spool_trouble.load(Ordering::SeqCst) {
            return false;
        }
        match self.work.spool.probe_async().await {
            Ok(()) => {
                self.work.spool_trouble.store(false, Ordering::SeqCst);
                if std::mem::take(logged) {
                    info!("the spool can be written again; deliveries resume");
                }
                false
            }
            Err(e) => {
                if !std::mem::replace(logged, true) {
                    error!(error = %e, "the spool cannot be written; deliveries pause until it can");
                }
                true
            }
        }
    }

    /// With `[cluster]`: claims due messages (new ones nobody holds, deferred ones due, those of
    /// an instance whose lease passed) up to the free places, and starts them.
    async fn claim(
        &self,
        tasks: &mut JoinSet<(String, Finished)>,
        in_flight: &mut HashSet<String>,
        queued: &HashSet<String>,
        limit: usize,
    ) {
        let Some(queue) = self.work.spool.shared() else { return };
        let free = limit.saturating_sub(in_flight.len() + queued.len());
        if free == 0 {
            return;
        }
        let busy: Vec<String> = in_flight.iter().chain(queued.iter()).cloned().collect();
        match queue.claim(free, busy).await {
            Ok(claimed) => {
                for c in claimed {
                    let id = c.meta.id.clone();
                    if in_flight.contains(&id) {
                        continue;
                    }
                    debug!(id = %id, state = %c.state, "claimed");
                    self.start_with(tasks, in_flight, id, c.state, Some(Fresh { meta: c.meta, raw: Some(c.raw) }));
                }
            }
            Err(e) => {
                warn!(error = %e, "cannot claim messages from the queue");
                self.work.spool_trouble.store(true, Ordering::SeqCst);
            }
        }
    }

    /// Adds the messages of incoming that are neither started nor queued to the backlog.
    fn scan_incoming(&self, backlog: &mut VecDeque<String>, queued: &mut HashSet<String>, in_flight: &HashSet<String>) {
        let ids = match self.work.spool.list(State::Incoming) {
            Ok(ids) => ids,
            Err(e) => {
                error!(error = %e, "cannot read the spool's incoming");
                return;
            }
        };
        for id in ids {
            if !in_flight.contains(&id) && !queued.contains(&id) {
                queued.insert(id.clone());
                backlog.push_back(id);
            }
        }
    }

    fn scan_deferred(
        &self,
        schedule: &mut BTreeSet<(SystemTime, String)>,
        due_of: &mut HashMap<String, SystemTime>,
        in_flight: &HashSet<String>,
    ) {
        let ids = match self.work.spool.list(State::Deferred) {
            Ok(ids) => ids,
            Err(e) => {
                error!(error = %e, "cannot read the spool's deferred");
                return;
            }
        };
        let present: HashSet<&String> = ids.iter().collect();
        // Forget what left deferred behind our back (queue drop, replay, retry).
        let gone: Vec<String> = due_of.keys().filter(|id| !present.contains(id)).cloned().collect();
        for id in gone {
            if let Some(due) = due_of.remove(&id) {
                schedule.remove(&(due, id));
            }
        }
        for id in ids {
            if due_of.contains_key(&id) || in_flight.contains(&id) {
                continue;
            }
            match self.work.spool.read_meta(State::Deferred, &id) {
                Ok(meta) => {
                    let due = meta.due();
                    schedule.insert((due, id.clone()));
                    due_of.insert(id, due);
                }
                Err(SpoolError::NotFound(_)) => {}
                Err(e) => error!(id = %id, error = %e, "cannot read deferred message; it stays where it is"),
            }
        }
    }

    fn start(&self, tasks: &mut JoinSet<(String, Finished)>, in_flight: &mut HashSet<String>, id: String, from: State) {
        self.start_with(tasks, in_flight, id, from, None);
    }

    fn start_with(
        &self,
        tasks: &mut JoinSet<(String, Finished)>,
        in_flight: &mut HashSet<String>,
        id: String,
        from: State,
        fresh: Option<Fresh>,
    ) {
        in_flight.insert(id.clone());
        if from == State::Incoming
            && let Some(hook) = &self.before_judging
        {
            hook();
        }
        // One consistent set for the whole judgement, even if a reload swaps it meanwhile.
        let rules = self.rules.read().expect("rules lock").clone();
        let work = self.work.clone();
        tasks.spawn(async move {
            let finished = process(&work, &rules, &id, from, fresh).await;
            (id, finished)
        });
    }
}

async fn process(work: &Work, rules: &Arc<RuleSet>, id: &str, from: State, fresh: Option<Fresh>) -> Finished {
    match round(work, rules, id, from, fresh).await {
        Ok(f) => f,
        Err(SpoolError::NotFound(_)) => Finished::Released,
        Err(e) => {
            error!(id, error = %e, "spool error; the message stays where it is");
            work.spool_trouble.store(true, Ordering::SeqCst);
            Finished::Released
        }
    }
}

/// One round: judge if not yet judged, try every due destination, file the message.
async fn round(
    work: &Work,
    rules: &Arc<RuleSet>,
    id: &str,
    from: State,
    fresh: Option<Fresh>,
) -> Result<Finished, SpoolError> {
    let Work { spool, targets, memory: budget, metrics, archive, .. } = work;
    let (mut meta, kept_raw) = match fresh {
        Some(f) => (f.meta, f.raw),
        // A new message from another process (`ingest`), or one the inbox had no room for:
        // a small one is read whole at once, its raw bytes with its metadata.
        None => spool.read_meta_with_raw(from, id, INLINE_JUDGE_SIZE)?,
    };
    // Where the message is now.
    let mut at = from;
    // Judging takes a few times the message's size; what is left for the rest of the round
    // (and, with the raw bytes, until the archive has written them) is the size once.
    let mut memory = match meta.decision {
        None => budget.acquire(meta.size, rules.judge_peak()).await,
        Some(_) => budget.acquire(meta.size, 1).await,
    };

    // The raw message and what the archive indexes of it, when it was read this round.
    let mut held_raw: Option<Vec<u8>> = None;
    let mut held_search: Option<Searchable> = None;
    if meta.decision.is_none() {
        let outcome = if meta.size <= INLINE_JUDGE_SIZE {
            // Small mail is parsed and judged in a few microseconds: no thread hand-off.
            let raw = match kept_raw {
                Some(raw) => raw,
                None => spool.read_raw(id)?,
            };
            let email = parse(&raw);
            let outcome = rules.evaluate(&email, &meta.envelope);
            if let Some(o) = &work.observer {
                o.judged(&email, &meta.envelope, &outcome);
            }
            if archive.is_some() {
                held_search = Some(Searchable::of(&email, &meta.envelope));
                // The spool keeps the raw bytes for the archive: nothing to hold meanwhile.
                held_raw = (!spool.keeps_raw()).then_some(raw);
            }
            outcome
        } else {
            let (raw_spool, raw_id, rules) = (spool.clone(), id.to_string(), rules.clone());
            let envelope = meta.envelope.clone();
            let keep = archive.is_some();
            let hold_raw = !spool.keeps_raw();
            let observer = work.observer.clone();
            let (outcome, raw) = tokio::task::spawn_blocking(move || {
                raw_spool.read_raw(&raw_id).map(|raw| {
                    let email = parse(&raw);
                    let outcome = rules.evaluate(&email, &envelope);
                    if let Some(o) = &observer {
                        o.judged(&email, &envelope, &outcome);
                    }
                    let held = keep.then(|| (Searchable::of(&email, &envelope), hold_raw.then_some(raw)));
                    (outcome, held)
                })
            })
            .await
            .map_err(|e| SpoolError::io("judge", std::io::Error::other(e.to_string())))??;
            if let Some((search, raw)) = raw {
                held_raw = raw;
                held_search = Some(search);
            }
            outcome
        };
        budget.settle(&mut memory, meta.size);
        let rule = outcome.rule.clone();
        metrics.received(meta.envelope.source.protocol());
        match &rule {
            Some(r) => metrics.rule_matched(r),
            None => metrics.unmatched(),
        }
        match outcome.action {
            Action::Drop => {
                info!(id, rule = rule.as_deref().unwrap_or("-"), "dropped");
                let raw = raw_for_archive(work, id, held_raw, held_search.is_some()).await;
                spool.remove(id, from).await?;
                archive_done(work, ArchiveState::Dropped, &meta, raw, held_search, rule, None, memory).await;
                return Ok(Finished::Removed);
            }
            Action::Dead { reason } => {
                match &rule {
                    // A rule matched but could not make its payload: the rule needs fixing.
                    Some(r) => {
                        error!(id, rule = %r, reason = %reason, "dead letter");
                        metrics.extraction_failed(r);
                    }
                    // Unmatched mail kept as the `unmatched = "dead"` policy says.
                    None => warn!(id, rule = "-", reason = %reason, "dead letter"),
                }
                meta.dead_reason = Some(reason);
                meta.dead_rule = rule.clone();
                spool.transition(id, from, State::Dead, Some(&meta)).await?;
                let raw = raw_for_archive(work, id, held_raw, held_search.is_some()).await;
                // The payload a rule built, though nothing was sent, shows what it extracted. It
                // is kept as it would have been sent (cut to the largest max_body); one that no
                // destination would take (a field of many megabytes) is not kept at all.
                let limit = targets.values().map(|t| t.max_body).max().unwrap_or(usize::MAX);
                let payload = rule
                    .is_some()
                    .then(|| shrink::fit(outcome.payload, limit))
                    .filter(|p| p.as_str().len() <= limit)
                    .map(Payload::into_string);
                archive_done(work, ArchiveState::Dead, &meta, raw, held_search, rule, payload, memory).await;
                return Ok(Finished::Dead);
            }
            Action::Deliver { to } => {
                info!(id, rule = rule.as_deref().unwrap_or("-"), to = %to.join(","), "matched");
                let destinations = to.into_iter().map(|d| (d, DestStatus::pending())).collect();
                // No destination takes more than the largest max_body among them: keep the
                // stored payload within it (the spool need not hold a 25 MB text).
                let limit = to_limit(&destinations, targets);
                let payload = shrink::fit(outcome.payload, limit);
                meta.decision =
                    Some(Decision { rule, decided_at: format_time(SystemTime::now()), payload, destinations });
                // A new message is sent straight from incoming: if every destination takes it,
                // it is simply removed; otherwise the decision and each destination's state are
                // stored when it moves on (deferred or dead). A crash in between leaves it in
                // incoming, to be judged and sent again (at-least-once).
            }
        }
    } else if from != State::Active {
        // Claim it: while it is in active, it is ours.
        spool.transition(id, from, State::Active, None).await?;
        at = State::Active;
    }

    let decision = meta.decision.as_ref().expect("decided above");
    let payload = with_id(&decision.payload, id);
    let payload = payload.as_ref();
    let now = SystemTime::now();
    let due: Vec<String> = decision
        .destinations
        .iter()
        .filter(|(_, s)| s.state == DestState::Pending)
        .filter(|(_, s)| s.next_attempt.as_deref().and_then(parse_time).is_none_or(|t| t <= now))
        .map(|(name, _)| name.clone())
        .collect();

    let age = meta.age(now);
    let attempts = due.iter().map(|name| {
        let target = targets.get(name).cloned();
        let name = name.clone();
        async move {
            let started = SystemTime::now();
            let clock = Instant::now();
            let (attempt, reply) = match target {
                None => {
                    let reason = format!("destination {name:?} is no longer configured");
                    (Attempt::Fail { reason: reason.clone() }, Reply { reply: Some(reason), ..Reply::default() })
                }
                Some(t) => send(&t, id, payload, metrics).await,
            };
            (name, attempt, (started, clock.elapsed(), reply))
        }
    });
    let results: Vec<(String, Attempt, (SystemTime, Duration, Reply))> = futures_util::future::join_all(attempts).await;

    let decision = meta.decision.as_mut().expect("decided above");
    let mut errors = Vec::new();
    let mut traces = Vec::new();
    for (name, attempt, trace) in results {
        let status = decision.destinations.get_mut(&name).expect("due destinations come from the decision");
        status.attempts += 1;
        match attempt {
            Attempt::Done => {
                info!(id, destination = %name, attempts = status.attempts, "delivered");
                metrics.delivered(&name, Delivery::Delivered);
                status.state = DestState::Done;
                status.last_error = None;
                status.next_attempt = None;
            }
            Attempt::Fail { reason } => {
                error!(id, destination = %name, reason = %reason, "delivery failed for good");
                metrics.delivered(&name, Delivery::Dead);
                status.state = DestState::Dead;
                status.last_error = Some(reason.clone());
                status.next_attempt = None;
                errors.push(format!("{name}: {reason}"));
            }
            Attempt::Retry { after, reason } => {
                let target = targets.get(&name).expect("retry comes from a configured target");
                let delay = after.unwrap_or_else(|| backoff(&target.backoff, status.attempts));
                if age + delay > target.retry_for {
                    let why = format!("gave up after {}: {reason}", humantime::format_duration(target.retry_for));
                    error!(id, destination = %name, reason = %why, "delivery failed for good");
                    metrics.delivered(&name, Delivery::Dead);
                    status.state = DestState::Dead;
                    status.last_error = Some(why.clone());
                    status.next_attempt = None;
                    errors.push(format!("{name}: {why}"));
                } else {
                    info!(id, destination = %name, attempt = status.attempts, retry_in = %humantime::format_duration(round_secs(delay)), reason = %reason, "deferred");
                    metrics.delivered(&name, Delivery::Deferred);
                    status.last_error = Some(reason.clone());
                    status.next_attempt = Some(format_time(now + delay));
                    errors.push(format!("{name}: {reason}"));
                }
            }
        }
        let outcome = match status.state {
            DestState::Done => "delivered",
            DestState::Dead => "dead",
            DestState::Pending => "deferred",
        };
        traces.push(attempt_record(id, name, outcome, trace));
    }
    if let Some(archive) = archive {
        for trace in traces {
            archive.attempt(trace).await;
        }
    }
    meta.attempts += 1;
    if !errors.is_empty() {
        meta.last_error = Some(errors.join("; "));
    }

    let statuses: Vec<&DestStatus> = decision.destinations.values().collect();
    if statuses.iter().all(|s| s.state == DestState::Done) {
        let raw = raw_for_archive(work, id, held_raw, held_search.is_some()).await;
        spool.remove(id, at).await?;
        let rule = decision.rule.clone();
        let payload = Some(decision.payload.as_str().to_string());
        archive_done(work, ArchiveState::Delivered, &meta, raw, held_search, rule, payload, memory).await;
        return Ok(Finished::Removed);
    }
    let next = statuses
        .iter()
        .filter(|s| s.state == DestState::Pending)
        .map(|s| s.next_attempt.as_deref().and_then(parse_time).unwrap_or(now))
        .min();
    if let Some(next) = next {
        meta.next_attempt = Some(format_time(next));
        spool.transition(id, at, State::Deferred, Some(&meta)).await?;
        return Ok(Finished::Deferred(next));
    }
    let dead: BTreeMap<&String, &DestStatus> =
        decision.destinations.iter().filter(|(_, s)| s.state == DestState::Dead).collect();
    meta.dead_reason = Some(
        dead.iter()
            .map(|(n, s)| format!("{n}: {}", s.last_error.as_deref().unwrap_or("failed")))
            .collect::<Vec<_>>()
            .join("; "),
    );
    meta.next_attempt = None;
    spool.transition(id, at, State::Dead, Some(&meta)).await?;
    let raw = raw_for_archive(work, id, held_raw, held_search.is_some()).await;
    let (rule, payload) = match &meta.decision {
        Some(d) => (d.rule.clone(), Some(d.payload.as_str().to_string())),
        None => (None, None),
    };
    archive_done(work, ArchiveState::Dead, &meta, raw, held_search, rule, payload, memory).await;
    Ok(Finished::Dead)
}

/// The raw message for the archive (read again unless this round holds it, or the spool keeps
/// it and the round has read what the archive indexes: then empty); `None` when the archive is
/// off, or the message cannot be read (then it is not archived, and says so).
async fn raw_for_archive(work: &Work, id: &str, held: Option<Vec<u8>>, searched: bool) -> Option<Vec<u8>> {
    work.archive.as_ref()?;
    if held.is_some() {
        return held;
    }
    if searched && work.spool.keeps_raw() {
        return Some(Vec::new());
    }
    let (spool, raw_id) = (work.spool.clone(), id.to_string());
    match tokio::task::spawn_blocking(move || spool.read_raw(&raw_id)).await {
        Ok(Ok(raw)) => Some(raw),
        Ok(Err(e)) => {
            warn!(id, error = %e, "cannot read the message for the archive; it is not archived");
            None
        }
        Err(e) => {
            warn!(id, error = %e, "cannot read the message for the archive; it is not archived");
            None
        }
    }
}

/// Hands a finished message to the archive (after the spool has recorded its end), with the
/// share of the memory budget its raw bytes hold until they are written.
#[allow(clippy::too_many_arguments)]
async fn archive_done(
    work: &Work,
    state: ArchiveState,
    meta: &Meta,
    raw: Option<Vec<u8>>,
    search: Option<Searchable>,
    rule: Option<String>,
    payload: Option<String>,
    memory: Option<OwnedSemaphorePermit>,
) {
    let (Some(archive), Some(raw)) = (&work.archive, raw) else { return };
    let destinations = meta.decision.as_ref().map(|d| d.destinations.keys().cloned().collect()).unwrap_or_default();
    // The spool keeps the raw message for the archive: the entry refers to it, and holds the
    // bytes ([`raw_for_archive`]) only when the archive's writer must read them for its search
    // text. The budget share stands for bytes held: none held, none kept.
    let raw_kept = work.spool.keeps_raw().then_some(meta.size);
    let memory = if raw.is_empty() { None } else { memory };
    archive
        .finished(Archived {
            state,
            envelope: meta.envelope.clone(),
            raw,
            raw_kept,
            search,
            rule,
            payload,
            destinations,
            reason: meta.dead_reason.clone(),
            at: SystemTime::now(),
            memory,
        })
        .await;
}

fn attempt_record(id: &str, destination: String, outcome: &str, trace: (SystemTime, Duration, Reply)) -> AttemptRecord {
    let (started, took, reply) = trace;
    AttemptRecord {
        message_id: id.to_string(),
        at: format_time(started),
        destination,
        outcome: outcome.to_string(),
        status: reply.status,
        reply: reply.reply,
        body: reply.body,
        duration_ms: took.as_millis() as u64,
    }
}

/// `payload` with the message's `id` added when it has none (a `[rule.payload]` without one):
/// a receiver can always tell a resend from a new message. The payload itself when it has
/// one, or is nested too deep to be read back (it is then sent without one, whole).
fn with_id<'p>(payload: &'p Payload, id: &str) -> Cow<'p, Payload> {
    if payload.has_key("id") {
        return Cow::Borrowed(payload);
    }
    let Some(mut map) = payload.to_map() else { return Cow::Borrowed(payload) };
    map.insert("id".into(), Json::String(id.to_string()));
    Cow::Owned(Payload::of(&map))
}

/// The largest `max_body` among the destinations of a decision.
fn to_limit(destinations: &BTreeMap<String, DestStatus>, targets: &HashMap<String, Arc<PacedDestination>>) -> usize {
    destinations.keys().filter_map(|d| targets.get(d)).map(|t| t.max_body).max().unwrap_or(usize::MAX)
}

/// One attempt to one destination: shrink, wait for a permit and a token, send.
async fn send(target: &PacedDestination, id: &str, payload: &Payload, metrics: &Metrics) -> (Attempt, Reply) {
    let no_answer = |reason: String| Reply { reply: Some(reason), ..Reply::default() };
    let body = match shrink::encode(payload, target.max_body) {
        Ok(b) => b,
        Err(e) => {
            let reason = e.to_string();
            return (Attempt::Fail { reason: reason.clone() }, no_answer(reason));
        }
    };
    let Ok(_permit) = target.permits.acquire().await else {
        return (Attempt::Retry { after: None, reason: "shutting down".into() }, no_answer("shutting down".into()));
    };
    target.bucket.acquire().await;
    debug!(id, destination = %target.name, bytes = body.len(), "sending");
    // The destination's own timeout applies; this one only guards against a hang past it.
    let guard = target.timeout + Duration::from_secs(30);
    let started = Instant::now();
    let (attempt, reply) = match tokio::time::timeout(guard, target.destination.send_traced(id, &body)).await {
        Ok(a) => a,
        Err(_) => {
            let reason = format!("no answer within {}", humantime::format_duration(guard));
            (Attempt::Retry { after: None, reason: reason.clone() }, no_answer(reason))
        }
    };
    metrics.delivery_time(&target.name, started.elapsed());
    let pause = match &attempt {
        Attempt::Retry { after: Some(after), .. } => Some(*after),
        // In a cluster a 429 without a delay still stops every instance, for the first backoff:
        // the others would otherwise go on hitting the limit their peer was told about.
        Attempt::Retry { after: None, .. } if reply.status == Some(429) && target.bucket.is_shared() => {
            Some(target.backoff.initial)
        }
        _ => None,
    };
    if let Some(pause) = pause {
        // The receiver asked everyone to slow down: pause the whole destination.
        target.bucket.pause(pause).await;
    }
    (attempt, reply)
}

/// What judging a stored message again with the current rules did (`replay`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Replayed {
    /// Queued for delivery now to `to`.
    Queued { rule: Option<String>, to: Vec<String> },
    /// Still a dead letter, for this reason.
    StillDead(String),
    /// A rule drops it: removed from the spool.
    Dropped(Option<String>),
}

/// Judges `raw` again with `rules`: the new decision replaces the old one in `meta` (every
/// destination pending again). Returns where the message goes (`None`: removed) and what
/// happened.
pub fn rejudge(rules: &RuleSet, raw: &[u8], meta: &mut Meta) -> (Option<State>, Replayed) {
    let outcome = rules.evaluate(&parse(raw), &meta.envelope);
    meta.next_attempt = None;
    meta.last_error = None;
    match outcome.action {
        Action::Deliver { to } => {
            meta.dead_reason = None;
            meta.dead_rule = None;
            meta.decision = Some(Decision {
                rule: outcome.rule.clone(),
                decided_at: format_time(SystemTime::now()),
                payload: outcome.payload,
                destinations: to.iter().map(|d| (d.clone(), DestStatus::pending())).collect(),
            });
            (Some(State::Deferred), Replayed::Queued { rule: outcome.rule, to })
        }
        Action::Dead { reason } => {
            meta.decision = None;
            meta.dead_reason = Some(reason.clone());
            meta.dead_rule = outcome.rule;
            (Some(State::Dead), Replayed::StillDead(reason))
        }
        Action::Drop => (None, Replayed::Dropped(outcome.rule)),
    }
}

/// `replay` of one spooled message (not one being delivered right now).
pub fn replay(spool: &Spool, rules: &RuleSet, id: &str) -> Result<Replayed, crate::spool::actions::ActionError> {
    let (state, mut meta) = crate::spool::actions::locate(spool, id)?;
    let raw = spool.read_raw(id)?;
    let (to, replayed) = rejudge(rules, &raw, &mut meta);
    match to {
        Some(to) => spool.transition_blocking(id, state, to, Some(&meta))?,
        None => spool.remove_blocking(id, state)?,
    }
    Ok(replayed)
}

/// The rate a destination is paced at: its own `rate`, else `[delivery] rate` (Kustomer's
/// 1,000 a minute by default) — except a `file`, which needs no pacing and is unpaced unless
/// it sets a `rate` of its own.
fn pace(d: &DestinationConfig, delivery: &DeliveryConfig) -> Rate {
    match d.pacing().rate {
        Some(rate) => rate,
        None if matches!(d, DestinationConfig::File(_)) => Rate::unlimited(),
        None => delivery.rate,
    }
}

fn round_secs(d: Duration) -> Duration {
    Duration::from_secs(d.as_secs().max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_destinations_are_unpaced_and_hooks_keep_kustomers_rate() {
        let text = "[destination.out]\ntype = \"file\"\npath = \"out.jsonl\"\n\
                    [destination.paced]\ntype = \"file\"\npath = \"p.jsonl\"\nrate = \"5/s\"\n\
                    [destination.hook]\ntype = \"kustomer-form-hook\"\nurl = \"https://x.example/v1/hooks/form/o/h\"\n";
        let config = Config::parse(text, std::path::Path::new("t.toml"), std::path::Path::new("."), &|_| None).unwrap();
        let rate = |name: &str| pace(&config.destination[name], &config.delivery).per_second();
        assert_eq!(rate("out"), None);
        assert_eq!(rate("paced"), Some(5.0));
        assert_eq!(rate("hook"), Some(1000.0 / 60.0));
    }

    #[tokio::test]
    async fn judging_a_big_message_takes_its_peak_then_keeps_its_size() {
        const MB: u32 = 1024;
        // The peak of rules that extract nothing from the body (`RuleSet::judge_peak`).
        const JUDGE_PEAK: u64 = 4;
        let budget = MemoryBudget::new(256);
        let size = 25 << 20;
        let mut first = budget.acquire(size, JUDGE_PEAK).await;
        assert_eq!(
            first.as_ref().map(|p| p.num_permits()),
            Some(101 * MB as usize),
            "4 × 25 MB, and 1 MB for the rest"
        );
        let mut second = budget.acquire(size, JUDGE_PEAK).await;
        // A third waits while two are judged: it would not fit.
        assert!(budget.kib.clone().try_acquire_many_owned(budget.share(size, JUDGE_PEAK, JUDGE_OVERHEAD_KIB)).is_err());
        budget.settle(&mut first, size);
        budget.settle(&mut second, size);
        assert_eq!(
            first.as_ref().map(|p| p.num_permits()),
            Some(25 * MB as usize),
            "the raw bytes kept for the archive"
        );
        assert_eq!(budget.kib.available_permits(), (256 - 2 * 25) * MB as usize);
        let third = budget.kib.clone().try_acquire_many_owned(budget.share(size, JUDGE_PEAK, JUDGE_OVERHEAD_KIB));
        assert!(third.is_ok(), "judged: the next one is admitted");
        drop((first, second, third));
        assert_eq!(budget.kib.available_permits(), 256 * MB as usize);
        // Judging small mail takes about a megabyte, but its raw bytes kept for the archive only
        // their size: thousands can wait for the archive's writer.
        let mut small = budget.acquire(2048, JUDGE_PEAK).await;
        assert_eq!(small.as_ref().map(|p| p.num_permits()), Some(8 + MB as usize));
        budget.settle(&mut small, 2048);
        assert_eq!(small.as_ref().map(|p| p.num_permits()), Some(2));
        // A message larger than the budget takes all of it, alone.
        assert_eq!(budget.share(100 << 20, JUDGE_PEAK, JUDGE_OVERHEAD_KIB), 256 * MB);
        let serve = MemoryBudget::new(MEMORY_BUDGET_MB);
        assert_eq!(
            serve.share(size, JUDGE_PEAK, JUDGE_OVERHEAD_KIB),
            MEMORY_BUDGET_MB * MB,
            "serve judges one 25 MB message at a time"
        );
    }

    #[test]
    fn a_payload_without_an_id_is_sent_with_the_message_id() {
        let custom = Payload::of(&serde_json::json!({"ticket": "T-1", "fields": {"id": 7}}));
        let sent = with_id(&custom, "01MSG");
        assert_eq!(sent.as_str(), r#"{"ticket":"T-1","fields":{"id":7},"id":"01MSG"}"#);
        for kept in [r#"{"id":"own","x":1}"#, r#"{"x":1,"id":null}"#] {
            let payload: Payload = serde_json::from_str(kept).unwrap();
            assert_eq!(with_id(&payload, "01MSG").as_str(), kept, "an id of its own is kept");
        }
        // Nested deeper than the JSON reader goes: sent as it is, never cut down to an id.
        let mut deep = serde_json::json!("bottom");
        for _ in 0..200 {
            deep = serde_json::json!({ "a": deep });
        }
        let deep = Payload::of(&deep);
        assert_eq!(with_id(&deep, "01MSG").as_str(), deep.as_str());
    }
}
