//! The spool's contract, run against both of its storages: the files (the embedded default) and
//! the queue in PostgreSQL (`[cluster]`, a private cluster, see `tests/support/postgres.rs`).
//! Then what only the shared queue does: claims with leases, one instance at a time, takeover
//! once a lease has passed, and a database that goes away and comes back.

mod support;

use mailhook::config::{ClusterConfig, PostgresUrl};
use mailhook::model::{Envelope, Source};
use mailhook::spool::actions::{self, ActionError};
use mailhook::spool::{Spool, SpoolError, SpoolOptions, State};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;
use support::postgres::Postgres;
use support::tmpfs::Tmpfs;

fn same(p: &Path) -> PathBuf {
    p.to_path_buf()
}

fn cluster(pg: &Postgres, db: &str, lease: Duration) -> ClusterConfig {
    ClusterConfig { postgres: PostgresUrl::new(pg.url(db)), lease, ca_file: None }
}

fn envelope() -> Envelope {
    let mut e = Envelope::new(Source::Stdin);
    e.recipients = vec!["hook@example.com".into()];
    e
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)
}

/// Both storages, each empty: `(name, spool, what keeps it alive)`.
fn backends() -> Vec<(&'static str, Spool, Box<dyn std::any::Any>)> {
    let dir = tempfile::tempdir().unwrap();
    let files = Spool::open(&dir.path().join("spool"), SpoolOptions::default()).unwrap();
    let pg = Postgres::shared();
    let db = pg.database();
    let local = tempfile::tempdir().unwrap();
    let shared = Spool::open_cluster(&cluster(pg, &db, Duration::from_secs(30)), &same, None, local.path()).unwrap();
    vec![("files", files, Box::new(dir)), ("postgres", shared, Box::new(local))]
}

#[test]
fn a_stored_message_is_incoming_with_its_bytes_and_metadata() {
    for (name, spool, _keep) in backends() {
        let raw = b"Subject: hi\r\n\r\nbody\r\n";
        let id = spool.store(envelope(), raw).unwrap();
        assert_eq!(spool.find(&id), Some(State::Incoming), "{name}");
        assert_eq!(spool.read_raw(&id).unwrap(), raw, "{name}");
        let meta = spool.read_meta(State::Incoming, &id).unwrap();
        assert_eq!((meta.id.as_str(), meta.envelope.id.as_str()), (id.as_str(), id.as_str()), "{name}");
        assert_eq!(meta.size, raw.len() as u64, "{name}");
        assert_eq!(meta.envelope.recipients, vec!["hook@example.com".to_string()], "{name}");
        let (_, whole) = spool.read_meta_with_raw(State::Incoming, &id, u64::MAX).unwrap();
        assert_eq!(whole.as_deref(), Some(&raw[..]), "{name}: a small message comes whole");
        assert!(matches!(spool.read_meta(State::Deferred, &id), Err(SpoolError::NotFound(_))), "{name}");
        assert_eq!(spool.list(State::Incoming).unwrap(), vec![id], "{name}");
    }
}

#[test]
fn transitions_replace_metadata_refuse_the_wrong_state_and_removal_is_final() {
    for (name, spool, _keep) in backends() {
        let id = spool.store(envelope(), b"x").unwrap();
        let mut meta = spool.read_meta(State::Incoming, &id).unwrap();
        block_on(spool.transition(&id, State::Incoming, State::Active, None)).unwrap();
        assert_eq!(spool.find(&id), Some(State::Active), "{name}");
        meta.attempts = 3;
        meta.last_error = Some("HTTP 503".into());
        block_on(spool.transition(&id, State::Active, State::Deferred, Some(&meta))).unwrap();
        assert_eq!(spool.find(&id), Some(State::Deferred), "{name}");
        assert_eq!(spool.read_meta(State::Deferred, &id).unwrap().attempts, 3, "{name}");
        meta.attempts = 4;
        spool.transition_blocking(&id, State::Deferred, State::Deferred, Some(&meta)).unwrap();
        assert_eq!(spool.read_meta(State::Deferred, &id).unwrap(), meta, "{name}");
        let err = block_on(spool.transition(&id, State::Active, State::Dead, None)).unwrap_err();
        assert!(matches!(err, SpoolError::NotFound(_)), "{name}: {err}");
        assert_eq!(spool.find(&id), Some(State::Deferred), "{name}: nothing changed");
        assert_eq!(spool.read_raw(&id).unwrap(), b"x", "{name}: the raw message is kept");
        block_on(spool.remove(&id, State::Deferred)).unwrap();
        assert_eq!(spool.find(&id), None, "{name}");
        assert!(matches!(spool.read_raw(&id), Err(SpoolError::NotFound(_))), "{name}");
        assert!(matches!(spool.remove_blocking(&id, State::Deferred), Err(SpoolError::NotFound(_))), "{name}");
        for state in State::ALL {
            assert!(spool.list(state).unwrap().is_empty(), "{name}: {state} is empty");
        }
    }
}

#[test]
fn lists_are_oldest_first_and_counted() {
    for (name, spool, _keep) in backends() {
        // An id's order is its millisecond: two taken within one are in no particular order.
        let ids: Vec<String> = (0..5)
            .map(|n| {
                std::thread::sleep(std::time::Duration::from_millis(2));
                spool.store(envelope(), format!("m{n}").as_bytes()).unwrap()
            })
            .collect();
        spool.transition_blocking(&ids[1], State::Incoming, State::Dead, None).unwrap();
        spool.transition_blocking(&ids[3], State::Incoming, State::Deferred, None).unwrap();
        assert_eq!(spool.list(State::Incoming).unwrap(), [ids[0].clone(), ids[2].clone(), ids[4].clone()], "{name}");
        assert_eq!(spool.list(State::Dead).unwrap(), [ids[1].clone()], "{name}");
        let g = spool.gauges().unwrap();
        assert_eq!((g.incoming, g.deferred, g.dead), (3, 1, 1), "{name}");
        assert!(g.oldest_deferred_age.is_some(), "{name}");
    }
}

#[test]
fn a_dropped_draft_leaves_nothing_and_a_committed_one_is_whole() {
    for (name, spool, _keep) in backends() {
        {
            let mut draft = spool.draft().unwrap();
            draft.write_all(b"partial").unwrap();
        }
        for state in State::ALL {
            assert!(spool.list(state).unwrap().is_empty(), "{name}: {state}");
        }
        let mut draft = spool.draft().unwrap();
        let id = draft.id().to_string();
        draft.write_all(b"Subject: a\r\n\r\n").unwrap();
        draft.write_all(b"two writes\r\n").unwrap();
        draft.set_fingerprint("abc".into());
        let meta = block_on(draft.commit(envelope())).unwrap();
        assert_eq!(meta.id, id, "{name}");
        assert_eq!(meta.fingerprint.as_deref(), Some("abc"), "{name}");
        assert_eq!(spool.read_raw(&id).unwrap(), b"Subject: a\r\n\r\ntwo writes\r\n", "{name}");
        assert_eq!(spool.read_meta(State::Incoming, &id).unwrap(), meta, "{name}");
    }
}

#[test]
fn ids_that_are_not_spool_ids_are_refused() {
    for (name, spool, _keep) in backends() {
        for bad in ["../etc/passwd", "", "01jd4z6w8q2m3n4p5r6s7t8v9x"] {
            assert!(matches!(spool.read_raw(bad), Err(SpoolError::BadId(_))), "{name}: {bad:?}");
            assert!(matches!(spool.remove_blocking(bad, State::Dead), Err(SpoolError::BadId(_))), "{name}");
            assert_eq!(spool.find(bad), None, "{name}");
        }
    }
}

#[test]
fn operator_actions_retry_and_drop() {
    for (name, spool, _keep) in backends() {
        let id = spool.store(envelope(), b"Subject: x\r\n\r\ny\r\n").unwrap();
        assert!(matches!(actions::retry(&spool, &id), Err(ActionError::AlreadyQueued(_))), "{name}");
        let mut meta = spool.read_meta(State::Incoming, &id).unwrap();
        meta.dead_reason = Some("no rule".into());
        spool.transition_blocking(&id, State::Incoming, State::Dead, Some(&meta)).unwrap();
        assert_eq!(actions::retry(&spool, &id).unwrap(), State::Incoming, "{name}: undecided goes to be judged");
        assert_eq!(spool.read_meta(State::Incoming, &id).unwrap().dead_reason, None, "{name}");
        spool.transition_blocking(&id, State::Incoming, State::Active, None).unwrap();
        assert!(matches!(actions::drop(&spool, &id), Err(ActionError::Busy(_))), "{name}");
        spool.transition_blocking(&id, State::Active, State::Deferred, None).unwrap();
        assert_eq!(actions::drop(&spool, &id).unwrap(), State::Deferred, "{name}");
        assert!(matches!(actions::drop(&spool, &id), Err(ActionError::NotFound(_))), "{name}");
    }
}

#[test]
fn concurrent_commits_and_removals_each_get_their_own_answer() {
    for (name, spool, _keep) in backends() {
        block_on(async {
            let commits = (0..20).map(|n| {
                let mut draft = spool.draft().unwrap();
                draft.write_all(format!("Subject: {n}\r\n\r\n").as_bytes()).unwrap();
                draft.commit(envelope())
            });
            let metas: Vec<_> = futures_util::future::join_all(commits).await;
            let ids: Vec<String> = metas.into_iter().map(|m| m.unwrap().id).collect();
            assert_eq!(spool.list(State::Incoming).unwrap().len(), 20, "{name}");
            assert_eq!(spool.read_raw(&ids[7]).unwrap(), b"Subject: 7\r\n\r\n", "{name}");
            // Every message removed once, half of them twice at the same time: ten find nothing.
            let removals = ids.iter().chain(&ids[..10]).map(|id| spool.remove(id, State::Incoming));
            let results = futures_util::future::join_all(removals).await;
            let ok = results.iter().filter(|r| r.is_ok()).count();
            let missing: Vec<&SpoolError> = results.iter().filter_map(|r| r.as_ref().err()).collect();
            assert_eq!(ok, 20, "{name}: {missing:?}");
            assert_eq!(missing.len(), 10, "{name}");
            assert!(
                missing.iter().all(|e| matches!(e, SpoolError::NotFound(id) if ids.contains(id))),
                "{name}: {missing:?}"
            );
        });
        for state in State::ALL {
            assert!(spool.list(state).unwrap().is_empty(), "{name}: {state}");
        }
    }
}

/// The queue of a serving instance `owner` on `db`, with `lease`.
fn instance(pg: &Postgres, db: &str, owner: &str, lease: Duration) -> (Spool, tempfile::TempDir) {
    let local = tempfile::tempdir().unwrap();
    let spool = Spool::open_cluster(&cluster(pg, db, lease), &same, Some(owner.into()), local.path()).unwrap();
    (spool, local)
}

#[test]
fn a_message_is_held_by_one_instance_until_its_lease_passes() {
    let pg = Postgres::shared();
    let db = pg.database();
    let lease = Duration::from_secs(2);
    let (a, _da) = instance(pg, &db, "instance-a", lease);
    let (b, _db) = instance(pg, &db, "instance-b", lease);
    let claim = |s: &Spool| block_on(s.shared().unwrap().claim(10, Vec::new())).unwrap();

    // Accepted by a: claimed by a at once, not claimable by b.
    let id = a.store(envelope(), b"Subject: one\r\n\r\n").unwrap();
    assert_eq!(pg.sql(&db, &format!("SELECT lease_owner FROM queue WHERE id = '{id}'")), "instance-a");
    assert!(claim(&b).is_empty(), "b may not take what a holds");

    // A message from a command (ingest) is nobody's: the first round takes it, once.
    let (cmd, _dc) = {
        let local = tempfile::tempdir().unwrap();
        (Spool::open_cluster(&cluster(pg, &db, lease), &same, None, local.path()).unwrap(), local)
    };
    let loose = cmd.store(envelope(), b"Subject: two\r\n\r\n").unwrap();
    let got = claim(&b);
    assert_eq!(got.iter().map(|c| c.meta.id.clone()).collect::<Vec<_>>(), std::slice::from_ref(&loose));
    assert_eq!(got[0].state, State::Incoming);
    assert_eq!(got[0].raw, b"Subject: two\r\n\r\n");
    // a takes back only its own message (one its rounds are not working on), never b's.
    let ids: Vec<String> = claim(&a).into_iter().map(|c| c.meta.id).collect();
    assert_eq!(ids, std::slice::from_ref(&id), "a may not take what b claimed");

    // a dies (stops renewing). Once its lease has passed, b takes its message over.
    std::thread::sleep(lease + Duration::from_millis(300));
    let got = claim(&b);
    let mut ids: Vec<String> = got.iter().map(|c| c.meta.id.clone()).collect();
    ids.sort();
    assert!(ids.contains(&id), "a's message is taken over: {ids:?}");
    // a comes back late: its changes to a message b holds change nothing.
    let err = block_on(a.remove(&id, State::Incoming)).unwrap_err();
    assert!(matches!(err, SpoolError::NotFound(_)), "{err}");
    assert_eq!(b.find(&id), Some(State::Incoming));
    block_on(b.remove(&id, State::Incoming)).unwrap();

    // A deferred message due now is claimed as active; one due later is not claimed.
    let mut meta = b.read_meta(State::Incoming, &loose).unwrap();
    meta.next_attempt = Some(mailhook::spool::format_time(std::time::SystemTime::now() + Duration::from_secs(3600)));
    block_on(b.transition(&loose, State::Incoming, State::Deferred, Some(&meta))).unwrap();
    assert!(claim(&a).is_empty(), "not due yet");
    meta.next_attempt = None;
    cmd.transition_blocking(&loose, State::Deferred, State::Deferred, Some(&meta)).unwrap();
    let got = claim(&a);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].state, State::Active, "a claimed deferred message is active");
    assert_eq!(a.find(&loose), Some(State::Active));
    assert!(claim(&b).is_empty());
    block_on(a.transition(&loose, State::Active, State::Deferred, Some(&meta))).unwrap();
    assert_eq!(pg.sql(&db, &format!("SELECT coalesce(lease_owner, '-') FROM queue WHERE id = '{loose}'")), "-");
}

#[test]
fn a_database_that_goes_away_fails_every_call_and_is_used_again_once_back() {
    // A cluster of its own: this test stops and starts it.
    let pg = Postgres::start();
    let db = pg.database();
    let (spool, _d) = instance(&pg, &db, "instance-a", Duration::from_secs(30));
    let first = spool.store(envelope(), b"Subject: before\r\n\r\n").unwrap();
    pg.stop();
    let err = spool.store(envelope(), b"Subject: while away\r\n\r\n").unwrap_err();
    match &err {
        SpoolError::Database(e) => assert!(e.is_unreachable(), "{e}"),
        other => panic!("not a database error: {other}"),
    }
    assert!(spool.probe().is_err());
    assert!(block_on(spool.probe_async()).is_err());
    // Commits waiting together fail together, each with the database's error.
    let results = block_on(futures_util::future::join_all((0..10).map(|n| {
        let mut draft = spool.draft().unwrap();
        draft.write_all(format!("Subject: away {n}\r\n\r\n").as_bytes()).unwrap();
        draft.commit(envelope())
    })));
    for r in &results {
        assert!(matches!(r, Err(SpoolError::Database(e)) if e.is_unreachable()), "{:?}", r.as_ref().err());
    }
    pg.restart();
    let second = spool.store(envelope(), b"Subject: after\r\n\r\n").unwrap();
    assert_eq!(spool.list(State::Incoming).unwrap(), [first, second], "nothing half-written");
    spool.probe().unwrap();
}

/// Two instances that fetched the same IMAP message (a lease changing hands mid-batch) each
/// commit it with its row of the dedupe ledger: the ledger row and the message go in one
/// transaction, so the second commit stores nothing, whatever the timing.
#[test]
fn a_message_fetched_twice_from_imap_is_spooled_once() {
    use mailhook::spool::postgres::Seen;
    let pg = Postgres::shared();
    let db = pg.database();
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let config = cluster(pg, &db, Duration::from_secs(30));
    let a = Spool::open_cluster(&config, &same, Some("instance-a".into()), a_dir.path()).unwrap();
    let b = Spool::open_cluster(&config, &same, Some("instance-b".into()), b_dir.path()).unwrap();
    let seen = Seen {
        account: "support".into(),
        folder: "INBOX".into(),
        uidvalidity: 7,
        uid: 42,
        fingerprint: vec![0xab; 32],
    };
    let imap = || {
        let mut e = Envelope::new(Source::Imap { account: "support".into(), folder: "INBOX".into() });
        e.recipients = vec!["support@example.com".into()];
        e
    };
    let commit = |spool: &Spool| {
        let mut draft = spool.draft().unwrap();
        draft.write_all(b"Subject: order 1042\r\n\r\nbody\r\n").unwrap();
        block_on(draft.commit_seen(imap(), seen.clone())).unwrap()
    };
    let first = commit(&a).expect("the first commit stores the message");
    assert!(commit(&b).is_none(), "the second instance stores nothing");
    assert!(commit(&a).is_none(), "nor does the first, again");
    assert_eq!(b.list(State::Incoming).unwrap(), vec![first.id.clone()]);

    // Another UID of the same folder is another message.
    let mut draft = b.draft().unwrap();
    draft.write_all(b"Subject: order 1043\r\n\r\nbody\r\n").unwrap();
    let other = block_on(draft.commit_seen(imap(), Seen { uid: 43, ..seen.clone() })).unwrap();
    assert!(other.is_some(), "UID 43 is new");
    assert_eq!(a.list(State::Incoming).unwrap().len(), 2);
}

/// Once a spool's file system is writable again, a connection to its database opened while it
/// was read-only (a reader in the middle of a scan) still holds the WAL's index read-only for
/// every connection of the process, and writes fail until it closes: the probe that says the
/// spool can be written again (ending the pipeline's pause, and `/healthz`) must say so too.
#[test]
fn the_probe_says_the_spool_is_writable_only_once_its_database_can_be_written() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("spool");
    let tmpfs = match Tmpfs::mount(&root, "8m") {
        Ok(t) => t,
        Err(e) => {
            eprintln!("skipping: cannot mount a tmpfs here: {e}");
            return;
        }
    };
    let spool = Spool::open(&root, SpoolOptions::default()).unwrap();
    spool.store(envelope(), b"Subject: before\r\n\r\n").unwrap();
    spool.probe().unwrap();
    // Idle: the spool closes its own connections (after 25 ms), so that it can be remounted.
    std::thread::sleep(Duration::from_millis(100));

    tmpfs.remount(true).unwrap();
    assert!(spool.probe().is_err(), "read-only");
    // A message offered while read-only: refused, and the writer's connection, opened read-only
    // for it, must not outlive the read-only spell.
    assert!(spool.store(envelope(), b"Subject: while read-only\r\n\r\n").is_err());
    tmpfs.remount(false).unwrap();
    let store = spool.store(envelope(), b"Subject: once writable\r\n\r\n");
    assert_eq!(spool.probe().is_ok(), store.is_ok(), "the probe says what a write does: {store:?}");
    assert!(store.is_ok(), "writable again: {store:?}");

    std::thread::sleep(Duration::from_millis(100));
    tmpfs.remount(true).unwrap();
    let reader = rusqlite::Connection::open(spool.db_path()).unwrap();
    let _: i64 = reader.query_row("SELECT count(*) FROM message", [], |r| r.get(0)).unwrap();
    tmpfs.remount(false).unwrap();

    let file_alone = std::fs::write(root.join("tmp/a-file"), b"x");
    let store = spool.store(envelope(), b"Subject: while the reader is open\r\n\r\n");
    assert_eq!(spool.probe().is_ok(), store.is_ok(), "the probe says what a write does: {store:?}");
    assert!(file_alone.is_ok(), "a file can be written again");
    drop(reader);
    spool.probe().unwrap();
    spool.store(envelope(), b"Subject: after\r\n\r\n").unwrap();
}
