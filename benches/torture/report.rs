//! Checking the invariants of a scenario and printing the results table.

use crate::sink::Seen;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

/// One line of the results table, with what went wrong.
#[derive(Debug, Default)]
pub struct Row {
    pub scenario: String,
    /// One line saying what the scenario does.
    pub what: String,
    /// Distinct messages offered to mailhook.
    pub sent: usize,
    /// Distinct messages mailhook acknowledged (250, exit 0, or simply present on the IMAP
    /// server: every one of those must be delivered).
    pub acknowledged: usize,
    /// Acknowledged messages that reached the destination at least once.
    pub delivered: usize,
    /// Acknowledged messages that never reached it. Must be 0.
    pub lost: usize,
    /// Extra deliveries under a spool id already delivered (a delivery in flight at a kill, or
    /// one the receiver took after the sender had given up on it).
    pub redelivered: usize,
    /// Extra deliveries of a message under another spool id (the sender sent it again because it
    /// never got the answer, or the IMAP watcher fetched it again after a kill).
    pub resent: usize,
    /// From the end of the fault (the last restart, the receiver back, the file system writable
    /// again) until every message acknowledged by then was delivered.
    pub drain: Option<Duration>,
    pub notes: Vec<String>,
    pub violations: Vec<String>,
}

impl Row {
    pub fn new(scenario: &str, what: &str) -> Row {
        Row { scenario: scenario.to_string(), what: what.to_string(), ..Row::default() }
    }

    pub fn note(&mut self, note: impl Into<String>) {
        self.notes.push(note.into());
    }

    pub fn violation(&mut self, v: impl Into<String>) {
        let v = v.into();
        eprintln!("    VIOLATION: {v}");
        self.violations.push(v);
    }

    /// Records a violation unless `ok`.
    pub fn check(&mut self, ok: bool, v: impl FnOnce() -> String) {
        if !ok {
            self.violation(v());
        }
    }
}

/// When a spool id may be delivered more than once.
pub enum Redelivery<'a> {
    /// Only when its first delivery was in flight at one of these kills: at most `window` before it.
    NearKills(&'a [Instant], Duration),
    /// Only when its first delivery came within `window` of this moment, before or after.
    Around(Instant, Duration),
    /// Expected in this scenario (counted, not a violation).
    Allowed,
    /// Never.
    Forbidden,
}

/// When a message may be delivered under more than one spool id.
pub enum Resend<'a> {
    /// At most once per attempt whose outcome the sender could not know.
    Unknown(&'a dyn Fn(u64) -> u32),
    /// Only when a kill (wall-clock time) came between the creation of its first spool id and
    /// that of the next one, at most `window` after the first (the spool id is a ULID: it
    /// carries its creation time): the copy spooled before the kill was not yet remembered as
    /// such, and the restarted serve spooled the message again.
    SpooledAcrossKill(&'a [SystemTime], Duration),
}

/// Fills in `delivered`, `lost`, `redelivered` and `resent` from what the destination saw, and
/// checks the invariants: nothing acknowledged is lost, every duplicate is explained, every
/// request carries its spool id as `Idempotency-Key` (when it has one), and nothing arrives
/// that was never sent.
pub fn tally(row: &mut Row, acked: &HashSet<u64>, seen: &[Seen], redelivery: Redelivery<'_>, resend: Resend<'_>) {
    let mut by_seq: BTreeMap<u64, BTreeMap<&str, Vec<Instant>>> = BTreeMap::new();
    for s in seen {
        let Some(seq) = s.seq else {
            row.violation(format!("a delivery of no test message arrived (payload id {:?})", s.id));
            continue;
        };
        if let Some(key) = &s.key
            && key != &s.id
        {
            row.violation(format!("message {seq}: Idempotency-Key {key:?} is not its payload id {:?}", s.id));
        }
        by_seq.entry(seq).or_default().entry(s.id.as_str()).or_default().push(s.at);
    }
    let lost: Vec<u64> = {
        let mut l: Vec<u64> = acked.iter().copied().filter(|s| !by_seq.contains_key(s)).collect();
        l.sort_unstable();
        l
    };
    row.acknowledged = acked.len();
    row.delivered = acked.len() - lost.len();
    row.lost = lost.len();
    if !lost.is_empty() {
        let shown: Vec<String> = lost.iter().take(20).map(u64::to_string).collect();
        row.violation(format!("{} acknowledged message(s) never delivered: {}", lost.len(), shown.join(", ")));
    }
    let near = |kills: &[Instant], first: Instant, window: Duration| {
        kills.iter().any(|k| *k >= first && k.duration_since(first) <= window)
    };
    let mut worst_gap: Option<Duration> = None;
    let mut worst_spool_gap: Option<Duration> = None;
    for (seq, ids) in &by_seq {
        for (id, times) in ids {
            if times.len() < 2 {
                continue;
            }
            row.redelivered += times.len() - 1;
            let first = *times.iter().min().expect("not empty");
            match &redelivery {
                Redelivery::Allowed => {}
                Redelivery::Forbidden => {
                    row.violation(format!("message {seq} (spool id {id}) was delivered {} times", times.len()))
                }
                Redelivery::Around(moment, window) => {
                    let gap = if first > *moment { first - *moment } else { *moment - first };
                    if gap > *window {
                        row.violation(format!(
                            "message {seq} (spool id {id}) was delivered {} times, first {:.3} s away from the fault",
                            times.len(),
                            gap.as_secs_f64()
                        ));
                    }
                }
                Redelivery::NearKills(kills, window) => {
                    if let Some(gap) = kills.iter().filter(|k| **k >= first).map(|k| k.duration_since(first)).min() {
                        worst_gap = worst_gap.max(Some(gap));
                    }
                    if !near(kills, first, *window) {
                        row.violation(format!(
                            "message {seq} (spool id {id}) was delivered {} times, but its first delivery was not in flight at a kill ({})",
                            times.len(),
                            relative(kills, times)
                        ));
                    }
                }
            }
        }
        if ids.len() > 1 {
            row.resent += ids.len() - 1;
            match &resend {
                Resend::Unknown(unknown) => {
                    let allowed = unknown(*seq) as usize;
                    if ids.len() - 1 > allowed {
                        row.violation(format!(
                            "message {seq} was delivered under {} spool ids, but only {allowed} of its attempts went unanswered",
                            ids.len()
                        ));
                    }
                }
                Resend::SpooledAcrossKill(kills, window) => {
                    let created = |id: &str| {
                        ulid::Ulid::from_string(id)
                            .map(|u| SystemTime::UNIX_EPOCH + Duration::from_millis(u.timestamp_ms()))
                            .ok()
                    };
                    let mut times: Vec<Option<SystemTime>> = ids.keys().map(|id| created(id)).collect();
                    times.sort();
                    let explained = times.windows(2).all(|w| match (w[0], w[1]) {
                        (Some(a), Some(b)) => kills.iter().any(|k| {
                            let gap = k.duration_since(a).unwrap_or_default();
                            let across = a <= *k && *k <= b && gap <= *window;
                            if across {
                                worst_spool_gap = worst_spool_gap.max(Some(gap));
                            }
                            across
                        }),
                        _ => false,
                    });
                    if !explained {
                        row.violation(format!(
                            "message {seq} was spooled {} times, not across a kill (spool ids {:?})",
                            ids.len(),
                            ids.keys().collect::<Vec<_>>()
                        ));
                    }
                }
            }
        }
    }
    if let Some(gap) = worst_spool_gap {
        row.note(format!(
            "each message spooled twice had its first copy spooled at most {} ms before a kill",
            gap.as_millis()
        ));
    }
    if let Some(gap) = worst_gap {
        row.note(format!(
            "each redelivered spool id was first delivered at most {:.2} s before a kill",
            gap.as_secs_f64()
        ));
    }
}

/// `times` in seconds relative to the first kill, and the kills, for a violation message.
fn relative(kills: &[Instant], times: &[Instant]) -> String {
    let Some(origin) = kills.iter().chain(times).min().copied() else { return String::new() };
    let fmt = |v: &[Instant]| {
        let mut v = v.to_vec();
        v.sort();
        let v: Vec<String> = v.iter().map(|t| format!("{:.3}", t.duration_since(origin).as_secs_f64())).collect();
        v.join(", ")
    };
    format!("deliveries at {} s, kills at {} s", fmt(times), fmt(kills))
}

/// Waits until every message of `acked` is delivered; returns when that happened.
pub fn wait_delivered(has_all: impl Fn() -> bool, timeout: Duration) -> Option<Instant> {
    let deadline = Instant::now() + timeout;
    loop {
        if has_all() {
            return Some(Instant::now());
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The moment a fault ended (the last restart, the receiver back, the file system writable
/// again, the dead letters retried), and the messages acknowledged by then: the backlog.
pub struct Recovered {
    pub at: Instant,
    pub backlog: HashSet<u64>,
}

impl Recovered {
    pub fn now(backlog: HashSet<u64>) -> Recovered {
        Recovered { at: Instant::now(), backlog }
    }
}

/// Records a violation unless everything acknowledged was delivered (`done`) in time.
pub fn delivered_in_time(row: &mut Row, done: Option<Instant>, timeout: Duration) {
    if done.is_none() {
        row.violation(format!("not everything acknowledged was delivered within {timeout:?}"));
    }
}

/// `drain`: from the recovery until the last message of its backlog was first delivered (zero
/// when all of it had been delivered before).
pub fn drain(row: &mut Row, recovered: &Recovered, seen: &[Seen]) {
    let mut first: HashMap<u64, Instant> = HashMap::new();
    for s in seen {
        if let Some(seq) = s.seq {
            let t = first.entry(seq).or_insert(s.at);
            *t = (*t).min(s.at);
        }
    }
    let last = recovered.backlog.iter().filter_map(|seq| first.get(seq)).max();
    row.drain = Some(last.map_or(Duration::ZERO, |t| t.saturating_duration_since(recovered.at)));
}

/// How many entries each spool directory holds.
pub fn spool_counts(spool: &Path) -> BTreeMap<&'static str, usize> {
    let mut counts: BTreeMap<&'static str, usize> = ["tmp", "corrupt"]
        .into_iter()
        .map(|d| (d, std::fs::read_dir(spool.join(d)).map(|r| r.count()).unwrap_or(0)))
        .collect();
    for state in ["incoming", "active", "deferred", "dead"] {
        counts.insert(state, 0);
    }
    let by_state = || -> rusqlite::Result<Vec<(String, i64)>> {
        let conn = open_spool_db(spool)?;
        let mut stmt = conn.prepare("SELECT state, count(*) FROM message GROUP BY state")?;
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect()
    };
    match by_state() {
        Ok(rows) => {
            for (state, n) in rows {
                if let Some(c) = counts.iter_mut().find(|(k, _)| **k == state) {
                    *c.1 = n as usize;
                }
            }
        }
        Err(_) => {
            counts.insert("unreadable", 1);
        }
    }
    counts
}

/// A connection on the spool's database (`spool.db`), for as long as a check takes.
fn open_spool_db(spool: &Path) -> rusqlite::Result<rusqlite::Connection> {
    let conn =
        rusqlite::Connection::open_with_flags(spool.join("spool.db"), rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    Ok(conn)
}

/// What is wrong in the spool's database: SQLite's own integrity check, a message without its
/// raw bytes (or raw bytes without their message), metadata that does not parse or names
/// another id.
pub fn spool_db_problems(spool: &Path) -> Vec<String> {
    let check = || -> rusqlite::Result<Vec<String>> {
        let conn = open_spool_db(spool)?;
        let mut problems = Vec::new();
        let integrity: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0))?;
        if integrity != "ok" {
            problems.push(format!("integrity check: {integrity}"));
        }
        for (what, sql) in [
            (
                "messages without their raw bytes",
                "SELECT count(*) FROM message m WHERE NOT EXISTS (SELECT 1 FROM raw r WHERE r.seq = m.seq)",
            ),
            (
                "raw bytes neither queued nor kept for the archive",
                "SELECT count(*) FROM raw r WHERE NOT EXISTS (SELECT 1 FROM message m WHERE m.seq = r.seq)
                     AND NOT EXISTS (SELECT 1 FROM kept k WHERE k.seq = r.seq)",
            ),
            (
                "kept raw bytes that are not there",
                "SELECT count(*) FROM kept k WHERE NOT EXISTS (SELECT 1 FROM raw r WHERE r.seq = k.seq)",
            ),
        ] {
            let n: i64 = conn.query_row(sql, [], |r| r.get(0))?;
            if n > 0 {
                problems.push(format!("{n} {what}"));
            }
        }
        let mut stmt = conn.prepare("SELECT id, meta FROM message")?;
        let rows: Vec<(String, String)> =
            stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<Result<_, _>>()?;
        for (id, meta) in rows {
            let whole = serde_json::from_str::<serde_json::Value>(&meta).is_ok_and(|v| v["id"] == id.as_str());
            if !whole {
                problems.push(format!("{id}: metadata does not read"));
            }
        }
        Ok(problems)
    };
    check().unwrap_or_else(|e| vec![format!("spool.db: {e}")])
}

/// Waits until nothing is left to do in the spool (`incoming/`, `active/`, `deferred/` empty).
pub fn wait_spool_idle(row: &mut Row, spool: &Path, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let c = spool_counts(spool);
        if c["incoming"] + c["active"] + c["deferred"] == 0 && !c.contains_key("unreadable") {
            return;
        }
        if Instant::now() > deadline {
            row.violation(format!("the spool still has work after {timeout:?}: {c:?}"));
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Checks what is left in the spool once everything was delivered: no dead letters, nothing in
/// `corrupt/`, a database that SQLite finds whole, with every message with its raw bytes.
/// Returns how many files `tmp/` holds (drafts of big messages cut short by a kill, which
/// recovery removes once they are 10 minutes old).
pub fn check_spool_end(row: &mut Row, spool: &Path, acked: &HashSet<u64>, delivered: &HashSet<u64>) -> usize {
    let c = spool_counts(spool);
    row.check(c["dead"] == 0, || format!("{} dead letter(s) left", c["dead"]));
    for entry in std::fs::read_dir(spool.join("corrupt")).into_iter().flatten().flatten() {
        let name = format!("corrupt/{}", entry.file_name().to_string_lossy());
        if name.ends_with(".eml") {
            let seq = crate::subject_seq(&std::fs::read(entry.path()).unwrap_or_default());
            if let Some(seq) = seq.filter(|s| acked.contains(s) && !delivered.contains(s)) {
                row.violation(format!("{name}: acknowledged message {seq} was quarantined and never delivered"));
            }
        } else {
            row.violation(format!("{name}: metadata was quarantined"));
        }
    }
    for problem in spool_db_problems(spool) {
        row.violation(format!("spool: {problem}"));
    }
    // Inside the spool by default; beside it where the spool is a mount of its own.
    for db in [spool.join("archive/archive.db"), spool.parent().unwrap_or(spool).join("archive/archive.db")] {
        check_archive(row, &db, spool);
    }
    c["tmp"]
}

/// Checks the archive after the kills: one entry per message (no duplicates), every entry with
/// its raw message (its own, or the one the spool keeps for it) and every raw message with its
/// entry.
pub fn check_archive(row: &mut Row, db: &Path, spool: &Path) {
    if !db.exists() {
        return;
    }
    let open = || -> rusqlite::Result<rusqlite::Connection> {
        let conn = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        conn.execute("ATTACH DATABASE ?1 AS spool", [spool.join("spool.db").to_string_lossy()])?;
        Ok(conn)
    };
    let conn = match open() {
        Ok(c) => c,
        Err(e) => return row.violation(format!("archive {}: cannot open: {e}", db.display())),
    };
    let count = |sql: &str| -> Result<i64, rusqlite::Error> { conn.query_row(sql, [], |r| r.get(0)) };
    let checks = [
        ("entries", "SELECT count(*) FROM message"),
        ("duplicate entries", "SELECT count(*) FROM (SELECT id FROM message GROUP BY id HAVING count(*) > 1)"),
        (
            "entries without their raw message",
            "SELECT count(*) FROM message m WHERE m.raw_kept = 0 AND NOT EXISTS (SELECT 1 FROM raw r WHERE r.seq = m.seq)",
        ),
        (
            "entries whose raw message the spool does not keep",
            "SELECT count(*) FROM message m WHERE m.raw_kept = 1
                 AND NOT EXISTS (SELECT 1 FROM spool.kept k WHERE k.id = m.id)
                 AND NOT EXISTS (SELECT 1 FROM spool.message q WHERE q.id = m.id)",
        ),
        (
            "raw messages without an entry",
            "SELECT count(*) FROM raw r WHERE NOT EXISTS (SELECT 1 FROM message m WHERE m.seq = r.seq)",
        ),
        (
            "raw messages kept by the spool without an entry",
            "SELECT count(*) FROM spool.kept k WHERE NOT EXISTS (SELECT 1 FROM message m WHERE m.id = k.id AND m.raw_kept = 1)",
        ),
    ];
    for (what, sql) in checks {
        match count(sql) {
            Ok(n) if what == "entries" => row.note(format!("{n} archive entries")),
            // Disk that the next start gives back (entries the archive could not write while
            // the disk was read-only), not a message lost.
            Ok(n) if what.starts_with("raw messages kept") => {
                if n > 0 {
                    row.note(format!("{n} {what}, given back at the next start"));
                }
            }
            Ok(0) => {}
            Ok(n) => row.violation(format!("archive: {n} {what}")),
            Err(e) => row.violation(format!("archive: cannot count {what}: {e}")),
        }
    }
}

fn secs(d: Option<Duration>) -> String {
    d.map_or("–".into(), |d| format!("{:.1} s", d.as_secs_f64()))
}

/// The results table, in Markdown.
pub fn table(rows: &[Row]) -> String {
    let mut out = String::from(
        "| scenario | sent | acknowledged | delivered | lost | duplicates (same id + resent) | drain after recovery | notes |\n\
         |---|---:|---:|---:|---:|---:|---:|---|\n",
    );
    for r in rows {
        let dups = r.redelivered + r.resent;
        let dups = if dups == 0 { "0".to_string() } else { format!("{dups} ({} + {})", r.redelivered, r.resent) };
        let mut notes = r.notes.join("; ");
        if !r.violations.is_empty() {
            notes = format!("**FAILED: {} violation(s)**; {notes}", r.violations.len());
        }
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.scenario,
            r.sent,
            r.acknowledged,
            r.delivered,
            r.lost,
            dups,
            secs(r.drain),
            notes
        ));
    }
    out
}

/// Seen deliveries by message, for quick lookups.
pub fn delivered_set(seen: &[Seen]) -> HashSet<u64> {
    seen.iter().filter_map(|s| s.seq).collect()
}

/// Counts log lines of every serve run whose `message` is `what`.
pub fn log_count(logs: &str, what: &str) -> usize {
    let needle = format!("\"message\":\"{what}\"");
    logs.lines().filter(|l| l.contains(&needle)).count()
}
