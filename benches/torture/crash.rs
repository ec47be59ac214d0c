//! The crash suite: `kill -9` of `mailhook serve` at random moments while it takes in and
//! delivers a load, restarting it each time. After the last restart the load finishes and the
//! spool drains; then every message mailhook acknowledged must have reached the destination.
//!
//! - **crash-smtp**: 10,000 messages over 8 concurrent SMTP sessions ([`SmtpLoad`]) into the
//!   SMTP listener, delivered to a webhook ([`Sink`]); serve is killed 5 times, at random
//!   points of the load (by the number of messages acknowledged so far, plus a random delay),
//!   and restarted after a random pause of up to half a second on the same port, where the
//!   sessions reconnect and send again every message they have no `250` for.
//! - **crash-ingest**: 3,000 messages, each through its own `mailhook ingest` process (12 at a
//!   time, [`IngestLoad`]), 5 % of which are themselves killed with SIGKILL shortly after they
//!   start; serve is killed 5 times meanwhile, and `ingest` goes on spooling while serve is down
//!   and while the next one recovers the spool. An `ingest` that exited 0 must be delivered; one
//!   that was killed is run again.
//! - **crash-imap**: a backlog of 2,000 messages in a private Dovecot's INBOX, watched with
//!   `after = "move:Done"`; serve is killed 5 times during the drain (by the number of messages
//!   delivered so far). Every message must be delivered, INBOX must end empty and `Done` full.
//!
//! Duplicates are allowed only where a kill explains them: a spool id delivered twice must have
//! had its first delivery in flight at a kill (at most [`IN_FLIGHT`] before it); a message
//! delivered under two spool ids must have had an attempt whose answer was lost (SMTP: the
//! connection broke after the final dot; ingest: the process was killed), or for IMAP a kill
//! right after its first copy was spooled (before the watcher had recorded it as spooled).

use crate::load::{IngestLoad, IngestLoadOptions, SmtpLoad, SmtpLoadOptions, Tally, message};
use crate::report::{self, Recovered, Redelivery, Resend, Row};
use crate::sink::{Seen, Sink};
use crate::support::dovecot::{Dovecot, ImapClient, PASSWORD, USER};
use crate::support::gateway::Gateway;
use crate::{Ctx, RULE, free_port, webhook_destination};
use std::collections::HashSet;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

/// A delivery counts as in flight at a kill when it reached the receiver at most this long
/// before it (the spool has not recorded it yet).
const IN_FLIGHT: Duration = Duration::from_secs(5);

/// How long the load may go without a message acknowledged before the scenario fails.
const STALL: Duration = Duration::from_secs(60);

/// How long the load and then the drain may take before the scenario fails.
const LOAD_TIMEOUT: Duration = Duration::from_secs(900);
const DRAIN_TIMEOUT: Duration = Duration::from_secs(300);

/// Short retries: a crash scenario is about kills, not about a slow receiver.
const DELIVERY: &str = "[delivery]\ntimeout = \"10s\"\nretry_for = \"1h\"\nbackoff = { initial = \"1s\", max = \"10s\" }\nrate = \"off\"\n";

/// When a killed serve was gone (every delivery it made had reached the receiver by then,
/// every message it spooled had its spool id), on the monotonic and on the wall clock.
#[derive(Default)]
struct Kills {
    at: Vec<Instant>,
    wall: Vec<SystemTime>,
}

/// Kills serve, waits a random moment, starts it again.
fn kill_and_restart(ctx: &mut Ctx, gw: &mut Gateway, listener: Option<&str>, kills: &mut Kills) {
    gw.kill9();
    kills.at.push(Instant::now());
    kills.wall.push(SystemTime::now());
    std::thread::sleep(Duration::from_millis(ctx.rng.u64(0..500)));
    gw.start();
    if let Some(protocol) = listener {
        gw.listening(protocol);
    }
}

/// `count` kill points spread at random over `total` (each in 5–90 %), in order.
fn kill_points(ctx: &mut Ctx, count: usize, total: usize) -> Vec<usize> {
    let mut points: Vec<usize> = (0..count).map(|_| total * 5 / 100 + ctx.rng.usize(0..total * 85 / 100)).collect();
    points.sort_unstable();
    points
}

fn wait_for(what: &str, timeout: Duration, f: impl Fn() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// What a crash scenario has left to check once its load was drained.
struct Drained {
    acked: HashSet<u64>,
    seen: Vec<Seen>,
    spool: PathBuf,
}

/// The part every load-driven crash scenario shares: kills serve at five random points of the
/// load (restarting it, and waiting for `listener` when given), lets the load end (`wait_load`),
/// waits until everything acknowledged was delivered and the spool is idle, stops serve, and
/// tallies losses and duplicates against the kills.
#[allow(clippy::too_many_arguments)]
fn kill_five_times_and_drain(
    ctx: &mut Ctx,
    row: &mut Row,
    gw: &mut Gateway,
    sink: &Sink,
    tally: &Tally,
    total: usize,
    listener: Option<&str>,
    wait_load: impl FnOnce() -> Result<(), String>,
) -> Drained {
    let mut kills = Kills::default();
    for point in kill_points(ctx, 5, total) {
        tally.wait_acked(point, STALL).unwrap_or_else(|e| panic!("{e}"));
        std::thread::sleep(Duration::from_millis(ctx.rng.u64(0..50)));
        kill_and_restart(ctx, gw, listener, &mut kills);
        eprintln!("    killed serve at {} acknowledged", tally.acked());
    }
    let recovered = Recovered::now(tally.acked_set());
    if let Err(e) = wait_load() {
        row.violation(e);
    }
    let acked = tally.acked_set();
    let done = report::wait_delivered(|| sink.has_all(&acked), DRAIN_TIMEOUT);
    report::delivered_in_time(row, done, DRAIN_TIMEOUT);
    let spool = gw.path().join("spool");
    report::wait_spool_idle(row, &spool, DRAIN_TIMEOUT);
    ctx.finish_serve(row, gw);
    let seen = sink.seen();
    report::drain(row, &recovered, &seen);
    row.sent = tally.offered();
    let unknown = |seq| tally.unknown(seq);
    report::tally(row, &acked, &seen, Redelivery::NearKills(&kills.at, IN_FLIGHT), Resend::Unknown(&unknown));
    Drained { acked, seen, spool }
}

/// Waits (up to the drain timeout) until the watchers have worked through the folder: INBOX
/// empty and all `total` messages moved to `Done`; a violation otherwise.
pub fn wait_folder_moved(row: &mut Row, imap: &mut ImapClient, total: usize) {
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    let (mut inbox, mut moved) = (imap.count("INBOX"), imap.count("Done"));
    while (inbox, moved) != (0, total) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        (inbox, moved) = (imap.count("INBOX"), imap.count("Done"));
    }
    row.check((inbox, moved) == (0, total), || format!("INBOX holds {inbox} and Done {moved} of {total} at the end"));
}

pub fn smtp(ctx: &mut Ctx) -> Row {
    let total = ctx.scale(10_000, 1_000);
    let mut row = Row::new("crash-smtp", "kill -9 of serve 5 times during an SMTP load (8 sessions)");
    let sink = Sink::start();
    let port = free_port();
    let config = format!("[smtp]\nlisten = [\"127.0.0.1:{port}\"]\n\n{DELIVERY}\n{}", webhook_destination(&sink));
    let mut gw = ctx.gateway(&config, RULE);
    gw.start();
    gw.listening("smtp");
    let mut load = SmtpLoad::start(SmtpLoadOptions {
        addrs: vec![([127, 0, 0, 1], port).into()],
        total,
        sessions: 8,
        per_second: None,
        tag: "crash-smtp",
    });
    let tally = load.tally.clone();
    let Drained { acked, seen, spool } =
        kill_five_times_and_drain(ctx, &mut row, &mut gw, &sink, &tally, total, Some("smtp"), || {
            load.wait(LOAD_TIMEOUT)
        });
    let tmp = report::check_spool_end(&mut row, &spool, &acked, &report::delivered_set(&seen));
    row.note(format!(
        "{} answers lost to a kill after the final dot; {} connections refused while serve was down; {} drafts of cut sessions left in tmp/",
        tally.unknown_total(),
        tally.connect_failures(),
        tmp
    ));
    ctx.keep_logs_if_failed(&row, &gw);
    row
}

pub fn ingest(ctx: &mut Ctx) -> Row {
    let total = ctx.scale(3_000, 400);
    let mut row = Row::new(
        "crash-ingest",
        "kill -9 of serve 5 times while 12 `ingest` processes at a time spool; 5 % of the `ingest` processes killed too",
    );
    let sink = Sink::start();
    let config = format!("{DELIVERY}\n{}", webhook_destination(&sink));
    let mut gw = ctx.gateway(&config, RULE);
    gw.start();
    gw.wait_log("spool recovered", 1, Duration::from_secs(10), |v| v["message"] == "spool recovered");
    let mut load = IngestLoad::start(IngestLoadOptions {
        config: gw.config(),
        env: vec![("HOOK_SECRET".into(), crate::SECRET.into())],
        base: 0,
        total,
        workers: 12,
        per_second: None,
        kill_share: 0.05,
        tag: "crash-ingest",
        seed: ctx.rng.u64(..),
    });
    let tally = load.tally.clone();
    let Drained { acked, seen, spool } =
        kill_five_times_and_drain(ctx, &mut row, &mut gw, &sink, &tally, total, None, || load.wait(LOAD_TIMEOUT));
    let odd: Vec<String> = tally.refusal_counts().into_iter().map(|(k, n)| format!("{k} × {n}")).collect();
    row.check(odd.is_empty(), || format!("ingest processes that were not killed failed: {}", odd.join(", ")));
    let tmp = report::check_spool_end(&mut row, &spool, &acked, &report::delivered_set(&seen));
    row.note(format!(
        "{} ingest runs, {} killed; {} drafts of killed ingests left in tmp/",
        tally.attempts(),
        load.killed.load(std::sync::atomic::Ordering::SeqCst),
        tmp
    ));
    ctx.keep_logs_if_failed(&row, &gw);
    row
}

pub fn imap(ctx: &mut Ctx) -> Row {
    let total = ctx.scale(2_000, 300);
    let mut row = Row::new(
        "crash-imap",
        "kill -9 of serve 5 times while it drains an IMAP backlog (Dovecot, `after = \"move:Done\"`)",
    );
    let dovecot = Dovecot::start();
    let mut imap = dovecot.client(USER, PASSWORD);
    let filled = Instant::now();
    for n in 0..total {
        imap.append("INBOX", &message("crash-imap", n as u64));
    }
    eprintln!("    {total} messages appended to INBOX in {:.1} s", filled.elapsed().as_secs_f64());
    let sink = Sink::start();
    let config = format!(
        "[[imap]]\nname = \"torture\"\nhost = \"127.0.0.1\"\nport = {}\ntls = \"none\"\nuser = \"{USER}\"\n\
         password = \"${{IMAP_PASSWORD}}\"\nafter = \"move:Done\"\npoll = \"1h\"\n\n{DELIVERY}\n{}",
        dovecot.port(),
        webhook_destination(&sink)
    );
    let mut gw = ctx.gateway(&config, RULE).env("IMAP_PASSWORD", PASSWORD);
    gw.start();
    let mut kills = Kills::default();
    for point in kill_points(ctx, 5, total) {
        wait_for("the drain to reach the next kill point", LOAD_TIMEOUT, || sink.distinct() >= point);
        std::thread::sleep(Duration::from_millis(ctx.rng.u64(0..30)));
        kill_and_restart(ctx, &mut gw, None, &mut kills);
        eprintln!("    killed serve at {} delivered", sink.distinct());
    }
    let acked: HashSet<u64> = (0..total as u64).collect();
    let recovered = Recovered::now(acked.clone());
    let done = report::wait_delivered(|| sink.has_all(&acked), DRAIN_TIMEOUT);
    report::delivered_in_time(&mut row, done, DRAIN_TIMEOUT);
    wait_folder_moved(&mut row, &mut imap, total);
    let spool = gw.path().join("spool");
    report::wait_spool_idle(&mut row, &spool, DRAIN_TIMEOUT);
    ctx.finish_serve(&mut row, &mut gw);
    let seen = sink.seen();
    report::drain(&mut row, &recovered, &seen);
    row.sent = total;
    report::tally(
        &mut row,
        &acked,
        &seen,
        Redelivery::NearKills(&kills.at, IN_FLIGHT),
        Resend::SpooledAcrossKill(&kills.wall, IN_FLIGHT),
    );
    report::check_spool_end(&mut row, &spool, &acked, &report::delivered_set(&seen));
    let logs = gw.logs();
    row.note(format!(
        "{} messages fetched again after a kill and recognised as already spooled",
        report::log_count(&logs, "already spooled from this folder; not sent again")
    ));
    ctx.keep_logs_if_failed(&row, &gw);
    row
}
