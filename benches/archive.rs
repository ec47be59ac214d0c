//! The archive at size: fills a fresh SQLite archive with N messages of about 2 KB (100,000 by
//! default; `ARCHIVE_BENCH_MESSAGES` changes it), then times the queries the console makes most
//! (first page, a sender's messages, a full-text search of the subject) and prints a table with
//! the archive's disk use per message. Run it with `scripts/bench-archive`; `ARCHIVE_BENCH_BATCH`
//! sets how many messages are committed per transaction (256 by default).
//!
//! `ARCHIVE_BENCH_AS=serve` writes the entries as `mailhook serve` does: the raw message kept by
//! the spool (the entry refers to it), and the payload of a rule without `[rule.payload]`, which
//! carries the message's text. It times the writing only (the queries then have no raw bytes to
//! read, which they do not read anyway).

use mailhook::model::{Envelope, Source};
use mailhook::store::sqlite::SqliteArchive;
use mailhook::store::{Archive, ArchiveState, ArchivedMessage, AttemptRecord, Entry, MessageQuery};
use std::time::{Duration, Instant, SystemTime};

/// Times each query this many times; the table shows the median and the slowest.
const RUNS: usize = 21;

const WORDS: &[&str] = &[
    "order", "invoice", "shipment", "parcel", "refund", "ticket", "delivery", "account", "payment", "reminder",
    "update", "welcome", "password", "report", "alert", "backup", "server", "meeting", "contract", "quote",
];

fn message(i: usize, start_ms: u64, as_serve: bool) -> (ArchivedMessage, AttemptRecord) {
    let id = ulid::Ulid::from_parts(start_ms + i as u64 * 10, i as u128).to_string();
    let sender = format!("customer{}@example{}.com", i % 5000, i % 7);
    let subject = format!("{} {} number {i}", WORDS[i % WORDS.len()], WORDS[(i / 20) % WORDS.len()]);
    let mut body = String::new();
    let mut k = i;
    while body.len() < 1700 {
        body.push_str(WORDS[k % WORDS.len()]);
        body.push(' ');
        k = k.wrapping_mul(31).wrapping_add(7);
    }
    let raw = format!(
        "From: Customer <{sender}>\r\nTo: support@shop.example.com\r\nSubject: {subject}\r\n\
         Message-ID: <{id}@example.com>\r\nDate: Tue, 01 Dec 2026 09:30:00 +0100\r\n\r\n{body}\r\n"
    )
    .into_bytes();
    let mut envelope = Envelope::new(Source::Smtp);
    envelope.id = id.clone();
    envelope.mail_from = Some(sender);
    envelope.recipients = vec!["support@shop.example.com".into()];
    let payload = if as_serve {
        let sender = envelope.mail_from.as_deref().unwrap_or_default();
        serde_json::json!({
            "id": id, "receivedAt": "2026-12-06T10:00:00.000Z", "source": "smtp", "rule": "support",
            "from": {"address": sender, "name": "Customer"}, "to": [{"address": "support@shop.example.com"}],
            "subject": subject, "messageId": format!("{id}@example.com"), "text": body, "fields": {"order": i.to_string()},
        })
        .to_string()
    } else {
        format!(r#"{{"id":"{id}","rule":"support","fields":{{"order":"{i}"}}}}"#)
    };
    let state = if i.is_multiple_of(50) { ArchiveState::Dead } else { ArchiveState::Delivered };
    let m = ArchivedMessage::build(
        state,
        envelope,
        raw,
        Some("support".into()),
        Some(payload),
        vec!["kustomer".into()],
        None,
        SystemTime::now(),
    );
    let m = if as_serve {
        let size = m.raw.len() as u64;
        m.raw_in_spool(size)
    } else {
        m
    };
    let a = AttemptRecord {
        message_id: id,
        at: "2026-12-06T10:00:00.000Z".into(),
        destination: "kustomer".into(),
        outcome: "delivered".into(),
        status: Some(200),
        reply: None,
        body: Some(r#"{"data":{"id":"5f1c"}}"#.into()),
        duration_ms: 42,
    };
    (m, a)
}

/// CPU time of this thread so far (user and system, in nanoseconds, from the scheduler).
fn thread_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap_or_default();
    Duration::from_nanos(stat.split_whitespace().next().and_then(|n| n.parse().ok()).unwrap_or(0))
}

fn time(archive: &SqliteArchive, query: &MessageQuery) -> (Duration, Duration, usize) {
    let mut took = Vec::with_capacity(RUNS);
    let mut found = 0;
    for _ in 0..RUNS {
        let t = Instant::now();
        found = archive.list(query).expect("query").items.len();
        took.push(t.elapsed());
    }
    took.sort();
    (took[RUNS / 2], took[RUNS - 1], found)
}

fn main() {
    let n: usize = std::env::var("ARCHIVE_BENCH_MESSAGES").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000);
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("archive.db");
    let archive = SqliteArchive::open(&path).expect("open");
    let start_ms = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_millis() as u64 - n as u64 * 10;

    let as_serve = std::env::var("ARCHIVE_BENCH_AS").is_ok_and(|v| v == "serve");
    let batch: usize = std::env::var("ARCHIVE_BENCH_BATCH").ok().and_then(|v| v.parse().ok()).unwrap_or(256).max(1);
    let (mut fill, mut cpu) = (Duration::ZERO, Duration::ZERO);
    let mut raw_bytes = 0usize;
    for chunk in (0..n).collect::<Vec<_>>().chunks(batch) {
        let mut entries = Vec::with_capacity(chunk.len() * 2);
        for &i in chunk {
            let (m, a) = message(i, start_ms, as_serve);
            raw_bytes += m.size() as usize;
            entries.push(Entry::Attempt(a));
            entries.push(Entry::Message(Box::new(m)));
        }
        // Only the writing is timed: building an entry (parsing its message) is the pipeline's.
        let (t, c) = (Instant::now(), thread_cpu());
        archive.write_batch(&entries).expect("write");
        fill += t.elapsed();
        cpu += thread_cpu() - c;
    }
    // What retention does after removing: the WAL folded into the database.
    archive.enforce_retention(Duration::from_secs(365 * 86400), u64::MAX, SystemTime::now()).expect("retention");
    let disk: u64 =
        std::fs::read_dir(dir.path()).unwrap().flatten().map(|e| e.metadata().map(|m| m.len()).unwrap_or(0)).sum();

    let sender = format!("customer1234@example{}.com", 1234 % 7);
    let queries = [
        ("first page (50, newest first)", MessageQuery::default()),
        ("search by sender (exact address)", MessageQuery { from: Some(sender), ..Default::default() }),
        ("full-text subject search (\"refund\")", MessageQuery { q: Some("refund".into()), ..Default::default() }),
        (
            "full-text, two words (\"invoice number 4242\")",
            MessageQuery { q: Some("invoice 4242".into()), ..Default::default() },
        ),
        ("filter by state (dead)", MessageQuery { state: Some(ArchiveState::Dead), ..Default::default() }),
    ];
    println!("archive benchmark: {n} messages, {} bytes of raw message on average", raw_bytes / n.max(1));
    println!(
        "written in {:.1} s: {:.0} messages/s; per message with its attempt {:.1} µs, of which {:.1} µs CPU \
         (batches of {batch})",
        fill.as_secs_f64(),
        n as f64 / fill.as_secs_f64(),
        fill.as_secs_f64() * 1e6 / n.max(1) as f64,
        cpu.as_secs_f64() * 1e6 / n.max(1) as f64
    );
    println!();
    println!("| query | median | slowest of {RUNS} | rows |");
    println!("|---|---:|---:|---:|");
    for (name, q) in &queries {
        let (median, worst, rows) = time(&archive, q);
        println!("| {name} | {:.2} ms | {:.2} ms | {rows} |", median.as_secs_f64() * 1e3, worst.as_secs_f64() * 1e3);
    }
    let t = Instant::now();
    let counts = archive.counts_by_state().expect("counts");
    println!("| counts by state (overview) | {:.2} ms | | {} |", t.elapsed().as_secs_f64() * 1e3, counts.len());
    let day = SystemTime::now() - Duration::from_secs(86400);
    let t = Instant::now();
    let hours = archive.hourly(day).expect("hourly");
    println!("| messages per hour, 24 h (overview) | {:.2} ms | | {} |", t.elapsed().as_secs_f64() * 1e3, hours.len());
    let t = Instant::now();
    let rules = archive.rule_stats(day).expect("rule stats");
    println!(
        "| rules and field fill, 24 h (overview; every message is within 24 h here) | {:.2} ms | | {} |",
        t.elapsed().as_secs_f64() * 1e3,
        rules.len()
    );
    let t = Instant::now();
    archive.get(&ulid::Ulid::from_parts(start_ms + 12_340, 1234).to_string()).expect("get");
    println!("| one message with its attempts | {:.2} ms | | 1 |", t.elapsed().as_secs_f64() * 1e3);
    println!();
    println!(
        "disk: {:.1} MB for {n} messages = {:.0} bytes per message ({:.2}× its raw size)",
        disk as f64 / 1e6,
        disk as f64 / n as f64,
        disk as f64 / raw_bytes as f64
    );
}
