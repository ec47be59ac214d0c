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
    for dir in ["tmp", "msg", "incoming", "active", "deferred", "dead"] {
        assert_eq!(entries(&spool, dir), Vec::<String>::new(), "{dir}/ is empty");
    }
}

/// The names in a spool directory, sorted.
fn entries(spool: &Spool, dir: &str) -> Vec<String> {
    let mut names: Vec<String> =
        fs::read_dir(spool.dir().join(dir)).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    names
}

#[test]
fn a_new_message_is_one_file_and_leaves_incoming_with_its_metadata() {
    let (_d, spool) = open();
    let raw = b"Subject: one file\r\n\r\nbody\r\n";
    let id = spool.store(envelope(), raw).unwrap();
    assert_eq!(entries(&spool, "incoming"), [format!("{id}.msg")]);
    assert_eq!(entries(&spool, "msg"), Vec::<String>::new());
    let file = fs::read(spool.dir().join("incoming").join(format!("{id}.msg"))).unwrap();
    assert!(file.starts_with(raw), "the raw message comes first, as received");

    // Leaving incoming/: metadata in the new state, the message file in msg/.
    block_on(spool.transition(&id, State::Incoming, State::Deferred, None)).unwrap();
    assert_eq!(entries(&spool, "incoming"), Vec::<String>::new());
    assert_eq!(entries(&spool, "msg"), [format!("{id}.msg")]);
    assert_eq!(entries(&spool, "deferred"), [format!("{id}.json")]);
    assert_eq!(spool.read_meta(State::Deferred, &id).unwrap().size, raw.len() as u64);
    assert_eq!(spool.read_raw(&id).unwrap(), raw);

    // Back in line (`queue retry` of an undecided message): its metadata goes to incoming/.
    let mut meta = spool.read_meta(State::Deferred, &id).unwrap();
    meta.attempts = 2;
    block_on(spool.transition(&id, State::Deferred, State::Incoming, Some(&meta))).unwrap();
    assert_eq!(spool.list(State::Incoming).unwrap(), std::slice::from_ref(&id));
    assert_eq!(spool.read_meta(State::Incoming, &id).unwrap().attempts, 2);
    assert_eq!(spool.read_raw(&id).unwrap(), raw);
    block_on(spool.remove(&id, State::Incoming)).unwrap();
    for dir in ["msg", "incoming", "deferred"] {
        assert_eq!(entries(&spool, dir), Vec::<String>::new(), "{dir}/ is empty");
    }

    // Replacing the metadata of a message still in incoming/ keeps it there, once.
    let id = spool.store(envelope(), raw).unwrap();
    let mut meta = spool.read_meta(State::Incoming, &id).unwrap();
    meta.attempts = 5;
    block_on(spool.transition(&id, State::Incoming, State::Incoming, Some(&meta))).unwrap();
    assert_eq!(spool.list(State::Incoming).unwrap(), std::slice::from_ref(&id));
    assert_eq!(spool.read_meta(State::Incoming, &id).unwrap().attempts, 5);
    block_on(spool.transition(&id, State::Incoming, State::Dead, None)).unwrap();
    assert_eq!(spool.read_meta(State::Dead, &id).unwrap().attempts, 5);
    assert_eq!(entries(&spool, "incoming"), Vec::<String>::new());
    block_on(spool.remove(&id, State::Dead)).unwrap();
    assert_eq!(entries(&spool, "msg"), Vec::<String>::new());
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
    let rawless = spool.store(envelope(), b"d").unwrap();
    let damaged = spool.store(envelope(), b"e").unwrap();
    let removed = spool.store(envelope(), b"f").unwrap();
    block_on(spool.transition(&undecided, State::Incoming, State::Active, None)).unwrap();
    let mut meta = spool.read_meta(State::Incoming, &decided).unwrap();
    meta.decision = Some(Decision {
        rule: Some("r".into()),
        decided_at: format_time(SystemTime::now()),
        payload: Default::default(),
        destinations: Default::default(),
    });
    block_on(spool.transition(&decided, State::Incoming, State::Active, Some(&meta))).unwrap();
    for id in [&broken, &rawless, &removed] {
        block_on(spool.transition(id, State::Incoming, State::Deferred, None)).unwrap();
    }
    fs::write(spool.dir().join("deferred").join(format!("{broken}.json")), b"{ not json").unwrap();
    fs::remove_file(spool.dir().join("msg").join(format!("{rawless}.msg"))).unwrap();
    // A message file whose footer was damaged.
    let damaged_file = spool.dir().join("incoming").join(format!("{damaged}.msg"));
    let mut bytes = fs::read(&damaged_file).unwrap();
    bytes.truncate(bytes.len() - 2);
    fs::write(&damaged_file, bytes).unwrap();
    // A removal cut short: metadata gone, the message file left.
    fs::remove_file(spool.dir().join("deferred").join(format!("{removed}.json"))).unwrap();
    let orphan = spool.dir().join("msg").join("01ORPHAN.eml");
    fs::write(&orphan, b"orphan").unwrap();
    File::options().write(true).open(&orphan).unwrap().set_modified(SystemTime::now() - TMP_GRACE).unwrap();
    fs::write(spool.dir().join("msg").join("01YOUNG.eml"), b"an older ingest committing").unwrap();
    fs::write(spool.dir().join("tmp").join("fresh.msg"), b"being written").unwrap();

    let report = spool.recover().unwrap();
    assert_eq!(report.requeued, 2);
    assert_eq!(spool.find(&undecided), Some(State::Incoming));
    assert_eq!(spool.read_raw(&undecided).unwrap(), b"a");
    assert_eq!(spool.find(&decided), Some(State::Deferred));
    assert!(spool.read_meta(State::Deferred, &decided).unwrap().due() <= SystemTime::now());
    assert_eq!(report.corrupt.len(), 4, "{:?}", report.corrupt);
    assert_eq!(report.removals_finished, 1, "the message file a removal left behind is removed");
    assert!(!spool.dir().join("msg").join(format!("{removed}.msg")).exists());
    for id in [&broken, &rawless, &damaged, &removed] {
        assert_eq!(spool.find(id), None);
    }
    let corrupt = entries(&spool, "corrupt");
    for name in [
        format!("{broken}.json"),
        format!("{broken}.msg"),
        format!("{rawless}.json"),
        format!("{damaged}.msg"),
        "01ORPHAN.eml".into(),
    ] {
        assert!(corrupt.contains(&name), "{name} not in corrupt/: {corrupt:?}");
    }
    // A young bare raw message and a young tmp file may belong to an ingest still writing.
    assert!(spool.dir().join("msg/01YOUNG.eml").exists());
    assert!(spool.dir().join("tmp/fresh.msg").exists());
    assert_eq!(report.tmp_removed, 0);
}

#[test]
fn recovery_finishes_a_move_out_of_incoming_cut_short() {
    let (_d, spool) = open();
    let id = spool.store(envelope(), b"Subject: moved\r\n\r\n").unwrap();
    let mut meta = spool.read_meta(State::Incoming, &id).unwrap();
    meta.attempts = 1;
    // The first step only: the metadata in deferred/, the message file still in incoming/.
    fs::write(spool.dir().join("deferred").join(format!("{id}.json")), Spool::encode(&meta)).unwrap();
    assert!(spool.recover().unwrap().corrupt.is_empty());
    assert_eq!(spool.list(State::Incoming).unwrap(), Vec::<String>::new(), "not judged a second time");
    assert_eq!(spool.find(&id), Some(State::Deferred));
    assert_eq!(spool.read_meta(State::Deferred, &id).unwrap().attempts, 1);
    assert_eq!(entries(&spool, "msg"), [format!("{id}.msg")]);
    assert_eq!(spool.read_raw(&id).unwrap(), b"Subject: moved\r\n\r\n");
}

#[test]
fn a_spool_of_bare_raw_messages_is_still_worked() {
    let (_d, spool) = open();
    // The layout written before message files: incoming/ID.json beside msg/ID.eml.
    let mut e = envelope();
    let raws: Vec<(String, &[u8])> =
        ["01JD4Z6W8Q2M3N4P5R6S7T8V9A", "01JD4Z6W8Q2M3N4P5R6S7T8V9B", "01JD4Z6W8Q2M3N4P5R6S7T8V9C"]
            .into_iter()
            .zip([&b"Subject: a\r\n\r\n"[..], b"Subject: b\r\n\r\n", b"Subject: c\r\n\r\n"])
            .map(|(id, raw)| (id.to_string(), raw))
            .collect();
    for (id, raw) in &raws {
        e.id = id.clone();
        fs::write(spool.dir().join("msg").join(format!("{id}.eml")), raw).unwrap();
        fs::write(spool.dir().join("incoming").join(format!("{id}.json")), Spool::encode(&Meta::new(e.clone(), 3)))
            .unwrap();
    }
    assert!(spool.recover().unwrap().corrupt.is_empty());
    let ids: Vec<String> = raws.iter().map(|(id, _)| id.clone()).collect();
    assert_eq!(spool.list(State::Incoming).unwrap(), ids);
    for (id, raw) in &raws {
        assert_eq!(spool.read_meta(State::Incoming, id).unwrap().id, *id);
        assert_eq!(&spool.read_raw(id).unwrap(), raw);
    }
    let [(a, _), (b, raw_b), (c, _)] = &raws[..] else { unreachable!() };
    block_on(spool.remove(a, State::Incoming)).unwrap();
    block_on(spool.transition(b, State::Incoming, State::Dead, None)).unwrap();
    assert_eq!(spool.find(b), Some(State::Dead));
    assert_eq!(&spool.read_raw(b).unwrap(), raw_b);
    block_on(spool.remove(b, State::Dead)).unwrap();
    assert_eq!(entries(&spool, "msg"), [format!("{c}.eml")]);
    assert_eq!(entries(&spool, "incoming"), [format!("{c}.json")]);
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
