//! drift: notice when a sender's mail stops fitting the rule that matched it.
//!
//! For each rule and each sender (address, or domain with `[drift] sender = "domain"`) that the
//! rule matched, a track keeps the last `2 × window` messages, one `u64` each: bit `i` set when
//! the rule's field `i` was filled (not missing, null or empty), or [`UNMATCHED`] for a mail of
//! that sender that no rule matched. A track's last `window` messages are compared with the
//! `window` before them, so a burst and a slow trickle are judged alike:
//!
//! - a field's fill rate (over the window's matches) falls by more than `drop`, both windows
//!   holding at least `min_messages` matches: a drift of that field;
//! - the share of the sender's mail that this rule matched (the pseudo-field [`MATCHED`]) falls
//!   by more than `drop`: the sender's mail now falls through to "no rule matched".
//!
//! A drift keeps the rate it had before (its baseline) and is resolved once the last window's
//! rate is back within `drop / 2` of it, so a sender that keeps its new layout stays in drift
//! instead of becoming the new normal after two windows. Each drift is logged, shown under
//! `/healthz` `warnings` and in `/metrics`, and, with `[drift] notify`, sent once as a
//! `rule.drift` payload (and once as `rule.drift.resolved`).
//!
//! Memory is bounded: at most `max_tracked` tracks; when full, the least recently seen track
//! goes (`mailhook_drift_dropped_total`). The state is saved as JSON
//! (`SPOOL/lifecycle/drift.json`, written to a temporary file, synced, renamed) every few
//! seconds while it changes and at shutdown, and read back at start.

use crate::config::Config;
use crate::metrics::DriftGauges;
use crate::model::{Action, Outcome};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::sync::mpsc;
use tracing::{info, warn};

/// An entry for a mail of the sender that no rule matched.
pub const UNMATCHED: u64 = 1 << 63;

/// Fields of one rule that are tracked at most (one bit each).
const MAX_FIELDS: usize = 63;

/// The pseudo-field of "this rule matched the sender's mail".
pub const MATCHED: &str = "(matched)";

/// Message ids kept per track, to give examples of a drift.
const EXAMPLES: usize = 5;

/// What `[drift]` says.
#[derive(Debug, Clone)]
pub struct Settings {
    pub window: usize,
    pub drop: f64,
    pub min_messages: usize,
    pub by_domain: bool,
    pub max_tracked: usize,
    /// Links to examples start with this (`https://console/messages/`), else they are bare ids
    /// (see [`Drift::default_links`]).
    pub link_base: Option<String>,
}

impl Settings {
    pub fn from_config(config: &Config) -> Settings {
        let d = &config.drift;
        Settings {
            window: d.window.max(1),
            drop: d.drop,
            min_messages: d.min_messages.max(1),
            by_domain: d.sender == "domain",
            max_tracked: d.max_tracked.max(1),
            link_base: d.console_url.as_ref().map(|u| format!("{}/messages/", u.trim_end_matches('/'))),
        }
    }
}

/// A drift raised or resolved: the payload `[drift] notify` sends.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DriftEvent {
    /// `rule.drift` or `rule.drift.resolved`.
    pub event: &'static str,
    pub rule: String,
    pub field: String,
    pub sender: String,
    /// The fill rate before the drift (0..1).
    pub before: f64,
    /// The fill rate over the last window.
    pub now: f64,
    /// Comma-joined links to example messages in the console.
    pub examples: String,
}

/// One drift in progress.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Active {
    pub rule: String,
    pub field: String,
    pub sender: String,
    pub before: f64,
    pub now: f64,
    /// When it was raised (RFC 3339).
    pub since: String,
    pub examples: Vec<String>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Track {
    rule: String,
    entries: VecDeque<u64>,
    /// The state's clock when the track last took a message.
    seen: u64,
    /// The last few (message id, entry).
    examples: VecDeque<(String, u64)>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct State {
    /// Each rule's field names; a field's index is its bit.
    fields: BTreeMap<String, Vec<String>>,
    /// Each sender's tracks, one per rule that matched it.
    senders: HashMap<String, Vec<Track>>,
    tracked: u64,
    dropped: u64,
    clock: u64,
    active: Vec<Active>,
    /// (rule, field) pairs that ever drifted: their `mailhook_drift_active` stays, at 0.
    ever: BTreeSet<(String, String)>,
}

/// The drift alarms of one `serve`.
pub struct Drift {
    settings: Settings,
    links: std::sync::RwLock<Option<String>>,
    state: Mutex<State>,
    events: Mutex<Option<mpsc::UnboundedSender<DriftEvent>>>,
    path: Option<PathBuf>,
    dirty: AtomicBool,
}

/// Why the saved state could not be written.
#[derive(Debug, thiserror::Error)]
#[error("drift state {path}: {source}")]
pub struct SaveError {
    path: String,
    source: std::io::Error,
}

impl Drift {
    /// Drift alarms with `settings`, saved at `path` (read back from it when it holds a state).
    pub fn new(settings: Settings, path: Option<PathBuf>) -> Drift {
        let state = match path.as_deref().map(std::fs::read) {
            Some(Ok(bytes)) => match serde_json::from_slice::<State>(&bytes) {
                Ok(s) => {
                    info!(tracked = s.tracked, active = s.active.len(), "drift state read back");
                    s
                }
                Err(e) => {
                    warn!(error = %e, "drift state unreadable; starting afresh");
                    State::default()
                }
            },
            Some(Err(e)) if e.kind() != std::io::ErrorKind::NotFound => {
                warn!(error = %e, "cannot read the drift state; starting afresh");
                State::default()
            }
            _ => State::default(),
        };
        Drift {
            links: std::sync::RwLock::new(settings.link_base.clone()),
            settings,
            state: Mutex::new(state),
            events: Mutex::new(None),
            path,
            dirty: AtomicBool::new(false),
        }
    }

    /// Example links start with `base` (the console's own address) unless `[drift]
    /// console_url` says otherwise.
    pub fn default_links(&self, base: String) {
        let mut links = self.links.write().unwrap_or_else(|e| e.into_inner());
        if links.is_none() {
            *links = Some(base);
        }
    }

    /// Where raised and resolved drifts go from now on (for `[drift] notify`).
    pub fn events(&self) -> mpsc::UnboundedReceiver<DriftEvent> {
        let (tx, rx) = mpsc::unbounded_channel();
        *self.events.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx);
        rx
    }

    /// The key a sender is tracked by: its address, or its domain.
    pub fn sender_key(&self, sender: &str) -> String {
        let s = sender.to_lowercase();
        match (self.settings.by_domain, s.rsplit_once('@')) {
            (true, Some((_, domain))) => domain.to_string(),
            _ => s,
        }
    }

    /// Counts one judged message of `sender` (its id, and what the live rules decided).
    pub fn observe(&self, sender: &str, id: &str, outcome: &Outcome) {
        // A rule that drops its mail (`to = []`) extracts nothing worth tracking.
        if sender.is_empty() || matches!(outcome.action, Action::Drop) && outcome.rule.is_some() {
            return;
        }
        let sender = self.sender_key(sender);
        let mut raised = Vec::new();
        {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            state.clock += 1;
            match &outcome.rule {
                Some(rule) => {
                    let filled = filled_fields(outcome);
                    let entry = state.entry(rule, &filled);
                    state.push(&self.settings, &sender, rule, id, entry);
                    state.judge(&self.settings, &sender, rule, &mut raised);
                }
                None => {
                    let rules: Vec<String> = state
                        .senders
                        .get(&sender)
                        .map(|t| t.iter().map(|t| t.rule.clone()).collect())
                        .unwrap_or_default();
                    for rule in rules {
                        state.push(&self.settings, &sender, &rule, id, UNMATCHED);
                        state.judge(&self.settings, &sender, &rule, &mut raised);
                    }
                }
            }
        }
        self.dirty.store(true, Ordering::Relaxed);
        if raised.is_empty() {
            return;
        }
        let events = self.events.lock().unwrap_or_else(|e| e.into_inner());
        let links = self.links.read().unwrap_or_else(|e| e.into_inner()).clone();
        for a in raised {
            let event = event(a.0, &a.1, links.as_deref());
            let (before, now) = (percent(event.before), percent(event.now));
            if event.event == "rule.drift" {
                warn!(rule = %event.rule, field = %event.field, sender = %event.sender, before, now, examples = %event.examples,
                    "rule drift: the sender's mail no longer fits the rule");
            } else {
                info!(rule = %event.rule, field = %event.field, sender = %event.sender, before, now, "rule drift resolved");
            }
            if let Some(tx) = events.as_ref() {
                let _ = tx.send(event);
            }
        }
    }

    /// The drifts in progress.
    pub fn active(&self) -> Vec<Active> {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).active.clone()
    }

    /// What `/metrics` and `/healthz` show.
    pub fn gauges(&self) -> DriftGauges {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let w = self.settings.window;
        // (rule, field index) → (filled, matched) over the current windows.
        let mut sums: BTreeMap<(&str, usize), (u64, u64)> = BTreeMap::new();
        for track in state.senders.values().flatten() {
            let Some(names) = state.fields.get(&track.rule) else { continue };
            let n = track.entries.len();
            for &e in track.entries.range(n - n.min(w)..) {
                if e & UNMATCHED != 0 {
                    continue;
                }
                for i in 0..names.len() {
                    let s = sums.entry((track.rule.as_str(), i)).or_default();
                    s.0 += (e >> i) & 1;
                    s.1 += 1;
                }
            }
        }
        let fill = sums
            .into_iter()
            .map(|((rule, i), (filled, matched))| {
                (rule.to_string(), state.fields[rule][i].clone(), filled as f64 / matched.max(1) as f64)
            })
            .collect();
        let active = state
            .ever
            .iter()
            .map(|(rule, field)| {
                let n = state.active.iter().filter(|a| &a.rule == rule && &a.field == field).count() as u64;
                (rule.clone(), field.clone(), n)
            })
            .collect();
        let warnings = state
            .active
            .iter()
            .map(|a| {
                format!(
                    "drift: rule {} field {} from {}: {}% before, {}% now (examples: {})",
                    a.rule,
                    a.field,
                    a.sender,
                    percent(a.before),
                    percent(a.now),
                    a.examples.join(", ")
                )
            })
            .collect();
        DriftGauges { fill, active, warnings, tracked: state.tracked, dropped: state.dropped }
    }

    /// Writes the state when it changed since the last save.
    pub fn save(&self) -> Result<(), SaveError> {
        let Some(path) = &self.path else { return Ok(()) };
        if !self.dirty.swap(false, Ordering::Relaxed) {
            return Ok(());
        }
        let bytes = {
            let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            serde_json::to_vec(&*state).expect("the drift state serialises")
        };
        write_atomically(path, &bytes).map_err(|source| {
            self.dirty.store(true, Ordering::Relaxed);
            SaveError { path: path.display().to_string(), source }
        })
    }
}

impl State {
    /// The entry of a match: a bit per filled field (new field names get the next bits).
    fn entry(&mut self, rule: &str, filled: &[(String, bool)]) -> u64 {
        let names = self.fields.entry(rule.to_string()).or_default();
        let mut entry = 0;
        for (name, is_filled) in filled {
            let i = match names.iter().position(|n| n == name) {
                Some(i) => i,
                None if names.len() < MAX_FIELDS => {
                    names.push(name.clone());
                    names.len() - 1
                }
                None => continue,
            };
            if *is_filled {
                entry |= 1 << i;
            }
        }
        entry
    }

    fn push(&mut self, settings: &Settings, sender: &str, rule: &str, id: &str, entry: u64) {
        let clock = self.clock;
        let exists = self.senders.get(sender).is_some_and(|t| t.iter().any(|t| t.rule == rule));
        if !exists {
            if self.tracked as usize >= settings.max_tracked {
                self.evict();
            }
            self.senders
                .entry(sender.to_string())
                .or_default()
                .push(Track { rule: rule.to_string(), ..Track::default() });
            self.tracked += 1;
        }
        let track = self
            .senders
            .get_mut(sender)
            .and_then(|t| t.iter_mut().find(|t| t.rule == rule))
            .expect("the track exists now");
        track.entries.push_back(entry);
        while track.entries.len() > 2 * settings.window {
            track.entries.pop_front();
        }
        track.examples.push_back((id.to_string(), entry));
        while track.examples.len() > EXAMPLES {
            track.examples.pop_front();
        }
        track.seen = clock;
    }

    /// Lets the least recently seen track without an active drift go.
    fn evict(&mut self) {
        let active: BTreeSet<(&str, &str)> = self.active.iter().map(|a| (a.sender.as_str(), a.rule.as_str())).collect();
        let oldest = self
            .senders
            .iter()
            .flat_map(|(s, tracks)| tracks.iter().map(move |t| (t.seen, s, &t.rule)))
            .filter(|(_, s, r)| !active.contains(&(s.as_str(), r.as_str())))
            .min()
            .map(|(_, s, r)| (s.clone(), r.clone()));
        let Some((sender, rule)) = oldest else { return };
        if let Some(tracks) = self.senders.get_mut(&sender) {
            tracks.retain(|t| t.rule != rule);
            if tracks.is_empty() {
                self.senders.remove(&sender);
            }
        }
        self.tracked -= 1;
        self.dropped += 1;
    }

    /// Compares the track's last window with the one before; raises and resolves drifts.
    fn judge(&mut self, settings: &Settings, sender: &str, rule: &str, out: &mut Vec<(&'static str, Active)>) {
        let Some(track) = self.senders.get(sender).and_then(|t| t.iter().find(|t| t.rule == rule)) else { return };
        let names = self.fields.get(rule).cloned().unwrap_or_default();
        let n = track.entries.len();
        let w = settings.window;
        let cur: Vec<u64> = track.entries.range(n - n.min(w)..).copied().collect();
        let prev: Vec<u64> = track.entries.range(n - n.min(2 * w)..n - n.min(w)).copied().collect();
        // (field, rate before, rate now, entries that show it)
        let mut rates: Vec<(String, Option<f64>, Option<f64>, u64)> = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let bit = 1u64 << i;
            rates.push((name.clone(), fill_rate(&prev, bit, settings), fill_rate(&cur, bit, settings), bit));
        }
        rates.push((MATCHED.to_string(), match_rate(&prev, settings), match_rate(&cur, settings), UNMATCHED));
        let examples: Vec<(String, u64)> = track.examples.iter().cloned().collect();
        for (field, before, now, bit) in rates {
            let Some(now) = now else { continue };
            let at = self.active.iter().position(|a| a.rule == rule && a.field == field && a.sender == sender);
            match at {
                Some(i) => {
                    self.active[i].now = now;
                    if now >= self.active[i].before - settings.drop / 2.0 {
                        let a = self.active.remove(i);
                        out.push(("rule.drift.resolved", a));
                    }
                }
                None => {
                    let Some(before) = before else { continue };
                    if before - now > settings.drop {
                        let lacking = |e: u64| {
                            if bit == UNMATCHED { e & UNMATCHED != 0 } else { e & UNMATCHED == 0 && e & bit == 0 }
                        };
                        let a = Active {
                            rule: rule.to_string(),
                            field: field.clone(),
                            sender: sender.to_string(),
                            before,
                            now,
                            since: crate::spool::format_time(std::time::SystemTime::now()),
                            examples: examples
                                .iter()
                                .rev()
                                .filter(|(_, e)| lacking(*e))
                                .take(3)
                                .map(|(id, _)| id.clone())
                                .collect(),
                        };
                        self.ever.insert((a.rule.clone(), a.field.clone()));
                        self.active.push(a.clone());
                        out.push(("rule.drift", a));
                    }
                }
            }
        }
    }
}

fn event(name: &'static str, a: &Active, link_base: Option<&str>) -> DriftEvent {
    let links: Vec<String> = a
        .examples
        .iter()
        .map(|id| match link_base {
            Some(base) => format!("{base}{id}"),
            None => id.clone(),
        })
        .collect();
    DriftEvent {
        event: name,
        rule: a.rule.clone(),
        field: a.field.clone(),
        sender: a.sender.clone(),
        before: a.before,
        now: a.now,
        examples: links.join(","),
    }
}

/// The share of the window's matches with `bit` set; `None` below `min_messages` matches.
fn fill_rate(window: &[u64], bit: u64, s: &Settings) -> Option<f64> {
    let matched: Vec<u64> = window.iter().copied().filter(|e| e & UNMATCHED == 0).collect();
    (matched.len() >= s.min_messages)
        .then(|| matched.iter().filter(|e| *e & bit != 0).count() as f64 / matched.len() as f64)
}

/// The share of the window's mail that the rule matched; `None` below `min_messages` mails.
fn match_rate(window: &[u64], s: &Settings) -> Option<f64> {
    (window.len() >= s.min_messages)
        .then(|| window.iter().filter(|e| *e & UNMATCHED == 0).count() as f64 / window.len() as f64)
}

fn percent(rate: f64) -> u64 {
    (rate * 100.0).round() as u64
}

/// The payload's extracted fields and whether each is filled: its `fields` object (the default
/// payload), else its own top-level keys (a rule's `[rule.payload]`). Read without copying a
/// value: a field may hold a whole message of many megabytes.
fn filled_fields(outcome: &Outcome) -> Vec<(String, bool)> {
    #[derive(Deserialize)]
    struct WithFields {
        fields: Option<Filled>,
    }
    match serde_json::from_str::<WithFields>(outcome.payload.as_str()) {
        Ok(WithFields { fields: Some(Filled::Fields(fields)) }) => fields,
        _ => match serde_json::from_str::<Filled>(outcome.payload.as_str()) {
            Ok(Filled::Fields(mut all)) => {
                all.retain(|(k, _)| !matches!(k.as_str(), "id" | "receivedAt" | "rule"));
                all
            }
            _ => Vec::new(),
        },
    }
}

/// Whether a JSON value is filled (not null, not a blank string, not an empty list or object),
/// read without keeping it; an object is read as its members' names, in order, each with
/// whether its own value is filled.
enum Filled {
    Value(bool),
    Fields(Vec<(String, bool)>),
}

impl Filled {
    fn is_filled(&self) -> bool {
        match self {
            Filled::Value(filled) => *filled,
            Filled::Fields(members) => !members.is_empty(),
        }
    }
}

impl<'de> Deserialize<'de> for Filled {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Filled, D::Error> {
        use serde::de::{IgnoredAny, MapAccess, SeqAccess, Visitor};
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Filled;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_unit<E>(self) -> Result<Filled, E> {
                Ok(Filled::Value(false))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Filled, E> {
                Ok(Filled::Value(true))
            }
            fn visit_i64<E>(self, _: i64) -> Result<Filled, E> {
                Ok(Filled::Value(true))
            }
            fn visit_u64<E>(self, _: u64) -> Result<Filled, E> {
                Ok(Filled::Value(true))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Filled, E> {
                Ok(Filled::Value(true))
            }
            fn visit_str<E>(self, s: &str) -> Result<Filled, E> {
                Ok(Filled::Value(!s.trim().is_empty()))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Filled, A::Error> {
                let mut any = false;
                while seq.next_element::<IgnoredAny>()?.is_some() {
                    any = true;
                }
                Ok(Filled::Value(any))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Filled, A::Error> {
                let mut members: Vec<(String, bool)> = Vec::new();
                while let Some((name, value)) = map.next_entry::<String, Filled>()? {
                    // A repeated name keeps its place and takes the last value, as in a map.
                    match members.iter_mut().find(|(n, _)| *n == name) {
                        Some(member) => member.1 = value.is_filled(),
                        None => members.push((name, value.is_filled())),
                    }
                }
                Ok(Filled::Fields(members))
            }
        }
        d.deserialize_any(V)
    }
}

/// How often the state is saved while it changes.
pub const SAVE_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Saves the state every [`SAVE_EVERY`] while it changes, and once more at shutdown.
pub async fn keep_saved(drift: std::sync::Arc<Drift>, mut stop: tokio::sync::watch::Receiver<bool>) {
    loop {
        let stopping = tokio::select! {
            _ = tokio::time::sleep(SAVE_EVERY) => false,
            _ = stop.wait_for(|s| *s) => true,
        };
        let d = drift.clone();
        match tokio::task::spawn_blocking(move || d.save()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(error = %e, "cannot save the drift state; tried again later"),
            Err(e) => warn!(error = %e, "cannot save the drift state; tried again later"),
        }
        if stopping {
            return;
        }
    }
}

/// Attempts per notification before it is given up (logged).
const NOTIFY_ATTEMPTS: u32 = 6;

/// Sends each raised or resolved drift to `destination` (the `[drift] notify` one), retrying a
/// temporary failure with backoff; a notification that still fails is logged and given up
/// (the drift itself stays in `/healthz` and `/metrics`). Ends at shutdown.
pub async fn notify(
    mut events: mpsc::UnboundedReceiver<DriftEvent>,
    name: String,
    destination: crate::deliver::Destination,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    use crate::deliver::Attempt;
    let backoff = crate::config::BackoffConfig {
        initial: std::time::Duration::from_secs(1),
        max: std::time::Duration::from_secs(60),
    };
    loop {
        let event = tokio::select! {
            e = events.recv() => match e { Some(e) => e, None => return },
            _ = stop.wait_for(|s| *s) => return,
        };
        let id = ulid::Ulid::generate().to_string();
        let body = serde_json::to_vec(&event).expect("an event serialises");
        for attempt in 1..=NOTIFY_ATTEMPTS {
            match destination.send(&id, &body).await {
                Attempt::Done => {
                    info!(destination = %name, event = event.event, rule = %event.rule, field = %event.field, "drift notification sent");
                    break;
                }
                Attempt::Retry { after, reason } if attempt < NOTIFY_ATTEMPTS => {
                    let wait = after.unwrap_or_else(|| crate::backoff::backoff(&backoff, attempt)).min(backoff.max);
                    warn!(destination = %name, reason = %reason, "drift notification not taken; trying again");
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = stop.wait_for(|s| *s) => return,
                    }
                }
                Attempt::Retry { reason, .. } | Attempt::Fail { reason } => {
                    warn!(destination = %name, reason = %reason, event = event.event, rule = %event.rule, "drift notification given up");
                    break;
                }
            }
        }
    }
}

/// Writes `bytes` to `path` through a temporary file beside it: synced, renamed over, the
/// directory synced. A crash leaves the old state or the new one, never half of one.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension("json.tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Payload;
    use serde_json::json;

    fn settings() -> Settings {
        Settings { window: 10, drop: 0.5, min_messages: 5, by_domain: false, max_tracked: 100, link_base: None }
    }

    fn matched(order_id: &str) -> Outcome {
        Outcome {
            rule: Some("erp".into()),
            action: Action::Deliver { to: vec!["orders".into()] },
            payload: Payload::of(&json!({"id": "x", "fields": {"order_id": order_id, "customer": "c"}})),
        }
    }

    fn unmatched() -> Outcome {
        Outcome { rule: None, action: Action::Dead { reason: "no rule matched".into() }, payload: Payload::empty() }
    }

    #[test]
    fn fields_are_filled_unless_null_blank_or_empty() {
        let with = |payload: serde_json::Value| Outcome {
            rule: Some("erp".into()),
            action: Action::Deliver { to: vec!["orders".into()] },
            payload: Payload::of(&payload),
        };
        let default = with(json!({"id": "x", "text": "body", "fields": {
            "order": "4711", "blank": " \n\t ", "none": null, "zero": 0, "no": false,
            "list": [], "items": [""], "map": {}, "nested": {"a": null}, "escaped": "\n é \n",
        }}));
        let expected = [
            ("order", true),
            ("blank", false),
            ("none", false),
            ("zero", true),
            ("no", true),
            ("list", false),
            ("items", true),
            ("map", false),
            ("nested", true),
            ("escaped", true),
        ];
        let expected: Vec<(String, bool)> = expected.iter().map(|(k, f)| (k.to_string(), *f)).collect();
        assert_eq!(filled_fields(&default), expected, "in the payload's order");

        // A rule's own payload: its top-level keys, without the ones every payload has.
        let own = with(json!({"id": "x", "rule": "erp", "receivedAt": "now", "ticket": "T-1", "note": ""}));
        assert_eq!(filled_fields(&own), vec![("ticket".to_string(), true), ("note".to_string(), false)]);
        assert_eq!(filled_fields(&unmatched()), Vec::new());
    }

    fn feed(d: &Drift, sender: &str, n: usize, outcome: &Outcome, start: usize) {
        for i in 0..n {
            d.observe(sender, &format!("m{}", start + i), outcome);
        }
    }

    #[test]
    fn a_field_that_empties_raises_one_drift_and_its_return_resolves_it() {
        let d = Drift::new(settings(), None);
        let mut events = d.events();
        feed(&d, "erp@acme.example", 30, &matched("4711"), 0);
        assert!(d.active().is_empty());
        feed(&d, "erp@acme.example", 30, &matched(""), 30);
        let raised = events.try_recv().expect("a drift");
        assert_eq!(
            (raised.event, raised.field.as_str(), raised.sender.as_str()),
            ("rule.drift", "order_id", "erp@acme.example")
        );
        assert_eq!(raised.before, 1.0);
        assert_eq!(raised.now, 0.4, "raised at the first window past the drop: 4 of 10 filled");
        assert_eq!(raised.examples, "m35,m34,m33");
        assert!(events.try_recv().is_err(), "once, not once per message");
        assert_eq!(d.active().len(), 1, "a kept layout stays in drift");
        let g = d.gauges();
        assert_eq!(g.active, vec![("erp".to_string(), "order_id".to_string(), 1)]);
        assert!(g.fill.contains(&("erp".into(), "order_id".into(), 0.0)), "{:?}", g.fill);
        assert!(g.fill.contains(&("erp".into(), "customer".into(), 1.0)), "{:?}", g.fill);
        assert_eq!(g.warnings.len(), 1);

        feed(&d, "erp@acme.example", 30, &matched("4712"), 60);
        let resolved = events.try_recv().expect("resolved");
        assert_eq!(resolved.event, "rule.drift.resolved");
        assert_eq!(resolved.now, 0.8, "resolved once within drop/2 of the rate before");
        assert!(events.try_recv().is_err());
        assert_eq!(d.gauges().active, vec![("erp".to_string(), "order_id".to_string(), 0)]);
    }

    #[test]
    fn a_sender_whose_mail_falls_through_drifts_on_matched() {
        let d = Drift::new(settings(), None);
        let mut events = d.events();
        feed(&d, "erp@acme.example", 20, &matched("1"), 0);
        feed(&d, "other@acme.example", 20, &unmatched(), 100);
        assert!(events.try_recv().is_err(), "mail of senders the rule never matched does not count");
        feed(&d, "erp@acme.example", 10, &unmatched(), 20);
        let raised = events.try_recv().unwrap();
        assert_eq!((raised.field.as_str(), raised.before), (MATCHED, 1.0));
        assert!(events.try_recv().is_err());
    }

    #[test]
    fn tracks_are_capped_and_the_state_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lifecycle/drift.json");
        let d = Drift::new(Settings { max_tracked: 3, ..settings() }, Some(path.clone()));
        for s in 0..5 {
            feed(&d, &format!("s{s}@acme.example"), 2, &matched("1"), s * 10);
        }
        let g = d.gauges();
        assert_eq!((g.tracked, g.dropped), (3, 2));
        feed(&d, "erp@acme.example", 20, &matched("1"), 100);
        feed(&d, "erp@acme.example", 10, &matched(""), 200);
        assert_eq!(d.active().len(), 1);
        d.save().unwrap();
        let again = Drift::new(settings(), Some(path));
        assert_eq!(again.active(), d.active());
        assert_eq!(again.gauges().tracked, 3);
    }
}
