//! IMAP watcher: backlog drain rate and IDLE latency, against a real Dovecot.
//!
//! 1. **Drain**: a private Dovecot (tests/support/dovecot.rs) gets `--messages` (default 1,000)
//!    messages of 2 KB in INBOX. Then `mailhook serve` (the real binary, spool fsync on, one
//!    catch-all rule to a `file` destination, `after = "seen"`) starts, and the time from its
//!    start until the folder's checkpoint (`spool/imap/alerts/INBOX.json`, written only after
//!    the messages are durable in the spool) reaches the last UID is measured. Process start,
//!    login and SELECT are included.
//! 2. **IDLE latency**: with the same serve watching the folder in IDLE (`poll = "1h"`, so only
//!    IDLE can bring mail), `--latency` (default 100) messages are appended one at a time; for
//!    each, the time from the server's `OK` to its APPEND until the checkpoint holds its UID.
//!
//! Needs Dovecot (`apt-get install -y dovecot-imapd`).
//!
//! ```text
//! cargo bench --bench imap
//! cargo bench --bench imap -- --messages 5000 --latency 200
//! ```

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::Path;
use std::time::{Duration, Instant};
use support::dovecot::{Dovecot, PASSWORD, USER};
use support::gateway::Gateway;

fn message(n: usize) -> Vec<u8> {
    let mut m = format!(
        "From: Monitor <monitor@example.com>\r\nTo: alerts@example.com\r\nSubject: alert {n}\r\n\
         Message-ID: <bench-{n}@example.com>\r\nDate: Tue, 01 Dec 2026 09:30:00 +0100\r\n\r\n"
    );
    while m.len() < 2048 {
        m.push_str("Service CHECK_DISK on host db-01 is CRITICAL: /var at 97% of 200 GB.\r\n");
    }
    m.into_bytes()
}

fn last_uid(checkpoint: &Path) -> u32 {
    std::fs::read(checkpoint)
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v["last_uid"].as_u64())
        .unwrap_or(0) as u32
}

fn wait_uid(checkpoint: &Path, uid: u32, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while last_uid(checkpoint) < uid {
        assert!(Instant::now() < deadline, "checkpoint did not reach UID {uid}");
        std::thread::sleep(Duration::from_micros(500));
    }
}

fn arg(args: &[String], name: &str, default: usize) -> usize {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        return;
    }
    let messages = arg(&args, "--messages", 1000);
    let samples = arg(&args, "--latency", 100);

    let dovecot = Dovecot::start();
    let mut imap = dovecot.client(USER, PASSWORD);
    let mut last = 0;
    for n in 0..messages {
        last = imap.append("INBOX", &message(n));
    }
    let config = format!(
        "[[imap]]\nname = \"alerts\"\nhost = \"127.0.0.1\"\nport = {}\ntls = \"none\"\nuser = \"{USER}\"\n\
         password = \"${{IMAP_PASSWORD}}\"\nafter = \"seen\"\npoll = \"1h\"\n\n\
         [destination.out]\ntype = \"file\"\npath = \"out.jsonl\"\n",
        dovecot.port()
    );
    let mut gw = Gateway::new(&config, "[[rule]]\nname = \"all\"\nto = [\"out\"]\n").env("IMAP_PASSWORD", PASSWORD);
    let checkpoint = gw.path().join("spool/imap/alerts/INBOX.json");

    let started = Instant::now();
    gw.start();
    wait_uid(&checkpoint, last, Duration::from_secs(600));
    let drain = started.elapsed();

    // Let the watcher settle into IDLE.
    std::thread::sleep(Duration::from_millis(500));
    let mut latencies = Vec::with_capacity(samples);
    for n in 0..samples {
        let uid = imap.append("INBOX", &message(messages + n));
        let appended = Instant::now();
        wait_uid(&checkpoint, uid, Duration::from_secs(30));
        latencies.push(appended.elapsed());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(gw.stop(), 0);
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1];
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;

    println!();
    println!("| measure | value |");
    println!("|---|---|");
    println!(
        "| backlog of {messages} × 2 KB drained to the spool | {:.2} s ({:.0} messages/s) |",
        drain.as_secs_f64(),
        messages as f64 / drain.as_secs_f64()
    );
    println!("| IDLE latency, APPEND → spool, p50 ({samples} messages) | {:.1} ms |", ms(pct(0.50)));
    println!("| IDLE latency, p99 | {:.1} ms |", ms(pct(0.99)));
    println!("| IDLE latency, max | {:.1} ms |", ms(*latencies.last().unwrap()));
}
