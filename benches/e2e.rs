//! End to end: SMTP in, webhook out, through the real `mailhook serve` (release build, spool
//! fsync on), measured from the client's end of DATA to the webhook's receipt.
//!
//! For each case (message size × concurrent sessions, `--messages` each, default 5,000):
//!
//! 1. a fresh spool directory under `$MAILHOOK_BENCH_DIR` (default `target/bench-e2e/`);
//! 2. a webhook sink in this process (axum on its own thread and current-thread runtime, on
//!    127.0.0.1) answers 200 and notes, for every request, the message's sequence number (from
//!    the payload's `subject`) and the time it arrived;
//! 3. `mailhook serve` with `[smtp]` on a free loopback port, one catch-all rule to a `webhook`
//!    destination pointing at the sink, `[delivery] rate = "off"`, `concurrency = 32`;
//! 4. a load client of ours: one thread per session, raw SMTP with PIPELINING (MAIL, RCPT and
//!    DATA in one write), each message carrying its sequence number; the client notes the time
//!    just before it writes the final `.` of DATA, and which messages were answered 250;
//! 5. the case ends when the sink has seen every acknowledged message (or after 120 s).
//!
//! Reported: messages/s end to end (first send to last receipt), latency p50/p99 (end of DATA
//! → webhook receipt), CPU of `serve` per message (utime+stime from `/proc`), `serve`'s peak RSS
//! (`VmHWM`), context switches of `serve` per message (voluntary and involuntary, summed over
//! its threads in `/proc/PID/task/*/status`), messages acknowledged but never received (lost; must be 0) and received more
//! than once (duplicates; must be 0 without crashes).
//!
//! ```text
//! cargo bench --bench e2e
//! cargo bench --bench e2e -- --messages 2000 --cases 2k:20,50k:20
//! MAILHOOK_BENCH_DIR=/mnt/journaled cargo bench --bench e2e
//! MAILHOOK_BENCH_ARCHIVE=off cargo bench --bench e2e   # without the archive, to compare
//! MAILHOOK_BENCH_DRIFT=off cargo bench --bench e2e    # without drift alarms (on by default)
//! MAILHOOK_BENCH_BIN=/tmp/mailhook-before cargo bench --bench e2e  # another build of serve
//! MAILHOOK_BENCH_CLUSTER=1 cargo bench --bench e2e -- --cases 2k:20   # [cluster], one instance
//! MAILHOOK_BENCH_CLUSTER=3 cargo bench --bench e2e -- --cases 2k:20   # three instances
//! ```
//!
//! With `MAILHOOK_BENCH_CLUSTER=N`, a private PostgreSQL 15 is started for the run (as the tests
//! start it, but with `fsync = on`: every commit reaches the disk before its `250`), each case
//! gets a database of its own, and `N` instances of `serve` share it (`[cluster]`: the queue and
//! the archive in PostgreSQL), the sessions spread round-robin over their listeners. CPU per
//! message is then mailhook's (every instance) plus PostgreSQL's (every server process), and
//! the peak RSS the largest instance's.

#[path = "common/proc.rs"]
mod proc;
use proc::{clock_ticks, context_switches, proc_field, stat_ticks};
#[path = "common/serve.rs"]
mod serve;
use serve::{Serve, load_message, reply, write_webhook_config};
#[path = "common/sink.rs"]
mod sink;
#[path = "../tests/support/mod.rs"]
mod support;
use support::postgres::Postgres;

use sink::Sink;
use std::collections::HashMap;
use std::io::{BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_mailhook");
const GIVE_UP: Duration = Duration::from_secs(120);

// ---------------------------------------------------------------------------------------------
// The sink

#[derive(Default)]
struct Received {
    /// (sequence number, arrival) of every request.
    arrivals: Mutex<Vec<(u64, Instant)>>,
}

impl Received {
    fn saw(&self, subject: &str) {
        let now = Instant::now();
        if let Some(seq) = subject.strip_prefix("e2e ").and_then(|n| n.parse().ok()) {
            self.arrivals.lock().unwrap().push((seq, now));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The load client

/// One session sending `seqs`; returns (seq, time just before the end of DATA) of each
/// message answered 250.
fn session(addr: SocketAddr, seqs: Vec<u64>, size: usize) -> Vec<(u64, Instant)> {
    let stream = TcpStream::connect(addr).expect("connect to serve");
    stream.set_nodelay(true).unwrap();
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    assert_eq!(reply(&mut reader), 220);
    writer.write_all(b"EHLO load.example\r\n").unwrap();
    assert_eq!(reply(&mut reader), 250);
    let mut acked = Vec::with_capacity(seqs.len());
    for seq in seqs {
        let body = load_message("e2e", seq, size);
        writer.write_all(b"MAIL FROM:<erp@example.com>\r\nRCPT TO:<hook@example.com>\r\nDATA\r\n").unwrap();
        let (mail, rcpt, data) = (reply(&mut reader), reply(&mut reader), reply(&mut reader));
        if (mail, rcpt, data) != (250, 250, 354) {
            continue;
        }
        let (head, end) = body.split_at(body.len() - 3);
        writer.write_all(head).unwrap();
        let sent = Instant::now();
        writer.write_all(end).unwrap();
        if reply(&mut reader) == 250 {
            acked.push((seq, sent));
        }
    }
    let _ = writer.write_all(b"QUIT\r\n");
    acked
}

// ---------------------------------------------------------------------------------------------
// serve

fn cpu_ticks(pid: u32) -> u64 {
    stat_ticks(Path::new(&format!("/proc/{pid}/stat"))).unwrap_or(0)
}

/// The private PostgreSQL of a `MAILHOOK_BENCH_CLUSTER` run, and how many instances share it.
struct Cluster {
    pg: Postgres,
    instances: usize,
}

/// utime + stime of the PostgreSQL server and every process it started, in ticks.
fn postgres_ticks(pg: &Postgres) -> u64 {
    let Some(root) = pg.pid() else { return 0 };
    let mut total = cpu_ticks(root);
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let stat = entry.path().join("stat");
        let Ok(text) = std::fs::read_to_string(&stat) else { continue };
        let ppid = text.rfind(')').and_then(|i| text[i + 2..].split(' ').nth(1)).and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(root) {
            total += stat_ticks(&stat).unwrap_or(0);
        }
    }
    total
}

fn start_serve(dir: &Path, sink: SocketAddr, cluster: Option<(&Postgres, &str)>) -> Serve {
    // The archive is on, as by default, unless MAILHOOK_BENCH_ARCHIVE=off.
    let archive = std::env::var("MAILHOOK_BENCH_ARCHIVE").as_deref() != Ok("off");
    // MAILHOOK_BENCH_DRIFT=off runs without drift alarms, to compare their cost side by side.
    let drift = match std::env::var("MAILHOOK_BENCH_DRIFT").as_deref() {
        Ok("off") => "[drift]\nenabled = false\n",
        _ => "",
    };
    let cluster = cluster
        .map_or(String::new(), |(pg, db)| format!("[cluster]\npostgres = \"{}\"\n", pg.url_with(db, "${PGPASS}")));
    write_webhook_config(dir, sink, "10s", archive, &format!("{drift}{cluster}"));
    Serve::spawn_with(dir, BIN, &[("PGPASS", support::postgres::PASSWORD)])
}

// ---------------------------------------------------------------------------------------------

struct Row {
    case: String,
    acked: usize,
    secs: f64,
    p50: f64,
    p99: f64,
    cpu_ms: f64,
    rss_mb: f64,
    switches: f64,
    lost: usize,
    dups: usize,
}

fn run_case(base: &Path, size: usize, sessions: usize, messages: usize, cluster: Option<&Cluster>) -> Row {
    let dir = base.join(format!("{}-{}k-{sessions}", std::process::id(), size / 1024));
    let _ = std::fs::remove_dir_all(&dir);
    let received = Arc::new(Received::default());
    let sink = Sink::subjects(1 << 20, {
        let r = received.clone();
        move |s| r.saw(s)
    });
    let db = cluster.map(|c| c.pg.database());
    let serves: Vec<Serve> = (0..cluster.map_or(1, |c| c.instances))
        .map(|n| {
            let dir = dir.join(format!("instance-{n}"));
            std::fs::create_dir_all(&dir).unwrap();
            start_serve(&dir, sink.addr, cluster.zip(db.as_deref()).map(|(c, db)| (&c.pg, db)))
        })
        .collect();
    let pids: Vec<u32> = serves.iter().map(|s| s.child.id()).collect();
    let ticks = || pids.iter().map(|p| cpu_ticks(*p)).sum::<u64>() + cluster.map_or(0, |c| postgres_ticks(&c.pg));
    let cpu0 = ticks();
    let switches0: u64 = pids.iter().map(|p| context_switches(*p)).sum();
    let start = Instant::now();
    let threads: Vec<_> = (0..sessions)
        .map(|s| {
            let seqs: Vec<u64> = (0..messages as u64).filter(|n| (*n as usize) % sessions == s).collect();
            let addr = serves[s % serves.len()].smtp;
            std::thread::spawn(move || session(addr, seqs, size))
        })
        .collect();
    let acked: HashMap<u64, Instant> = threads.into_iter().flat_map(|t| t.join().expect("session")).collect();
    let deadline = Instant::now() + GIVE_UP;
    loop {
        let arrived: std::collections::HashSet<u64> =
            received.arrivals.lock().unwrap().iter().map(|(s, _)| *s).collect();
        if acked.keys().all(|s| arrived.contains(s)) || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let arrivals = received.arrivals.lock().unwrap().clone();
    let cpu = ticks().saturating_sub(cpu0) as f64 / clock_ticks();
    let switches = pids.iter().map(|p| context_switches(*p)).sum::<u64>().saturating_sub(switches0);
    let rss = pids.iter().map(|p| proc_field(*p, "status", "VmHWM:").unwrap_or(0)).max().unwrap_or(0) as f64 / 1024.0;
    for serve in serves {
        serve.stop();
    }
    drop(sink);

    let mut first: HashMap<u64, Instant> = HashMap::new();
    let mut dups = 0;
    for (seq, at) in &arrivals {
        if first.insert(*seq, *at).is_some() {
            dups += 1;
        }
    }
    let last = arrivals.iter().map(|(_, at)| *at).max().unwrap_or(start);
    let mut latencies: Vec<f64> = acked
        .iter()
        .filter_map(|(seq, sent)| first.get(seq).map(|at| at.saturating_duration_since(*sent).as_secs_f64() * 1000.0))
        .collect();
    latencies.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| {
        if latencies.is_empty() {
            return f64::NAN;
        }
        latencies[((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1]
    };
    let _ = std::fs::remove_dir_all(&dir);
    Row {
        case: match cluster {
            Some(c) => format!("{} KB × {sessions}, cluster of {}", size / 1024, c.instances),
            None => format!("{} KB × {sessions}", size / 1024),
        },
        acked: acked.len(),
        secs: last.duration_since(start).as_secs_f64(),
        p50: pct(0.50),
        p99: pct(0.99),
        cpu_ms: cpu * 1000.0 / acked.len().max(1) as f64,
        rss_mb: rss,
        switches: switches as f64 / acked.len().max(1) as f64,
        lost: acked.keys().filter(|s| !first.contains_key(s)).count(),
        dups,
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        return;
    }
    let value = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let messages: usize = value("--messages").and_then(|v| v.parse().ok()).unwrap_or(5000);
    let cases: Vec<(usize, usize)> = value("--cases")
        .unwrap_or_else(|| "2k:1,2k:20,50k:1,50k:20".into())
        .split(',')
        .filter_map(|c| {
            let (size, sessions) = c.split_once(':')?;
            Some((size.trim_end_matches('k').parse::<usize>().ok()? * 1024, sessions.parse().ok()?))
        })
        .collect();
    let base = std::env::var_os("MAILHOOK_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"))
        .join("bench-e2e");
    std::fs::create_dir_all(&base).unwrap();

    let cluster = std::env::var("MAILHOOK_BENCH_CLUSTER")
        .ok()
        .and_then(|n| n.parse::<usize>().ok())
        .filter(|n| *n > 0)
        .map(|instances| Cluster { pg: Postgres::start_durable(), instances });
    let mut rows = Vec::new();
    for (size, sessions) in cases {
        let row = run_case(&base, size, sessions, messages, cluster.as_ref());
        eprintln!("{}: {} acknowledged, {:.2} s", row.case, row.acked, row.secs);
        rows.push(row);
    }
    println!();
    println!(
        "| case | acknowledged | messages/s | p50 latency | p99 latency | CPU per message | context switches per message | peak RSS | lost | duplicates |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut bad = false;
    for r in &rows {
        println!(
            "| {} | {} | {:.0} | {:.1} ms | {:.1} ms | {:.2} ms | {:.1} | {:.1} MB | {} | {} |",
            r.case,
            r.acked,
            r.acked as f64 / r.secs,
            r.p50,
            r.p99,
            r.cpu_ms,
            r.switches,
            r.rss_mb,
            r.lost,
            r.dups
        );
        bad |= r.lost > 0 || r.dups > 0 || r.acked < messages;
    }
    if bad {
        eprintln!("FAILED: messages refused, lost or duplicated");
        std::process::exit(1);
    }
}
