//! What every [`Archive`] backend must do, as functions over `&dyn Archive`: a backend's tests
//! call [`run_all`] with a function that gives a fresh, empty archive. Each check panics with
//! what went wrong.

use super::{Archive, ArchiveState, ArchivedMessage, AttemptRecord, MessageQuery};
use crate::model::{Envelope, Source};
use std::time::{Duration, SystemTime};

/// Every check below, each on a fresh archive from `fresh`.
pub fn run_all(fresh: &dyn Fn() -> Box<dyn Archive>) {
    record_and_read_back(fresh().as_ref());
    raw_is_kept_byte_for_byte(fresh().as_ref());
    recording_again_replaces(fresh().as_ref());
    pages_are_newest_first_and_complete(fresh().as_ref());
    filters_each_narrow(fresh().as_ref());
    search_finds_subject_and_text(fresh().as_ref());
    search_finds_every_word_of_a_repetitive_text(fresh().as_ref());
    unknown_and_bad_ids_are_none(fresh().as_ref());
    counts_and_stats(fresh().as_ref());
    retention_by_age_removes_oldest(fresh().as_ref());
    retention_by_size_removes_oldest(fresh().as_ref());
}

/// A spool-like id received `ago` before `now`.
pub fn id_at(t: SystemTime, n: u64) -> String {
    ulid::Ulid::from_parts(super::unix_ms(t) as u64, u128::from(n)).to_string()
}

/// A finished message for tests: `id`, its subject, sender and body.
pub fn message(id: &str, state: ArchiveState, subject: &str, from: &str, body: &str) -> ArchivedMessage {
    let raw = format!("From: {from}\r\nTo: ops@example.com\r\nSubject: {subject}\r\n\r\n{body}\r\n").into_bytes();
    let mut envelope = Envelope::new(Source::Smtp);
    envelope.id = id.to_string();
    envelope.recipients = vec!["Ops@Example.com".into()];
    envelope.mail_from = Some(from.into());
    let (rule, payload, to) = match state {
        ArchiveState::Delivered => (
            Some("orders".to_string()),
            Some(format!(r#"{{"subject":{},"fields":{{"order":"42","empty":""}}}}"#, serde_json::json!(subject))),
            vec!["hook".to_string()],
        ),
        ArchiveState::Dropped => (Some("spam".to_string()), None, vec![]),
        ArchiveState::Dead => (None, None, vec![]),
    };
    let reason = (state == ArchiveState::Dead).then(|| "no rule matched".to_string());
    ArchivedMessage::build(state, envelope, raw, rule, payload, to, reason, SystemTime::now())
}

fn attempt(id: &str, outcome: &str, status: u16) -> AttemptRecord {
    AttemptRecord {
        message_id: id.into(),
        at: crate::spool::format_time(SystemTime::now()),
        destination: "hook".into(),
        outcome: outcome.into(),
        status: Some(status),
        reply: None,
        body: Some("{\"ok\":true}".into()),
        duration_ms: 12,
    }
}

pub fn record_and_read_back(a: &dyn Archive) {
    let id = id_at(SystemTime::now(), 1);
    a.add_attempt(&attempt(&id, "deferred", 503)).unwrap();
    a.record(&message(&id, ArchiveState::Delivered, "Order 42 shipped", "Shop@Example.com", "Your parcel")).unwrap();
    a.add_attempt(&attempt(&id, "delivered", 200)).unwrap();
    let r = a.get(&id).unwrap().expect("recorded message is found");
    assert_eq!(r.summary.id, id);
    assert_eq!(r.summary.state, ArchiveState::Delivered);
    assert_eq!(r.summary.subject, "Order 42 shipped");
    assert_eq!(r.summary.from, "shop@example.com");
    assert_eq!(r.summary.rule.as_deref(), Some("orders"));
    assert_eq!(r.summary.destinations, vec!["hook".to_string()]);
    assert_eq!(r.envelope.recipients, vec!["Ops@Example.com".to_string()]);
    assert_eq!(r.fields, Some(serde_json::json!({"order": "42", "empty": ""})));
    assert_eq!(r.payload.as_ref().and_then(|p| p.get("subject")).and_then(|s| s.as_str()), Some("Order 42 shipped"));
    let statuses: Vec<Option<u16>> = r.attempts.iter().map(|x| x.status).collect();
    assert_eq!(statuses, vec![Some(503), Some(200)], "attempts oldest first, before and after the record");
    assert_eq!(r.attempts[1].body.as_deref(), Some("{\"ok\":true}"));
    assert_eq!(r.attempts[1].duration_ms, 12);
}

pub fn raw_is_kept_byte_for_byte(a: &dyn Archive) {
    let id = id_at(SystemTime::now(), 2);
    let mut m = message(&id, ArchiveState::Dead, "bytes", "a@b.c", "x");
    m.raw = b"Subject: bytes\r\n\r\n\x00\xff\xfe binary \r\n.\r\n".to_vec();
    a.record(&m).unwrap();
    assert_eq!(a.raw(&id).unwrap().as_deref(), Some(&m.raw[..]));
    assert_eq!(a.get(&id).unwrap().unwrap().size, m.raw.len() as u64);
}

pub fn recording_again_replaces(a: &dyn Archive) {
    let id = id_at(SystemTime::now(), 3);
    a.record(&message(&id, ArchiveState::Dead, "first try", "a@b.c", "x")).unwrap();
    a.add_attempt(&attempt(&id, "dead", 400)).unwrap();
    a.record(&message(&id, ArchiveState::Delivered, "first try", "a@b.c", "x")).unwrap();
    let page = a.list(&MessageQuery::default()).unwrap();
    assert_eq!(page.items.len(), 1, "one entry per message: {page:?}");
    assert_eq!(page.items[0].state, ArchiveState::Delivered);
    assert_eq!(a.get(&id).unwrap().unwrap().attempts.len(), 1, "attempts survive the new entry");
    let found = a.list(&MessageQuery { q: Some("first".into()), ..Default::default() }).unwrap();
    assert_eq!(found.items.len(), 1, "the search index has one entry too");
}

pub fn pages_are_newest_first_and_complete(a: &dyn Archive) {
    let base = SystemTime::now() - Duration::from_secs(3600);
    let ids: Vec<String> = (0..7).map(|i| id_at(base + Duration::from_secs(i * 10), i)).collect();
    for id in &ids {
        a.record(&message(id, ArchiveState::Delivered, "paged", "a@b.c", "x")).unwrap();
    }
    let mut seen = Vec::new();
    let mut cursor = None;
    loop {
        let page = a.list(&MessageQuery { limit: 3, cursor: cursor.clone(), ..Default::default() }).unwrap();
        assert!(page.items.len() <= 3);
        seen.extend(page.items.iter().map(|s| s.id.clone()));
        match page.next {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    let mut expected = ids.clone();
    expected.reverse();
    assert_eq!(seen, expected, "every message once, newest first");
}

pub fn filters_each_narrow(a: &dyn Archive) {
    let now = SystemTime::now();
    let old = id_at(now - Duration::from_secs(7200), 1);
    let delivered = id_at(now, 2);
    let dead = id_at(now, 3);
    a.record(&message(&old, ArchiveState::Dropped, "old one", "old@x.org", "x")).unwrap();
    a.record(&message(&delivered, ArchiveState::Delivered, "shipped", "shop@x.org", "x")).unwrap();
    let mut m = message(&dead, ArchiveState::Dead, "lost", "who@y.org", "x");
    m.envelope.source = Source::Imap { account: "a".into(), folder: "INBOX".into() };
    m.envelope.recipients = vec!["other@example.com".into()];
    a.record(&m).unwrap();
    let ids = |q: MessageQuery| -> Vec<String> { a.list(&q).unwrap().items.into_iter().map(|s| s.id).collect() };
    let q = MessageQuery::default;
    assert_eq!(ids(MessageQuery { state: Some(ArchiveState::Dead), ..q() }), vec![dead.clone()]);
    assert_eq!(ids(MessageQuery { rule: Some("orders".into()), ..q() }), vec![delivered.clone()]);
    assert_eq!(ids(MessageQuery { destination: Some("hook".into()), ..q() }), vec![delivered.clone()]);
    assert_eq!(ids(MessageQuery { from: Some("SHOP@x.org".into()), ..q() }), vec![delivered.clone()]);
    assert_eq!(ids(MessageQuery { to: Some("other@example.com".into()), ..q() }), vec![dead.clone()]);
    assert_eq!(ids(MessageQuery { source: Some("imap".into()), ..q() }), vec![dead.clone()]);
    assert_eq!(ids(MessageQuery { since: Some(now - Duration::from_secs(60)), ..q() }), vec![dead.clone(), delivered]);
    assert_eq!(ids(MessageQuery { until: Some(now - Duration::from_secs(60)), ..q() }), vec![old]);
    assert!(ids(MessageQuery { state: Some(ArchiveState::Dead), rule: Some("orders".into()), ..q() }).is_empty());
}

/// The ids a search for `q` lists, newest first.
fn searched(a: &dyn Archive, q: &str) -> Vec<String> {
    a.list(&MessageQuery { q: Some(q.into()), ..Default::default() }).unwrap().items.into_iter().map(|s| s.id).collect()
}

pub fn search_finds_subject_and_text(a: &dyn Archive) {
    let now = SystemTime::now();
    let (x, y) = (id_at(now, 1), id_at(now, 2));
    a.record(&message(&x, ArchiveState::Delivered, "Invoice 2231 overdue", "a@b.c", "please pay")).unwrap();
    a.record(&message(&y, ArchiveState::Delivered, "Hello", "a@b.c", "the parcel for invoice 77 arrived")).unwrap();
    let ids = |q: &str| searched(a, q);
    assert_eq!(ids("invoice"), vec![y.clone(), x.clone()]);
    assert_eq!(ids("overdue"), vec![x.clone()]);
    assert_eq!(ids("parc"), vec![y.clone()], "a word matches as a prefix");
    assert_eq!(ids("invoice-2231"), vec![x.clone()], "punctuation splits words as the index does");
    assert_eq!(ids("invoice 2231"), vec![x]);
    assert!(ids("nothing-like-this").is_empty());
    let odd = MessageQuery { q: Some("\" OR * NEAR( AND".into()), ..Default::default() };
    assert!(a.list(&odd).is_ok(), "what a user types is never read as a query operator");
}

/// Machine-written mail repeats its lines: every word is found, the first and the last, in
/// whatever case, beside punctuation or whitespace, and a word of one line only.
pub fn search_finds_every_word_of_a_repetitive_text(a: &dyn Archive) {
    let now = SystemTime::now();
    let (x, y) = (id_at(now, 1), id_at(now, 2));
    let mut text = String::new();
    for n in 0..40 {
        text.push_str(&format!("Job NIGHTLY_EXPORT finished,\twarnings: see the log.\r\nrow {n} done\r\n"));
    }
    text.push_str("Total: 40 rows; archive closed");
    a.record(&message(&x, ArchiveState::Delivered, "export report", "cron@b.c", &text)).unwrap();
    a.record(&message(&y, ArchiveState::Delivered, "other", "cron@b.c", "job finished without rows")).unwrap();
    let ids = |q: &str| searched(a, q);
    assert_eq!(ids("nightly_export"), vec![x.clone()]);
    assert_eq!(ids("warnings"), vec![x.clone()], "a word after a tab and before a colon");
    assert_eq!(ids("log"), vec![x.clone()]);
    assert_eq!(ids("39"), vec![x.clone()], "a word of the last repeated line only");
    assert_eq!(ids("finished"), vec![y.clone(), x.clone()]);
    assert_eq!(ids("closed"), vec![x.clone()], "the last word");
    assert_eq!(ids("job rows"), vec![y, x]);
}

pub fn unknown_and_bad_ids_are_none(a: &dyn Archive) {
    let unknown = id_at(SystemTime::now(), 9);
    assert!(a.get(&unknown).unwrap().is_none());
    assert!(a.raw(&unknown).unwrap().is_none());
    for bad in ["../../etc/passwd", "", "01ARZ3NDEKTSV4RRFFQ69G5FA", "x' OR 1=1 --"] {
        assert!(a.get(bad).unwrap().is_none(), "{bad:?}");
        assert!(a.raw(bad).unwrap().is_none(), "{bad:?}");
    }
    let mut m = message(&unknown, ArchiveState::Dead, "bad", "a@b.c", "x");
    m.id = "not-a-ulid".into();
    assert!(a.record(&m).is_err(), "an entry without a spool id is refused");
    assert!(a.list(&MessageQuery { cursor: Some("../x".into()), ..Default::default() }).is_err());
}

pub fn counts_and_stats(a: &dyn Archive) {
    let now = SystemTime::now();
    a.record(&message(&id_at(now, 1), ArchiveState::Delivered, "a", "a@b.c", "x")).unwrap();
    a.record(&message(&id_at(now, 2), ArchiveState::Delivered, "b", "a@b.c", "x")).unwrap();
    a.record(&message(&id_at(now, 3), ArchiveState::Dead, "c", "a@b.c", "x")).unwrap();
    a.add_attempt(&attempt(&id_at(now, 3), "deferred", 429)).unwrap();
    let counts = a.counts_by_state().unwrap();
    assert_eq!(counts, vec![(ArchiveState::Delivered, 2), (ArchiveState::Dropped, 0), (ArchiveState::Dead, 1)]);
    let hours = a.hourly(now - Duration::from_secs(24 * 3600)).unwrap();
    assert_eq!(hours.iter().map(|(_, n)| n).sum::<u64>(), 3);
    let stats = a.rule_stats(now - Duration::from_secs(3600)).unwrap();
    assert_eq!(stats.len(), 1, "{stats:?}");
    assert_eq!(stats[0].rule, "orders");
    assert_eq!(stats[0].matches, 2);
    assert_eq!(stats[0].filled, vec![("order".to_string(), 2)], "an empty field is not filled");
    let dests = a.destinations().unwrap();
    assert_eq!(dests.len(), 1);
    assert_eq!(dests[0].last.status, Some(429));
}

pub fn retention_by_age_removes_oldest(a: &dyn Archive) {
    let now = SystemTime::now();
    let old = id_at(now - Duration::from_secs(40 * 86400), 1);
    let new = id_at(now - Duration::from_secs(86400), 2);
    a.record(&message(&old, ArchiveState::Delivered, "old", "a@b.c", "x")).unwrap();
    a.add_attempt(&attempt(&old, "delivered", 200)).unwrap();
    a.record(&message(&new, ArchiveState::Delivered, "new", "a@b.c", "x")).unwrap();
    let r = a.enforce_retention(Duration::from_secs(30 * 86400), u64::MAX, now).unwrap();
    assert_eq!(r.removed, 1);
    assert!(a.get(&old).unwrap().is_none());
    assert!(a.raw(&old).unwrap().is_none());
    assert!(a.get(&new).unwrap().is_some());
    assert!(a.list(&MessageQuery { q: Some("old".into()), ..Default::default() }).unwrap().items.is_empty());
}

pub fn retention_by_size_removes_oldest(a: &dyn Archive) {
    let now = SystemTime::now();
    let body = "z".repeat(20_000);
    let ids: Vec<String> = (0..20).map(|i| id_at(now - Duration::from_secs(100 - i), i)).collect();
    for id in &ids {
        a.record(&message(id, ArchiveState::Delivered, "big", "a@b.c", &body)).unwrap();
    }
    let full = a.size().unwrap();
    let r = a.enforce_retention(Duration::from_secs(86400), full / 2, now).unwrap();
    assert!(r.size <= full / 2, "{} > {}", r.size, full / 2);
    assert!(r.removed >= 1);
    let left: Vec<String> =
        a.list(&MessageQuery { limit: 100, ..Default::default() }).unwrap().items.into_iter().map(|s| s.id).collect();
    assert!(!left.is_empty(), "not everything had to go");
    let mut newest: Vec<String> = ids.iter().rev().take(left.len()).cloned().collect();
    newest.sort();
    newest.reverse();
    assert_eq!(left, newest, "the oldest went first");
}
