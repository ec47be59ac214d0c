//! Pacing shared by the instances of a cluster: three real `mailhook serve` processes on one
//! private PostgreSQL deliver to one hook on 127.0.0.1, which counts what it receives. Each
//! instance delivers the mail of its own spool, so without sharing each would send at the full
//! rate; shared, the hook sees the rate once. A 429 answered to one instance pauses them all,
//! and with the database stopped each instance paces the rounds it has in flight alone, with its
//! share of the rate.

mod support;

use std::time::{Duration, Instant};
use support::gateway::{Gateway, message};
use support::hook::{HookServer, Recorded};
use support::postgres::{PASSWORD, Postgres};
use support::smtp_client::send_message;

/// A gateway of the cluster on `db` whose one destination is `hook` at `rate`.
fn instance(pg: &Postgres, db: &str, hook: &HookServer, rate: &str) -> Gateway {
    let config = format!(
        "[cluster]\npostgres = \"{}\"\n\n\
         [delivery]\nbackoff = {{ initial = \"200ms\", max = \"500ms\" }}\nrate = \"{rate}\"\n\n\
         [destination.kustomer]\ntype = \"kustomer-form-hook\"\nurl = \"{}\"\n",
        pg.url_with(db, "${PGPASS}"),
        hook.url("/hook")
    );
    let rules = "[[rule]]\nname = \"all\"\nto = [\"kustomer\"]\n[rule.when]\nsubject = '.'\n";
    Gateway::new(&config, rules).env("PGPASS", PASSWORD)
}

/// `n` instances, each with `per_instance` messages waiting in its spool, started together.
fn cluster(pg: &Postgres, db: &str, hook: &HookServer, rate: &str, n: usize, per_instance: usize) -> Vec<Gateway> {
    let mut gws: Vec<Gateway> = (0..n).map(|_| instance(pg, db, hook, rate)).collect();
    for (i, gw) in gws.iter().enumerate() {
        for m in 0..per_instance {
            gw.ingest(&message(i * 1000 + m, "paced"));
        }
    }
    for gw in &mut gws {
        gw.start();
    }
    gws
}

/// Seconds between two requests.
fn secs(a: &Recorded, b: &Recorded) -> f64 {
    b.at.duration_since(a.at).as_secs_f64()
}

/// The most requests seen in any window, beyond what a bucket of `burst` refilled at `rate`
/// per second allows in that window: `(excess, window start, requests in it, window seconds)`.
fn worst_window(requests: &[Recorded], rate: f64, burst: f64) -> (f64, usize, usize, f64) {
    let mut worst = (f64::MIN, 0, 0, 0.0);
    for i in 0..requests.len() {
        for j in i..requests.len() {
            let w = secs(&requests[i], &requests[j]);
            let count = j - i + 1;
            let excess = count as f64 - (burst + rate * w);
            if excess > worst.0 {
                worst = (excess, i, count, w);
            }
        }
    }
    worst
}

#[test]
fn three_instances_share_one_rate() {
    let pg = Postgres::shared();
    let db = pg.database();
    let hook = HookServer::start(Default::default());
    let (n, per) = (3, 20);
    let mut gws = cluster(pg, &db, &hook, "10/s", n, per);
    let requests = hook.wait_for_accepted(n * per, Duration::from_secs(30));
    let requests: Vec<Recorded> = requests.into_iter().filter(|r| r.path == "/hook").collect();
    assert_eq!(requests.len(), n * per, "one request per message");

    // A bucket of 10 refilled at 10/s: in any window of w seconds at most 10 + 10 w requests.
    // Alone, each instance would send its 20 at that rate: 30 at once and 30/s. One request of
    // slack for the time between the token and the request's arrival.
    let (excess, start, count, w) = worst_window(&requests, 10.0, 10.0);
    let overall = (requests.len() - 10) as f64 / secs(&requests[0], &requests[requests.len() - 1]);
    assert!(
        excess <= 1.0,
        "{count} requests in {w:.2}s from request {start}: more than the shared 10/s allows ({overall:.1}/s overall)"
    );
    assert!(overall <= 11.0, "{overall:.1}/s overall after the burst");
    // The instances overlapped: the check above measured sharing, not turns.
    let row = pg.sql(&db, "SELECT count(*) FROM instance");
    assert_eq!(row, n.to_string(), "every instance registered");
    assert!(secs(&requests[0], &requests[requests.len() - 1]) >= 4.0, "60 requests at 10/s after a burst of 10");
    for gw in &mut gws {
        assert_eq!(gw.stop(), 0, "{}", gw.logs());
    }
}

#[test]
fn a_429_seen_by_one_instance_pauses_them_all() {
    let hook = HookServer::start(Default::default());
    // The first request of all is answered 429 with Retry-After: 2.
    hook.push_429(2);
    pauses_every_instance_for_2s(hook, "200ms");
}

#[test]
fn a_429_without_a_delay_pauses_them_all_for_the_first_backoff() {
    let hook = HookServer::start(Default::default());
    hook.push_status(429);
    pauses_every_instance_for_2s(hook, "2s");
}

/// The first request is answered 429 (as `hook` was told); every instance waits 2 s.
fn pauses_every_instance_for_2s(hook: HookServer, initial_backoff: &str) {
    let pg = Postgres::shared();
    let db = pg.database();
    // Alone, the other instance would send its 9 in 0.8 s (a burst of 5, then 5/s).
    let (n, per) = (2, 9);
    let mut gws: Vec<Gateway> = (0..n)
        .map(|_| {
            let gw = instance(pg, &db, &hook, "5/s");
            let text = std::fs::read_to_string(gw.config()).unwrap();
            std::fs::write(
                gw.config(),
                text.replace(
                    "initial = \"200ms\", max = \"500ms\"",
                    &format!("initial = \"{initial_backoff}\", max = \"{initial_backoff}\""),
                ),
            )
            .unwrap();
            gw
        })
        .collect();
    for (i, gw) in gws.iter().enumerate() {
        for m in 0..per {
            gw.ingest(&message(i * 1000 + m, "paced"));
        }
    }
    for gw in &mut gws {
        gw.start();
    }
    hook.wait_for_accepted(n * per, Duration::from_secs(30));
    let requests: Vec<Recorded> = hook.requests().into_iter().filter(|r| r.path == "/hook").collect();
    let limited = requests.iter().position(|r| r.status == 429).expect("the 429 was answered");
    let at = &requests[limited];
    // Requests already under way when the 429 came may still arrive just after it; then none,
    // from any instance, until the pause is over.
    let during: Vec<f64> = requests
        .iter()
        .map(|r| if r.at >= at.at { secs(at, r) } else { -secs(r, at) })
        .filter(|&t| (0.3..1.8).contains(&t))
        .collect();
    assert!(during.is_empty(), "requests {during:?} s after the 429, during its 2 s pause");
    let after = requests.iter().filter(|r| r.at > at.at && secs(at, r) >= 1.8).count();
    assert!(after >= n * per - 6, "delivery resumed after the pause: {after} requests");
    let paused = pg.sql(&db, "SELECT count(*) FROM pacing WHERE paused_until IS NOT NULL");
    assert_eq!(paused, "1", "the pause was shared through the database");
    for gw in &mut gws {
        assert_eq!(gw.stop(), 0, "{}", gw.logs());
    }
}

#[test]
fn without_the_database_two_instances_split_the_rate_then_share_again() {
    // A cluster of its own: this test stops it.
    let pg = Postgres::start();
    let db = pg.database();
    let hook = HookServer::start(Default::default());
    let mut gws: Vec<Gateway> = (0..2)
        .map(|_| {
            let gw = instance(&pg, &db, &hook, "10/s");
            // Heartbeats every second, so that each soon knows the other.
            let text = std::fs::read_to_string(gw.config()).unwrap();
            // An SMTP listener each: a message taken over SMTP is its instance's to deliver.
            let text = text.replace("[cluster]\n", "[cluster]\nlease = \"3s\"\n");
            let text = format!("[smtp]\nlisten = [\"127.0.0.1:0\"]\nrecipients = ['@example\\.com$']\n\n{text}");
            std::fs::write(gw.config(), text).unwrap();
            gw
        })
        .collect();
    let mut smtp = Vec::new();
    for gw in &mut gws {
        gw.start();
        smtp.push(gw.listening("smtp"));
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while pg.try_sql(&db, "SELECT count(*) FROM instance").ok().as_deref() != Some("2") {
        assert!(Instant::now() < deadline, "both instances registered");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(1500));
    // The queue is in the database: mail is taken while it is up. The first request is told to
    // wait (a 429 pauses both instances), so the rounds of every message are waiting for their
    // turn when the database stops; they then pace alone.
    hook.push_429(8);
    for (i, addr) in smtp.iter().enumerate() {
        for m in 0..15 {
            send_message(*addr, &message(i * 1000 + m, "split"));
        }
    }
    pg.stop();
    hook.wait_for_accepted(29, Duration::from_secs(30));
    for gw in &gws {
        gw.wait_log("pacing alone", 1, Duration::from_secs(10), |l| {
            l["message"].as_str().is_some_and(|m| m.starts_with("database unreachable: pacing alone"))
                && l["instances"].as_u64() == Some(2)
        });
    }
    // Each at 5/s with a burst of 5: together never above the shared 10/s. With the whole rate
    // each, the two would send 20 at once.
    let requests: Vec<Recorded> = hook.requests().into_iter().filter(|r| r.path == "/hook").collect();
    let (excess, start, count, w) = worst_window(&requests, 10.0, 10.0);
    assert!(excess <= 1.0, "{count} requests in {w:.2}s from request {start}: each instance took more than half");

    pg.restart();
    // Past the retry, the next message takes its token from the database again.
    std::thread::sleep(Duration::from_secs(5));
    for (i, addr) in smtp.iter().enumerate() {
        send_message(*addr, &message(i * 1000 + 99, "shared again"));
    }
    hook.wait_for_accepted(32, Duration::from_secs(30));
    let starts = |prefix: &'static str| {
        move |l: &serde_json::Value| l["message"].as_str().is_some_and(|m| m.starts_with(prefix))
    };
    for gw in &gws {
        gw.wait_log("shared again", 1, Duration::from_secs(10), starts("database back: pacing shared"));
        let alone = gw.log_lines().iter().filter(|l| starts("database unreachable: pacing alone")(l)).count();
        assert_eq!(alone, 1, "said once");
    }
    assert_eq!(pg.sql(&db, "SELECT count(*) FROM pacing WHERE destination = 'kustomer'"), "1");
    for gw in &mut gws {
        assert_eq!(gw.stop(), 0, "{}", gw.logs());
    }
}
