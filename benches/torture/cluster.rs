//! The cluster suite: three `mailhook serve` instances sharing one private PostgreSQL (started
//! as the tests start it, see `tests/support/postgres.rs`), their queue in it.
//!
//! - **cluster-kill**: 10,000 messages over 9 SMTP sessions, three to each instance; an instance
//!   chosen at random is `kill -9`'d 6 times at random points of the load and restarted after a
//!   random pause of up to half a second. The messages a killed instance held are delivered by
//!   another once their lease (3 s here) has passed.
//! - **cluster-dbdown**: a paced SMTP load into three instances; PostgreSQL is stopped for 15 s
//!   in the middle of it and started again. While it is away the listeners answer `451 4.3.0`
//!   (the load sends those messages again later); once it is back, delivery resumes with no
//!   restart of any instance.
//! - **cluster-imap**: a backlog of 2,000 messages in one folder of a private Dovecot, watched
//!   by three instances with `after = "move:Done"`; the holder of the folder's lease is
//!   `kill -9`'d once mid-way through the fetch (by the ledger's rows) and restarted; a survivor
//!   takes the folder over once the lease has passed and goes on where the ledger says.
//!
//! Invariants: nothing acknowledged is lost; every request carries its spool id as its
//! `Idempotency-Key`, so a duplicate has the key of its first delivery; a spool id delivered
//! twice had its first delivery in flight at a kill (cluster-kill, cluster-imap) or around the
//! outage (cluster-dbdown); the queue ends empty; neither the destination's secret nor the
//! database password shows in any log.
//!
//! cluster-imap adds: every message of the folder is spooled exactly once, kill or not (the
//! message and its row of the dedupe ledger are one transaction, see `docs/design.md` "IMAP
//! folders"). The copies are counted as the distinct `Idempotency-Key`s the destination saw
//! per message (every spool id is delivered, none is lost). The ledger ends with one row per message, naming a spool id that was
//! delivered; the folder ends empty and `Done` full.

use crate::load::{SmtpLoad, SmtpLoadOptions, Tally, message};
use crate::report::{self, Recovered, Redelivery, Resend, Row};
use crate::sink::Sink;
use crate::support::dovecot::{self, Dovecot, USER};
use crate::support::gateway::Gateway;
use crate::support::postgres::{PASSWORD, Postgres};
use crate::{Ctx, RULE, free_port, webhook_destination};
use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

/// The lease of these scenarios: a killed instance's messages wait this long at most.
const LEASE: &str = "3s";

/// A delivery counts as in flight at a kill when it reached the receiver at most this long
/// before it: the killed instance may have sent it without recording it, and its lease has to
/// pass before another instance sends it again.
const IN_FLIGHT: Duration = Duration::from_secs(5);

const STALL: Duration = Duration::from_secs(60);
const LOAD_TIMEOUT: Duration = Duration::from_secs(900);
const DRAIN_TIMEOUT: Duration = Duration::from_secs(300);

const DELIVERY: &str = "[delivery]\ntimeout = \"10s\"\nretry_for = \"1h\"\nbackoff = { initial = \"1s\", max = \"10s\" }\nrate = \"off\"\n";

/// Three instances on `db`, each with an SMTP listener on a port of its own.
fn instances(ctx: &Ctx, pg: &Postgres, db: &str, sink: &Sink) -> Vec<(Gateway, SocketAddr)> {
    (0..3)
        .map(|_| {
            let port = free_port();
            let config = format!(
                "[cluster]\npostgres = \"{}\"\nlease = \"{LEASE}\"\n\n[smtp]\nlisten = [\"127.0.0.1:{port}\"]\n\n{DELIVERY}\n{}",
                pg.url_with(db, "${PGPASS}"),
                webhook_destination(sink)
            );
            let mut gw = ctx.gateway(&config, RULE).env("PGPASS", PASSWORD);
            gw.start();
            gw.listening("smtp");
            (gw, ([127, 0, 0, 1], port).into())
        })
        .collect()
}

/// Messages still in the shared queue (`None` while the database does not answer).
fn queued(pg: &Postgres, db: &str) -> Option<usize> {
    count(pg, db, "SELECT count(*) FROM queue")
}

/// Waits until the shared queue is empty, checks it has no dead letter, and stops every
/// instance (each must exit 0, the database password in none of their logs).
fn wait_queue_empty_and_stop<'a>(
    ctx: &Ctx,
    row: &mut Row,
    pg: &Postgres,
    db: &str,
    gws: impl Iterator<Item = &'a mut Gateway>,
) {
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    while queued(pg, db) != Some(0) {
        if Instant::now() > deadline {
            row.violation(format!("the queue still holds {:?} messages after {DRAIN_TIMEOUT:?}", queued(pg, db)));
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let dead = pg.try_sql(db, "SELECT count(*) FROM queue WHERE state = 'dead'").unwrap_or_default();
    row.check(dead == "0", || format!("{dead} dead letter(s) left"));
    for gw in gws {
        ctx.finish_serve(row, gw);
        row.check(!gw.logs().contains(PASSWORD), || "the database password appears in serve's logs".into());
        ctx.keep_logs_if_failed(row, gw);
    }
}

/// Waits until every message acknowledged was delivered and the queue is empty, stops every
/// instance, and tallies what the destination saw.
#[allow(clippy::too_many_arguments)]
fn drain_and_tally(
    ctx: &Ctx,
    row: &mut Row,
    pg: &Postgres,
    db: &str,
    gws: &mut [(Gateway, SocketAddr)],
    sink: &Sink,
    tally: &Tally,
    recovered: &Recovered,
    redelivery: Redelivery<'_>,
) {
    let acked = tally.acked_set();
    let done = report::wait_delivered(|| sink.has_all(&acked), DRAIN_TIMEOUT);
    report::delivered_in_time(row, done, DRAIN_TIMEOUT);
    wait_queue_empty_and_stop(ctx, row, pg, db, gws.iter_mut().map(|(gw, _)| gw));
    let seen = sink.seen();
    report::drain(row, recovered, &seen);
    row.sent = tally.offered();
    let unknown = |seq| tally.unknown(seq);
    report::tally(row, &acked, &seen, redelivery, Resend::Unknown(&unknown));
}

pub fn kill(ctx: &mut Ctx) -> Row {
    let total = ctx.scale(10_000, 1_000);
    let mut row =
        Row::new("cluster-kill", "3 instances on one PostgreSQL, SMTP round-robin; kill -9 of one at random 6 times");
    let pg = Postgres::start();
    let db = pg.database();
    let sink = Sink::start();
    let mut gws = instances(ctx, &pg, &db, &sink);
    let mut load = SmtpLoad::start(SmtpLoadOptions {
        addrs: gws.iter().map(|(_, a)| *a).collect(),
        total,
        sessions: 9,
        per_second: None,
        tag: "cluster-kill",
    });
    let tally = load.tally.clone();
    let mut kills = Vec::new();
    let mut points: Vec<usize> = (0..6).map(|_| total * 5 / 100 + ctx.rng.usize(0..total * 85 / 100)).collect();
    points.sort_unstable();
    for point in points {
        tally.wait_acked(point, STALL).unwrap_or_else(|e| panic!("{e}"));
        std::thread::sleep(Duration::from_millis(ctx.rng.u64(0..50)));
        let victim = ctx.rng.usize(0..gws.len());
        let gw = &mut gws[victim].0;
        gw.kill9();
        kills.push(Instant::now());
        eprintln!("    killed instance {victim} at {} acknowledged", tally.acked());
        std::thread::sleep(Duration::from_millis(ctx.rng.u64(0..500)));
        gw.start();
        gw.listening("smtp");
    }
    let recovered = Recovered::now(tally.acked_set());
    if let Err(e) = load.wait(LOAD_TIMEOUT) {
        row.violation(e);
    }
    drain_and_tally(
        ctx,
        &mut row,
        &pg,
        &db,
        &mut gws,
        &sink,
        &tally,
        &recovered,
        Redelivery::NearKills(&kills, IN_FLIGHT),
    );
    row.note(format!(
        "{} kills; {} answers lost to a kill after the final dot; {} connections refused while an instance was down",
        kills.len(),
        tally.unknown_total(),
        tally.connect_failures()
    ));
    row
}

pub fn dbdown(ctx: &mut Ctx) -> Row {
    let total = ctx.scale(4_000, 600);
    let rate = ctx.rate(100.0, 40.0);
    let outage = ctx.secs(15, 5);
    let mut row = Row::new("cluster-dbdown", "3 instances; PostgreSQL stopped for 15 s under a paced SMTP load");
    let pg = Postgres::start();
    let db = pg.database();
    let sink = Sink::start();
    let mut gws = instances(ctx, &pg, &db, &sink);
    let mut load = SmtpLoad::start(SmtpLoadOptions {
        addrs: gws.iter().map(|(_, a)| *a).collect(),
        total,
        sessions: 9,
        per_second: Some(rate),
        tag: "cluster-dbdown",
    });
    let tally = load.tally.clone();
    tally.wait_acked(total / 4, STALL).unwrap_or_else(|e| panic!("{e}"));
    let stopped = Instant::now();
    pg.stop();
    eprintln!("    database stopped at {} acknowledged", tally.acked());
    let acked_at_stop = tally.acked();
    std::thread::sleep(outage);
    let during = tally.acked() - acked_at_stop;
    row.check(during == 0, || format!("{during} message(s) acknowledged while the database was stopped"));
    pg.restart();
    eprintln!("    database back after {:.1} s", stopped.elapsed().as_secs_f64());
    let recovered = Recovered::now(tally.acked_set());
    if let Err(e) = load.wait(LOAD_TIMEOUT) {
        row.violation(e);
    }
    let refused = tally.refusal_counts();
    let window = outage + Duration::from_secs(10);
    drain_and_tally(
        ctx,
        &mut row,
        &pg,
        &db,
        &mut gws,
        &sink,
        &tally,
        &recovered,
        Redelivery::Around(stopped + outage / 2, window),
    );
    let refusals: Vec<String> = refused.iter().map(|(k, n)| format!("{k} × {n}")).collect();
    row.check(refused.keys().all(|k| k == "451 4.3.0"), || format!("refusals other than 451 4.3.0: {refusals:?}"));
    row.note(format!("refused while away: {}", refusals.join(", ")));
    row
}

/// A number the database answers (`None` while it does not, or for no row).
fn count(pg: &Postgres, db: &str, sql: &str) -> Option<usize> {
    pg.try_sql(db, sql).ok()?.trim().parse().ok()
}

/// Which of `gws` holds the lease of the folder INBOX (by the pid in its `instance` row).
fn inbox_holder(pg: &Postgres, db: &str, gws: &[Gateway]) -> Option<usize> {
    let host = pg
        .try_sql(
            db,
            "SELECT i.host FROM folder_lease l JOIN instance i ON i.id = l.owner \
             WHERE l.folder = 'INBOX' AND l.until > now()",
        )
        .ok()?;
    let pid: u32 = host.trim().rsplit(':').next()?.parse().ok()?;
    gws.iter().position(|gw| gw.serve_pid() == Some(pid))
}

pub fn imap(ctx: &mut Ctx) -> Row {
    let total = ctx.scale(2_000, 300);
    let mut row = Row::new(
        "cluster-imap",
        "3 instances watch one IMAP folder (Dovecot, `move:Done`); kill -9 of the lease holder mid-way",
    );
    let pg = Postgres::start();
    let db = pg.database();
    let dovecot = Dovecot::start();
    let mut imap = dovecot.client(USER, dovecot::PASSWORD);
    let filled = Instant::now();
    for n in 0..total {
        imap.append("INBOX", &message("cluster-imap", n as u64));
    }
    eprintln!("    {total} messages appended to INBOX in {:.1} s", filled.elapsed().as_secs_f64());
    let sink = Sink::start();
    let config = format!(
        "[cluster]\npostgres = \"{}\"\nlease = \"{LEASE}\"\n\n\
         [[imap]]\nname = \"torture\"\nhost = \"127.0.0.1\"\nport = {}\ntls = \"none\"\nuser = \"{USER}\"\n\
         password = \"${{IMAP_PASSWORD}}\"\nafter = \"move:Done\"\npoll = \"1s\"\n\n{DELIVERY}\n{}",
        pg.url_with(&db, "${PGPASS}"),
        dovecot.port(),
        webhook_destination(&sink)
    );
    let mut gws: Vec<Gateway> = (0..3)
        .map(|_| {
            let mut gw = ctx.gateway(&config, RULE).env("PGPASS", PASSWORD).env("IMAP_PASSWORD", dovecot::PASSWORD);
            gw.start();
            gw
        })
        .collect();

    // The kill: once the ledger holds a random 20-80 % of the folder, the holder goes.
    let point = total / 5 + ctx.rng.usize(0..total * 3 / 5);
    let ledger = "SELECT count(*) FROM imap_seen";
    let deadline = Instant::now() + LOAD_TIMEOUT;
    while count(&pg, &db, ledger).unwrap_or(0) < point {
        assert!(Instant::now() < deadline, "the ledger did not reach {point} rows in {LOAD_TIMEOUT:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
    let victim = inbox_holder(&pg, &db, &gws).expect("an instance holds the folder");
    gws[victim].kill9();
    let (killed, killed_wall) = (Instant::now(), SystemTime::now());
    let in_ledger = count(&pg, &db, ledger).unwrap_or(0);
    eprintln!("    killed the holder (instance {victim}) at {in_ledger} rows in the ledger");
    std::thread::sleep(Duration::from_millis(ctx.rng.u64(0..500)));
    gws[victim].start();
    let mut takeover = None;
    while takeover.is_none() && killed.elapsed() < STALL {
        // The dead holder's pid is no longer any instance's: a holder found is a new one.
        match inbox_holder(&pg, &db, &gws) {
            Some(i) => takeover = Some((i, killed.elapsed())),
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    let Some((heir, after)) = takeover else { panic!("no instance took the folder over within {STALL:?}") };
    eprintln!("    instance {heir} holds the folder {:.1} s after the kill", after.as_secs_f64());
    let recovered = Recovered::now((0..total as u64).collect());

    // The end: everything delivered, the folder moved, the queue empty.
    let all: HashSet<u64> = (0..total as u64).collect();
    let done = report::wait_delivered(|| sink.has_all(&all), DRAIN_TIMEOUT);
    report::delivered_in_time(&mut row, done, DRAIN_TIMEOUT);
    crate::crash::wait_folder_moved(&mut row, &mut imap, total);
    wait_queue_empty_and_stop(ctx, &mut row, &pg, &db, gws.iter_mut());

    // Spooled exactly once: the destination saw every spool id (none is lost), so the spool ids
    // it saw per message are its copies in the spool; the ledger has one row per message, each
    // naming a spool id that was delivered. (The archive cannot count them: a kill loses the
    // entries the killed instance had not committed yet, see docs/design.md "When it is written, and what a crash may lose".)
    let ledger_ids = pg.try_sql(&db, "SELECT message_id FROM imap_seen").unwrap_or_default();
    let ledger_ids: HashSet<&str> = ledger_ids.lines().collect();
    row.check(ledger_ids.len() == total, || {
        format!("the ledger names {} spool ids for {total} messages", ledger_ids.len())
    });
    let seen = sink.seen();
    report::drain(&mut row, &recovered, &seen);
    row.sent = total;
    report::tally(
        &mut row,
        &all,
        &seen,
        Redelivery::NearKills(&[killed], IN_FLIGHT),
        Resend::SpooledAcrossKill(&[killed_wall], IN_FLIGHT),
    );
    let delivered_ids: HashSet<&str> = seen.iter().map(|s| s.id.as_str()).collect();
    let unknown = ledger_ids.iter().filter(|id| !delivered_ids.contains(*id)).count();
    row.check(unknown == 0, || format!("{unknown} spool ids of the ledger were never delivered"));
    let resent = row.resent;
    row.check(resent == 0, || format!("{resent} messages spooled twice"));
    let logs: String = gws.iter().map(Gateway::logs).collect();
    row.note(format!(
        "holder killed at {in_ledger} of {total} in the ledger; instance {heir} held the folder {:.1} s later; \
         {} UIDs found in the ledger and only moved",
        after.as_secs_f64(),
        ledger_skips(&logs)
    ));
    row
}

/// How many UIDs the watchers found already in the ledger (the `count` of those log lines).
fn ledger_skips(logs: &str) -> u64 {
    logs.lines()
        .filter(|l| l.contains("already in the dedupe ledger; not sent again"))
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["fields"]["count"].as_u64().or_else(|| v["count"].as_u64()))
        .sum()
}
