//! shadow: judge archived messages with two rule sets and report what differs.
//!
//! ```text
//! Archive::list (newest first, a page at a time) ─► get (envelope) + raw ─► parse once
//!     ─► live.evaluate  ┐
//!     ─► other.evaluate ┴► compare ─► ShadowReport (counts + one Difference per changed message)
//! ```
//!
//! A page of messages is judged on every core at once (the rules are pure); the report keeps
//! the archive's order. Messages removed from the archive while the run reads it are skipped.

use super::compare::{Change, Kind, breaks, compare};
use crate::model::Envelope;
use crate::rules::RuleSet;
use crate::store::{Archive, MessageQuery, StoreError};
use serde::Serialize;
use std::fmt::Write as _;
use std::time::{Instant, SystemTime};

/// Which archived messages a run judges: the newest `last` received since `since` (either or
/// both; neither is every message).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Scope {
    pub since: Option<SystemTime>,
    pub last: Option<usize>,
}

/// One archived message, as a shadow run judges it.
#[derive(Debug, Clone)]
pub struct Sample {
    pub id: String,
    pub sender: String,
    pub subject: String,
    pub envelope: Envelope,
    pub raw: Vec<u8>,
}

/// One message whose judgement differs.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Difference {
    pub id: String,
    pub sender: String,
    pub subject: String,
    pub kind: Kind,
    pub rule_before: Option<String>,
    pub rule_after: Option<String>,
    /// A message a rule matched is now unmatched or a dead letter (what `guard = "refuse"` refuses).
    pub breaks: bool,
    pub changes: Vec<Change>,
}

/// How many messages fell in each kind.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Counts {
    pub judged: u64,
    pub unchanged: u64,
    pub changed_rule: u64,
    pub newly_matched: u64,
    pub newly_unmatched: u64,
    pub newly_dead: u64,
    pub changed_fields: u64,
}

impl Counts {
    fn add(&mut self, kind: Option<Kind>) {
        self.judged += 1;
        *match kind {
            None => &mut self.unchanged,
            Some(Kind::ChangedRule) => &mut self.changed_rule,
            Some(Kind::NewlyMatched) => &mut self.newly_matched,
            Some(Kind::NewlyUnmatched) => &mut self.newly_unmatched,
            Some(Kind::NewlyDead) => &mut self.newly_dead,
            Some(Kind::ChangedFields) => &mut self.changed_fields,
        } += 1;
    }

    /// Messages whose judgement differs.
    pub fn changed(&self) -> u64 {
        self.judged - self.unchanged
    }

    /// `3 unchanged, 0 changed rule, ...`.
    pub fn line(&self) -> String {
        format!(
            "{} unchanged, {} changed rule, {} newly matched, {} newly unmatched, {} newly dead, {} changed fields",
            self.unchanged,
            self.changed_rule,
            self.newly_matched,
            self.newly_unmatched,
            self.newly_dead,
            self.changed_fields
        )
    }
}

/// What a shadow run found.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ShadowReport {
    /// When the run ended (RFC 3339).
    pub at: String,
    pub counts: Counts,
    /// Messages that [`Difference::breaks`].
    pub breaking: u64,
    /// The differences, newest message first (at most the `keep` the run was given).
    pub differences: Vec<Difference>,
    /// Differences counted but not kept.
    pub left_out: u64,
    pub took_ms: u64,
}

impl ShadowReport {
    /// The human-readable report: the counts, then each difference with its diff lines.
    pub fn text(&self) -> String {
        let mut out = String::new();
        let n = self.counts.judged;
        let _ = writeln!(out, "judged {n} archived message{}: {}", if n == 1 { "" } else { "s" }, self.counts.line());
        for d in &self.differences {
            let subject = serde_json::to_string(&d.subject).unwrap_or_default();
            let _ = writeln!(out, "\n{}  {}  from {}  {}", d.kind.words(), d.id, d.sender, subject);
            for c in &d.changes {
                let _ = writeln!(out, "  {}", c.line());
            }
        }
        if self.left_out > 0 {
            let _ = writeln!(out, "\n({} more difference(s) not shown)", self.left_out);
        }
        out
    }

    /// The differences that break mail that worked, as one log-sized sentence.
    pub fn breaking_summary(&self) -> String {
        let examples: Vec<String> = self
            .differences
            .iter()
            .filter(|d| d.breaks)
            .take(3)
            .map(|d| format!("{} from {} ({})", d.id, d.sender, d.kind.words()))
            .collect();
        format!("{} message(s) that a rule matched would be unmatched or dead: {}", self.breaking, examples.join("; "))
    }
}

/// Judges one message with both sets.
pub fn judge(live: &RuleSet, other: &RuleSet, sample: &Sample) -> Option<Difference> {
    let email = crate::parse::parse(&sample.raw);
    let before = live.evaluate(&email, &sample.envelope);
    let after = other.evaluate(&email, &sample.envelope);
    let (kind, changes) = compare(&before, &after)?;
    Some(Difference {
        id: sample.id.clone(),
        sender: sample.sender.clone(),
        subject: sample.subject.clone(),
        kind,
        breaks: breaks(&before, &after),
        rule_before: before.rule,
        rule_after: after.rule,
        changes,
    })
}

/// Messages read from the archive per step.
const PAGE: usize = crate::store::MAX_PAGE;

/// Judges the archived messages `scope` names with `live` and `other`; keeps at most `keep`
/// differences (all are counted). Blocks: async callers run it on the blocking pool.
pub fn run(
    archive: &dyn Archive,
    live: &RuleSet,
    other: &RuleSet,
    scope: Scope,
    keep: usize,
) -> Result<ShadowReport, StoreError> {
    let started = Instant::now();
    let mut counts = Counts::default();
    let mut differences = Vec::new();
    let mut breaking = 0;
    let mut left_out = 0;
    let mut cursor = None;
    let mut remaining = scope.last.unwrap_or(usize::MAX);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    while remaining > 0 {
        let query = MessageQuery {
            since: scope.since,
            limit: remaining.min(PAGE),
            cursor: cursor.take(),
            ..Default::default()
        };
        let page = archive.list(&query)?;
        let mut samples = Vec::with_capacity(page.items.len());
        for item in &page.items {
            let (Some(record), Some(raw)) = (archive.get(&item.id)?, archive.raw(&item.id)?) else { continue };
            samples.push(Sample {
                id: item.id.clone(),
                sender: item.from.clone(),
                subject: item.subject.clone(),
                envelope: record.envelope,
                raw,
            });
        }
        remaining = remaining.saturating_sub(page.items.len());
        for found in judge_all(live, other, &samples, threads) {
            counts.add(found.as_ref().map(|d| d.kind));
            if let Some(d) = found {
                breaking += u64::from(d.breaks);
                if differences.len() < keep {
                    differences.push(d);
                } else {
                    left_out += 1;
                }
            }
        }
        match page.next {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    Ok(ShadowReport {
        at: crate::spool::format_time(SystemTime::now()),
        counts,
        breaking,
        differences,
        left_out,
        took_ms: started.elapsed().as_millis() as u64,
    })
}

/// [`judge`] for every sample, on up to `threads` threads, in the samples' order.
fn judge_all(live: &RuleSet, other: &RuleSet, samples: &[Sample], threads: usize) -> Vec<Option<Difference>> {
    if threads <= 1 || samples.len() < 2 {
        return samples.iter().map(|s| judge(live, other, s)).collect();
    }
    let chunk = samples.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let handles: Vec<_> = samples
            .chunks(chunk)
            .map(|part| scope.spawn(move || part.iter().map(|s| judge(live, other, s)).collect::<Vec<_>>()))
            .collect();
        handles.into_iter().flat_map(|h| h.join().expect("judging does not panic")).collect()
    })
}
