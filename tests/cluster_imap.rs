//! `[cluster]` IMAP watching against a real PostgreSQL and a real Dovecot, with real
//! `mailhook serve` processes: one folder watched by three instances is fetched by one at a
//! time (its lease holder), every message is delivered exactly once even when the holder is
//! `kill -9`'d and another takes over, the dedupe ledger keeps a renumbered folder (new
//! UIDVALIDITY) from being sent again by another instance, an instance whose lease was taken
//! stops fetching at once, and `/healthz` lists the peers.

mod support;

use serde_json::Value;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use support::dovecot::{Dovecot, PASSWORD as IMAP_PASSWORD, USER};
use support::gateway::{Gateway, http_get, message};
use support::hook::{HookOptions, HookServer};
use support::postgres::{PASSWORD as PG_PASSWORD, Postgres};
use support::wait_for;

/// The lease of these tests: renewed (and tried) every 667 ms.
const LEASE: &str = "2s";

/// An instance of the cluster on `db`, watching `dovecot`'s INBOX, delivering to `hook`.
fn instance(pg: &Postgres, db: &str, dovecot: &Dovecot, hook: &HookServer) -> Gateway {
    let config = format!(
        "[cluster]\npostgres = \"{}\"\nlease = \"{LEASE}\"\n\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [[imap]]\nname = \"alerts\"\nhost = \"127.0.0.1\"\nport = {}\ntls = \"none\"\nuser = \"{USER}\"\n\
         password = \"${{IMAP_PASSWORD}}\"\npoll = \"1s\"\n\n\
         [delivery]\nbackoff = {{ initial = \"200ms\", max = \"500ms\" }}\nrate = \"off\"\n\n\
         [destination.hook]\ntype = \"webhook\"\nurl = \"{}\"\n",
        pg.url_with(db, "${PGPASS}"),
        dovecot.port(),
        hook.url("/hook"),
    );
    let rules = "[[rule]]\nname = \"all\"\nto = [\"hook\"]\n";
    Gateway::new(&config, rules).env("PGPASS", PG_PASSWORD).env("IMAP_PASSWORD", IMAP_PASSWORD)
}

/// How many times each message (by its number in `message(n, ..)`) reached the hook.
fn deliveries(hook: &HookServer) -> BTreeMap<usize, usize> {
    let mut out = BTreeMap::new();
    for r in hook.accepted() {
        let body = String::from_utf8_lossy(&r.body);
        let n = body
            .split("bulk ")
            .nth(1)
            .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|d| d.parse::<usize>().ok())
            .unwrap_or_else(|| panic!("no message number in {body}"));
        *out.entry(n).or_default() += 1;
    }
    out
}

fn healthz(admin: SocketAddr) -> Value {
    let (status, _, body) = http_get(admin, "/healthz", None);
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

fn holds_inbox(health: &Value) -> bool {
    health["cluster"]["leases"].as_array().is_some_and(|l| l.iter().any(|k| k["folder"] == "INBOX"))
}

#[test]
fn a_shared_folder_is_delivered_exactly_once_across_a_kill() {
    let pg = Postgres::shared();
    let db = pg.database();
    let dovecot = Dovecot::start();
    let hook = HookServer::start(HookOptions::default());
    let mut imap = dovecot.client(USER, IMAP_PASSWORD);
    for n in 0..100 {
        imap.append("INBOX", &message(n, "bulk"));
    }

    let mut instances: Vec<Gateway> = (0..3).map(|_| instance(pg, &db, &dovecot, &hook)).collect();
    for gw in &mut instances {
        gw.start();
    }
    let admins: Vec<SocketAddr> = instances.iter_mut().map(|gw| gw.listening("admin")).collect();
    wait_for("the first 100 deliveries", Duration::from_secs(20), || hook.accepted().len() >= 100);

    // Each instance knows itself and its two peers; exactly one holds the folder.
    wait_for("every instance to see two peers", Duration::from_secs(10), || {
        admins.iter().all(|a| healthz(*a)["cluster"]["peers"].as_array().is_some_and(|p| p.len() == 2))
    });
    let health: Vec<Value> = admins.iter().map(|a| healthz(*a)).collect();
    let ids: Vec<String> = health.iter().map(|h| h["cluster"]["instance"].as_str().unwrap().to_string()).collect();
    for (i, h) in health.iter().enumerate() {
        let mut peers: Vec<String> =
            h["cluster"]["peers"].as_array().unwrap().iter().map(|p| p["id"].as_str().unwrap().to_string()).collect();
        peers.sort();
        let mut others: Vec<String> =
            ids.iter().enumerate().filter(|(j, _)| *j != i).map(|(_, id)| id.clone()).collect();
        others.sort();
        assert_eq!(peers, others, "instance {i}'s peers");
    }
    let holders: Vec<usize> = (0..3).filter(|&i| holds_inbox(&health[i])).collect();
    assert_eq!(holders.len(), 1, "one holder: {health:?}");
    let holder = holders[0];
    assert_eq!(pg.sql(&db, "SELECT owner FROM folder_lease WHERE folder = 'INBOX'"), ids[holder]);
    let (_, _, metrics) = http_get(admins[holder], "/metrics", None);
    assert!(metrics.contains("mailhook_cluster_folder_lease{account=\"alerts\",folder=\"INBOX\"} 1"), "{metrics}");
    assert!(metrics.contains("mailhook_cluster_peers 2"), "{metrics}");

    // The holder dies without a word; the second half arrives meanwhile.
    instances[holder].kill9();
    let killed = Instant::now();
    for n in 100..200 {
        imap.append("INBOX", &message(n, "bulk"));
    }
    wait_for("a survivor to take the folder over", Duration::from_secs(10), || {
        let owner = pg.sql(&db, "SELECT owner FROM folder_lease WHERE folder = 'INBOX'");
        owner != ids[holder] && ids.contains(&owner)
    });
    // Within the lease (2 s) plus one try (667 ms), and some slack for a loaded machine.
    assert!(killed.elapsed() < Duration::from_secs(6), "takeover took {:?}", killed.elapsed());
    wait_for("all 200 deliveries", Duration::from_secs(30), || hook.accepted().len() >= 200);
    // A moment for any duplicate to show.
    std::thread::sleep(Duration::from_secs(2));
    let counts = deliveries(&hook);
    let twice: Vec<_> = counts.iter().filter(|(_, c)| **c != 1).collect();
    assert!(twice.is_empty(), "delivered more than once: {twice:?}");
    assert_eq!(counts.len(), 200, "every message delivered");
    assert_eq!(pg.sql(&db, "SELECT count(*) FROM imap_seen"), "200");
    assert_eq!(pg.sql(&db, "SELECT count(DISTINCT message_id) FROM imap_seen"), "200");
    let checkpoint = pg.sql(&db, "SELECT last_uid FROM imap_checkpoint WHERE folder = 'INBOX'");
    assert_eq!(checkpoint, "200");
    assert_eq!(imap.unseen("INBOX"), Vec::<u32>::new(), "every message flagged seen");

    for (i, gw) in instances.iter_mut().enumerate() {
        if i != holder {
            assert_eq!(gw.stop(), 0, "{}", gw.logs());
            assert!(!gw.logs().contains(PG_PASSWORD), "the database password is logged");
        }
    }
    assert_eq!(pg.sql(&db, "SELECT count(*) FROM folder_lease"), "0", "leases given up at shutdown");
    assert_eq!(pg.sql(&db, &format!("SELECT count(*) FROM instance WHERE id <> '{}'", ids[holder])), "0");
}

#[test]
fn the_ledger_keeps_a_renumbered_folder_from_being_sent_again() {
    let pg = Postgres::shared();
    let db = pg.database();
    let mut dovecot = Dovecot::start();
    let hook = HookServer::start(HookOptions::default());
    let mut imap = dovecot.client(USER, IMAP_PASSWORD);
    for n in 0..3 {
        imap.append("INBOX", &message(n, "bulk"));
    }
    imap.logout();
    let mut first = instance(pg, &db, &dovecot, &hook);
    first.start();
    wait_for("three deliveries", Duration::from_secs(20), || hook.accepted().len() >= 3);
    assert_eq!(first.stop(), 0, "{}", first.logs());

    // The server renumbers the folder, and the messages lose their \Seen flag; another
    // instance (with a spool of its own, so only the shared ledger knows them) watches it.
    dovecot.reset_uidvalidity(USER, "INBOX");
    let mut imap = dovecot.client(USER, IMAP_PASSWORD);
    for uid in imap.uids("INBOX") {
        imap.store("INBOX", uid, "-FLAGS (\\Seen)");
    }
    imap.append("INBOX", &message(3, "bulk"));
    let mut second = instance(pg, &db, &dovecot, &hook);
    second.start();
    wait_for("the new message", Duration::from_secs(20), || hook.accepted().len() >= 4);
    second.wait_log("the renumbered messages recognised", 3, Duration::from_secs(10), |l| {
        l["message"].as_str().is_some_and(|m| m.starts_with("same content already in the dedupe ledger"))
    });
    std::thread::sleep(Duration::from_secs(1));
    let counts = deliveries(&hook);
    assert_eq!(counts, BTreeMap::from([(0, 1), (1, 1), (2, 1), (3, 1)]));
    assert_eq!(imap.unseen("INBOX"), Vec::<u32>::new(), "recognised messages are still flagged");
    assert_eq!(second.stop(), 0, "{}", second.logs());
}

#[test]
fn an_instance_that_loses_its_lease_stops_fetching_at_once() {
    let pg = Postgres::shared();
    let db = pg.database();
    let dovecot = Dovecot::start();
    let hook = HookServer::start(HookOptions::default());
    let mut imap = dovecot.client(USER, IMAP_PASSWORD);
    imap.append("INBOX", &message(0, "bulk"));
    let mut gw = instance(pg, &db, &dovecot, &hook);
    gw.start();
    wait_for("the first delivery", Duration::from_secs(20), || hook.accepted().len() == 1);

    // Another owner (one that never renews) takes the folder behind the holder's back.
    pg.sql(&db, "UPDATE folder_lease SET owner = 'elsewhere', until = now() + interval '1 hour'");
    gw.wait_log("the lease lost", 1, Duration::from_secs(10), |l| {
        l["message"].as_str().is_some_and(|m| m.starts_with("IMAP folder lease lost"))
    });
    imap.append("INBOX", &message(1, "bulk"));
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(hook.accepted().len(), 1, "fetched without the lease");
    let admin = gw.listening("admin");
    assert!(!holds_inbox(&healthz(admin)), "the lost lease is not reported as held");

    // The other owner goes away: the instance takes the folder back and fetches.
    pg.sql(&db, "DELETE FROM folder_lease");
    wait_for("the second delivery", Duration::from_secs(10), || hook.accepted().len() == 2);
    assert_eq!(deliveries(&hook), BTreeMap::from([(0, 1), (1, 1)]));
    assert!(holds_inbox(&healthz(admin)));
    assert_eq!(gw.stop(), 0, "{}", gw.logs());
}
