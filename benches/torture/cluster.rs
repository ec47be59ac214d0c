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
//!
//! Invariants: nothing acknowledged is lost; every request carries its spool id as its
//! `Idempotency-Key`, so a duplicate has the key of its first delivery; a spool id delivered
//! twice had its first delivery in flight at a kill (cluster-kill) or around the outage
//! (cluster-dbdown); the queue ends empty; neither the destination's secret nor the database
//! password shows in any log.

use crate::load::{SmtpLoad, SmtpLoadOptions, Tally};
use crate::report::{self, Recovered, Redelivery, Resend, Row};
use crate::sink::Sink;
use crate::support::gateway::Gateway;
use crate::support::postgres::{PASSWORD, Postgres};
use crate::{Ctx, RULE, free_port, webhook_destination};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

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
    pg.try_sql(db, "SELECT count(*) FROM queue").ok()?.parse().ok()
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
    for (gw, _) in gws.iter_mut() {
        ctx.finish_serve(row, gw);
        row.check(!gw.logs().contains(PASSWORD), || "the database password appears in serve's logs".into());
        ctx.keep_logs_if_failed(row, gw);
    }
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
