//! metrics: what `serve` counts and how healthy each part is, read by the admin endpoint
//! (`/metrics`, `/healthz`). Parts of `serve` write to it; nothing reads it back to decide.
//!
//! Counters are plain atomics or small mutex-guarded lists keyed by their label values (a few
//! dozen rules and destinations at most: a linear search allocates nothing on the hot path).
//! [`Metrics::render`] writes them in the Prometheus text exposition format (version 0.0.4),
//! every name prefixed `mailhook_`.
//!
//! | series | type | labels |
//! |---|---|---|
//! | `mailhook_messages_received_total` | counter | `source` (`smtp`, `lmtp`, `stdin`, `imap`) |
//! | `mailhook_rule_matches_total` | counter | `rule` |
//! | `mailhook_unmatched_total` | counter | |
//! | `mailhook_extraction_failures_total` | counter | `rule` |
//! | `mailhook_deliveries_total` | counter | `destination`, `outcome` (`delivered`, `deferred`, `dead`) |
//! | `mailhook_delivery_duration_seconds` | histogram | `destination` |
//! | `mailhook_incoming_messages` | gauge | |
//! | `mailhook_deferred_messages` | gauge | |
//! | `mailhook_deferred_oldest_age_seconds` | gauge | |
//! | `mailhook_dead_letters` | gauge | |
//! | `mailhook_connections_total` | counter | `protocol` |
//! | `mailhook_rejections_total` | counter | `protocol`, `reason` |
//! | `mailhook_listener_up` | gauge | `protocol`, `addr` |
//! | `mailhook_imap_connected` | gauge | `account`, `folder` |
//! | `mailhook_imap_seconds_since_sync` | gauge | `account`, `folder` |
//! | `mailhook_imap_reconnects_total` | counter | `account`, `folder` |
//! | `mailhook_imap_fetched_total` | counter | `account`, `folder` |
//! | `mailhook_rules_reloads_total` | counter | `result` (`ok`, `error`) |
//! | `mailhook_rules` | gauge | |
//! | `mailhook_trial_diff_total` | counter | `kind` (`changed_rule`, `newly_matched`, `newly_unmatched`, `newly_dead`, `changed_fields`) |
//! | `mailhook_rule_field_fill_ratio` | gauge | `rule`, `field` |
//! | `mailhook_drift_active` | gauge | `rule`, `field` |
//! | `mailhook_drift_tracked` | gauge | |
//! | `mailhook_drift_dropped_total` | counter | |

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

/// Health of one watched IMAP folder, written by its watcher.
#[derive(Debug)]
pub struct FolderHealth {
    pub account: String,
    pub folder: String,
    /// How often the folder is synced at the latest (its `poll` interval, or the IDLE re-issue
    /// period); `/healthz` calls it stale after twice this long without a sync.
    pub interval: Duration,
    connected: AtomicBool,
    reconnects: AtomicU64,
    fetched: AtomicU64,
    last_sync: Mutex<Option<SystemTime>>,
    last_error: Mutex<Option<String>>,
    /// When the watcher registered it: a folder never synced is judged from here.
    since: SystemTime,
}

/// A copy of a folder's health at one moment.
#[derive(Debug, Clone)]
pub struct FolderStatus {
    pub account: String,
    pub folder: String,
    pub interval: Duration,
    pub connected: bool,
    pub reconnects: u64,
    pub fetched: u64,
    pub last_sync: Option<SystemTime>,
    pub last_error: Option<String>,
    /// When the folder was registered (its watcher started).
    pub since: SystemTime,
}

impl FolderStatus {
    /// How long since the last sync (or, never synced, since the watcher started).
    pub fn since_sync(&self, now: SystemTime) -> Duration {
        now.duration_since(self.last_sync.unwrap_or(self.since)).unwrap_or_default()
    }

    /// What is wrong with the folder, if anything: its connection failed and is not back yet,
    /// or no sync within twice its interval.
    pub fn problem(&self, now: SystemTime) -> Option<String> {
        if !self.connected
            && let Some(e) = &self.last_error
        {
            return Some(format!("imap {}/{}: not connected: {e}", self.account, self.folder));
        }
        let ago = self.since_sync(now);
        let limit = self.interval * 2;
        if ago <= limit {
            return None;
        }
        let what = match self.last_sync {
            Some(_) => format!("last sync {}s ago", ago.as_secs()),
            None => format!("no sync in the {}s since start", ago.as_secs()),
        };
        let mut p = format!("imap {}/{}: {what} (limit {}s)", self.account, self.folder, limit.as_secs());
        if let Some(e) = &self.last_error {
            p.push_str(": ");
            p.push_str(e);
        }
        Some(p)
    }
}

impl FolderHealth {
    pub fn new(account: &str, folder: &str, interval: Duration) -> FolderHealth {
        FolderHealth {
            account: account.to_string(),
            folder: folder.to_string(),
            interval,
            connected: AtomicBool::new(false),
            reconnects: AtomicU64::new(0),
            fetched: AtomicU64::new(0),
            last_sync: Mutex::new(None),
            last_error: Mutex::new(None),
            since: SystemTime::now(),
        }
    }

    /// The connection is up (logged in, folder selected) or down.
    pub fn set_connected(&self, up: bool) {
        self.connected.store(up, Ordering::Relaxed);
    }

    /// A sync finished: everything the server had was spooled. Clears the last error.
    pub fn synced(&self) {
        *self.last_sync.lock().unwrap_or_else(|e| e.into_inner()) = Some(SystemTime::now());
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// The connection failed with `error` (already free of secrets).
    pub fn failed(&self, error: &str) {
        self.set_connected(false);
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(error.to_string());
    }

    /// A new connection is being made after a failure.
    pub fn reconnecting(&self) {
        self.reconnects.fetch_add(1, Ordering::Relaxed);
    }

    /// `n` messages were fetched and spooled.
    pub fn fetched(&self, n: u64) {
        self.fetched.fetch_add(n, Ordering::Relaxed);
    }

    pub fn status(&self) -> FolderStatus {
        FolderStatus {
            account: self.account.clone(),
            folder: self.folder.clone(),
            interval: self.interval,
            connected: self.connected.load(Ordering::Relaxed),
            reconnects: self.reconnects.load(Ordering::Relaxed),
            fetched: self.fetched.load(Ordering::Relaxed),
            last_sync: *self.last_sync.lock().unwrap_or_else(|e| e.into_inner()),
            last_error: self.last_error.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            since: self.since,
        }
    }
}

/// Health of one bound SMTP/LMTP listener address, written by its accept loop.
#[derive(Debug)]
pub struct ListenerHealth {
    pub protocol: &'static str,
    pub addr: String,
    up: AtomicBool,
    /// The last accept(2) failure (out of file descriptors and the like), with its time.
    accept_error: Mutex<Option<(SystemTime, String)>>,
}

/// A copy of a listener's health at one moment.
#[derive(Debug, Clone)]
pub struct ListenerStatus {
    pub protocol: &'static str,
    pub addr: String,
    pub up: bool,
    pub accept_error: Option<(SystemTime, String)>,
}

/// An accept failure counts as a problem for this long.
const ACCEPT_ERROR_WINDOW: Duration = Duration::from_secs(30);

impl ListenerHealth {
    /// The accept loop runs (or has stopped).
    pub fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::Relaxed);
    }

    /// accept(2) failed with `error`.
    pub fn accept_failed(&self, error: &str) {
        *self.accept_error.lock().unwrap_or_else(|e| e.into_inner()) = Some((SystemTime::now(), error.to_string()));
    }

    pub fn status(&self) -> ListenerStatus {
        ListenerStatus {
            protocol: self.protocol,
            addr: self.addr.clone(),
            up: self.up.load(Ordering::Relaxed),
            accept_error: self.accept_error.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        }
    }
}

impl ListenerStatus {
    /// What is wrong with the listener, if anything: not accepting, or accept failing lately.
    pub fn problem(&self, now: SystemTime) -> Option<String> {
        if !self.up {
            return Some(format!("{} {}: not accepting connections", self.protocol, self.addr));
        }
        match &self.accept_error {
            Some((at, e)) if now.duration_since(*at).unwrap_or_default() < ACCEPT_ERROR_WINDOW => Some(format!(
                "{} {}: accept failed {}s ago: {e}",
                self.protocol,
                self.addr,
                now.duration_since(*at).unwrap_or_default().as_secs()
            )),
            _ => None,
        }
    }
}

/// How one delivery attempt to one destination ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    Delivered,
    /// To be tried again later.
    Deferred,
    /// Given up for good.
    Dead,
}

impl Delivery {
    pub fn label(self) -> &'static str {
        match self {
            Delivery::Delivered => "delivered",
            Delivery::Deferred => "deferred",
            Delivery::Dead => "dead",
        }
    }
}

/// What the spool holds, counted when `/metrics` is read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpoolGauges {
    /// Accepted, not yet judged and sent a first time.
    pub incoming: u64,
    /// Waiting for a retry (the retry queue).
    pub deferred: u64,
    /// Age, since it was received, of the oldest message waiting for a retry.
    pub oldest_deferred_age: Option<Duration>,
    pub dead: u64,
}

/// What the drift tracker (`lifecycle::drift`) reports, read each time `/metrics` or
/// `/healthz` is asked.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DriftGauges {
    /// (rule, field, share of the rule's matches in the current windows that had it filled).
    pub fill: Vec<(String, String, f64)>,
    /// (rule, field, senders whose mail drifted); 0 once resolved.
    pub active: Vec<(String, String, u64)>,
    /// One line per active drift, for `/healthz`.
    pub warnings: Vec<String>,
    /// Rule and sender pairs tracked now.
    pub tracked: u64,
    /// Pairs let go to stay within the cap.
    pub dropped: u64,
}

/// Where [`DriftGauges`] come from (set once by `serve`).
#[derive(Default)]
struct DriftSource(Mutex<Option<Arc<dyn Fn() -> DriftGauges + Send + Sync>>>);

impl std::fmt::Debug for DriftSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DriftSource")
    }
}

/// Counters of one metric, one per combination of `N` label values.
#[derive(Debug)]
struct Family<const N: usize> {
    entries: Mutex<Vec<([String; N], u64)>>,
}

impl<const N: usize> Default for Family<N> {
    fn default() -> Self {
        Family { entries: Mutex::new(Vec::new()) }
    }
}

impl<const N: usize> Family<N> {
    fn add(&self, labels: [&str; N], n: u64) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        match entries.iter_mut().find(|(l, _)| l.iter().zip(labels).all(|(a, b)| a == b)) {
            Some((_, v)) => *v += n,
            None => entries.push((labels.map(str::to_string), n)),
        }
    }

    fn inc(&self, labels: [&str; N]) {
        self.add(labels, 1);
    }

    /// Makes the series exist (at 0) so that it is exported before its first event.
    fn declare(&self, labels: [&str; N]) {
        self.add(labels, 0);
    }

    fn snapshot(&self) -> Vec<([String; N], u64)> {
        let mut v = self.entries.lock().unwrap_or_else(|e| e.into_inner()).clone();
        v.sort();
        v
    }
}

/// Upper bounds of the delivery latency histogram's buckets, in seconds (`+Inf` is implied).
pub const LATENCY_BUCKETS: [f64; 13] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

#[derive(Debug, Clone, Default)]
struct Histogram {
    /// Observations per bucket (not cumulative); the last one is `+Inf`.
    buckets: [u64; LATENCY_BUCKETS.len() + 1],
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, v: f64) {
        let i = LATENCY_BUCKETS.iter().position(|b| v <= *b).unwrap_or(LATENCY_BUCKETS.len());
        self.buckets[i] += 1;
        self.sum += v;
        self.count += 1;
    }
}

/// Everything `serve` counts, shared by all its parts.
#[derive(Debug, Default)]
pub struct Metrics {
    folders: Mutex<Vec<Arc<FolderHealth>>>,
    listeners: Mutex<Vec<Arc<ListenerHealth>>>,
    received: Family<1>,
    rule_matches: Family<1>,
    unmatched: AtomicU64,
    extraction_failures: Family<1>,
    deliveries: Family<2>,
    delivery_seconds: Mutex<Vec<(String, Histogram)>>,
    connections: Family<1>,
    rejections: Family<2>,
    reloads: Family<1>,
    rules: AtomicU64,
    spool: Mutex<Option<SpoolGauges>>,
    trial_diffs: Family<1>,
    drift: DriftSource,
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let m = Metrics::default();
        for source in ["smtp", "lmtp", "stdin", "imap"] {
            m.received.declare([source]);
        }
        for result in ["ok", "error"] {
            m.reloads.declare([result]);
        }
        Arc::new(m)
    }

    /// Registers a watched folder; its watcher keeps the returned handle.
    pub fn folder(&self, account: &str, folder: &str, interval: Duration) -> Arc<FolderHealth> {
        let health = Arc::new(FolderHealth::new(account, folder, interval));
        self.folders.lock().unwrap_or_else(|e| e.into_inner()).push(health.clone());
        health
    }

    /// The health of every watched folder, in registration order.
    pub fn folders(&self) -> Vec<FolderStatus> {
        self.folders.lock().unwrap_or_else(|e| e.into_inner()).iter().map(|f| f.status()).collect()
    }

    /// Registers a bound listener address (down until its accept loop runs); its accept loop
    /// keeps the returned handle.
    pub fn listener(&self, protocol: &'static str, addr: &str) -> Arc<ListenerHealth> {
        let health = Arc::new(ListenerHealth {
            protocol,
            addr: addr.to_string(),
            up: AtomicBool::new(false),
            accept_error: Mutex::new(None),
        });
        self.listeners.lock().unwrap_or_else(|e| e.into_inner()).push(health.clone());
        self.connections.declare([protocol]);
        health
    }

    /// The health of every listener address, in registration order.
    pub fn listeners(&self) -> Vec<ListenerStatus> {
        self.listeners.lock().unwrap_or_else(|e| e.into_inner()).iter().map(|l| l.status()).collect()
    }

    /// A message is judged for the first time; `source` is its protocol (`smtp`, `lmtp`,
    /// `stdin`, `imap`).
    pub fn received(&self, source: &str) {
        self.received.inc([source]);
    }

    pub fn rule_matched(&self, rule: &str) {
        self.rule_matches.inc([rule]);
    }

    /// No rule matched a message.
    pub fn unmatched(&self) {
        self.unmatched.fetch_add(1, Ordering::Relaxed);
    }

    /// A rule matched but its message became a dead letter (a required field missing, a
    /// template failing).
    pub fn extraction_failed(&self, rule: &str) {
        self.extraction_failures.inc([rule]);
    }

    /// The rules now loaded: their count, and a (zero) match series for each.
    pub fn rules_loaded<'a>(&self, names: impl IntoIterator<Item = &'a str>) {
        let mut n = 0;
        for name in names {
            self.rule_matches.declare([name]);
            self.extraction_failures.declare([name]);
            n += 1;
        }
        self.rules.store(n, Ordering::Relaxed);
    }

    /// A reload of the rules was tried: `ok` when the new set replaced the old one.
    pub fn reloaded(&self, ok: bool) {
        self.reloads.inc([if ok { "ok" } else { "error" }]);
    }

    /// Makes a destination's series exist before its first delivery.
    pub fn destination(&self, name: &str) {
        for outcome in [Delivery::Delivered, Delivery::Deferred, Delivery::Dead] {
            self.deliveries.declare([name, outcome.label()]);
        }
        let mut h = self.delivery_seconds.lock().unwrap_or_else(|e| e.into_inner());
        if !h.iter().any(|(d, _)| d == name) {
            h.push((name.to_string(), Histogram::default()));
        }
    }

    /// One delivery attempt to `destination` ended with `outcome`.
    pub fn delivered(&self, destination: &str, outcome: Delivery) {
        self.deliveries.inc([destination, outcome.label()]);
    }

    /// One attempt to `destination` took `took` (sending and the answer; no queueing).
    pub fn delivery_time(&self, destination: &str, took: Duration) {
        let mut h = self.delivery_seconds.lock().unwrap_or_else(|e| e.into_inner());
        match h.iter_mut().find(|(d, _)| d == destination) {
            Some((_, hist)) => hist.observe(took.as_secs_f64()),
            None => {
                let mut hist = Histogram::default();
                hist.observe(took.as_secs_f64());
                h.push((destination.to_string(), hist));
            }
        }
    }

    /// A client connected to a listener of `protocol` (`smtp`, `lmtp`).
    pub fn connection(&self, protocol: &str) {
        self.connections.inc([protocol]);
    }

    /// A listener of `protocol` refused something, for `reason` (a short snake_case word).
    pub fn rejected(&self, protocol: &str, reason: &str) {
        self.rejections.inc([protocol, reason]);
    }

    /// What the spool holds now (set by whoever counted it, just before [`render`](Self::render)).
    pub fn set_spool(&self, gauges: SpoolGauges) {
        *self.spool.lock().unwrap_or_else(|e| e.into_inner()) = Some(gauges);
    }

    /// The trial rules disagreed with the live rules `n` times in `kind` (0 makes the series exist).
    pub fn trial_diff(&self, kind: &str, n: u64) {
        self.trial_diffs.add([kind], n);
    }

    /// Where the drift gauges are read from.
    pub fn set_drift_source(&self, source: impl Fn() -> DriftGauges + Send + Sync + 'static) {
        *self.drift.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(source));
    }

    /// The drift gauges now, when drift alarms are on.
    pub fn drift(&self) -> Option<DriftGauges> {
        let source = self.drift.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
        source.map(|f| f())
    }

    /// What `/healthz` lists under `warnings` (it stays 200 for them): the active drifts.
    pub fn warnings(&self) -> Vec<String> {
        self.drift().map(|d| d.warnings).unwrap_or_default()
    }

    /// Everything, in the Prometheus text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        let mut out = Exposition::default();
        let now = SystemTime::now();

        out.family1(
            "mailhook_messages_received_total",
            "counter",
            "Messages judged for the first time, by the protocol they came in by.",
            "source",
            &self.received,
        );
        out.family1(
            "mailhook_rule_matches_total",
            "counter",
            "Messages a rule matched, by rule.",
            "rule",
            &self.rule_matches,
        );
        out.head("mailhook_unmatched_total", "counter", "Messages no rule matched.");
        out.sample("mailhook_unmatched_total", &[], self.unmatched.load(Ordering::Relaxed));
        out.family1(
            "mailhook_extraction_failures_total",
            "counter",
            "Messages a rule matched that became dead letters (a required field missing, a template failing), by rule.",
            "rule",
            &self.extraction_failures,
        );
        out.family2(
            "mailhook_deliveries_total",
            "counter",
            "Delivery attempts, by destination and outcome (delivered, deferred, dead).",
            ["destination", "outcome"],
            &self.deliveries,
        );

        let name = "mailhook_delivery_duration_seconds";
        out.head(name, "histogram", "Time of one delivery attempt (request and answer), by destination.");
        let mut hists = self.delivery_seconds.lock().unwrap_or_else(|e| e.into_inner()).clone();
        hists.sort_by(|a, b| a.0.cmp(&b.0));
        for (dest, h) in &hists {
            let mut cumulative = 0;
            for (i, count) in h.buckets.iter().enumerate() {
                cumulative += count;
                let le = LATENCY_BUCKETS.get(i).map_or("+Inf".to_string(), |b| float(*b));
                out.sample(&format!("{name}_bucket"), &[("destination", dest), ("le", &le)], cumulative);
            }
            out.sample(&format!("{name}_sum"), &[("destination", dest)], float(h.sum));
            out.sample(&format!("{name}_count"), &[("destination", dest)], h.count);
        }

        if let Some(spool) = *self.spool.lock().unwrap_or_else(|e| e.into_inner()) {
            out.head("mailhook_incoming_messages", "gauge", "Messages accepted and not yet sent a first time.");
            out.sample("mailhook_incoming_messages", &[], spool.incoming);
            out.head("mailhook_deferred_messages", "gauge", "Messages waiting for a retry (the retry queue).");
            out.sample("mailhook_deferred_messages", &[], spool.deferred);
            out.head(
                "mailhook_deferred_oldest_age_seconds",
                "gauge",
                "Age since reception of the oldest message waiting for a retry (0 when none).",
            );
            let age = spool.oldest_deferred_age.unwrap_or_default().as_secs_f64();
            out.sample("mailhook_deferred_oldest_age_seconds", &[], float(age.floor()));
            out.head("mailhook_dead_letters", "gauge", "Messages in dead/ (kept for retry or replay).");
            out.sample("mailhook_dead_letters", &[], spool.dead);
        }

        out.family1(
            "mailhook_connections_total",
            "counter",
            "Connections accepted by the SMTP/LMTP listeners, by protocol.",
            "protocol",
            &self.connections,
        );
        out.family2(
            "mailhook_rejections_total",
            "counter",
            "Connections, commands and messages the SMTP/LMTP listeners refused, by protocol and reason.",
            ["protocol", "reason"],
            &self.rejections,
        );
        let listeners = self.listeners();
        out.head("mailhook_listener_up", "gauge", "1 while a listener address accepts connections.");
        for l in &listeners {
            out.sample("mailhook_listener_up", &[("protocol", l.protocol), ("addr", &l.addr)], u64::from(l.up));
        }

        let folders = self.folders();
        let label = |f: &FolderStatus| [("account", f.account.clone()), ("folder", f.folder.clone())];
        out.head("mailhook_imap_connected", "gauge", "1 while the folder's IMAP connection is up.");
        for f in &folders {
            out.sample_owned("mailhook_imap_connected", &label(f), u64::from(f.connected));
        }
        out.head(
            "mailhook_imap_seconds_since_sync",
            "gauge",
            "Seconds since the folder's last successful sync (since its watcher started when never synced).",
        );
        for f in &folders {
            out.sample_owned("mailhook_imap_seconds_since_sync", &label(f), f.since_sync(now).as_secs());
        }
        out.head("mailhook_imap_reconnects_total", "counter", "Reconnections to the folder after a failure.");
        for f in &folders {
            out.sample_owned("mailhook_imap_reconnects_total", &label(f), f.reconnects);
        }
        out.head("mailhook_imap_fetched_total", "counter", "Messages fetched from the folder and spooled.");
        for f in &folders {
            out.sample_owned("mailhook_imap_fetched_total", &label(f), f.fetched);
        }

        out.family1(
            "mailhook_rules_reloads_total",
            "counter",
            "Reloads of the rules directory, by result (ok: the new set serves; error: the old set kept).",
            "result",
            &self.reloads,
        );
        out.head("mailhook_rules", "gauge", "Rules in the set now serving.");
        out.sample("mailhook_rules", &[], self.rules.load(Ordering::Relaxed));

        if !self.trial_diffs.snapshot().is_empty() {
            out.family1(
                "mailhook_trial_diff_total",
                "counter",
                "New messages the trial rules judged differently from the live rules, by kind.",
                "kind",
                &self.trial_diffs,
            );
        }
        if let Some(d) = self.drift() {
            let name = "mailhook_rule_field_fill_ratio";
            out.head(
                name,
                "gauge",
                "Share of a rule's recent matches (the current drift windows) that had the field filled.",
            );
            for (rule, field, ratio) in &d.fill {
                out.sample(name, &[("rule", rule), ("field", field)], float(*ratio));
            }
            let name = "mailhook_drift_active";
            out.head(name, "gauge", "Senders whose mail no longer fits the rule, by rule and field (0 once resolved).");
            for (rule, field, n) in &d.active {
                out.sample(name, &[("rule", rule), ("field", field)], n);
            }
            out.head("mailhook_drift_tracked", "gauge", "Rule and sender pairs the drift alarms track.");
            out.sample("mailhook_drift_tracked", &[], d.tracked);
            out.head(
                "mailhook_drift_dropped_total",
                "counter",
                "Rule and sender pairs let go to stay within [drift] max_tracked.",
            );
            out.sample("mailhook_drift_dropped_total", &[], d.dropped);
        }
        out.text
    }
}

/// A number as the text format writes it.
fn float(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf".into() } else { "-Inf".into() }
    } else {
        format!("{v}")
    }
}

/// The text being written.
#[derive(Default)]
struct Exposition {
    text: String,
}

impl Exposition {
    fn head(&mut self, name: &str, kind: &str, help: &str) {
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.text, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.text.push_str(name);
        if !labels.is_empty() {
            self.text.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.text.push(',');
                }
                let _ = write!(self.text, "{k}=\"{}\"", escape_label(v));
            }
            self.text.push('}');
        }
        let _ = writeln!(self.text, " {value}");
    }

    fn sample_owned(&mut self, name: &str, labels: &[(&str, String)], value: impl std::fmt::Display) {
        let borrowed: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
        self.sample(name, &borrowed, value);
    }

    fn family1(&mut self, name: &str, kind: &str, help: &str, label: &str, family: &Family<1>) {
        self.head(name, kind, help);
        for ([value], n) in family.snapshot() {
            self.sample(name, &[(label, &value)], n);
        }
    }

    fn family2(&mut self, name: &str, kind: &str, help: &str, labels: [&str; 2], family: &Family<2>) {
        self.head(name, kind, help);
        for ([a, b], n) in family.snapshot() {
            self.sample(name, &[(labels[0], &a), (labels[1], &b)], n);
        }
    }
}

/// A label value as the text format wants it: backslash, double quote and newline escaped.
pub fn escape_label(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> prometheus_parse::Scrape {
        prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("valid exposition")
    }

    fn value(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        scrape.samples.iter().find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v))).map(
            |s| match &s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => *v,
                other => panic!("{name}: unexpected {other:?}"),
            },
        )
    }

    #[test]
    fn counters_render_with_their_labels() {
        let m = Metrics::new();
        m.received("smtp");
        m.received("smtp");
        m.received("stdin");
        m.rules_loaded(["ups", "nagios"]);
        m.rule_matched("ups");
        m.unmatched();
        m.extraction_failed("ups");
        m.destination("orders");
        m.delivered("orders", Delivery::Delivered);
        m.delivered("orders", Delivery::Deferred);
        m.connection("smtp");
        m.rejected("smtp", "unknown_recipient");
        m.reloaded(false);
        let text = m.render();
        let s = parse(&text);
        assert_eq!(value(&s, "mailhook_messages_received_total", &[("source", "smtp")]), Some(2.0), "{text}");
        assert_eq!(value(&s, "mailhook_messages_received_total", &[("source", "stdin")]), Some(1.0));
        assert_eq!(value(&s, "mailhook_messages_received_total", &[("source", "imap")]), Some(0.0));
        assert_eq!(value(&s, "mailhook_rule_matches_total", &[("rule", "ups")]), Some(1.0));
        assert_eq!(value(&s, "mailhook_rule_matches_total", &[("rule", "nagios")]), Some(0.0));
        assert_eq!(value(&s, "mailhook_unmatched_total", &[]), Some(1.0));
        assert_eq!(value(&s, "mailhook_extraction_failures_total", &[("rule", "ups")]), Some(1.0));
        let orders = |o| value(&s, "mailhook_deliveries_total", &[("destination", "orders"), ("outcome", o)]);
        assert_eq!((orders("delivered"), orders("deferred"), orders("dead")), (Some(1.0), Some(1.0), Some(0.0)));
        assert_eq!(value(&s, "mailhook_connections_total", &[("protocol", "smtp")]), Some(1.0));
        assert_eq!(
            value(&s, "mailhook_rejections_total", &[("protocol", "smtp"), ("reason", "unknown_recipient")]),
            Some(1.0)
        );
        assert_eq!(value(&s, "mailhook_rules_reloads_total", &[("result", "error")]), Some(1.0));
        assert_eq!(value(&s, "mailhook_rules_reloads_total", &[("result", "ok")]), Some(0.0));
        assert_eq!(value(&s, "mailhook_rules", &[]), Some(2.0));
        assert!(text.contains("# TYPE mailhook_deliveries_total counter\n"), "{text}");
        assert!(text.contains("# HELP mailhook_unmatched_total Messages no rule matched.\n"), "{text}");
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        let m = Metrics::new();
        m.destination("hook");
        m.delivery_time("hook", Duration::from_millis(3));
        m.delivery_time("hook", Duration::from_millis(70));
        m.delivery_time("hook", Duration::from_secs(100));
        let text = m.render();
        assert!(text.contains("# TYPE mailhook_delivery_duration_seconds histogram\n"), "{text}");
        let bucket =
            |le: &str| format!("mailhook_delivery_duration_seconds_bucket{{destination=\"hook\",le=\"{le}\"}} ");
        let count_at = |le: &str| -> u64 {
            let prefix = bucket(le);
            let line = text.lines().find(|l| l.starts_with(&prefix)).unwrap_or_else(|| panic!("{prefix}\n{text}"));
            line[prefix.len()..].parse().unwrap()
        };
        assert_eq!(count_at("0.005"), 1);
        assert_eq!(count_at("0.05"), 1);
        assert_eq!(count_at("0.1"), 2);
        assert_eq!(count_at("60"), 2);
        assert_eq!(count_at("+Inf"), 3);
        assert!(text.contains("mailhook_delivery_duration_seconds_count{destination=\"hook\"} 3\n"), "{text}");
        let s = parse(&text);
        let hist = s.samples.iter().find(|s| s.metric == "mailhook_delivery_duration_seconds").expect("histogram");
        match &hist.value {
            prometheus_parse::Value::Histogram(buckets) => {
                assert_eq!(buckets.len(), LATENCY_BUCKETS.len() + 1);
                assert_eq!(buckets.last().unwrap().count, 3.0);
            }
            other => panic!("not a histogram: {other:?}"),
        }
        let sum_prefix = "mailhook_delivery_duration_seconds_sum{destination=\"hook\"} ";
        let sum: f64 = text.lines().find_map(|l| l.strip_prefix(sum_prefix)).unwrap().parse().unwrap();
        assert!((sum - 100.073).abs() < 1e-9, "{sum}");
    }

    #[test]
    fn label_values_are_escaped() {
        let m = Metrics::new();
        m.rule_matched("a \"quoted\" back\\slash\nnewline");
        let text = m.render();
        assert!(text.contains(r#"mailhook_rule_matches_total{rule="a \"quoted\" back\\slash\nnewline"} 1"#), "{text}");
        // One sample per line: the newline did not split it.
        assert!(text.lines().all(|l| l.starts_with('#') || l.starts_with("mailhook_")), "{text}");
    }

    #[test]
    fn imap_folders_and_listeners_are_exported() {
        let m = Metrics::new();
        let f = m.folder("alerts", "INBOX", Duration::from_secs(60));
        f.set_connected(true);
        f.reconnecting();
        f.fetched(3);
        let l = m.listener("smtp", "127.0.0.1:2525");
        l.set_up(true);
        let s = parse(&m.render());
        let labels = [("account", "alerts"), ("folder", "INBOX")];
        assert_eq!(value(&s, "mailhook_imap_connected", &labels), Some(1.0));
        assert_eq!(value(&s, "mailhook_imap_reconnects_total", &labels), Some(1.0));
        assert_eq!(value(&s, "mailhook_imap_fetched_total", &labels), Some(3.0));
        assert!(value(&s, "mailhook_imap_seconds_since_sync", &labels).is_some());
        assert_eq!(value(&s, "mailhook_listener_up", &[("protocol", "smtp"), ("addr", "127.0.0.1:2525")]), Some(1.0));
    }

    #[test]
    fn spool_gauges_appear_once_counted() {
        let m = Metrics::new();
        assert!(!m.render().contains("mailhook_dead_letters"));
        m.set_spool(SpoolGauges {
            incoming: 1,
            deferred: 2,
            oldest_deferred_age: Some(Duration::from_millis(90_500)),
            dead: 3,
        });
        let s = parse(&m.render());
        assert_eq!(value(&s, "mailhook_deferred_messages", &[]), Some(2.0));
        assert_eq!(value(&s, "mailhook_deferred_oldest_age_seconds", &[]), Some(90.0));
        assert_eq!(value(&s, "mailhook_dead_letters", &[]), Some(3.0));
        assert_eq!(value(&s, "mailhook_incoming_messages", &[]), Some(1.0));
    }

    #[test]
    fn a_failed_or_stale_folder_is_a_problem_naming_the_limit_and_error() {
        let m = Metrics::new();
        let f = m.folder("alerts", "INBOX", Duration::from_secs(60));
        let status = f.status();
        let later = status.since + Duration::from_secs(130);
        assert_eq!(status.problem(status.since + Duration::from_secs(100)), None, "still connecting is no problem");
        f.failed("connection refused");
        assert_eq!(
            f.status().problem(status.since + Duration::from_secs(1)).as_deref(),
            Some("imap alerts/INBOX: not connected: connection refused"),
            "a lost connection is a problem at once"
        );
        f.set_connected(true);
        assert_eq!(
            f.status().problem(later).as_deref(),
            Some("imap alerts/INBOX: no sync in the 130s since start (limit 120s): connection refused")
        );
        f.synced();
        let synced = f.status();
        let at = synced.last_sync.unwrap() + Duration::from_secs(121);
        assert_eq!(synced.problem(at).as_deref(), Some("imap alerts/INBOX: last sync 121s ago (limit 120s)"));
    }
}
