use super::db::{Op, Raw};
use super::*;
use crate::model::{Envelope, Source};
use proptest::prelude::*;
use std::collections::HashMap;

fn open() -> (tempfile::TempDir, Spool) {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(&dir.path().join("spool"), SpoolOptions::default()).unwrap();
    (dir, spool)
}

fn envelope() -> Envelope {
    let mut e = Envelope::new(Source::Stdin);
    e.recipients = vec!["hook@example.com".into()];
    e
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
}

#[test]
fn stored_message_is_in_incoming_with_its_raw_bytes() {
    let (_d, spool) = open();
    let raw = b"Subject: hi\r\n\r\nbody\r\n";
    let id = spool.store(envelope(), raw).unwrap();
    assert_eq!(spool.find(&id), Some(State::Incoming));
    assert_eq!(spool.read_raw(&id).unwrap(), raw);
    let meta = spool.read_meta(State::Incoming, &id).unwrap();
    assert_eq!(meta.id, id);
    assert_eq!(meta.envelope.id, id);
    assert_eq!(meta.size, raw.len() as u64);
    assert_eq!(meta.envelope.recipients, vec!["hook@example.com".to_string()]);
    assert!(fs::read_dir(spool.dir().join("tmp")).unwrap().next().is_none(), "tmp/ is empty after a commit");
}

#[test]
fn transitions_and_removal() {
    let (_d, spool) = open();
    let id = spool.store(envelope(), b"x").unwrap();
    let mut meta = spool.read_meta(State::Incoming, &id).unwrap();
    block_on(spool.transition(&id, State::Incoming, State::Active, None)).unwrap();
    assert_eq!(spool.find(&id), Some(State::Active));
    meta.attempts = 3;
    meta.last_error = Some("HTTP 503".into());
    block_on(spool.transition(&id, State::Active, State::Deferred, Some(&meta))).unwrap();
    assert_eq!(spool.find(&id), Some(State::Deferred));
    assert_eq!(spool.read_meta(State::Deferred, &id).unwrap().attempts, 3);
    meta.attempts = 4;
    block_on(spool.transition(&id, State::Deferred, State::Deferred, Some(&meta))).unwrap();
    assert_eq!(spool.read_meta(State::Deferred, &id).unwrap().attempts, 4);
    // Moving from a state the message is not in is refused and changes nothing.
    let err = block_on(spool.transition(&id, State::Active, State::Dead, None)).unwrap_err();
    assert!(matches!(err, SpoolError::NotFound(_)), "{err}");
    assert_eq!(spool.find(&id), Some(State::Deferred));
    block_on(spool.remove(&id, State::Deferred)).unwrap();
    assert_eq!(spool.find(&id), None);
    assert!(matches!(spool.read_raw(&id), Err(SpoolError::NotFound(_))));
    assert!(matches!(block_on(spool.remove(&id, State::Deferred)), Err(SpoolError::NotFound(_))));
    assert_eq!(rows(&spool), (0, 0), "no message row and no raw row left");
    assert_eq!(entries(&spool, "tmp"), Vec::<String>::new());
}

/// How many rows the spool's `message` and `raw` tables hold, read with a connection of its own.
fn rows(spool: &Spool) -> (i64, i64) {
    let c = rusqlite::Connection::open(spool.db_path()).unwrap();
    let n = |t: &str| c.query_row(&format!("SELECT count(*) FROM {t}"), [], |r| r.get(0)).unwrap();
    (n("message"), n("raw"))
}

/// Runs `sql` on the spool's database from a connection of its own (as `sqlite3` would).
fn sql(spool: &Spool, sql: &str) {
    rusqlite::Connection::open(spool.db_path()).unwrap().execute_batch(sql).unwrap();
}

/// The names in a spool directory, sorted.
fn entries(spool: &Spool, dir: &str) -> Vec<String> {
    let mut names: Vec<String> =
        fs::read_dir(spool.dir().join(dir)).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    names
}

#[test]
fn a_new_message_is_a_row_not_a_file_and_keeps_its_metadata_across_states() {
    let (_d, spool) = open();
    let raw = b"Subject: one row\r\n\r\nbody\r\n";
    let id = spool.store(envelope(), raw).unwrap();
    // Only the database and its own files: no file per message.
    let mut top = entries(&spool, ".");
    top.retain(|n| !n.starts_with("spool.db"));
    assert_eq!(top, ["corrupt", "tmp"]);
    assert_eq!(entries(&spool, "tmp"), Vec::<String>::new());
    assert_eq!(rows(&spool), (1, 1));

    // Leaving incoming without new metadata keeps the metadata it had.
    block_on(spool.transition(&id, State::Incoming, State::Deferred, None)).unwrap();
    assert_eq!(spool.list(State::Incoming).unwrap(), Vec::<String>::new());
    assert_eq!(spool.read_meta(State::Deferred, &id).unwrap().size, raw.len() as u64);
    assert_eq!(spool.read_raw(&id).unwrap(), raw);

    // Back in line (`queue retry` of an undecided message).
    let mut meta = spool.read_meta(State::Deferred, &id).unwrap();
    meta.attempts = 2;
    block_on(spool.transition(&id, State::Deferred, State::Incoming, Some(&meta))).unwrap();
    assert_eq!(spool.list(State::Incoming).unwrap(), std::slice::from_ref(&id));
    assert_eq!(spool.read_meta(State::Incoming, &id).unwrap().attempts, 2);
    assert_eq!(spool.read_raw(&id).unwrap(), raw);
    // Read with its raw bytes in one go, when small enough.
    let (m, r) = spool.read_meta_with_raw(State::Incoming, &id, 1 << 20).unwrap();
    assert_eq!((m.attempts, r.as_deref()), (2, Some(&raw[..])));
    assert_eq!(spool.read_meta_with_raw(State::Incoming, &id, 3).unwrap().1, None, "larger than asked");
    block_on(spool.remove(&id, State::Incoming)).unwrap();
    assert_eq!(rows(&spool), (0, 0));

    // Replacing the metadata of a message in incoming keeps it there, once.
    let id = spool.store(envelope(), raw).unwrap();
    let mut meta = spool.read_meta(State::Incoming, &id).unwrap();
    meta.attempts = 5;
    block_on(spool.transition(&id, State::Incoming, State::Incoming, Some(&meta))).unwrap();
    assert_eq!(spool.list(State::Incoming).unwrap(), std::slice::from_ref(&id));
    assert_eq!(spool.read_meta(State::Incoming, &id).unwrap().attempts, 5);
    block_on(spool.transition(&id, State::Incoming, State::Dead, None)).unwrap();
    assert_eq!(spool.read_meta(State::Dead, &id).unwrap().attempts, 5);
    assert!(matches!(spool.read_meta(State::Incoming, &id), Err(SpoolError::NotFound(_))));
    block_on(spool.remove(&id, State::Dead)).unwrap();
    assert_eq!(rows(&spool), (0, 0));
}

#[test]
fn the_database_is_private_and_in_wal_mode() {
    use std::os::unix::fs::PermissionsExt;
    let (_d, spool) = open();
    spool.store(envelope(), b"Subject: x\r\n\r\n").unwrap();
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(spool.dir()), 0o700);
    for name in ["spool.db", "spool.db-wal", "spool.db-shm"] {
        assert_eq!(mode(&spool.dir().join(name)), 0o600, "{name}");
    }
    let c = rusqlite::Connection::open(spool.db_path()).unwrap();
    let journal: String = c.query_row("PRAGMA journal_mode", [], |r| r.get(0)).unwrap();
    assert_eq!(journal, "wal");
}

#[test]
fn a_big_message_spills_to_tmp_and_is_copied_in_whole() {
    let (_d, spool) = open();
    let mut raw = b"Subject: big\r\n\r\n".to_vec();
    let mut n = 0u64;
    while raw.len() < 3 * SPILL + 12345 {
        raw.extend_from_slice(format!("line {n}\r\n").as_bytes());
        n += 1;
    }
    let mut draft = spool.draft().unwrap();
    draft.write_all(&raw[..SPILL]).unwrap();
    assert_eq!(entries(&spool, "tmp"), Vec::<String>::new(), "up to the threshold, kept in memory");
    for chunk in raw[SPILL..].chunks(65_000) {
        draft.write_all(chunk).unwrap();
    }
    assert_eq!(entries(&spool, "tmp").len(), 1, "past it, spilled to tmp/");
    let meta = draft.commit_blocking(envelope()).unwrap();
    assert_eq!(entries(&spool, "tmp"), Vec::<String>::new(), "the spill file goes once committed");
    assert_eq!(meta.size, raw.len() as u64);
    assert!(spool.read_raw(&meta.id).unwrap() == raw, "the raw bytes come back whole");
    let (m, r) = spool.read_meta_with_raw(State::Incoming, &meta.id, u64::MAX).unwrap();
    assert_eq!((m.size, r), (raw.len() as u64, None), "a big message is read on its own");

    // A big draft dropped before its commit leaves nothing either.
    let mut draft = spool.draft().unwrap();
    draft.write_all(&raw).unwrap();
    drop(draft);
    assert_eq!(entries(&spool, "tmp"), Vec::<String>::new());
    assert_eq!(rows(&spool), (1, 1));
}

#[test]
fn another_handle_on_the_same_spool_sees_and_changes_the_same_messages() {
    let (_d, spool) = open();
    // What `mailhook ingest` and `queue` do while `serve` runs: a spool opened a second time.
    let other = Spool::open(spool.dir(), SpoolOptions::default()).unwrap();
    let id = other.store(envelope(), b"Subject: from ingest\r\n\r\n").unwrap();
    assert_eq!(spool.list(State::Incoming).unwrap(), std::slice::from_ref(&id));
    block_on(spool.transition(&id, State::Incoming, State::Dead, None)).unwrap();
    assert_eq!(other.find(&id), Some(State::Dead));
    other.transition_blocking(&id, State::Dead, State::Deferred, None).unwrap();
    assert_eq!(spool.find(&id), Some(State::Deferred));
    assert_eq!(spool.read_raw(&id).unwrap(), b"Subject: from ingest\r\n\r\n");
}

#[test]
fn one_failing_operation_does_not_fail_the_others_of_its_batch() {
    let (_d, spool) = open();
    let id = spool.store(envelope(), b"x").unwrap();
    let missing = ulid::Ulid::generate().to_string();
    let ops = vec![
        Spool::transition_op(&id, State::Incoming, State::Deferred, None).unwrap(),
        Spool::transition_op(&missing, State::Incoming, State::Dead, None).unwrap(),
        Spool::remove_op(&missing, State::Dead).unwrap(),
        Op::Insert {
            id: missing.clone(),
            state: State::Dead,
            meta: "{}".into(),
            raw: Raw::Bytes(b"y".to_vec()),
            if_absent: false,
        },
        // The same id twice: the second insert breaks the key and is undone alone.
        Op::Insert {
            id: missing.clone(),
            state: State::Dead,
            meta: "{}".into(),
            raw: Raw::Bytes(b"z".to_vec()),
            if_absent: false,
        },
    ];
    let results = spool.db().unwrap().submit_all_blocking(ops);
    assert!(results[0].is_ok(), "{:?}", results[0]);
    assert!(matches!(results[1], Err(SpoolError::NotFound(_))), "{:?}", results[1]);
    assert!(matches!(results[2], Err(SpoolError::NotFound(_))), "{:?}", results[2]);
    assert!(results[3].is_ok(), "{:?}", results[3]);
    assert!(matches!(results[4], Err(SpoolError::Db { .. })), "{:?}", results[4]);
    assert_eq!(spool.find(&id), Some(State::Deferred));
    assert_eq!(spool.read_raw(&missing).unwrap(), b"y");
    assert_eq!(rows(&spool), (2, 2));
}

#[test]
fn dropped_draft_leaves_nothing() {
    let (_d, spool) = open();
    {
        let mut draft = spool.draft().unwrap();
        draft.write_all(b"partial").unwrap();
    }
    assert!(fs::read_dir(spool.dir().join("tmp")).unwrap().next().is_none());
    for state in State::ALL {
        assert!(spool.list(state).unwrap().is_empty());
    }
    assert_eq!(rows(&spool), (0, 0));
}

#[test]
fn the_lock_is_exclusive() {
    let (_d, spool) = open();
    let lock = spool.lock().unwrap();
    let other = Spool::open(spool.dir(), SpoolOptions::default()).unwrap();
    assert!(matches!(other.lock(), Err(SpoolError::Locked(_))));
    drop(lock);
    assert!(other.lock().is_ok());
}

#[test]
fn the_lock_file_is_not_held_open_for_writing() {
    let (_d, spool) = open();
    let _lock = spool.lock().unwrap();
    let lock_path = fs::canonicalize(spool.dir().join("lock")).unwrap();
    // The access mode of every descriptor of this process that is open on the lock file.
    let modes: Vec<u32> = fs::read_dir("/proc/self/fd")
        .unwrap()
        .flatten()
        .filter(|fd| fs::read_link(fd.path()).is_ok_and(|target| target == lock_path))
        .map(|fd| {
            let info = fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.file_name().to_string_lossy())).unwrap();
            let flags = info.lines().find_map(|l| l.strip_prefix("flags:")).unwrap().trim();
            u32::from_str_radix(flags, 8).unwrap() & 0o3
        })
        .collect();
    assert_eq!(modes, [0], "held once, read-only (O_RDONLY), so the file system can be remounted read-only");
}

#[test]
fn recovery_requeues_active_and_quarantines_what_it_cannot_read() {
    let (_d, spool) = open();
    let undecided = spool.store(envelope(), b"a").unwrap();
    let decided = spool.store(envelope(), b"b").unwrap();
    let broken = spool.store(envelope(), b"c").unwrap();
    let kept = spool.store(envelope(), b"d").unwrap();
    block_on(spool.transition(&undecided, State::Incoming, State::Active, None)).unwrap();
    let mut meta = spool.read_meta(State::Incoming, &decided).unwrap();
    meta.decision = Some(Decision {
        rule: Some("r".into()),
        decided_at: format_time(SystemTime::now()),
        payload: Default::default(),
        destinations: Default::default(),
    });
    meta.next_attempt = Some(format_time(SystemTime::now() + Duration::from_secs(3600)));
    block_on(spool.transition(&decided, State::Incoming, State::Active, Some(&meta))).unwrap();
    block_on(spool.transition(&broken, State::Incoming, State::Deferred, None)).unwrap();
    block_on(spool.transition(&kept, State::Incoming, State::Dead, None)).unwrap();
    sql(&spool, &format!("UPDATE message SET meta = '{{ not json' WHERE id = '{broken}'"));
    let old_tmp = spool.dir().join("tmp").join("old.msg");
    fs::write(&old_tmp, b"a crashed draft").unwrap();
    File::options().write(true).open(&old_tmp).unwrap().set_modified(SystemTime::now() - TMP_GRACE).unwrap();
    fs::write(spool.dir().join("tmp").join("fresh.msg"), b"being written").unwrap();

    let report = spool.recover().unwrap();
    assert_eq!(report.requeued, 2);
    assert_eq!(spool.find(&undecided), Some(State::Incoming));
    assert_eq!(spool.read_raw(&undecided).unwrap(), b"a");
    assert_eq!(spool.find(&decided), Some(State::Deferred));
    let back = spool.read_meta(State::Deferred, &decided).unwrap();
    assert!(back.due() <= SystemTime::now(), "due now");
    assert_eq!(back.decision, meta.decision, "its decision is kept");
    assert_eq!(spool.find(&kept), Some(State::Dead));
    assert_eq!(report.corrupt.len(), 1, "{:?}", report.corrupt);
    assert!(report.corrupt[0].starts_with(&format!("deferred/{broken}: ")), "{:?}", report.corrupt);
    assert_eq!(spool.find(&broken), None);
    assert_eq!(fs::read(spool.dir().join("corrupt").join(format!("{broken}.json"))).unwrap(), b"{ not json");
    assert_eq!(fs::read(spool.dir().join("corrupt").join(format!("{broken}.eml"))).unwrap(), b"c");
    // A young tmp file may belong to another process still writing; an old one is a leftover.
    assert!(spool.dir().join("tmp/fresh.msg").exists());
    assert!(!old_tmp.exists());
    assert_eq!(report.tmp_removed, 1);
    assert_eq!(rows(&spool), (3, 3));
}

/// Writes an entry of the spool format used before the database: the raw message, a line of
/// metadata and a footer in `incoming/ID.msg`.
fn legacy_message_file(spool: &Spool, id: &str, raw: &[u8]) -> Meta {
    let mut e = envelope();
    e.id = id.to_string();
    let meta = Meta::new(e, raw.len() as u64);
    let mut bytes = raw.to_vec();
    file::write_tail(&mut bytes, &meta, raw.len() as u64).unwrap();
    fs::create_dir_all(spool.dir().join("incoming")).unwrap();
    fs::write(spool.dir().join("incoming").join(format!("{id}.msg")), bytes).unwrap();
    meta
}

fn legacy_json(spool: &Spool, state: &str, meta: &Meta) {
    let dir = spool.dir().join(state);
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join(format!("{}.json", meta.id)), serde_json::to_vec_pretty(meta).unwrap()).unwrap();
}

fn legacy_id(n: u8) -> String {
    format!("01JD4Z6W8Q2M3N4P5R6S7T8V{n:02}")
}

#[test]
fn an_old_spool_of_message_files_is_drained_into_the_database() {
    let (_d, spool) = open();
    let dir = spool.dir().to_path_buf();
    // In line, never judged: its metadata only inside its message file.
    let fresh = legacy_id(1);
    legacy_message_file(&spool, &fresh, b"Subject: fresh\r\n\r\n");
    // Deferred: metadata in deferred/, the message file moved to msg/.
    let deferred = legacy_id(2);
    let mut meta = legacy_message_file(&spool, &deferred, b"Subject: deferred\r\n\r\n");
    meta.attempts = 3;
    legacy_json(&spool, "deferred", &meta);
    fs::create_dir_all(dir.join("msg")).unwrap();
    fs::rename(dir.join(format!("incoming/{deferred}.msg")), dir.join(format!("msg/{deferred}.msg"))).unwrap();
    // A move out of incoming/ cut short: metadata in dead/, its message file still in incoming/.
    let cut = legacy_id(3);
    let meta = legacy_message_file(&spool, &cut, b"Subject: cut short\r\n\r\n");
    legacy_json(&spool, "dead", &meta);
    // Active when the old version stopped.
    let active = legacy_id(4);
    let meta = legacy_message_file(&spool, &active, b"Subject: active\r\n\r\n");
    legacy_json(&spool, "active", &meta);
    fs::rename(dir.join(format!("incoming/{active}.msg")), dir.join(format!("msg/{active}.msg"))).unwrap();
    // Unreadable: a footer cut off; metadata that does not parse.
    let torn = legacy_id(5);
    let path = dir.join(format!("incoming/{torn}.msg"));
    legacy_message_file(&spool, &torn, b"Subject: torn\r\n\r\n");
    let bytes = fs::read(&path).unwrap();
    fs::write(&path, &bytes[..bytes.len() - 2]).unwrap();
    let garbled = legacy_id(6);
    legacy_message_file(&spool, &garbled, b"Subject: garbled\r\n\r\n");
    fs::write(dir.join(format!("deferred/{garbled}.json")), b"{ not json").unwrap();
    // A removal cut short: the message file without metadata.
    let removed = legacy_id(7);
    legacy_message_file(&spool, &removed, b"Subject: removed\r\n\r\n");
    fs::rename(dir.join(format!("incoming/{removed}.msg")), dir.join(format!("msg/{removed}.msg"))).unwrap();

    let report = spool.recover().unwrap();
    assert_eq!(report.drained, 4, "{report:?}");
    assert_eq!(report.removals_finished, 1);
    assert_eq!(report.requeued, 1, "the active one goes back in line");
    assert_eq!(report.corrupt.len(), 2, "{:?}", report.corrupt);
    assert_eq!(spool.list(State::Incoming).unwrap(), [fresh.clone(), active.clone()]);
    assert_eq!(spool.list(State::Deferred).unwrap(), std::slice::from_ref(&deferred));
    assert_eq!(spool.list(State::Dead).unwrap(), std::slice::from_ref(&cut));
    assert_eq!(spool.read_meta(State::Deferred, &deferred).unwrap().attempts, 3);
    assert_eq!(spool.read_raw(&deferred).unwrap(), b"Subject: deferred\r\n\r\n");
    assert_eq!(spool.read_raw(&cut).unwrap(), b"Subject: cut short\r\n\r\n");
    assert_eq!(spool.read_raw(&fresh).unwrap(), b"Subject: fresh\r\n\r\n");
    let corrupt = entries(&spool, "corrupt");
    for name in [format!("{torn}.msg"), format!("{garbled}.json"), format!("{garbled}.msg")] {
        assert!(corrupt.contains(&name), "{name} not in corrupt/: {corrupt:?}");
    }
    // The old directories are gone, empty.
    let mut top = entries(&spool, ".");
    top.retain(|n| !n.starts_with("spool.db"));
    assert_eq!(top, ["corrupt", "tmp"]);
    // A second recovery finds nothing more to do.
    let again = spool.recover().unwrap();
    assert_eq!((again.drained, again.corrupt.len(), again.requeued), (0, 0, 0));
}

#[test]
fn a_drain_cut_short_after_its_commit_inserts_nothing_twice() {
    let (_d, spool) = open();
    let id = legacy_id(1);
    let raw = b"Subject: twice\r\n\r\n";
    legacy_message_file(&spool, &id, raw);
    let kept = fs::read(spool.dir().join(format!("incoming/{id}.msg"))).unwrap();
    assert_eq!(spool.recover().unwrap().drained, 1);
    let mut meta = spool.read_meta(State::Incoming, &id).unwrap();
    meta.attempts = 7;
    spool.transition_blocking(&id, State::Incoming, State::Incoming, Some(&meta)).unwrap();
    // As if the process had died after the insert was committed, before the file was removed.
    fs::create_dir_all(spool.dir().join("incoming")).unwrap();
    fs::write(spool.dir().join(format!("incoming/{id}.msg")), kept).unwrap();
    let report = spool.recover().unwrap();
    assert!(report.corrupt.is_empty(), "{:?}", report.corrupt);
    assert_eq!(spool.list(State::Incoming).unwrap(), std::slice::from_ref(&id));
    assert_eq!(spool.read_meta(State::Incoming, &id).unwrap().attempts, 7, "the row in the database wins");
    assert_eq!(spool.read_raw(&id).unwrap(), raw);
    assert!(!spool.dir().join("incoming").exists());
    assert_eq!(rows(&spool), (1, 1));
}

#[test]
fn a_spool_of_bare_raw_messages_is_drained_too() {
    let (_d, spool) = open();
    // The oldest layout: incoming/ID.json beside msg/ID.eml.
    let mut e = envelope();
    let ids = [legacy_id(1), legacy_id(2), legacy_id(3)];
    fs::create_dir_all(spool.dir().join("msg")).unwrap();
    for (n, id) in ids.iter().enumerate() {
        e.id = id.clone();
        fs::write(spool.dir().join("msg").join(format!("{id}.eml")), format!("Subject: {n}\r\n\r\n")).unwrap();
        legacy_json(&spool, "incoming", &Meta::new(e.clone(), 14));
    }
    // A bare raw message without metadata: an orphan once old, maybe an old `ingest` when young.
    let orphan = spool.dir().join("msg").join(format!("{}.eml", legacy_id(9)));
    fs::write(&orphan, b"orphan").unwrap();
    File::options().write(true).open(&orphan).unwrap().set_modified(SystemTime::now() - TMP_GRACE).unwrap();
    let young = spool.dir().join("msg").join(format!("{}.eml", legacy_id(8)));
    fs::write(&young, b"an older ingest committing").unwrap();

    let report = spool.recover().unwrap();
    assert_eq!(report.drained, 3);
    assert_eq!(report.corrupt, [format!("msg/{}.eml: no metadata", legacy_id(9))]);
    assert_eq!(spool.list(State::Incoming).unwrap(), ids);
    for (n, id) in ids.iter().enumerate() {
        assert_eq!(spool.read_raw(id).unwrap(), format!("Subject: {n}\r\n\r\n").as_bytes());
    }
    assert!(young.exists());
    assert!(entries(&spool, "corrupt").contains(&format!("{}.eml", legacy_id(9))));
}

#[test]
fn only_letters_and_digits_are_looked_up_as_ids() {
    let (_d, spool) = open();
    let id = spool.store(envelope(), b"Subject: x\r\n\r\nx\r\n").unwrap();
    assert_eq!(spool.find(&id), Some(State::Incoming));
    // A path that would reach the message's own file from elsewhere is no id.
    let around = format!("../incoming/{id}");
    assert_eq!(spool.find(&around), None);
    for bad in ["", "..", "../../etc/passwd", "a/b", "a.b", &"A".repeat(65)] {
        assert_eq!(spool.find(bad), None, "{bad:?}");
    }
}

#[test]
fn concurrent_stores_are_all_durable() {
    let (_d, spool) = open();
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let spool = spool.clone();
            std::thread::spawn(move || {
                (0..50)
                    .map(|i| spool.store(envelope(), format!("thread {t} message {i}").as_bytes()).unwrap())
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let ids: Vec<String> = threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
    assert_eq!(ids.len(), 400);
    assert_eq!(spool.list(State::Incoming).unwrap().len(), 400);
}

#[test]
fn an_unwritable_spool_is_refused_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-dir");
    fs::write(&file, b"").unwrap();
    assert!(matches!(Spool::open(&file.join("spool"), SpoolOptions::default()), Err(SpoolError::Io { .. })));
}

/// Operations of the model test.
#[derive(Debug, Clone)]
enum ModelOp {
    Store,
    Move { pick: usize, to: State, with_meta: bool },
    Remove { pick: usize },
    Crash,
}

fn model_op() -> impl Strategy<Value = ModelOp> {
    let state = prop::sample::select(State::ALL.to_vec());
    prop_oneof![
        3 => Just(ModelOp::Store),
        4 => (any::<usize>(), state, any::<bool>()).prop_map(|(pick, to, with_meta)| ModelOp::Move { pick, to, with_meta }),
        1 => any::<usize>().prop_map(|pick| ModelOp::Remove { pick }),
        1 => Just(ModelOp::Crash),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// The spool against a model: a map from id to state. After every operation, and after a
    /// simulated restart (a fresh handle and a recovery pass), every message is exactly where
    /// the model says, with its raw bytes intact.
    #[test]
    fn spool_matches_a_simple_model(ops in prop::collection::vec(model_op(), 1..40)) {
        let (_d, mut spool) = open();
        let mut model: HashMap<String, (State, Vec<u8>)> = HashMap::new();
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        for op in ops {
            let mut ids: Vec<String> = model.keys().cloned().collect();
            ids.sort();
            match op {
                ModelOp::Store => {
                    let raw = ulid::Ulid::generate().to_string().into_bytes();
                    let id = spool.store(envelope(), &raw).unwrap();
                    model.insert(id, (State::Incoming, raw));
                }
                ModelOp::Move { pick, to, with_meta } if !ids.is_empty() => {
                    let id = &ids[pick % ids.len()];
                    let from = model[id].0;
                    let mut meta = spool.read_meta(from, id).unwrap();
                    meta.attempts += 1;
                    rt.block_on(spool.transition(id, from, to, with_meta.then_some(&meta))).unwrap();
                    model.get_mut(id).unwrap().0 = to;
                    if with_meta {
                        prop_assert_eq!(spool.read_meta(to, id).unwrap().attempts, meta.attempts);
                    }
                }
                ModelOp::Remove { pick } if !ids.is_empty() => {
                    let id = &ids[pick % ids.len()];
                    rt.block_on(spool.remove(id, model[id].0)).unwrap();
                    model.remove(id);
                }
                ModelOp::Crash => {
                    spool = Spool::open(spool.dir(), SpoolOptions::default()).unwrap();
                    let report = spool.recover().unwrap();
                    prop_assert!(report.corrupt.is_empty(), "{:?}", report.corrupt);
                    for (state, _) in model.values_mut() {
                        if *state == State::Active {
                            *state = State::Incoming; // no decision in these messages
                        }
                    }
                }
                _ => {}
            }
            for state in State::ALL {
                let mut expected: Vec<String> = model.iter().filter(|(_, (s, _))| *s == state).map(|(id, _)| id.clone()).collect();
                expected.sort();
                prop_assert_eq!(spool.list(state).unwrap(), expected, "state {}", state);
            }
            for (id, (_, raw)) in &model {
                prop_assert_eq!(&spool.read_raw(id).unwrap(), raw);
            }
        }
    }
}

#[test]
fn recovery_reports_the_fingerprint_of_each_message_that_has_one() {
    let (_d, spool) = open();
    let source = Source::Imap { account: "alerts".into(), folder: "INBOX".into() };
    let mut draft = spool.draft().unwrap();
    draft.write_all(b"Subject: from imap\r\n\r\n").unwrap();
    draft.set_fingerprint("ab12".into());
    let mut e = envelope();
    e.source = source.clone();
    let imap = draft.commit_blocking(e).unwrap().id;
    spool.store(envelope(), b"Subject: from stdin\r\n\r\n").unwrap();
    // Also once the message has left incoming/.
    block_on(spool.transition(&imap, State::Incoming, State::Deferred, None)).unwrap();
    assert_eq!(spool.read_meta(State::Deferred, &imap).unwrap().fingerprint.as_deref(), Some("ab12"));
    assert_eq!(spool.recover().unwrap().fingerprints, [(source, "ab12".to_string())]);
}

#[test]
fn ids_that_are_not_ulids_never_become_paths() {
    let (d, spool) = open();
    let id = spool.store(envelope(), b"Subject: x\r\n\r\n").unwrap();
    let outside = d.path().join("victim.json");
    fs::write(&outside, b"{}").unwrap();
    for bad in [
        "../../victim",
        "../msg/X",
        &format!("../incoming/{id}"),
        &id.to_lowercase(),
        "",
        "01JD4Z6W8Q2M3N4P5R6S7T8V9X/",
    ] {
        assert!(matches!(check_id(bad), Err(SpoolError::BadId(_))), "{bad:?}");
        assert_eq!(spool.find(bad), None, "{bad:?}");
        assert!(matches!(spool.read_meta(State::Dead, bad), Err(SpoolError::BadId(_))), "{bad:?}");
        assert!(matches!(spool.read_raw(bad), Err(SpoolError::BadId(_))), "{bad:?}");
        assert!(matches!(spool.remove_blocking(bad, State::Dead), Err(SpoolError::BadId(_))), "{bad:?}");
        assert!(
            matches!(spool.transition_blocking(bad, State::Incoming, State::Dead, None), Err(SpoolError::BadId(_))),
            "{bad:?}"
        );
    }
    assert!(outside.exists());
    assert_eq!(spool.find(&id), Some(State::Incoming));
    assert!(check_id(&id).is_ok());
}

/// The message thread `t` stores `i`-th in the crash test: every 25th one past [`SPILL`].
fn crash_body(t: u64, i: u64) -> Vec<u8> {
    let mut raw = format!("Subject: {t}/{i}\r\n\r\n").into_bytes();
    let size = if i % 25 == 24 { SPILL + 4096 } else { 2048 };
    while raw.len() < size {
        raw.extend_from_slice(format!("{t}/{i} filler line\r\n").as_bytes());
    }
    raw
}

/// Run by [`a_killed_writer_loses_nothing_it_acknowledged`] in a process of its own: stores
/// messages from 4 threads into the spool at `MAILHOOK_CRASH_SPOOL`, moves every third one to
/// `deferred`, and prints each step once it returned, until it is killed.
#[test]
#[ignore = "the child process of a_killed_writer_loses_nothing_it_acknowledged"]
fn crash_child() {
    let Ok(dir) = std::env::var("MAILHOOK_CRASH_SPOOL") else { return };
    let spool = Spool::open(Path::new(&dir), SpoolOptions::default()).unwrap();
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let spool = spool.clone();
            std::thread::spawn(move || {
                for i in 0.. {
                    let id = spool.store(envelope(), &crash_body(t, i)).unwrap();
                    println!("stored {id} {t} {i}");
                    if i % 3 == 0 {
                        spool.transition_blocking(&id, State::Incoming, State::Deferred, None).unwrap();
                        println!("moved {id}");
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

/// SIGKILL at a random moment while messages are stored and moved, five times over the same
/// spool: after each, a new handle recovers and finds every message whose commit had returned,
/// with its raw bytes whole and in the state last acknowledged.
#[test]
fn a_killed_writer_loses_nothing_it_acknowledged() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let spool_dir = dir.path().join("spool");
    let mut acked: HashMap<String, (u64, u64)> = HashMap::new();
    let mut moved: std::collections::HashSet<String> = Default::default();
    for round in 0..5u32 {
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "spool::tests::crash_child", "--ignored", "--nocapture", "--test-threads=1"])
            .env("MAILHOOK_CRASH_SPOOL", &spool_dir)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let lines = std::thread::spawn(move || {
            std::io::BufReader::new(stdout).lines().map_while(Result::ok).collect::<Vec<_>>()
        });
        let wait = 150 + (SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().subsec_nanos() % 400);
        std::thread::sleep(Duration::from_millis(u64::from(wait)));
        child.kill().unwrap();
        child.wait().unwrap();
        let mut stored = 0;
        for line in lines.join().unwrap() {
            let words: Vec<&str> = line.split(' ').collect();
            match words[..] {
                ["stored", id, t, i] => {
                    acked.insert(id.to_string(), (t.parse().unwrap(), i.parse().unwrap()));
                    stored += 1;
                }
                ["moved", id] => {
                    moved.insert(id.to_string());
                }
                _ => {}
            }
        }
        assert!(stored > 0, "round {round}: the child stored nothing in {wait} ms");
        let spool = Spool::open(&spool_dir, SpoolOptions::default()).unwrap();
        let report = spool.recover().unwrap();
        assert!(report.corrupt.is_empty(), "{:?}", report.corrupt);
        for (id, (t, i)) in &acked {
            let state = spool.find(id);
            if moved.contains(id) {
                assert_eq!(state, Some(State::Deferred), "round {round}: {id}");
            } else {
                assert!(matches!(state, Some(State::Incoming | State::Deferred)), "round {round}: {id} is {state:?}");
            }
            assert!(spool.read_raw(id).unwrap() == crash_body(*t, *i), "round {round}: {id} raw bytes differ");
        }
        // Nothing but what the children stored: each row is a whole message of theirs.
        let total: usize = State::ALL.iter().map(|s| spool.list(*s).unwrap().len()).sum();
        assert!(total >= acked.len());
        assert_eq!(rows(&spool).0, rows(&spool).1, "every row has its raw bytes");
    }
}

/// The descriptors of this process open on files under `dir`, with their access mode.
fn open_under(dir: &Path) -> Vec<(PathBuf, u32)> {
    let dir = fs::canonicalize(dir).unwrap();
    fs::read_dir("/proc/self/fd")
        .unwrap()
        .flatten()
        .filter_map(|fd| {
            let target = fs::read_link(fd.path()).ok()?;
            let info = fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.file_name().to_string_lossy())).ok()?;
            let flags = info.lines().find_map(|l| l.strip_prefix("flags:"))?.trim().to_string();
            target.starts_with(&dir).then(|| (target, u32::from_str_radix(&flags, 8).unwrap() & 0o3))
        })
        .collect()
}

#[test]
fn an_idle_spool_holds_no_file_open_so_it_can_be_remounted_read_only() {
    let (_d, spool) = open();
    let _lock = spool.lock().unwrap();
    let id = spool.store(envelope(), b"Subject: x\r\n\r\n").unwrap();
    assert_eq!(spool.list(State::Incoming).unwrap(), std::slice::from_ref(&id));
    assert!(open_under(spool.dir()).iter().any(|(_, mode)| *mode != 0), "in use, the database is open");
    std::thread::sleep(db::IDLE * 4);
    let open = open_under(spool.dir());
    assert_eq!(open, [(fs::canonicalize(spool.dir().join("lock")).unwrap(), 0)], "only the lock, read-only");
    // The WAL is emptied into the database, and kept with its index, so that a spool that can
    // no longer be written can still be read.
    assert_eq!(fs::metadata(spool.dir().join("spool.db-wal")).unwrap().len(), 0);
    assert!(spool.dir().join("spool.db-shm").exists());
    // And it works as before once used again.
    block_on(spool.remove(&id, State::Incoming)).unwrap();
    assert_eq!(spool.list(State::Incoming).unwrap(), Vec::<String>::new());
}

fn open_keeping() -> (tempfile::TempDir, Spool) {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(&dir.path().join("spool"), SpoolOptions { fsync: false, keep_raw: true }).unwrap();
    (dir, spool)
}

/// With `keep_raw`, a removed message leaves the queue but its raw bytes stay, by id, until
/// they are released; a spool that does not keep them removes them with the message.
#[test]
fn a_spool_that_keeps_raw_messages_keeps_them_until_released() {
    let (_d, spool) = open_keeping();
    let a = spool.store(envelope(), b"Subject: a\r\n\r\na\r\n").unwrap();
    block_on(spool.remove(&a, State::Incoming)).unwrap();
    assert_eq!(spool.find(&a), None, "out of the queue");
    assert!(matches!(spool.read_raw(&a), Err(SpoolError::NotFound(_))), "not a queued message any more");
    assert_eq!(spool.read_any_raw(&a).unwrap().as_deref(), Some(&b"Subject: a\r\n\r\na\r\n"[..]));
    assert_eq!(spool.kept("", 10).unwrap(), vec![a.clone()]);

    // A message still queued is read the same way (the archive's dead letters).
    let b = spool.store(envelope(), b"Subject: b\r\n\r\nb\r\n").unwrap();
    assert_eq!(spool.read_any_raw(&b).unwrap().as_deref(), Some(&b"Subject: b\r\n\r\nb\r\n"[..]));
    // Releasing a queued id does nothing to it.
    spool.release(vec![a.clone(), b.clone()]).unwrap();
    assert_eq!(spool.read_any_raw(&a).unwrap(), None, "released");
    assert!(spool.kept("", 10).unwrap().is_empty());
    assert_eq!(spool.read_raw(&b).unwrap(), b"Subject: b\r\n\r\nb\r\n", "queued: untouched");

    // An old spool's entry drained again after its message was delivered: already there.
    let d = spool.store(envelope(), b"Subject: d\r\n\r\nd\r\n").unwrap();
    block_on(spool.remove(&d, State::Incoming)).unwrap();
    let again = Op::Insert {
        id: d.clone(),
        state: State::Incoming,
        meta: "{}".into(),
        raw: Raw::Bytes(b"again".to_vec()),
        if_absent: true,
    };
    spool.db().unwrap().submit_blocking(again).unwrap();
    assert_eq!(spool.find(&d), None, "not queued again");
    assert_eq!(spool.read_any_raw(&d).unwrap().as_deref(), Some(&b"Subject: d\r\n\r\nd\r\n"[..]));

    let (_d2, plain) = open();
    let c = plain.store(envelope(), b"c").unwrap();
    block_on(plain.remove(&c, State::Incoming)).unwrap();
    assert_eq!(plain.read_any_raw(&c).unwrap(), None);
    assert!(plain.kept("", 10).unwrap().is_empty());
}

/// The newest message removed, its raw row kept: the next message must not take that row's
/// place (SQLite gives a new row the largest key plus one, of the rows left in its table).
#[test]
fn a_new_message_never_lands_on_raw_bytes_kept() {
    let (_d, spool) = open_keeping();
    let mut ids = Vec::new();
    for n in 0..5 {
        let raw = format!("Subject: {n}\r\n\r\n{n}\r\n");
        let id = spool.store(envelope(), raw.as_bytes()).unwrap();
        block_on(spool.remove(&id, State::Incoming)).unwrap();
        ids.push((id, raw));
    }
    let big = vec![b'x'; db::BOUND_RAW + 10];
    let id = spool.store(envelope(), &big).unwrap();
    block_on(spool.remove(&id, State::Incoming)).unwrap();
    let last = spool.store(envelope(), b"last").unwrap();
    for (id, raw) in &ids {
        assert_eq!(spool.read_any_raw(id).unwrap().as_deref(), Some(raw.as_bytes()), "{id}");
    }
    assert_eq!(spool.read_any_raw(&id).unwrap().map(|r| r.len()), Some(big.len()));
    assert_eq!(spool.read_raw(&last).unwrap(), b"last");
    assert_eq!(spool.release_all_kept().unwrap(), 6);
    assert_eq!(spool.read_raw(&last).unwrap(), b"last", "a queued message is not kept: not released");
}
