//! Hostile SMTP clients against a real `mailhook serve` on loopback: over-long command and text
//! lines (and long lines in BDAT chunks, which are allowed), a DATA that never ends (cut by its
//! deadline), a thousand
//! idle connections, a pipelining flood, a flood from a client that never reads its replies,
//! and bytes dripped one at a time. `tests/smtp.rs` has
//! the protocol itself; this file checks that abuse stays contained: the abuser gets the right
//! answer or a clean close, other clients are served meanwhile, and the memory of the serve
//! process (its VmRSS / VmHWM in `/proc/PID/status`) stays within a stated bound.
//!
//! Memory bounds are generous on purpose (allocator and runtime noise is a few MB) and each
//! says what it would catch: a per-connection or per-line cost that grows with what the client
//! sends. No assertion is about speed.

mod support;

use serde_json::Value;
use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};
use support::gateway::Gateway;
use support::smtp_client::{Reply, SmtpClient};

const MB: u64 = 1024 * 1024;
const WAIT: Duration = Duration::from_secs(20);

/// No message matches this rule; with `unmatched = "dead"` every accepted message stays in the
/// spool as a dead letter, where the test can count it.
const KEEP_RULES: &str =
    "[[rule]]\nname = \"never\"\nto = []\n\n[rule.when]\nsubject = '^no message has this subject$'\n";

/// A started gateway with an `[smtp]` listener on a free loopback port and `extra` `[smtp]`
/// keys; every accepted message is kept as a dead letter.
fn keeping_smtp(extra: &str) -> (Gateway, SocketAddr) {
    let config = format!(
        "[rules]\ndir = \"rules\"\nunmatched = \"dead\"\n\
         [smtp]\nlisten = [\"127.0.0.1:0\"]\nhostname = \"mx.test\"\n{extra}"
    );
    let mut gw = Gateway::new(&config, KEEP_RULES);
    gw.start();
    let addr = gw.listening("smtp");
    (gw, addr)
}

/// A small message with `body` (lines ending in CRLF).
fn mail(subject: &str, body: &str) -> String {
    format!("From: erp@legacy.example\r\nTo: orders@hooks.example.com\r\nSubject: {subject}\r\n\r\n{body}")
}

/// A transaction that must be stored; returns the spool id named in the 250.
#[track_caller]
fn store(c: &mut SmtpClient, subject: &str) -> String {
    c.expect("MAIL FROM:<erp@legacy.example>", &["250 2.1.0"]);
    c.expect("RCPT TO:<orders@hooks.example.com>", &["250 2.1.5"]);
    let reply = c.data(mail(subject, "hello\r\n").as_bytes());
    if !reply.is("250 2.0.0") {
        c.fail(&format!("expected 250 2.0.0 after the end of data, got {reply}"));
    }
    queued_id(&reply).unwrap_or_else(|| c.fail(&format!("the reply {reply} names no spool id")))
}

fn queued_id(reply: &Reply) -> Option<String> {
    reply.text().split("queued as ").nth(1).map(|id| id.trim().to_string())
}

/// Waits until the spool holds exactly the dead letters `ids`.
#[track_caller]
fn wait_kept(gw: &Gateway, ids: &[&str]) -> Vec<Value> {
    let want: BTreeSet<&str> = ids.iter().copied().collect();
    gw.wait_queue(WAIT, &format!("exactly the dead letters {want:?}"), |q| {
        q.len() == want.len()
            && q.iter().all(|m| m["state"] == "dead")
            && q.iter().filter_map(|m| m["id"].as_str()).collect::<BTreeSet<_>>() == want
    })
}

/// A `Vm*` value of `/proc/PID/status` (`VmRSS`: resident now; `VmHWM`: the peak), in bytes.
fn vm(pid: u32, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with(key)).unwrap_or_else(|| panic!("{key} in /proc/{pid}/status"));
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

/// Nothing half-written is left in the spool's `tmp/`.
#[track_caller]
fn assert_tmp_empty(gw: &Gateway) {
    let left: Vec<_> = std::fs::read_dir(gw.path().join("spool/tmp")).unwrap().map(|e| e.unwrap().path()).collect();
    assert!(left.is_empty(), "left in spool/tmp: {left:?}");
}

#[test]
fn hundred_kb_command_and_text_lines_get_500_and_memory_does_not_grow() {
    let (gw, addr) = keeping_smtp("");
    let pid = gw.serve_pid().unwrap();
    let mut c = SmtpClient::connect(addr);
    c.hello("EHLO", "client.test");
    let warm_up = store(&mut c, "warm up");
    let before = vm(pid, "VmHWM:");

    // Command lines: each answered 500 5.5.2, the session goes on.
    let long = "x".repeat(100 * 1024);
    for verb in ["NOOP", "MAIL FROM:<", "RCPT TO:<", "EHLO", "AUTH PLAIN "] {
        c.send(&format!("{verb}{long}"));
        c.expect_reply(&["500 5.5.2"]);
    }
    c.expect("NOOP", &["250 2.0.0"]);
    let between = store(&mut c, "between long command lines");

    // Text lines: a message holding one is refused after its end (nothing stored), the
    // session goes on. Forty of them: 4 MB of over-long lines through one session.
    let body = format!("before\r\n{long}\r\nafter\r\n");
    for n in 0..40 {
        c.expect("MAIL FROM:<erp@legacy.example>", &["250 2.1.0"]);
        c.expect("RCPT TO:<orders@hooks.example.com>", &["250 2.1.5"]);
        c.expect("DATA", &["354"]);
        c.send_bulk(format!("{}.\r\n", mail(&format!("long line {n}"), &body)).as_bytes(), "a 100 KB text line");
        c.expect_reply(&["500 5.5.2"]);
    }
    let after = store(&mut c, "after long text lines");
    c.expect("QUIT", &["221"]);
    c.expect_closed();

    // Past 20 errors a session is closed cleanly: 500 to each line, then 421, then the close.
    let mut abuser = SmtpClient::connect(addr);
    abuser.hello("EHLO", "abuser.test");
    for _ in 0..19 {
        abuser.send(&format!("NOOP {long}"));
        abuser.expect_reply(&["500 5.5.2"]);
    }
    abuser.send(&format!("NOOP {long}"));
    abuser.expect_reply(&["500 5.5.2"]);
    abuser.expect_reply(&["421 4.7.0"]);
    abuser.expect_closed();

    // About 6 MB of over-long lines went through; a server that kept them, or grew a buffer per
    // line, would have grown by that much. Reading them costs a few 64 KB buffers.
    let grown = vm(pid, "VmHWM:").saturating_sub(before);
    eprintln!("over-long lines: peak memory grew by {} KB", grown / 1024);
    assert!(grown < 4 * MB, "peak memory grew by {:.1} MB over 6 MB of over-long lines", grown as f64 / MB as f64);
    wait_kept(&gw, &[&warm_up, &between, &after]);
    assert_tmp_empty(&gw);
}

#[test]
fn bdat_chunks_holding_100_kb_lines_are_stored_verbatim() {
    // BDAT is binary-clean: the text-line limit of DATA does not apply to it.
    let (gw, addr) = keeping_smtp("");
    let mut c = SmtpClient::connect(addr);
    c.hello("EHLO", "client.test");
    let content = mail("long bdat lines", &format!("{}\r\n{}", "x".repeat(100 * 1024), "y".repeat(100 * 1024)));
    c.expect("MAIL FROM:<erp@legacy.example>", &["250 2.1.0"]);
    c.expect("RCPT TO:<orders@hooks.example.com>", &["250 2.1.5"]);
    let (first, second) = content.split_at(150 * 1024);
    c.send_bulk(format!("BDAT {}\r\n{first}", first.len()).as_bytes(), "150 KB of a BDAT chunk");
    c.expect_reply(&["250 2.0.0"]);
    c.send_bulk(format!("BDAT {} LAST\r\n{second}", second.len()).as_bytes(), "the rest in a last chunk");
    let reply = c.expect_reply(&["250 2.0.0"]);
    let id = queued_id(&reply).unwrap_or_else(|| c.fail("no spool id"));
    c.expect("QUIT", &["221"]);
    wait_kept(&gw, &[&id]);
    assert!(gw.raw_message(&id) == content.as_bytes(), "the stored message is not what was sent");
}

#[test]
fn a_data_that_never_ends_is_cut_by_its_deadline_while_others_are_served() {
    let (gw, addr) = keeping_smtp("data_timeout = \"1s\"\ncommand_timeout = \"10s\"\n");
    let mut endless = SmtpClient::connect(addr);
    endless.hello("EHLO", "endless.test");
    endless.expect("MAIL FROM:<erp@legacy.example>", &["250 2.1.0"]);
    endless.expect("RCPT TO:<orders@hooks.example.com>", &["250 2.1.5"]);
    endless.expect("DATA", &["354"]);
    endless.send_raw(b"Subject: endless\r\n\r\n");

    // It keeps sending a line every 100 ms (about 400 bytes a second, under the 500 B/s
    // minimum rate): each line is a sign of life, yet the body's deadline (the data timeout
    // plus a second per 500 bytes received) ends it; other clients are served meanwhile.
    let mut served = Vec::new();
    let started = Instant::now();
    let mut n = 0;
    let cut = loop {
        assert!(started.elapsed() < Duration::from_secs(10), "the endless DATA was never cut");
        if endless.try_send_raw(format!("line {n} of a message that never ends\r\n").as_bytes()).is_err() {
            break started.elapsed();
        }
        if n % 3 == 0 {
            let mut other = SmtpClient::connect(addr);
            other.hello("EHLO", "other.test");
            served.push(store(&mut other, &format!("served meanwhile {n}")));
            other.expect("QUIT", &["221"]);
        }
        n += 1;
        std::thread::sleep(Duration::from_millis(100));
        if let Ok(reply) = endless.read_reply(Duration::from_millis(1)) {
            if !reply.is("421 4.4.2") {
                endless.fail(&format!("expected 421 4.4.2, got {reply}"));
            }
            break started.elapsed();
        }
    };
    assert!(cut >= Duration::from_secs(1), "cut after {cut:?}: before its data timeout");

    let mut after = SmtpClient::connect(addr);
    after.hello("EHLO", "after.test");
    served.push(store(&mut after, "after the timeout"));
    after.expect("QUIT", &["221"]);
    let ids: Vec<&str> = served.iter().map(String::as_str).collect();
    assert!(ids.len() >= 4, "{ids:?}");
    wait_kept(&gw, &ids);
    assert_tmp_empty(&gw);
}

#[test]
fn a_thousand_idle_connections_neither_block_the_limit_nor_cost_much_memory() {
    const IDLE: usize = 1000;
    // Every connection comes from 127.0.0.1: the per-address limit is raised with the global one.
    let (gw, addr) = keeping_smtp(&format!("max_connections = {IDLE}\nmax_connections_per_ip = {}\n", IDLE + 10));
    let pid = gw.serve_pid().unwrap();
    let mut c = SmtpClient::connect(addr);
    c.hello("EHLO", "warm-up.test");
    let warm_up = store(&mut c, "warm up");
    c.expect("QUIT", &["221"]);
    c.expect_closed();
    std::thread::sleep(Duration::from_millis(100));
    let before = vm(pid, "VmRSS:");

    let mut idle: Vec<SmtpClient> = (0..IDLE)
        .map(|_| {
            let mut c = SmtpClient::connect(addr);
            c.expect_reply(&["220"]);
            c
        })
        .collect();
    let rss = vm(pid, "VmRSS:");
    let per_connection = rss.saturating_sub(before) / IDLE as u64;

    // One more is refused at once and closed.
    let mut refused = SmtpClient::connect(addr);
    refused.expect_reply(&["421 4.7.0"]);
    refused.expect_closed();

    // The idle ones are all still there and answer.
    for i in [0, IDLE / 2, IDLE - 1] {
        idle[i].expect("NOOP", &["250 2.0.0"]);
    }

    // Freeing one slot lets a new client in (the server may need a moment to notice the close).
    let mut quitter = idle.pop().unwrap();
    quitter.expect("QUIT", &["221"]);
    quitter.expect_closed();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut next = loop {
        let mut c = SmtpClient::connect(addr);
        match c.read_reply(Duration::from_secs(5)) {
            Ok(r) if r.is("220") => break c,
            Ok(r) if r.is("421") && Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            _ => c.fail("a client after one of the idle ones quit should be greeted with 220"),
        }
    };
    next.expect("EHLO next.test", &["250"]);
    let id = store(&mut next, "while a thousand wait");
    next.expect("QUIT", &["221"]);
    drop(idle);

    // An idle session holds a socket, a task, a 64 KB read buffer (reserved, not written) and a
    // small reply buffer: 64 KB each would be 64 MB for a thousand, even if every page of every
    // buffer were touched. Measured here: a few KB each.
    assert!(
        per_connection < 64 * 1024,
        "{IDLE} idle connections cost {} KB each ({} MB resident in all)",
        per_connection / 1024,
        rss / MB
    );
    eprintln!("{IDLE} idle connections: {} KB resident each, {} MB in all", per_connection / 1024, rss / MB);
    wait_kept(&gw, &[&warm_up, &id]);
}

/// Writes `script` from another thread (so that neither side blocks the other) and reads
/// `count` replies; returns them as text lines (the last line of each reply).
fn flood(addr: SocketAddr, script: Vec<u8>, count: usize) -> Vec<String> {
    let stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut writer = stream.try_clone().unwrap();
    let sender = std::thread::spawn(move || writer.write_all(&script));
    let mut reader = BufReader::new(stream);
    let mut replies = Vec::with_capacity(count);
    let mut line = String::new();
    while replies.len() < count {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) => panic!("closed after {} replies; the last: {:?}", replies.len(), replies.last()),
            Ok(_) => {}
            Err(e) => panic!("{e} after {} replies; the last: {:?}", replies.len(), replies.last()),
        }
        assert!(line.ends_with("\r\n"), "a reply line ends with CRLF: {line:?}");
        if line.as_bytes().get(3) == Some(&b' ') {
            replies.push(line.trim_end().to_string());
        }
    }
    sender.join().unwrap().expect("the flood is written");
    replies
}

#[test]
fn a_pipelining_flood_gets_every_reply_in_order() {
    let (gw, addr) = keeping_smtp("max_recipients = 1000\n");
    // One write: EHLO, then 500 rounds of commands (a transaction with DATA every 100th round),
    // with a reply known in advance for each command.
    let mut script = String::from("EHLO flood.test\r\n");
    let mut want: Vec<&str> = vec!["220 ", "250 "];
    for round in 0..500 {
        script.push_str(&format!("MAIL FROM:<sender{round}@legacy.example>\r\n"));
        want.push("250 2.1.0");
        for r in 0..3 {
            script.push_str(&format!("RCPT TO:<r{round}.{r}@hooks.example.com>\r\n"));
            want.push("250 2.1.5");
        }
        if round % 100 == 0 {
            script.push_str("DATA\r\n");
            script.push_str(&mail(&format!("flood {round}"), "..dot\r\nbody\r\n"));
            script.push_str(".\r\n");
            want.extend(["354 ", "250 2.0.0"]);
        } else {
            script.push_str("RSET\r\n");
            want.push("250 2.0.0");
        }
        script.push_str("NOOP\r\nVRFY postmaster\r\nHELP\r\n");
        want.extend(["250 2.0.0", "252 2.5.0", "214 2.0.0"]);
    }
    script.push_str("QUIT\r\n");
    want.push("221 2.0.0");
    let commands = script.lines().count();
    assert!(commands > 4000, "{commands} lines");

    let replies = flood(addr, script.into_bytes(), want.len());
    let mut ids = Vec::new();
    for (i, (got, want)) in replies.iter().zip(&want).enumerate() {
        assert!(got.starts_with(want), "reply {i}: expected {want:?}, got {got:?}");
        if let Some((_, id)) = got.split_once("queued as ") {
            ids.push(id.to_string());
        }
    }
    assert_eq!(ids.len(), 5, "one message per DATA");
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    let kept = wait_kept(&gw, &ids);
    assert_eq!(kept.len(), 5);
    let raw = gw.raw_message(ids[0]);
    assert!(raw.ends_with(b"\r\n.dot\r\nbody\r\n"), "{}", String::from_utf8_lossy(&raw));
}

#[test]
fn clients_that_flood_and_never_read_are_timed_out_without_memory_growth() {
    const FLOODERS: usize = 20;
    let (gw, addr) = keeping_smtp(&format!(
        "max_connections = {FLOODERS}\nmax_connections_per_ip = {}\ncommand_timeout = \"1s\"\ndata_timeout = \"1s\"\n",
        FLOODERS + 5
    ));
    let pid = gw.serve_pid().unwrap();
    let mut c = SmtpClient::connect(addr);
    c.hello("EHLO", "warm-up.test");
    c.expect("QUIT", &["221"]);
    c.expect_closed();
    std::thread::sleep(Duration::from_millis(100)); // its slot is free again
    let before = vm(pid, "VmHWM:");

    // Each sends 1 MB of EHLOs (every one answered by 8 lines, 20 times its size) and reads
    // nothing: the replies pile up until the socket buffers are full.
    let script = "EHLO x\r\n".repeat(128 * 1024).into_bytes();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flooders: Vec<_> = (0..FLOODERS)
        .map(|_| {
            let mut stream = TcpStream::connect(addr).unwrap();
            stream.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
            let (script, done) = (script.clone(), done.clone());
            std::thread::spawn(move || {
                let _ = stream.write_all(&script);
                // Keep the connection open, still reading nothing, until the test is over: only
                // the server may end it.
                let until = Instant::now() + Duration::from_secs(30);
                while !done.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(20));
                }
                drop(stream);
            })
        })
        .collect();

    // Every slot is taken by a client that does not read. A server that waited for them forever
    // would never free a slot; with the command timeout also bounding writes, one frees within
    // seconds.
    std::thread::sleep(Duration::from_millis(300));
    let mut probe = SmtpClient::connect(addr);
    probe.expect_reply(&["421 4.7.0"]);
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut next = loop {
        let mut c = SmtpClient::connect(addr);
        match c.read_reply(Duration::from_secs(5)) {
            Ok(r) if r.is("220") => break c,
            Ok(r) if r.is("421") && Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
            _ => c.fail("once the flooders' sessions time out, a new client is greeted with 220"),
        }
    };
    next.expect("EHLO next.test", &["250"]);
    next.expect("QUIT", &["221"]);

    // Replies waiting for a client that does not read are bounded per session (16 KB or so),
    // not by what the client sent: 20 MB of EHLOs would otherwise queue about 400 MB of replies.
    let grown = vm(pid, "VmHWM:").saturating_sub(before);
    eprintln!("{FLOODERS} clients flooding without reading: peak memory grew by {} KB", grown / 1024);
    assert!(grown < 16 * MB, "peak memory grew by {} MB with {FLOODERS} clients not reading", grown / MB);
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    for f in flooders {
        f.join().unwrap();
    }
}

#[test]
fn bytes_dripped_one_at_a_time_work_and_a_half_sent_command_times_out() {
    let (gw, addr) = keeping_smtp("command_timeout = \"1s\"\n");
    let mut c = SmtpClient::connect(addr);
    c.expect_reply(&["220"]);
    let drip = |c: &mut SmtpClient, bytes: &[u8]| {
        for b in bytes {
            c.send_bulk(std::slice::from_ref(b), "one byte");
            std::thread::sleep(Duration::from_millis(3));
        }
    };
    drip(&mut c, b"EHLO drip.test\r\n");
    c.expect_reply(&["250"]);
    drip(&mut c, b"MAIL FROM:<erp@legacy.example>\r\nRCPT TO:<orders@hooks.example.com>\r\nDATA\r\n");
    c.expect_reply(&["250 2.1.0"]);
    c.expect_reply(&["250 2.1.5"]);
    c.expect_reply(&["354"]);
    let content = mail("dripped", "one\r\n..two\r\n");
    drip(&mut c, content.as_bytes());
    drip(&mut c, b".\r\n");
    let reply = c.expect_reply(&["250 2.0.0"]);
    let id = queued_id(&reply).unwrap();

    // Half a command, then silence: the command timeout ends it.
    drip(&mut c, b"NOOP");
    c.timeout = Duration::from_secs(10);
    c.expect_reply(&["421 4.4.2"]);
    c.expect_closed();

    wait_kept(&gw, &[&id]);
    let raw = gw.raw_message(&id);
    assert!(
        raw.ends_with(mail("dripped", "one\r\n.two\r\n").as_bytes()),
        "{}",
        String::from_utf8_lossy(&raw).escape_debug()
    );
}
