//! The fault suite: a paced SMTP load runs into `mailhook serve` while something it depends on
//! misbehaves for a while, then recovers. Nothing acknowledged may be lost; the drain time is
//! measured from the recovery to the last acknowledged message delivered. Every scenario uses
//! `[delivery] retry_for = "1h"`, `backoff = { initial = "1s", max = "30s" }`, `rate = "off"` and
//! the default concurrency of 8, so the drain after a long outage is bounded by the 30 s cap of
//! the backoff (the default cap is 15 minutes).
//!
//! - **webhook-down**: the webhook goes away for 60 s in the middle of the load: its port
//!   refuses connections and open connections are cut; then it comes back on the same port.
//! - **webhook-429**: for 20 s the webhook answers every request `429` with `Retry-After: 2`.
//!   Besides losing nothing, mailhook must pause the whole destination: 429s come in bursts of
//!   at most `concurrency` requests, at least 2 s apart.
//! - **webhook-slow-10s** / **webhook-slow-3s**: for 20 s the webhook takes 5 s to answer each
//!   request, with `[delivery] timeout` at 10 s (above: requests succeed, slowly; no duplicates
//!   allowed) and at 3 s (below: every attempt times out and is retried, though the receiver
//!   took it: duplicates with the same `Idempotency-Key` are expected and counted).
//! - **relay-451** / **relay-554** / **relay-drop**: the destination is a Kustomer email hook
//!   through an SMTP relay ([`SmtpSink`]) that, for 15 s, answers every message `451`
//!   (retried), or `554` (permanent: the messages become dead letters, kept, and `queue retry
//!   --all-dead` sends them once the relay is fixed), or closes every connection without an
//!   answer, open ones included (retried).
//! - **spool-readonly**: the spool is a tmpfs that is remounted read-only for 15 s while SMTP
//!   sessions and `ingest` processes (5 a second) keep coming. SMTP must answer `451 4.3.0`,
//!   `ingest` must exit 75, nothing half-written may be left in `tmp/` or `incoming/` once it is
//!   writable again, and then everything drains.

use crate::load::{IngestLoad, IngestLoadOptions, SmtpLoad, SmtpLoadOptions, Tally};
use crate::report::{self, Recovered, Redelivery, Resend, Row};
use crate::sink::{Mode, Seen, Sink};
use crate::support::smtp::{SmtpOptions, SmtpSink};
use crate::support::tmpfs::Tmpfs;
use crate::{Ctx, RULE, free_port, webhook_destination};
use std::collections::HashSet;
use std::time::{Duration, Instant};

const LOAD_TIMEOUT: Duration = Duration::from_secs(900);
const DRAIN_TIMEOUT: Duration = Duration::from_secs(300);
/// Requests a destination has in flight at most (the default `concurrency`).
const CONCURRENCY: usize = 8;

fn delivery(timeout: &str) -> String {
    format!(
        "[delivery]\ntimeout = \"{timeout}\"\nretry_for = \"1h\"\nbackoff = {{ initial = \"1s\", max = \"30s\" }}\nrate = \"off\"\n"
    )
}

fn smtp_config(port: u16, delivery: &str, destination: &str) -> String {
    format!("[smtp]\nlisten = [\"127.0.0.1:{port}\"]\n\n{delivery}\n{destination}")
}

fn start_load(port: u16, total: usize, per_second: f64, tag: &'static str) -> SmtpLoad {
    SmtpLoad::start(SmtpLoadOptions {
        addrs: vec![([127, 0, 0, 1], port).into()],
        total,
        sessions: 8,
        per_second: Some(per_second),
        tag,
    })
}

fn sleep_until(t: Instant) {
    std::thread::sleep(t.saturating_duration_since(Instant::now()));
}

/// What every fault scenario does once the fault is over: let the load finish, wait for the
/// drain, stop serve, and check the invariants.
struct Finish<'a> {
    recovered: Recovered,
    /// Another load into the same destination, checked together with the SMTP one.
    also: Option<&'a Tally>,
    receiver: &'a dyn Receiver,
    redelivery: Redelivery<'a>,
}

/// Where a scenario's deliveries land: the webhook sink, or the email hook's relay.
trait Receiver {
    /// Every delivery taken so far.
    fn seen(&self) -> Vec<Seen>;
    /// Whether every message of `acked` was delivered at least once.
    fn has_all(&self, acked: &HashSet<u64>) -> bool {
        let got = report::delivered_set(&self.seen());
        acked.iter().all(|s| got.contains(s))
    }
}

impl Receiver for Sink {
    fn seen(&self) -> Vec<Seen> {
        Sink::seen(self)
    }
    fn has_all(&self, acked: &HashSet<u64>) -> bool {
        Sink::has_all(self, acked)
    }
}

/// The relay's accepted messages, as deliveries.
struct Relayed<'a>(&'a SmtpSink);

impl Receiver for Relayed<'_> {
    fn seen(&self) -> Vec<Seen> {
        relay_seen(self.0, false)
    }
}

fn finish(ctx: &Ctx, row: &mut Row, gw: &mut crate::support::gateway::Gateway, load: &mut SmtpLoad, f: Finish<'_>) {
    if let Err(e) = load.wait(LOAD_TIMEOUT) {
        row.violation(e);
    }
    let tally = load.tally.clone();
    let mut acked = tally.acked_set();
    acked.extend(f.also.map(Tally::acked_set).unwrap_or_default());
    let done = report::wait_delivered(|| f.receiver.has_all(&acked), DRAIN_TIMEOUT);
    report::delivered_in_time(row, done, DRAIN_TIMEOUT);
    let spool = gw.path().join("spool");
    report::wait_spool_idle(row, &spool, DRAIN_TIMEOUT);
    ctx.finish_serve(row, gw);
    let seen = f.receiver.seen();
    report::drain(row, &f.recovered, &seen);
    row.sent = tally.offered() + f.also.map_or(0, Tally::offered);
    let unknown = |seq| tally.unknown(seq) + f.also.map_or(0, |t| t.unknown(seq));
    report::tally(row, &acked, &seen, f.redelivery, Resend::Unknown(&unknown));
    let tmp = report::check_spool_end(row, &spool, &acked, &report::delivered_set(&seen));
    row.check(tmp == 0, || format!("{tmp} file(s) left in tmp/"));
    refusals_note(row, &tally);
}

fn refusals_note(row: &mut Row, tally: &Tally) {
    let counts = tally.refusal_counts();
    if !counts.is_empty() {
        let list: Vec<String> = counts.iter().map(|(k, n)| format!("{n} × {k}")).collect();
        row.note(format!("the sender was refused {}", list.join(", ")));
    }
}

pub fn webhook_down(ctx: &mut Ctx) -> Row {
    let (total, rate) = (ctx.scale(3_000, 300), ctx.rate(40.0, 30.0));
    let (from, outage) = (ctx.secs(10, 2), ctx.secs(60, 5));
    let mut row = Row::new(
        "webhook-down",
        &format!("the webhook refuses connections for {} s in the middle of the load", outage.as_secs()),
    );
    let mut sink = Sink::start();
    let port = free_port();
    let mut gw = ctx.gateway(&smtp_config(port, &delivery("10s"), &webhook_destination(&sink)), RULE);
    gw.start();
    gw.listening("smtp");
    let mut load = start_load(port, total, rate, "webhook-down");
    let t0 = Instant::now();
    sleep_until(t0 + from);
    sink.stop();
    let down = [Instant::now()];
    let acked_before = load.tally.acked();
    sleep_until(t0 + from + outage);
    sink.resume();
    let recovered = Recovered::now(load.tally.acked_set());
    row.note(format!("{} messages acknowledged while the webhook was down", load.tally.acked() - acked_before));
    finish(
        ctx,
        &mut row,
        &mut gw,
        &mut load,
        Finish {
            recovered,
            also: None,
            receiver: &sink,
            // A request the receiver took just as it went away was never answered.
            redelivery: Redelivery::NearKills(&down, Duration::from_secs(1)),
        },
    );
    row.note(format!("{} delivery attempts deferred", report::log_count(&gw.logs(), "deferred")));
    ctx.keep_logs_if_failed(&row, &gw);
    row
}

pub fn webhook_429(ctx: &mut Ctx) -> Row {
    let (total, rate) = (ctx.scale(1_500, 300), ctx.rate(30.0, 30.0));
    let (from, window) = (ctx.secs(10, 2), ctx.secs(20, 5));
    let mut row =
        Row::new("webhook-429", &format!("the webhook answers 429 with Retry-After: 2 for {} s", window.as_secs()));
    let sink = Sink::start();
    let port = free_port();
    let mut gw = ctx.gateway(&smtp_config(port, &delivery("10s"), &webhook_destination(&sink)), RULE);
    gw.start();
    gw.listening("smtp");
    let mut load = start_load(port, total, rate, "webhook-429");
    let t0 = Instant::now();
    sleep_until(t0 + from);
    sink.set_mode(Mode::TooMany { retry_after_secs: 2 });
    sleep_until(t0 + from + window);
    sink.set_mode(Mode::Accept);
    let recovered = Recovered::now(load.tally.acked_set());
    finish(
        ctx,
        &mut row,
        &mut gw,
        &mut load,
        Finish { recovered, also: None, receiver: &sink, redelivery: Redelivery::Forbidden },
    );
    // The pause: 429s come in bursts (the requests already past the pause), bursts >= 2 s apart.
    let times = sink.too_many();
    let mut bursts: Vec<(Instant, usize)> = Vec::new();
    for t in &times {
        match bursts.last_mut() {
            Some((start, n)) if t.duration_since(*start) < Duration::from_millis(500) => *n += 1,
            _ => bursts.push((*t, 1)),
        }
    }
    let biggest = bursts.iter().map(|(_, n)| *n).max().unwrap_or(0);
    let closest = bursts.windows(2).map(|w| w[1].0.duration_since(w[0].0)).min();
    row.check(!times.is_empty(), || "no 429 was answered".into());
    row.check(biggest <= CONCURRENCY, || {
        format!("a burst of {biggest} requests got 429 (concurrency is {CONCURRENCY})")
    });
    row.check(closest.is_none_or(|d| d >= Duration::from_millis(1900)), || {
        format!(
            "two bursts of 429s only {:?} apart: the Retry-After pause was not honoured",
            closest.unwrap_or_default()
        )
    });
    row.note(format!(
        "{} requests answered 429 in {} bursts of at most {biggest}, at least {:.1} s apart",
        times.len(),
        bursts.len(),
        closest.unwrap_or_default().as_secs_f64()
    ));
    ctx.keep_logs_if_failed(&row, &gw);
    row
}

pub fn webhook_slow_10s(ctx: &mut Ctx) -> Row {
    webhook_slow(ctx, "webhook-slow-10s", "10s", false)
}

pub fn webhook_slow_3s(ctx: &mut Ctx) -> Row {
    webhook_slow(ctx, "webhook-slow-3s", "3s", true)
}

fn webhook_slow(ctx: &mut Ctx, name: &str, timeout: &str, below: bool) -> Row {
    let (total, rate) = (ctx.scale(300, 80), ctx.rate(10.0, 10.0));
    let (from, window) = (ctx.secs(5, 1), ctx.secs(20, 6));
    let mut row = Row::new(
        name,
        &format!("the webhook takes 5 s per request for {} s; `[delivery] timeout = \"{timeout}\"`", window.as_secs()),
    );
    let sink = Sink::start();
    let port = free_port();
    let mut gw = ctx.gateway(&smtp_config(port, &delivery(timeout), &webhook_destination(&sink)), RULE);
    gw.start();
    gw.listening("smtp");
    let mut load = start_load(port, total, rate, "webhook-slow");
    let t0 = Instant::now();
    sleep_until(t0 + from);
    sink.set_mode(Mode::Slow(Duration::from_secs(5)));
    let slow_from = Instant::now();
    sleep_until(t0 + from + window);
    sink.set_mode(Mode::Accept);
    let recovered = Recovered::now(load.tally.acked_set());
    let fast_again = recovered.at;
    finish(
        ctx,
        &mut row,
        &mut gw,
        &mut load,
        Finish {
            recovered,
            also: None,
            receiver: &sink,
            redelivery: if below { Redelivery::Allowed } else { Redelivery::Forbidden },
        },
    );
    let seen = sink.seen();
    let during = seen.iter().filter(|s| s.at >= slow_from && s.at < fast_again).count();
    let timeouts = report::log_count(&gw.logs(), "deferred");
    if below {
        row.check(timeouts > 0, || "no attempt timed out".into());
        row.note(format!(
            "{during} requests taken while slow, none answered in time: {timeouts} attempts timed out and were sent again (same Idempotency-Key)"
        ));
    } else {
        row.check(timeouts == 0, || format!("{timeouts} attempts were deferred"));
        row.note(format!("{during} requests taken while slow, each answered within the timeout; no retries"));
    }
    ctx.keep_logs_if_failed(&row, &gw);
    row
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum RelayFault {
    Refuse451,
    Refuse554,
    Drop,
}

pub fn relay_451(ctx: &mut Ctx) -> Row {
    relay(ctx, "relay-451", RelayFault::Refuse451)
}

pub fn relay_554(ctx: &mut Ctx) -> Row {
    relay(ctx, "relay-554", RelayFault::Refuse554)
}

pub fn relay_drop(ctx: &mut Ctx) -> Row {
    relay(ctx, "relay-drop", RelayFault::Drop)
}

fn relay_seen(relay: &SmtpSink, rejected: bool) -> Vec<Seen> {
    let messages = if rejected { relay.rejected() } else { relay.messages() };
    messages.iter().filter_map(|m| m.json_ld().map(|(_, payload)| Seen::from_payload(&payload, None, m.at))).collect()
}

fn relay(ctx: &mut Ctx, name: &str, fault: RelayFault) -> Row {
    let (total, rate) = (ctx.scale(600, 100), ctx.rate(20.0, 20.0));
    let (from, window) = (ctx.secs(5, 1), ctx.secs(15, 3));
    let what = match fault {
        RelayFault::Refuse451 => "answers every message 451 4.3.0",
        RelayFault::Refuse554 => "answers every message 554 5.7.1 (dead letters, then `queue retry --all-dead`)",
        RelayFault::Drop => "closes every connection without an answer",
    };
    let mut row = Row::new(name, &format!("the email hook's SMTP relay {what} for {} s", window.as_secs()));
    let relay = SmtpSink::start(SmtpOptions::default());
    let destination = format!(
        "[destination.hook]\ntype = \"kustomer-email-hook\"\naddress = \"abc123@hooks.kustomerapp.com\"\n\
         key = \"${{HOOK_SECRET}}\"\nrelay = \"{}\"\nfrom = \"mailhook@example.com\"\n",
        relay.relay_url()
    );
    let port = free_port();
    let mut gw = ctx.gateway(&smtp_config(port, &delivery("10s"), &destination), RULE);
    gw.start();
    gw.listening("smtp");
    let mut load = start_load(port, total, rate, name_tag(fault));
    let t0 = Instant::now();
    sleep_until(t0 + from);
    match fault {
        RelayFault::Refuse451 => relay.set_data_reply(Some((451, "4.3.0 Try again later"))),
        RelayFault::Refuse554 => relay.set_data_reply(Some((554, "5.7.1 Rejected"))),
        RelayFault::Drop => relay.set_drop_connections(true),
    }
    sleep_until(t0 + from + window);
    relay.set_data_reply(None);
    relay.set_drop_connections(false);
    let mut recovered = Recovered::now(load.tally.acked_set());
    if fault == RelayFault::Refuse554 {
        // Wait for the refused messages to settle as dead letters, then send them again.
        if let Err(e) = load.wait(LOAD_TIMEOUT) {
            row.violation(e);
        }
        let spool = gw.path().join("spool");
        report::wait_spool_idle(&mut row, &spool, DRAIN_TIMEOUT);
        let dead = report::spool_counts(&spool)["dead"];
        let refused: HashSet<String> = relay_seen(&relay, true).into_iter().map(|s| s.id).collect();
        row.check(dead == refused.len() && dead > 0, || {
            format!("{dead} dead letters, but the relay refused {} messages", refused.len())
        });
        let out = gw.run(&["queue", "retry", "--config", "mailhook.toml", "--all-dead"]);
        row.check(out.status.success(), || format!("queue retry failed: {}", String::from_utf8_lossy(&out.stderr)));
        recovered = Recovered::now(load.tally.acked_set());
        row.note(format!("{dead} dead letters after the 554s, all sent by `queue retry --all-dead`"));
    }
    finish(
        ctx,
        &mut row,
        &mut gw,
        &mut load,
        Finish { recovered, also: None, receiver: &Relayed(&relay), redelivery: Redelivery::Forbidden },
    );
    if fault != RelayFault::Refuse554 {
        row.note(format!(
            "{} delivery attempts deferred; {} connections to the relay",
            report::log_count(&gw.logs(), "deferred"),
            relay.connections()
        ));
    }
    ctx.keep_logs_if_failed(&row, &gw);
    row
}

fn name_tag(fault: RelayFault) -> &'static str {
    match fault {
        RelayFault::Refuse451 => "relay-451",
        RelayFault::Refuse554 => "relay-554",
        RelayFault::Drop => "relay-drop",
    }
}

pub fn spool_readonly(ctx: &mut Ctx) -> Row {
    let (total, rate) = (ctx.scale(2_000, 300), ctx.rate(40.0, 40.0));
    let (from, window) = (ctx.secs(10, 2), ctx.secs(15, 3));
    let mut row = Row::new(
        "spool-readonly",
        &format!(
            "the spool's file system (tmpfs) is read-only for {} s under SMTP and `ingest` load",
            window.as_secs()
        ),
    );
    let sink = Sink::start();
    let port = free_port();
    // The archive lives beside the tmpfs here: its database, open for writing, would keep the
    // kernel from remounting the spool read-only (the spool's own is closed whenever idle).
    let config = format!(
        "{}[archive]\npath = \"archive/archive.db\"\n",
        smtp_config(port, &delivery("10s"), &webhook_destination(&sink))
    );
    let mut gw = ctx.gateway(&config, RULE);
    let spool = gw.path().join("spool");
    let tmpfs = match Tmpfs::mount(&spool, "512m") {
        Ok(t) => t,
        Err(e) => {
            row.violation(format!("cannot mount a tmpfs at the spool (needs root): {e}"));
            return row;
        }
    };
    gw.start();
    gw.listening("smtp");
    let ingest_total = ctx.scale(300, 60);
    let mut ingest = IngestLoad::start(IngestLoadOptions {
        config: gw.config(),
        env: vec![("HOOK_SECRET".into(), crate::SECRET.into())],
        base: 1_000_000,
        total: ingest_total,
        workers: 2,
        per_second: Some(5.0),
        kill_share: 0.0,
        tag: "readonly-ingest",
        seed: ctx.rng.u64(..),
    });
    let mut load = start_load(port, total, rate, "readonly-smtp");
    let t0 = Instant::now();
    sleep_until(t0 + from);
    let ro_from = match tmpfs.remount(true) {
        Ok((tries, started)) => {
            row.note(format!("remounted read-only at the {tries}. try (EBUSY while a file is open for writing)"));
            started
        }
        Err(e) => {
            row.violation(format!("could not remount the spool read-only: {e}"));
            drop(load);
            drop(ingest);
            ctx.keep_logs_if_failed(&row, &gw);
            return row;
        }
    };
    sleep_until(t0 + from + window);
    if let Err(e) = tmpfs.remount(false) {
        row.violation(format!("could not remount the spool read-write: {e}"));
    }
    let mut backlog = load.tally.acked_set();
    backlog.extend(ingest.tally.acked_set());
    let recovered = Recovered::now(backlog);
    let writable_again = recovered.at;
    let bad = crate::report::spool_db_problems(&spool);
    row.check(bad.is_empty(), || format!("half-written entries right after the remount: {bad:?}"));
    if let Err(e) = ingest.wait(LOAD_TIMEOUT) {
        row.violation(e);
    }
    finish(
        ctx,
        &mut row,
        &mut gw,
        &mut load,
        Finish {
            recovered,
            also: Some(&ingest.tally),
            receiver: &sink,
            // A delivery in flight as the file system turned read-only cannot be recorded: it is
            // sent again once, when the spool is writable again. None may start while it lasts.
            redelivery: Redelivery::Around(ro_from, Duration::from_secs(2)),
        },
    );
    // SMTP refusals: only 451 4.3.0, and only while read-only (or just after, for a session
    // that was already past its draft).
    let smtp = load.tally.refusals();
    let wrong: Vec<&String> = smtp.iter().map(|(_, r)| r).filter(|r| *r != "451 4.3.0").collect();
    row.check(!smtp.is_empty(), || "SMTP was never refused while the spool was read-only".into());
    row.check(wrong.is_empty(), || format!("SMTP refusals other than 451 4.3.0: {wrong:?}"));
    let outside = smtp.iter().filter(|(t, _)| *t < ro_from || *t > writable_again + Duration::from_secs(1)).count();
    row.check(outside == 0, || format!("{outside} SMTP refusals while the spool was writable"));
    let codes = ingest.tally.refusals();
    let wrong: Vec<&String> = codes.iter().map(|(_, r)| r).filter(|r| *r != "exit 75").collect();
    row.check(!codes.is_empty(), || "no ingest exited 75 while the spool was read-only".into());
    row.check(wrong.is_empty(), || format!("ingest failures other than exit 75: {wrong:?}"));
    row.note(format!("{} `ingest` runs exited 75", codes.len()));
    let mut per_id: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    let seen = sink.seen();
    for s in &seen {
        *per_id.entry(s.id.as_str()).or_default() += 1;
    }
    let most = per_id.values().copied().max().unwrap_or(0);
    row.check(most <= 2, || {
        format!("a message was delivered {most} times (at most twice: once more after the remount)")
    });
    row.note(format!("{} deliveries in flight at the remount sent again once", row.redelivered));
    ctx.keep_logs_if_failed(&row, &gw);
    drop(tmpfs);
    row
}
