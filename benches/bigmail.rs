//! Big mail: memory of the real `mailhook serve` (release build, spool fsync on, the archive on
//! as by default) while many large messages arrive at once.
//!
//! For each case (kind × message size × concurrent sessions):
//!
//! 1. a fresh spool directory under `$MAILHOOK_BENCH_DIR` (default `target/bench-bigmail/`);
//! 2. a webhook sink in this process (on 127.0.0.1, its own thread) notes every payload's
//!    `subject`;
//! 3. `mailhook serve` with `[smtp]` on a free loopback port and one rule to the sink:
//!    - `plain`: a catch-all rule with the default payload;
//!    - `hostile`: a rule whose condition and extraction are regexes over the whole body (the
//!      extraction captures all of it), and whose payload's templates read the whole text and
//!      the captured body (their output stays small: a template's fuel is spent by what it
//!      writes, so a template writing 24 MB runs out of it and makes a dead letter);
//! 4. one thread per session, each sending one plain-text message of the given size over
//!    SMTP (EHLO, MAIL, RCPT, DATA, all at once);
//! 5. the case ends when every acknowledged message has reached the sink or is a dead letter
//!    (or after 300 s).
//!
//! Reported: messages acknowledged (250), delivered and made dead letters, `serve`'s peak RSS (`VmHWM` from
//! `/proc`), and the time from the first connection to the last delivery.
//!
//! ```text
//! cargo bench --bench bigmail
//! cargo bench --bench bigmail -- --cases plain:25:20,hostile:24:8,hostile:24:24
//! MAILHOOK_BENCH_BIN=/tmp/mailhook-before cargo bench --bench bigmail   # another build of serve
//! ```

#[path = "common/proc.rs"]
#[allow(dead_code)]
mod proc;
use proc::proc_field;
#[path = "common/serve.rs"]
mod serve;
use serve::{Serve, reply, write_webhook_config};
#[path = "common/sink.rs"]
mod sink;

use sink::Sink;
use std::collections::HashSet;
use std::io::{BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_mailhook");
const GIVE_UP: Duration = Duration::from_secs(300);

const HOSTILE_RULE: &str = r#"[[rule]]
name = "hostile"
to = ["sink"]

[rule.when]
body = '(?s)NIGHTLY_EXPORT.*details'

[rule.extract]
body = ['(?s)(?P<whole>Job .*)']

[rule.payload]
subject = "{{ subject }}"
length = "{{ whole | length }}"
seen = "{{ 'NIGHTLY_EXPORT' in text and 'details' in whole }}"
"#;

#[derive(Default)]
struct Received {
    subjects: Mutex<HashSet<String>>,
}

impl Received {
    fn saw(&self, subject: &str) {
        self.subjects.lock().unwrap().insert(subject.to_string());
    }
}

/// The body every message shares: plain text lines up to `size` bytes, with the final dot.
fn body(size: usize) -> Vec<u8> {
    let line = b"Job NIGHTLY_EXPORT finished with warnings; see the attached log for details.\r\n";
    let mut b = Vec::with_capacity(size + line.len() + 3);
    while b.len() < size {
        b.extend_from_slice(line);
    }
    b.extend_from_slice(b".\r\n");
    b
}

/// Sends one message; whether it was answered 250.
fn send(addr: SocketAddr, seq: usize, body: &[u8]) -> bool {
    let stream = TcpStream::connect(addr).expect("connect to serve");
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    assert_eq!(reply(&mut reader), 220);
    writer.write_all(b"EHLO load.example\r\n").unwrap();
    assert_eq!(reply(&mut reader), 250);
    writer.write_all(b"MAIL FROM:<erp@example.com>\r\nRCPT TO:<hook@example.com>\r\nDATA\r\n").unwrap();
    if (reply(&mut reader), reply(&mut reader), reply(&mut reader)) != (250, 250, 354) {
        return false;
    }
    let head = format!(
        "From: Legacy ERP <erp@example.com>\r\nTo: hook@example.com\r\nSubject: big {seq}\r\n\
         Message-ID: <big-{seq}@example.com>\r\nDate: Tue, 01 Dec 2026 09:30:00 +0100\r\n\r\n"
    );
    writer.write_all(head.as_bytes()).unwrap();
    writer.write_all(body).unwrap();
    let ok = reply(&mut reader) == 250;
    let _ = writer.write_all(b"QUIT\r\n");
    ok
}

fn start_serve(dir: &Path, sink: SocketAddr, hostile: bool) -> Serve {
    // Big messages take long to post: a longer delivery timeout. The archive is on.
    write_webhook_config(dir, sink, "60s", true, "");
    if hostile {
        std::fs::write(dir.join("rules/10-all.toml"), HOSTILE_RULE).unwrap();
    }
    Serve::spawn(dir, BIN)
}

struct Row {
    case: String,
    sessions: usize,
    acked: usize,
    delivered: usize,
    dead: usize,
    rss_mb: f64,
    secs: f64,
}

/// Dead letters `serve` has logged (at `warn`, the level it runs at here).
fn dead_letters(log: &Path) -> usize {
    std::fs::read_to_string(log).map(|l| l.matches("\"dead letter\"").count()).unwrap_or(0)
}

fn run_case(base: &Path, kind: &str, megabytes: usize, sessions: usize) -> Row {
    let hostile = kind == "hostile";
    let dir = base.join(format!("{}-{kind}-{megabytes}-{sessions}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let received = Arc::new(Received::default());
    let sink = Sink::subjects(64 << 20, {
        let r = received.clone();
        move |s| r.saw(s)
    });
    let serve = start_serve(&dir, sink.addr, hostile);
    let pid = serve.child.id();
    let body = Arc::new(body(megabytes * 1_000_000));
    let start = Instant::now();
    let threads: Vec<_> = (0..sessions)
        .map(|seq| {
            let (addr, body) = (serve.smtp, body.clone());
            std::thread::spawn(move || send(addr, seq, &body).then_some(format!("big {seq}")))
        })
        .collect();
    let acked: Vec<String> = threads.into_iter().filter_map(|t| t.join().expect("session")).collect();
    let deadline = Instant::now() + GIVE_UP;
    let dead = || dead_letters(&dir.join("serve.log"));
    while Instant::now() < deadline {
        let delivered = acked.iter().filter(|s| received.subjects.lock().unwrap().contains(*s)).count();
        if delivered + dead() >= acked.len() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let dead = dead();
    let secs = start.elapsed().as_secs_f64();
    let rss = proc_field(pid, "status", "VmHWM:").unwrap_or(0) as f64 / 1024.0;
    serve.stop();
    drop(sink);
    let delivered = acked.iter().filter(|s| received.subjects.lock().unwrap().contains(*s)).count();
    if delivered == sessions || (hostile && acked.len() == sessions && delivered + dead >= sessions) {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        eprintln!("not all delivered: serve's log and spool are kept in {}", dir.display());
    }
    Row { case: format!("{kind} {megabytes} MB"), sessions, acked: acked.len(), delivered, dead, rss_mb: rss, secs }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        return;
    }
    let value = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let cases: Vec<(String, usize, usize)> = value("--cases")
        .unwrap_or_else(|| "plain:25:20,hostile:24:8,hostile:24:24".into())
        .split(',')
        .filter_map(|c| {
            let mut parts = c.split(':');
            let kind = parts.next()?.to_string();
            Some((kind, parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
        })
        .collect();
    let base = std::env::var_os("MAILHOOK_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"))
        .join("bench-bigmail");
    std::fs::create_dir_all(&base).unwrap();

    let mut rows = Vec::new();
    for (kind, megabytes, sessions) in cases {
        let row = run_case(&base, &kind, megabytes, sessions);
        eprintln!(
            "{} × {}: {} delivered, {:.1} MB, {:.1} s",
            row.case, row.sessions, row.delivered, row.rss_mb, row.secs
        );
        rows.push(row);
    }
    println!();
    println!("| case | sessions | acknowledged | delivered | dead letters | peak RSS | time |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    let mut bad = false;
    for r in &rows {
        println!(
            "| {} | {} | {} | {} | {} | {:.0} MB | {:.1} s |",
            r.case, r.sessions, r.acked, r.delivered, r.dead, r.rss_mb, r.secs
        );
        // Plain mail must all be delivered; hostile mail all judged (a template that runs out of
        // fuel makes a dead letter, which is the expected end there).
        let judged = if r.case.starts_with("hostile") { r.delivered + r.dead } else { r.delivered };
        bad |= r.acked < r.sessions || judged < r.sessions;
    }
    if bad {
        eprintln!("FAILED: messages refused, or neither delivered nor (hostile cases) dead letters");
        std::process::exit(1);
    }
}
