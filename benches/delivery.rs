//! Deliveries per second from a full spool to a local webhook, through the real pipeline.
//!
//! For each concurrency (32, then 8):
//!
//! 1. a fresh spool under `target/bench-delivery/` (or `$MAILHOOK_BENCH_DIR/bench-delivery/`)
//!    is filled with 10,000 messages of 2 KB (`Spool::store` from 32 threads, fsync on: with
//!    group commit that is quick, and unlike fsync off it leaves no dirty inode tables behind,
//!    which on ext4 without a journal would slow down the file creations measured next);
//! 2. a sink (axum, on its own thread and current-thread runtime, on 127.0.0.1) counts requests
//!    and `Idempotency-Key`s and answers 200 `{}`;
//! 3. the config has one `webhook` destination pointing at the sink, `[delivery] rate = "off"`,
//!    the concurrency under test, one catch-all rule (`[[rule]] name = "all" to = ["sink"]`) and
//!    spool fsync **on** (the real setting);
//! 4. the pipeline is built as `mailhook serve` builds it (`load_rules`, `Spool::open`, lock,
//!    recover, `Pipeline::new`, `run` on a multi-thread runtime) and runs until the sink has
//!    seen every message and `incoming/`, `active/` and `deferred/` are empty.
//!
//! Reported: wall seconds, deliveries/s, distinct `Idempotency-Key`s and duplicates seen by the
//! sink, dead letters, CPU time of the whole process (`/proc/self/stat` utime+stime, sink
//! included) per 1,000 deliveries with a per-thread breakdown, and peak RSS (`VmHWM`, reset
//! through `/proc/self/clear_refs` before each run). No log subscriber is installed, so the
//! cost of `serve`'s logging is not included.
//!
//! ```text
//! cargo bench --bench delivery
//! cargo bench --bench delivery -- --messages 2000 --concurrency 32,8,64
//! ```

#[path = "common/proc.rs"]
mod proc;
use proc::{clock_ticks, stat_ticks};
#[path = "common/sink.rs"]
mod sink;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State as AxState};
use axum::http::{StatusCode, header};
use axum::response::Response;
use mailhook::config::Config;
use mailhook::model::{Envelope, Source};
use mailhook::pipeline::{Pipeline, SharedRules};
use mailhook::rules::load_rules;
use mailhook::spool::{Spool, SpoolOptions, State};
use sink::Sink;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

const MESSAGE_SIZE: usize = 2048;
const GIVE_UP: Duration = Duration::from_secs(300);

// ---------------------------------------------------------------------------------------------
// The sink

#[derive(Default)]
struct SinkState {
    requests: AtomicU64,
    keys: Mutex<HashMap<String, u32>>,
    /// Kernel thread id of the sink's thread, for the CPU breakdown.
    tid: AtomicI64,
    first: Mutex<Option<Instant>>,
    last: Mutex<Option<Instant>>,
}

async fn sink_handler(AxState(state): AxState<Arc<SinkState>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let _ = axum::body::to_bytes(body, 1 << 20).await;
    let key = parts.headers.get("idempotency-key").map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    *state.keys.lock().unwrap().entry(key.unwrap_or_default()).or_insert(0) += 1;
    let now = Instant::now();
    state.first.lock().unwrap().get_or_insert(now);
    *state.last.lock().unwrap() = Some(now);
    state.requests.fetch_add(1, Ordering::SeqCst);
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from("{}"))
        .expect("response")
}

// ---------------------------------------------------------------------------------------------
// /proc helpers

fn current_tid() -> i64 {
    // "/proc/thread-self" -> "PID/task/TID"
    std::fs::read_link("/proc/thread-self")
        .ok()
        .and_then(|p| p.file_name().and_then(|n| n.to_str()).and_then(|s| s.parse().ok()))
        .unwrap_or(-1)
}

/// Busy CPU time of the whole machine (every process), in ticks, from /proc/stat.
fn machine_busy_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(cpu) = stat.lines().find(|l| l.starts_with("cpu ")) else { return 0 };
    let v: Vec<u64> = cpu.split_whitespace().skip(1).map(|x| x.parse().unwrap_or(0)).collect();
    // user nice system idle iowait irq softirq steal: everything but idle and iowait.
    v.iter().take(8).enumerate().filter(|(i, _)| *i != 3 && *i != 4).map(|(_, x)| x).sum()
}

fn process_ticks() -> u64 {
    stat_ticks(Path::new("/proc/self/stat")).unwrap_or(0)
}

/// Ticks of every live thread: tid -> (name, ticks).
fn thread_ticks() -> HashMap<i64, (String, u64)> {
    let mut out = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else { return out };
    for e in dir.flatten() {
        let Some(tid) = e.file_name().to_str().and_then(|s| s.parse::<i64>().ok()) else { continue };
        let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default().trim().to_string();
        if let Some(t) = stat_ticks(&e.path().join("stat")) {
            out.insert(tid, (comm, t));
        }
    }
    out
}

fn status_kb(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field).map(|v| v.trim().trim_end_matches("kB").trim().parse().unwrap_or(0)))
        .unwrap_or(0)
}

/// Resets VmHWM to the current RSS (Linux ≥ 4.0).
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

// ---------------------------------------------------------------------------------------------
// Setup

/// `$MAILHOOK_BENCH_DIR`, else the target directory: never a tmpfs unless asked for.
fn bench_base() -> PathBuf {
    if let Some(d) = std::env::var_os("MAILHOOK_BENCH_DIR") {
        return PathBuf::from(d);
    }
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
}

/// Marker touched after each mass deletion by a benchmark (see [`settle`]).
const DELETED_MARKER: &str = "bench-last-delete";

/// Deletes `dir` (if any), flushes the file system and, when it held anything, touches the
/// deletion marker.
fn delete_and_mark(base: &Path, dir: &Path) {
    let held = std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_some());
    let _ = std::fs::remove_dir_all(dir);
    if held {
        let _ = std::fs::File::open(base).map(|f| rustix::fs::syncfs(&f));
        let _ = std::fs::write(base.join(DELETED_MARKER), b"");
    }
}

/// Removes what interrupted runs left under `root`: every entry but those of a benchmark still
/// running (named `…-PID` after a live process), so that two runs never delete each other's
/// spool.
fn remove_stale(base: &Path, root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let pid = name.rsplit_once('-').and_then(|(_, p)| p.parse::<u32>().ok());
        let running = pid.is_some_and(|p| p != std::process::id() && Path::new(&format!("/proc/{p}")).exists());
        if !running {
            delete_and_mark(base, &e.path());
        }
    }
}

/// On ext4 without a journal, a new inode skips every free inode deleted in the last 5 s (300 s
/// while its inode table block is dirty), scanning them one by one under the directory lock.
/// Waits until the last deletion by a benchmark is flushed and 6 s old.
fn settle(base: &Path) {
    let age = std::fs::metadata(base.join(DELETED_MARKER))
        .and_then(|m| m.modified())
        .ok()
        .map(|t| t.elapsed().unwrap_or_default());
    if let Some(a) = age
        && a < Duration::from_secs(6)
    {
        std::thread::sleep(Duration::from_secs(6) - a);
    }
}

/// For ext4: whether the file system on `source` has a journal.
fn ext4_journal(source: &str) -> Option<bool> {
    let dev = Path::new(source).file_name()?.to_str()?;
    let task = std::fs::read_to_string(format!("/sys/fs/ext4/{dev}/journal_task")).ok()?;
    Some(task.trim() != "<none>")
}

/// File system type of `path` (with ext4's journal status), from /proc/self/mountinfo.
fn filesystem_type(path: &Path) -> String {
    let path = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut best: Option<(usize, String, String)> = None;
    for line in info.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        let Some(dash) = f.iter().position(|x| *x == "-") else { continue };
        if f.len() < 5 || f.len() < dash + 3 {
            continue;
        }
        let mount = f[4].replace("\\040", " ");
        if path.starts_with(&mount) && best.as_ref().is_none_or(|(l, _, _)| mount.len() >= *l) {
            best = Some((mount.len(), f[dash + 1].to_string(), f[dash + 2].to_string()));
        }
    }
    match best {
        Some((_, t, source)) if t == "ext4" => match ext4_journal(&source) {
            Some(true) => format!("ext4 with journal on {source}"),
            Some(false) => format!("ext4 WITHOUT journal on {source}"),
            None => format!("ext4 on {source}"),
        },
        Some((_, t, source)) => format!("{t} on {source}"),
        None => "unknown".into(),
    }
}

fn message(i: usize) -> Vec<u8> {
    let mut m = format!(
        "From: Monitoring <alerts@monitor.example.com>\r\n\
         To: hooks@hooks.example.com\r\n\
         Subject: ** PROBLEM Service Alert: web{i:05}.example.com/HTTP is CRITICAL **\r\n\
         Date: Tue, 01 Dec 2026 09:30:00 +0100\r\n\
         Message-ID: <bench-{i}@monitor.example.com>\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: text/plain; charset=utf-8\r\n\
         \r\n\
         Notification Type: PROBLEM\r\n\
         Service: HTTP\r\n\
         Host: web{i:05}.example.com\r\n\
         State: CRITICAL\r\n\
         \r\n"
    );
    let line = "CRITICAL - Socket timeout after 10 seconds; the check will be retried shortly.\r\n";
    while m.len() + line.len() <= MESSAGE_SIZE {
        m.push_str(line);
    }
    while m.len() < MESSAGE_SIZE {
        m.push('.');
    }
    m.into_bytes()
}

/// Fills the spool with `n` messages from 32 threads. With fsync on (group commit) this is
/// about as fast as without on this kind of disk, and it keeps the inode tables clean (see
/// [`settle`]), which fsync off would not.
fn fill(spool_dir: &Path, n: usize) -> Duration {
    let spool = Spool::open(spool_dir, SpoolOptions { fsync: true, keep_raw: false }).expect("open spool for filling");
    let start = Instant::now();
    let threads = 32;
    std::thread::scope(|s| {
        for t in 0..threads {
            let spool = spool.clone();
            s.spawn(move || {
                for i in (t..n).step_by(threads) {
                    let mut e = Envelope::new(Source::Smtp);
                    e.mail_from = Some("alerts@monitor.example.com".into());
                    e.recipients = vec!["hooks@hooks.example.com".into()];
                    spool.store(e, &message(i)).expect("store");
                }
            });
        }
    });
    let took = start.elapsed();
    assert_eq!(spool.list(State::Incoming).expect("list").len(), n);
    took
}

struct Row {
    concurrency: usize,
    messages: usize,
    fill: Duration,
    wall: Duration,
    first_request: Option<Duration>,
    last_request: Option<Duration>,
    requests: u64,
    distinct: usize,
    duplicates: u64,
    missing_key: u64,
    dead: usize,
    cpu_secs: f64,
    others_secs: f64,
    threads: BTreeMap<String, f64>,
    peak_rss_kb: u64,
    hwm_reset: bool,
}

fn thread_group(name: &str) -> String {
    match name {
        "bench-sink" => "sink (axum)".into(),
        "spool-writer" => "spool-writer".into(),
        n if n.starts_with("tokio-runtime") || n.starts_with("pipeline-rt") => "pipeline runtime".into(),
        "" => "?".into(),
        n => n.to_string(),
    }
}

fn run_once(base: &Path, root: &Path, concurrency: usize, n: usize) -> Row {
    let dir = root.join(format!("c{concurrency}-{}", std::process::id()));
    settle(base);
    std::fs::create_dir_all(dir.join("rules")).expect("create bench dir");
    let spool_dir = dir.join("spool");
    let fill_took = fill(&spool_dir, n);
    eprintln!("delivery: concurrency {concurrency}: spool filled in {:.2} s; delivering", fill_took.as_secs_f64());

    let state = Arc::new(SinkState::default());
    let st = state.clone();
    let sink = Sink::start(Router::new().fallback(sink_handler).with_state(state.clone()), move || {
        st.tid.store(current_tid(), Ordering::SeqCst)
    });
    std::fs::write(dir.join("rules/all.toml"), "[[rule]]\nname = \"all\"\nto = [\"sink\"]\n").expect("write rules");
    let config_text = format!(
        r#"[spool]
dir = "./spool"
fsync = true

[rules]
dir = "./rules"
unmatched = "dead"

[delivery]
rate = "off"
concurrency = {concurrency}

[destination.sink]
type = "webhook"
url = "http://{addr}/hook"
"#,
        addr = sink.addr
    );
    let config_path = dir.join("mailhook.toml");
    std::fs::write(&config_path, &config_text).expect("write config");
    let config = Config::parse(&config_text, &config_path, &dir, &|_| None).unwrap_or_else(|errors| {
        for e in &errors {
            eprintln!("{e}");
        }
        panic!("bench config does not load")
    });

    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("pipeline-rt").build().expect("runtime");
    let hwm_reset = reset_peak_rss();
    let ticks_before = process_ticks();
    let machine_before = machine_busy_ticks();
    let threads_before = thread_ticks();
    let start = Instant::now();

    let (wall, spool) = runtime.block_on(async {
        let rules = load_rules(&config).unwrap_or_else(|errors| panic!("{} rule error(s)", errors.len()));
        let rules: SharedRules = Arc::new(RwLock::new(Arc::new(rules)));
        let spool = Spool::open(&config.resolve(&config.spool.dir), SpoolOptions::of(&config)).expect("open spool");
        let lock = spool.lock().expect("lock spool");
        let recovery = spool.recover().expect("recover");
        assert!(recovery.corrupt.is_empty(), "fresh spool has corrupt entries: {:?}", recovery.corrupt);
        let metrics = mailhook::metrics::Metrics::new();
        let pipeline = Arc::new(Pipeline::new(&config, spool.clone(), rules, metrics).expect("build pipeline"));
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let workers = tokio::spawn(pipeline.clone().run(stop_rx));

        let empty = |spool: &Spool| {
            [State::Incoming, State::Active, State::Deferred]
                .into_iter()
                .all(|s| spool.list(s).map(|l| l.is_empty()).unwrap_or(false))
        };
        let wall = loop {
            if state.requests.load(Ordering::SeqCst) >= n as u64 && empty(&spool) {
                break start.elapsed();
            }
            if !spool.db_path().is_file() {
                panic!("concurrency {concurrency}: the spool directory {} was removed", spool.dir().display());
            }
            if start.elapsed() > GIVE_UP {
                let counts: Vec<String> = State::ALL
                    .into_iter()
                    .map(|s| format!("{s}={}", spool.list(s).map(|l| l.len()).unwrap_or(0)))
                    .collect();
                panic!(
                    "concurrency {concurrency}: not done after {GIVE_UP:?}: sink saw {} request(s); spool {}",
                    state.requests.load(Ordering::SeqCst),
                    counts.join(" ")
                );
            }
            // Cheap check first; the directories are only listed once the sink has everything.
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let _ = stop_tx.send(true);
        let _ = workers.await;
        drop(lock);
        (wall, spool)
    });

    let ticks_after = process_ticks();
    let machine_after = machine_busy_ticks();
    let threads_after = thread_ticks();
    let peak_rss_kb = status_kb("VmHWM:");
    let hz = clock_ticks();
    let cpu_secs = (ticks_after - ticks_before) as f64 / hz;
    let others_secs =
        machine_after.saturating_sub(machine_before).saturating_sub(ticks_after - ticks_before) as f64 / hz;
    let mut threads: BTreeMap<String, f64> = BTreeMap::new();
    let mut accounted = 0u64;
    for (tid, (name, after)) in &threads_after {
        let before = threads_before.get(tid).map_or(0, |(_, t)| *t);
        let d = after.saturating_sub(before);
        accounted += d;
        *threads.entry(thread_group(name)).or_default() += d as f64 / hz;
    }
    let gone = (ticks_after - ticks_before).saturating_sub(accounted);
    if gone > 0 {
        *threads.entry("unattributed (exited threads, rounding)".into()).or_default() += gone as f64 / hz;
    }

    let dead = spool.list(State::Dead).map(|l| l.len()).unwrap_or(0);
    drop(spool);
    drop(runtime);

    let keys = state.keys.lock().unwrap().clone();
    let missing_key = keys.get("").copied().unwrap_or(0) as u64;
    let distinct = keys.keys().filter(|k| !k.is_empty()).count();
    let duplicates: u64 = keys.iter().filter(|(k, _)| !k.is_empty()).map(|(_, c)| (*c as u64).saturating_sub(1)).sum();
    let first_request = state.first.lock().unwrap().map(|t| t.saturating_duration_since(start));
    let last_request = state.last.lock().unwrap().map(|t| t.saturating_duration_since(start));
    let requests = state.requests.load(Ordering::SeqCst);
    drop(sink);
    delete_and_mark(base, &dir);

    Row {
        concurrency,
        messages: n,
        fill: fill_took,
        wall,
        first_request,
        last_request,
        requests,
        distinct,
        duplicates,
        missing_key,
        dead,
        cpu_secs,
        others_secs,
        threads,
        peak_rss_kb,
        hwm_reset,
    }
}

fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();

    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |flag: &str| args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1)).cloned();
    let n: usize = value("--messages").map(|v| v.parse().expect("--messages N")).unwrap_or(10_000);
    let concurrencies: Vec<usize> = value("--concurrency")
        .map(|v| v.split(',').map(|c| c.trim().parse().expect("--concurrency N[,N…]")).collect())
        .unwrap_or_else(|| vec![32, 8]);

    let base = bench_base();
    let root = base.join("bench-delivery");
    remove_stale(&base, &root);
    std::fs::create_dir_all(&root).expect("create bench root");
    let fstype = filesystem_type(&root);

    let mut rows = Vec::new();
    for &c in &concurrencies {
        eprintln!("delivery: concurrency {c}: filling the spool with {n} messages");
        let row = run_once(&base, &root, c, n);
        eprintln!("delivery: concurrency {c}: {:.2} s", row.wall.as_secs_f64());
        rows.push(row);
    }

    println!();
    println!(
        "delivery benchmark: {n} messages of {MESSAGE_SIZE} bytes, spool → pipeline → local webhook (127.0.0.1), rate off"
    );
    println!(
        "bench dir: {} ({fstype}); spool filled by 32 writers, delivered with fsync on; one catch-all rule",
        root.display()
    );
    println!();
    println!(
        "| concurrency | messages | seconds | deliveries/s | distinct keys | duplicates | dead | CPU s | CPU ms / 1000 deliveries | peak RSS MB |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        let secs = r.wall.as_secs_f64();
        println!(
            "| {} | {} | {:.2} | {:.0} | {} | {} | {} | {:.2} | {:.0} | {:.1}{} |",
            r.concurrency,
            r.messages,
            secs,
            r.messages as f64 / secs,
            r.distinct,
            r.duplicates,
            r.dead,
            r.cpu_secs,
            r.cpu_secs * 1000.0 * 1000.0 / r.messages as f64,
            r.peak_rss_kb as f64 / 1024.0,
            if r.hwm_reset { "" } else { " (not reset)" },
        );
    }
    println!();
    for r in &rows {
        let fmt = |d: Option<Duration>| d.map_or("-".to_string(), |d| format!("{:.2} s", d.as_secs_f64()));
        let breakdown: Vec<String> = r.threads.iter().map(|(k, v)| format!("{k} {v:.2} s")).collect();
        println!(
            "concurrency {}: filled in {:.2} s; first request at {}, last at {}; {} requests ({} without a key); CPU by thread: {}; other processes: {:.1} CPU s",
            r.concurrency,
            r.fill.as_secs_f64(),
            fmt(r.first_request),
            fmt(r.last_request),
            r.requests,
            r.missing_key,
            breakdown.join(", "),
            r.others_secs
        );
    }
    let ok = rows.iter().all(|r| r.distinct == r.messages && r.duplicates == 0 && r.dead == 0 && r.missing_key == 0);
    println!();
    println!(
        "{}",
        if ok {
            "check: every message delivered once (distinct keys = messages, no duplicates, no dead letters)"
        } else {
            "check: FAILED (see distinct keys / duplicates / dead above)"
        }
    );
    if !ok {
        std::process::exit(1);
    }
}
