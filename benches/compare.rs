//! mailhook beside other gateways, in one run, with one load client and one webhook sink.
//!
//! Rows (each skipped, with a note, when its program is not installed):
//!
//! - **Postfix `smtp-sink`** (Debian `postfix`): accepts every message and discards it. It does
//!   no work, so its rate is the limit of this machine and this client.
//! - **mailhook**: the real `mailhook serve` (release build, spool fsync on, the archive on as
//!   by default), one catch-all rule to a `webhook` destination pointing at the sink,
//!   `[delivery] rate = "off"`. `MAILHOOK_BENCH_ARCHIVE=off` adds a row with the archive off.
//! - **Haraka** (npm `Haraka`, the `haraka` command): a plugin of ours (written below) accepts
//!   every recipient and, in its queue hook, posts the message as JSON to the sink and answers
//!   `250` only once the sink has answered `2xx` (else `451`): like mailhook, it acknowledges
//!   nothing it has not handed on. Logging at `WARN`, one worker per core (`nodes=cpus`).
//!
//! The load client is ours and the same for every row: `--sessions` threads (default 20), each
//! opening **one connection per message** (greeting, EHLO, then MAIL, RCPT and DATA pipelined,
//! the message, QUIT), `--messages` messages (default 5,000) of `--size` bytes (default 2 KB).
//! A row ends when the sink has seen every acknowledged message (for `smtp-sink`, when the last
//! is acknowledged).
//!
//! Reported per row:
//! - messages/s: acknowledged messages over the time from the first connection to the last
//!   receipt at the sink;
//! - CPU per message, two ways: the gateway's own process (utime + stime), and the whole machine's busy time (`/proc/stat`) less this process (client and
//!   sink). The second counts the kernel's work that no process is charged for (the file
//!   system's journal thread committing each fsync, block I/O completion) against the gateway;
//!   run it on an otherwise idle machine;
//! - peak RSS of the gateway (`VmHWM`; for Haraka, summed over its master and workers);
//! - lost: acknowledged but never received (must be 0).
//!
//! ```text
//! scripts/bench-compare
//! cargo bench --bench compare -- --messages 5000 --sessions 20 --size 2048
//! ```

#[path = "common/proc.rs"]
mod proc;
use proc::{clock_ticks, proc_field, stat_ticks};
#[path = "common/serve.rs"]
mod serve;
use serve::{Serve, load_message, reply, write_webhook_config};
#[path = "common/sink.rs"]
mod sink;

use sink::Sink;
use std::collections::HashSet;
use std::io::{BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_mailhook");
const GIVE_UP: Duration = Duration::from_secs(120);

// ---------------------------------------------------------------------------------------------
// The sink: answers 200 and notes the sequence number in each payload's subject.

#[derive(Default)]
struct Received {
    seqs: Mutex<Vec<u64>>,
}

impl Received {
    fn saw(&self, subject: &str) {
        if let Some(seq) = subject.trim().strip_prefix("bench ").and_then(|n| n.parse().ok()) {
            self.seqs.lock().unwrap().push(seq);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The load client

/// Sends one message on a connection of its own; whether it was answered 250.
fn send_one(addr: SocketAddr, seq: u64, size: usize) -> bool {
    let Ok(stream) = TcpStream::connect(addr) else { return false };
    stream.set_nodelay(true).unwrap();
    // A gateway that stops answering fails the message rather than the whole run.
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    if reply(&mut reader) != 220 {
        return false;
    }
    writer.write_all(b"EHLO load.example\r\n").unwrap();
    if reply(&mut reader) != 250 {
        return false;
    }
    let _ = writer.write_all(b"MAIL FROM:<erp@example.com>\r\nRCPT TO:<hook@example.com>\r\nDATA\r\n");
    let (mail, rcpt, data) = (reply(&mut reader), reply(&mut reader), reply(&mut reader));
    if (mail, rcpt, data) != (250, 250, 354) {
        return false;
    }
    let _ = writer.write_all(&load_message("bench", seq, size));
    let ok = reply(&mut reader) == 250;
    let _ = writer.write_all(b"QUIT\r\n");
    let _ = reply(&mut reader);
    ok
}

/// Runs the load; the sequence numbers acknowledged.
fn load(addr: SocketAddr, sessions: usize, messages: usize, size: usize) -> Vec<u64> {
    let threads: Vec<_> = (0..sessions)
        .map(|s| {
            std::thread::spawn(move || {
                (0..messages as u64)
                    .filter(|n| (*n as usize) % sessions == s)
                    .filter(|&seq| send_one(addr, seq, size))
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    threads.into_iter().flat_map(|t| t.join().expect("session")).collect()
}

// ---------------------------------------------------------------------------------------------
// CPU accounting

/// Busy ticks of the whole machine: every column of `/proc/stat`'s `cpu` line but idle and
/// iowait.
fn machine_busy() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let cols: Vec<u64> =
        stat.lines().next().unwrap_or("").split_whitespace().skip(1).filter_map(|c| c.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal guest guest_nice (guest is inside user).
    cols.iter().take(8).enumerate().filter(|(i, _)| *i != 3 && *i != 4).map(|(_, v)| v).sum()
}

/// `pid` and its children (Haraka's workers).
fn family(pid: u32) -> Vec<u32> {
    let mut pids = vec![pid];
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(child) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        // The field after the state is the parent's pid.
        let ppid = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
        if ppid == Some(pid) {
            pids.push(child);
        }
    }
    pids
}

/// utime + stime of `pid` and its children.
fn process_ticks(pid: u32) -> u64 {
    family(pid).iter().filter_map(|p| stat_ticks(Path::new(&format!("/proc/{p}/stat")))).sum()
}

/// utime + stime of this process alone (the load client and the sink), not of the gateways it
/// started.
fn own_ticks() -> u64 {
    stat_ticks(Path::new("/proc/self/stat")).unwrap_or(0)
}

/// Peak RSS of `pid` and its children, in KiB, summed.
fn peak_rss(pid: u32) -> u64 {
    family(pid).iter().filter_map(|p| proc_field(*p, "status", "VmHWM:")).sum()
}

// ---------------------------------------------------------------------------------------------
// The gateways

enum Gateway {
    Sink(Child),
    Mailhook(Serve),
    Haraka(Child),
}

impl Gateway {
    fn pid(&self) -> u32 {
        match self {
            Gateway::Sink(c) | Gateway::Haraka(c) => c.id(),
            Gateway::Mailhook(s) => s.child.id(),
        }
    }

    fn stop(self) {
        match self {
            Gateway::Mailhook(s) => s.stop(),
            Gateway::Sink(mut c) | Gateway::Haraka(mut c) => {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn wait_listening(addr: SocketAddr, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "{what} did not listen on {addr} within 20 s");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn find(program: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default() + ":/usr/sbin:/usr/local/bin";
    path.split(':').map(|d| Path::new(d).join(program)).find(|p| p.is_file())
}

fn start_smtp_sink(program: &Path) -> (Gateway, SocketAddr) {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut command = Command::new(program);
    // As root it must be told whom to run as.
    if proc_field(std::process::id(), "status", "Uid:") == Some(0) {
        command.args(["-u", "nobody"]);
    }
    let child = command
        .args([&addr.to_string(), "1024"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn smtp-sink");
    wait_listening(addr, "smtp-sink");
    (Gateway::Sink(child), addr)
}

fn start_mailhook(dir: &Path, sink: SocketAddr, archive: bool) -> (Gateway, SocketAddr) {
    write_webhook_config(dir, sink, "10s", archive, "");
    let serve = Serve::spawn(dir, BIN);
    let addr = serve.smtp;
    (Gateway::Mailhook(serve), addr)
}

/// The Haraka plugin: every recipient accepted; the queue hook posts the message to the sink and
/// acknowledges only once the sink answered 2xx.
const HARAKA_PLUGIN: &str = r#"'use strict';
const http = require('http');

exports.register = function () {
    this.url = new (require('url').URL)(process.env.BENCH_WEBHOOK);
    this.agent = new http.Agent({ keepAlive: true, maxSockets: 32 });
};

exports.hook_rcpt = function (next) {
    next(OK);
};

exports.hook_queue = function (next, connection) {
    const txn = connection.transaction;
    const plugin = this;
    txn.message_stream.get_data(function (buf) {
        const body = JSON.stringify({
            subject: txn.header.get_decoded('Subject'),
            from: String(txn.mail_from),
            to: txn.rcpt_to.map((r) => String(r)),
            text: buf.toString('utf8'),
        });
        const req = http.request({
            host: plugin.url.hostname, port: plugin.url.port, path: plugin.url.pathname,
            method: 'POST', agent: plugin.agent,
            headers: { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) },
        }, function (res) {
            res.resume();
            if (res.statusCode >= 200 && res.statusCode < 300) next(OK);
            else next(DENYSOFT, 'webhook answered ' + res.statusCode);
        });
        req.on('error', function (e) { next(DENYSOFT, 'webhook: ' + e.message); });
        req.end(body);
    });
};
"#;

fn start_haraka(program: &Path, dir: &Path, sink: SocketAddr) -> (Gateway, SocketAddr) {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    // A fresh instance directory with Haraka's default configuration, then ours over it.
    let init = Command::new(program).arg("-i").arg(dir).stdout(Stdio::null()).stderr(Stdio::null()).status();
    assert!(init.is_ok_and(|s| s.success()), "haraka -i {} failed", dir.display());
    std::fs::write(dir.join("plugins/bench_webhook.js"), HARAKA_PLUGIN).unwrap();
    std::fs::write(dir.join("config/plugins"), "bench_webhook\n").unwrap();
    // One worker per core, as Haraka's performance guide advises.
    std::fs::write(dir.join("config/smtp.ini"), format!("listen={addr}\nnodes=cpus\n")).unwrap();
    std::fs::write(dir.join("config/log.ini"), "[main]\nlevel=warn\n").unwrap();
    std::fs::write(dir.join("config/me"), "bench.example\n").unwrap();
    let log = std::fs::File::create(dir.join("haraka.log")).unwrap();
    let child = Command::new(program)
        .args(["-c", &dir.to_string_lossy()])
        .env("BENCH_WEBHOOK", format!("http://{sink}/hook"))
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("spawn haraka");
    wait_listening(addr, "haraka");
    (Gateway::Haraka(child), addr)
}

// ---------------------------------------------------------------------------------------------

struct Row {
    name: String,
    acked: usize,
    secs: f64,
    own_ms: f64,
    machine_ms: Option<f64>,
    rss_mb: f64,
    lost: usize,
}

fn run(name: &str, gateway: Gateway, addr: SocketAddr, received: Option<&Received>, args: &Args) -> Row {
    let pid = gateway.pid();
    // Settle: start-up work (Haraka's workers load for a second or two) is not measured.
    std::thread::sleep(Duration::from_secs(3));
    let (own0, busy0, me0) = (process_ticks(pid), machine_busy(), own_ticks());
    let start = Instant::now();
    let acked = load(addr, args.sessions, args.messages, args.size);
    let wanted: HashSet<u64> = acked.iter().copied().collect();
    let mut end = Instant::now();
    if let Some(received) = received {
        let deadline = Instant::now() + GIVE_UP;
        loop {
            let seen: HashSet<u64> = received.seqs.lock().unwrap().iter().copied().collect();
            if wanted.iter().all(|s| seen.contains(s)) || Instant::now() > deadline {
                end = Instant::now();
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    let (own1, busy1, me1) = (process_ticks(pid), machine_busy(), own_ticks());
    let rss = peak_rss(pid) as f64 / 1024.0;
    gateway.stop();
    let lost = match received {
        Some(r) => {
            let seen: HashSet<u64> = r.seqs.lock().unwrap().iter().copied().collect();
            wanted.iter().filter(|s| !seen.contains(s)).count()
        }
        None => 0,
    };
    let n = acked.len().max(1) as f64;
    let ms = |ticks: u64| ticks as f64 / clock_ticks() * 1000.0 / n;
    let machine = busy1.saturating_sub(busy0).saturating_sub(me1.saturating_sub(me0));
    Row {
        name: name.into(),
        acked: acked.len(),
        secs: end.duration_since(start).as_secs_f64(),
        own_ms: ms(own1.saturating_sub(own0)),
        machine_ms: received.map(|_| ms(machine)),
        rss_mb: rss,
        lost,
    }
}

struct Args {
    messages: usize,
    sessions: usize,
    size: usize,
}

fn main() {
    let argv: Vec<String> = std::env::args().collect();
    if argv.iter().any(|a| a == "--list") {
        return;
    }
    let value =
        |name: &str| argv.iter().position(|a| a == name).and_then(|i| argv.get(i + 1)).and_then(|v| v.parse().ok());
    let args = Args {
        messages: value("--messages").unwrap_or(5000),
        sessions: value("--sessions").unwrap_or(20),
        size: value("--size").unwrap_or(2048),
    };
    let base = std::env::var_os("MAILHOOK_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"))
        .join("bench-compare")
        .join(std::process::id().to_string());
    std::fs::create_dir_all(&base).unwrap();

    let mut rows = Vec::new();
    match find("smtp-sink") {
        Some(p) => {
            let (g, addr) = start_smtp_sink(&p);
            rows.push(run("Postfix smtp-sink (accepts and discards)", g, addr, None, &args));
        }
        None => eprintln!("smtp-sink not found (apt-get install postfix, then postfix stop): row skipped"),
    }
    let mut cases = vec![("mailhook (archive on)", true)];
    if std::env::var("MAILHOOK_BENCH_ARCHIVE").as_deref() == Ok("off") {
        cases.push(("mailhook (archive off)", false));
    }
    for (name, archive) in cases {
        let received = Arc::new(Received::default());
        let sink = Sink::subjects(1 << 20, {
            let r = received.clone();
            move |s| r.saw(s)
        });
        let (g, addr) =
            start_mailhook(&base.join(if archive { "mailhook" } else { "mailhook-off" }), sink.addr, archive);
        rows.push(run(name, g, addr, Some(&received), &args));
    }
    match find("haraka") {
        Some(p) => {
            let received = Arc::new(Received::default());
            let sink = Sink::subjects(1 << 20, {
                let r = received.clone();
                move |s| r.saw(s)
            });
            let (g, addr) = start_haraka(&p, &base.join("haraka"), sink.addr);
            rows.push(run("Haraka + webhook plugin", g, addr, Some(&received), &args));
        }
        None => eprintln!("haraka not found (npm install -g Haraka): row skipped"),
    }
    let _ = std::fs::remove_dir_all(&base);

    println!();
    println!(
        "{} messages of {} bytes, {} sessions, one connection per message",
        args.messages, args.size, args.sessions
    );
    println!();
    println!(
        "| gateway | acknowledged | messages/s | CPU per message (own) | CPU per message (machine less client) | peak RSS | lost |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    let mut bad = false;
    for r in &rows {
        println!(
            "| {} | {} | {:.0} | {:.3} ms | {} | {:.1} MB | {} |",
            r.name,
            r.acked,
            r.acked as f64 / r.secs,
            r.own_ms,
            r.machine_ms.map_or("—".into(), |m| format!("{m:.3} ms")),
            r.rss_mb,
            r.lost
        );
        bad |= r.lost > 0 || r.acked < args.messages;
    }
    let rate = |prefix: &str| rows.iter().find(|r| r.name.starts_with(prefix)).map(|r| r.acked as f64 / r.secs);
    let cpu = |prefix: &str| rows.iter().find(|r| r.name.starts_with(prefix)).and_then(|r| r.machine_ms);
    println!();
    if let (Some(m), Some(s)) = (rate("mailhook (archive on)"), rate("Postfix")) {
        println!("mailhook / smtp-sink messages/s: {:.0} %", m / s * 100.0);
    }
    if let (Some(m), Some(h)) = (rate("mailhook (archive on)"), rate("Haraka")) {
        println!("mailhook / Haraka messages/s: {:.2}×", m / h);
    }
    if let (Some(m), Some(h)) = (cpu("mailhook (archive on)"), cpu("Haraka")) {
        println!("mailhook / Haraka CPU per message (machine less client): {:.2}", m / h);
    }
    if bad {
        eprintln!("FAILED: messages refused or lost");
        std::process::exit(1);
    }
}
