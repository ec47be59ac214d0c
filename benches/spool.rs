//! The cost of a durable spool write: `Spool::store` of a 2 KB message.
//!
//! | case | writers | fsync | what it shows |
//! |------|---------|-------|---------------|
//! | (a)  | 1 thread    | on  | one commit (one flush of the WAL) per message |
//! | (b)  | 1 thread    | off | the CPU and VFS cost alone |
//! | (c)  | 32 threads  | on  | group commit: concurrent writers share each flush |
//! | (d)  | 32 threads  | off | the writer thread's ceiling without flushes |
//! | (e)  | 32 tasks    | on  | (c) with `draft()` + `commit().await` on a 2-worker tokio runtime |
//!
//! Each case stores N messages into a fresh spool and reports messages/s and wall time / N.
//! "vs (a)" is the throughput ratio to (a). For the concurrent fsync-on cases the average batch
//! size is estimated from the acknowledgements: a batch is answered at once and batches are a
//! flush apart, so acknowledgements are grouped by the gaps between them (a lower bound: late
//! wake-ups on busy CPUs split groups). The flush requests the disk completed per message
//! (`/sys/class/block/DEV/stat`, whoever issued them) show what a flush strategy costs.
//!
//! The spool lives under `target/bench-spool/` (or `$MAILHOOK_BENCH_DIR/bench-spool/`), on the
//! same file system as the build, never on a tmpfs; the file system type is printed. It is
//! deleted at the end. On ext4 *without a journal*, freshly deleted inodes make file creation
//! slow for a while (see `settle`): the benchmark waits a few seconds after the last deletion
//! by a benchmark, and says so when one happened in the last five minutes; the sys µs/msg
//! column shows when file creation was slowed down.
//!
//! ```text
//! cargo bench --bench spool
//! cargo bench --bench spool -- --quick     # fewer messages per case
//! ```

use mailhook::model::{Envelope, Source};
use mailhook::spool::{Spool, SpoolOptions, State};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

const MESSAGE_SIZE: usize = 2048;
const WRITERS: usize = 32;

/// A plain 2 KB message (headers, a text body padded to the size).
fn message(size: usize) -> Vec<u8> {
    let mut m = String::from(
        "Return-Path: <alerts@monitor.example.com>\r\n\
         From: Monitoring <alerts@monitor.example.com>\r\n\
         To: hooks@hooks.example.com\r\n\
         Subject: ** PROBLEM Service Alert: web01.example.com/HTTP is CRITICAL **\r\n\
         Date: Tue, 01 Dec 2026 09:30:00 +0100\r\n\
         Message-ID: <bench-0001@monitor.example.com>\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: text/plain; charset=utf-8\r\n\
         \r\n\
         Notification Type: PROBLEM\r\n\
         Service: HTTP\r\n\
         Host: web01.example.com\r\n\
         State: CRITICAL\r\n\
         \r\n",
    );
    let line = "CRITICAL - Socket timeout after 10 seconds; the check will be retried shortly.\r\n";
    while m.len() + line.len() <= size {
        m.push_str(line);
    }
    while m.len() < size {
        m.push('.');
    }
    m.into_bytes()
}

fn envelope() -> Envelope {
    let mut e = Envelope::new(Source::Smtp);
    e.mail_from = Some("alerts@monitor.example.com".into());
    e.recipients = vec!["hooks@hooks.example.com".into()];
    e.client = Some("127.0.0.1".into());
    e
}

/// `$MAILHOOK_BENCH_DIR`, else the target directory: never a tmpfs unless asked for.
fn bench_base() -> PathBuf {
    if let Some(d) = std::env::var_os("MAILHOOK_BENCH_DIR") {
        return PathBuf::from(d);
    }
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
}

/// `(mount point, fs type, source)` of the file system holding `path`, from /proc/self/mountinfo.
fn filesystem_of(path: &Path) -> (String, String, String) {
    let path = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut best: Option<(String, String, String)> = None;
    for line in info.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(dash) = fields.iter().position(|f| *f == "-") else { continue };
        if fields.len() < dash + 3 || fields.len() < 5 {
            continue;
        }
        let mount = fields[4].replace("\\040", " ");
        if path.starts_with(&mount) && best.as_ref().is_none_or(|(m, _, _)| mount.len() >= m.len()) {
            best = Some((mount, fields[dash + 1].to_string(), fields[dash + 2].to_string()));
        }
    }
    best.unwrap_or_else(|| ("?".into(), "unknown".into(), "?".into()))
}

/// For ext4: whether the file system has a journal (`/sys/fs/ext4/DEV/journal_task`).
fn ext4_journal(source: &str) -> Option<bool> {
    let dev = Path::new(source).file_name()?.to_str()?;
    let task = std::fs::read_to_string(format!("/sys/fs/ext4/{dev}/journal_task")).ok()?;
    Some(task.trim() != "<none>")
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
/// while its inode table block is dirty), scanning them one by one under the directory lock:
/// right after a mass deletion each file creation can cost a millisecond. Waits until the last
/// deletion is flushed and 6 s old; returns its age when under 300 s.
fn settle(base: &Path) -> Option<Duration> {
    let age = || {
        std::fs::metadata(base.join(DELETED_MARKER))
            .and_then(|m| m.modified())
            .ok()
            .map(|t| t.elapsed().unwrap_or_default())
    };
    if let Some(a) = age()
        && a < Duration::from_secs(6)
    {
        std::thread::sleep(Duration::from_secs(6) - a);
    }
    age().filter(|a| *a < Duration::from_secs(300))
}

/// Busy CPU time of the whole machine (every process), in seconds, from /proc/stat.
fn machine_busy() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(cpu) = stat.lines().find(|l| l.starts_with("cpu ")) else { return 0.0 };
    let v: Vec<f64> = cpu.split_whitespace().skip(1).map(|x| x.parse().unwrap_or(0.0)).collect();
    // user nice system idle iowait irq softirq steal: everything but idle and iowait.
    let busy: f64 = v.iter().take(8).enumerate().filter(|(i, _)| *i != 3 && *i != 4).map(|(_, x)| x).sum();
    busy / 100.0
}

/// (user, system) CPU time of this process, in seconds.
fn cpu_times() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let rest = stat.rfind(')').map_or("", |i| &stat[i + 2..]);
    let f: Vec<&str> = rest.split(' ').collect();
    // `rest` starts at field 3; utime and stime are fields 14 and 15, in ticks of 1/100 s.
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0) / 100.0;
    (ticks(11), ticks(12))
}

/// Flush requests completed by the block device behind `source` (field 16 of its `stat`,
/// Linux ≥ 5.5), whoever issued them.
fn device_flushes(source: &str) -> Option<u64> {
    let dev = Path::new(source).file_name()?.to_str()?;
    let stat = std::fs::read_to_string(format!("/sys/class/block/{dev}/stat")).ok()?;
    stat.split_whitespace().nth(15)?.parse().ok()
}

struct Case {
    name: &'static str,
    fsync: bool,
    writers: usize,
    tasks: bool,
    n: usize,
}

struct Outcome {
    wall: Duration,
    /// When each message was acknowledged, relative to the start.
    acks: Vec<Duration>,
}

/// `ROOT/LETTER-PID` for case "(LETTER) …".
fn case_dir(root: &Path, case: &str) -> PathBuf {
    root.join(format!("{}-{}", &case[1..2], std::process::id()))
}

fn fresh_dir(dir: PathBuf) -> PathBuf {
    std::fs::create_dir_all(&dir).expect("create bench dir");
    dir
}

fn run_threads(spool: &Spool, writers: usize, n: usize, raw: &Arc<Vec<u8>>) -> Outcome {
    let barrier = Arc::new(Barrier::new(writers + 1));
    let per = n / writers;
    let extra = n % writers;
    let mut handles = Vec::new();
    let start_cell = Arc::new(std::sync::OnceLock::<Instant>::new());
    for w in 0..writers {
        let (spool, raw, barrier, start_cell) = (spool.clone(), raw.clone(), barrier.clone(), start_cell.clone());
        let count = per + usize::from(w < extra);
        handles.push(std::thread::spawn(move || {
            let mut acks = Vec::with_capacity(count);
            barrier.wait();
            let start = *start_cell.wait();
            for _ in 0..count {
                spool.store(envelope(), &raw).expect("store");
                acks.push(start.elapsed());
            }
            acks
        }));
    }
    let start = Instant::now();
    start_cell.set(start).expect("start set once");
    barrier.wait();
    let mut acks = Vec::with_capacity(n);
    for h in handles {
        acks.extend(h.join().expect("writer thread"));
    }
    Outcome { wall: start.elapsed(), acks }
}

fn run_tasks(spool: &Spool, writers: usize, n: usize, raw: &Arc<Vec<u8>>) -> Outcome {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(async {
        let per = n / writers;
        let extra = n % writers;
        let start = Instant::now();
        let mut set = tokio::task::JoinSet::new();
        for w in 0..writers {
            let (spool, raw) = (spool.clone(), raw.clone());
            let count = per + usize::from(w < extra);
            set.spawn(async move {
                use std::io::Write;
                let mut acks = Vec::with_capacity(count);
                for _ in 0..count {
                    let mut draft = spool.draft().expect("draft");
                    draft.write_all(&raw).expect("write draft");
                    draft.commit(envelope()).await.expect("commit");
                    acks.push(start.elapsed());
                }
                acks
            });
        }
        let mut acks = Vec::with_capacity(n);
        while let Some(r) = set.join_next().await {
            acks.extend(r.expect("writer task"));
        }
        Outcome { wall: start.elapsed(), acks }
    })
}

/// Groups acknowledgements separated by less than `gap` into one batch; returns the count.
fn batches(acks: &mut [Duration], gap: Duration) -> usize {
    acks.sort();
    if acks.is_empty() {
        return 0;
    }
    1 + acks.windows(2).filter(|w| w[1] - w[0] > gap).count()
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // `cargo bench` passes `--bench`; ignore it and any filter.
    let quick = args.iter().any(|a| a == "--quick");
    let scale = if quick { 4 } else { 1 };

    let base = bench_base();
    let root = base.join("bench-spool");
    remove_stale(&base, &root);
    std::fs::create_dir_all(&root).expect("create bench root");
    let recent_delete = settle(&base);
    let (mount, fstype, source) = filesystem_of(&root);
    if fstype == "tmpfs" || fstype == "ramfs" {
        eprintln!("warning: {} is on {fstype}: fsync there proves nothing", root.display());
    }
    let journal = match (fstype.as_str(), ext4_journal(&source)) {
        ("ext4", Some(true)) => ", with journal",
        ("ext4", Some(false)) => ", WITHOUT journal",
        _ => "",
    };

    let raw = Arc::new(message(MESSAGE_SIZE));
    assert_eq!(raw.len(), MESSAGE_SIZE);

    let cases = [
        Case { name: "(a) 1 writer, fsync on", fsync: true, writers: 1, tasks: false, n: 2_000 / scale },
        Case { name: "(b) 1 writer, fsync off", fsync: false, writers: 1, tasks: false, n: 20_000 / scale },
        Case { name: "(c) 32 threads, fsync on", fsync: true, writers: WRITERS, tasks: false, n: 10_000 / scale },
        Case { name: "(d) 32 threads, fsync off", fsync: false, writers: WRITERS, tasks: false, n: 20_000 / scale },
        Case { name: "(e) 32 tasks, fsync on", fsync: true, writers: WRITERS, tasks: true, n: 10_000 / scale },
    ];

    println!();
    println!("spool write benchmark: Spool::store of a {MESSAGE_SIZE}-byte message into a fresh spool");
    println!("bench dir: {} ({fstype}{journal} on {source}, mounted at {mount})", root.display());
    if let Some(age) = recent_delete
        && journal.contains("WITHOUT")
    {
        println!(
            "note: a benchmark deleted many files here {}s ago; for 300 s the fsync-off cases may pay for\n\
             skipping those inodes (see the sys µs/message column)",
            age.as_secs()
        );
    }
    println!();
    println!(
        "| case | messages | wall s | messages/s | µs/message | vs (a) | avg batch ≥ | device flushes/msg | user µs/msg | sys µs/msg |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");

    let (machine0, own0, wall0) = (machine_busy(), cpu_times(), Instant::now());
    let mut single_us = None;
    for case in &cases {
        let dir = fresh_dir(case_dir(&root, case.name));
        let spool = Spool::open(&dir, SpoolOptions { fsync: case.fsync, keep_raw: false }).expect("open spool");
        // Warm up: directories, page cache, the writer thread.
        const WARM_UP: usize = 20;
        for _ in 0..WARM_UP {
            spool.store(envelope(), &raw).expect("warm-up store");
        }

        let flushes0 = device_flushes(&source);
        let (user0, sys0) = cpu_times();
        let mut out = if case.tasks {
            run_tasks(&spool, case.writers, case.n, &raw)
        } else {
            run_threads(&spool, case.writers, case.n, &raw)
        };
        let (user1, sys1) = cpu_times();
        let flushes = flushes0.zip(device_flushes(&source)).map(|(a, b)| b.saturating_sub(a));
        let stored = spool.list(State::Incoming).expect("list").len();
        assert_eq!(stored, WARM_UP + case.n, "{}: every message is in incoming", case.name);

        let secs = out.wall.as_secs_f64();
        let rate = case.n as f64 / secs;
        let us = secs * 1e6 / case.n as f64;
        if case.writers == 1 && case.fsync {
            single_us = Some(us);
        }
        let ratio = match single_us {
            Some(a) if case.fsync => format!("{:.1}x", a / us),
            _ => "-".into(),
        };
        // A batch is answered in one loop and batches are a flush apart: acknowledgements
        // closer than a quarter of (a)'s time per message belong to one batch. Busy CPUs delay
        // some wake-ups past that, which splits batches: a lower bound.
        let batch = match (case.writers > 1 && case.fsync, single_us) {
            (true, Some(a)) => {
                let gap = Duration::from_secs_f64(a / 4.0 / 1e6);
                let b = batches(&mut out.acks, gap);
                format!("{:.1}", case.n as f64 / b as f64)
            }
            _ if case.writers == 1 => "1".into(),
            _ => "-".into(),
        };
        let flushes = flushes.map_or("?".to_string(), |f| format!("{:.2}", f as f64 / case.n as f64));
        let per = |t: f64| t * 1e6 / case.n as f64;
        println!(
            "| {} | {} | {:.2} | {:.0} | {:.1} | {} | {} | {} | {:.0} | {:.0} |",
            case.name,
            case.n,
            secs,
            rate,
            us,
            ratio,
            batch,
            flushes,
            per(user1 - user0),
            per(sys1 - sys0)
        );

        drop(spool);
    }
    // Not between cases: deleting would slow down the inode allocation of the next case.
    for case in &cases {
        delete_and_mark(&base, &case_dir(&root, case.name));
    }
    println!();
    println!(
        "µs/message = wall time / messages; vs (a) = throughput ratio to (a), the flush cost each message is spared."
    );
    println!(
        "avg batch ≥: messages / groups of acknowledgements closer than a quarter of (a)'s µs/message (a batch is"
    );
    println!(
        "answered at once, batches are a flush apart; late wake-ups on busy CPUs split groups, hence a lower bound)."
    );
    println!("device flushes/msg: flush requests completed by the disk during the case (any process) / messages.");
    println!("user/sys µs/msg: CPU time of the whole process (writers and the spool-writer thread) per message.");
    let own1 = cpu_times();
    let own = (own1.0 - own0.0) + (own1.1 - own0.1);
    let others = (machine_busy() - machine0 - own).max(0.0);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "other processes used {others:.1} CPU s of the {:.1} available ({cores} cores × {:.1} s) while the cases ran.",
        wall0.elapsed().as_secs_f64() * cores as f64,
        wall0.elapsed().as_secs_f64()
    );
}
