//! The IMAP watcher end to end: a real Dovecot (tests/support/dovecot.rs) → `mailhook serve`
//! → spool → a `file` destination whose JSON lines the tests read back. Loopback only.

mod support;

use serde_json::Value;
use std::collections::HashMap;
use std::time::{Duration, Instant};
use support::dovecot::{Dovecot, DovecotOptions, OAUTH_TOKEN, PASSWORD, USER};
use support::gateway::{Gateway, message};

const WAIT: Duration = Duration::from_secs(20);
const RULES: &str = "[[rule]]\nname = \"all\"\nto = [\"out\"]\n";

/// A config watching `folders` of [`USER`] on `dovecot` (plain IMAP on loopback) with `extra`
/// keys in the `[[imap]]` table, delivering to `out.jsonl`.
fn config(dovecot: &Dovecot, extra: &str) -> String {
    format!(
        "[[imap]]\nname = \"alerts\"\nhost = \"127.0.0.1\"\nport = {}\ntls = \"none\"\nuser = \"{USER}\"\n\
         password = \"${{IMAP_PASSWORD}}\"\n{extra}\n\n[destination.out]\ntype = \"file\"\npath = \"out.jsonl\"\n",
        dovecot.port()
    )
}

fn gateway(dovecot: &Dovecot, extra: &str) -> Gateway {
    Gateway::new(&config(dovecot, extra), RULES).env("IMAP_PASSWORD", PASSWORD)
}

/// Every payload delivered so far (a line still being written is not one yet).
fn delivered(gw: &Gateway) -> Vec<Value> {
    std::fs::read_to_string(gw.path().join("out.jsonl"))
        .unwrap_or_default()
        .split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
        .collect()
}

/// Waits until at least `n` payloads are delivered; returns them all.
fn wait_delivered(gw: &Gateway, n: usize, timeout: Duration) -> Vec<Value> {
    let deadline = Instant::now() + timeout;
    loop {
        let got = delivered(gw);
        if got.len() >= n {
            return got;
        }
        if Instant::now() > deadline {
            panic!("{} of {n} messages delivered after {timeout:?}; logs:\n{}", got.len(), gw.logs());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// How many times each subject was delivered.
fn subjects(payloads: &[Value]) -> HashMap<String, usize> {
    let mut out = HashMap::new();
    for p in payloads {
        *out.entry(p["subject"].as_str().unwrap().to_string()).or_insert(0) += 1;
    }
    out
}

/// Waits until `f` holds, polling the server.
fn wait_server(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until the running serve has logged `message` at least `n` times.
fn wait_log(gw: &Gateway, message: &str, n: usize, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let count = gw
            .logs()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["message"] == message)
            .count();
        if count >= n {
            return;
        }
        assert!(Instant::now() < deadline, "{message:?} logged {count} of {n} times; logs:\n{}", gw.logs());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn backlog_of_unread_mail_is_delivered_and_flagged_seen_then_idle_brings_new_mail_at_once() {
    let dovecot = Dovecot::start();
    let mut imap = dovecot.client(USER, PASSWORD);
    let read_before = imap.append_with_flags("INBOX", "(\\Seen)", &message(0, "read before"));
    let backlog: Vec<u32> = (1..=3).map(|n| imap.append("INBOX", &message(n, "backlog"))).collect();

    // poll = 1h: only IDLE can explain a message arriving within seconds.
    let mut gw = gateway(&dovecot, "after = \"seen\"\npoll = \"1h\"");
    gw.start();
    let got = wait_delivered(&gw, 3, WAIT);
    assert_eq!(
        subjects(&got),
        HashMap::from([("backlog 1".into(), 1), ("backlog 2".into(), 1), ("backlog 3".into(), 1)])
    );
    for p in &got {
        assert_eq!(p["source"], "imap");
        assert_eq!(p["rule"], "all");
    }
    wait_server("the backlog flagged \\Seen", WAIT, || imap.unseen("INBOX").is_empty());
    for uid in backlog.iter().chain([&read_before]) {
        assert!(imap.flags("INBOX", *uid).contains(&"\\Seen".to_string()));
    }
    assert_eq!(imap.count("INBOX"), 4, "seen mode leaves the messages in place");

    wait_log(&gw, "IMAP folder selected", 1, WAIT);
    std::thread::sleep(Duration::from_millis(300)); // let the watcher enter IDLE
    let sent = Instant::now();
    imap.append("INBOX", &message(4, "during idle"));
    let got = wait_delivered(&gw, 4, Duration::from_secs(10));
    let latency = sent.elapsed();
    assert_eq!(got[3]["subject"], "during idle 4");
    assert!(latency < Duration::from_secs(10), "IDLE did not bring the message ({latency:?})");
    assert_eq!(gw.stop(), 0);
    assert!(!gw.logs().contains(PASSWORD), "the IMAP password leaked into the logs");
}

#[test]
fn restart_sends_nothing_twice_and_picks_up_mail_that_arrived_meanwhile() {
    let dovecot = Dovecot::start();
    let mut imap = dovecot.client(USER, PASSWORD);
    for n in 0..3 {
        imap.append("INBOX", &message(n, "first run"));
    }
    let mut gw = gateway(&dovecot, "after = \"seen\"\npoll = \"1h\"");
    gw.start();
    wait_delivered(&gw, 3, WAIT);
    wait_server("seen flags", WAIT, || imap.unseen("INBOX").is_empty());
    assert_eq!(gw.stop(), 0);

    // Mail that arrives while mailhook is down, including one a person already read.
    imap.append("INBOX", &message(3, "while down"));
    imap.append_with_flags("INBOX", "(\\Seen)", &message(4, "read while down"));
    // And the flags of the first run's mail cleared: the checkpoint, not \Seen, decides.
    for uid in imap.uids("INBOX") {
        imap.store("INBOX", uid, "-FLAGS (\\Seen)");
    }
    gw.start();
    let got = wait_delivered(&gw, 5, WAIT);
    std::thread::sleep(Duration::from_millis(500));
    let got = if delivered(&gw).len() > got.len() { delivered(&gw) } else { got };
    assert_eq!(
        subjects(&got),
        HashMap::from([
            ("first run 0".into(), 1),
            ("first run 1".into(), 1),
            ("first run 2".into(), 1),
            ("while down 3".into(), 1),
            ("read while down 4".into(), 1)
        ])
    );
    assert_eq!(gw.stop(), 0);
}

#[test]
fn a_backlog_larger_than_a_batch_is_moved_to_a_folder_created_for_it() {
    let dovecot = Dovecot::start();
    let mut imap = dovecot.client(USER, PASSWORD);
    for n in 0..250 {
        imap.append("INBOX", &message(n, "backlog"));
    }
    assert!(!imap.exists("Processed"));
    let mut gw = gateway(&dovecot, "after = \"move:Processed\"\npoll = \"1h\"");
    gw.start();
    let got = wait_delivered(&gw, 250, Duration::from_secs(60));
    let twice: Vec<_> = subjects(&got).into_iter().filter(|(_, n)| *n > 1).collect();
    assert!(twice.is_empty(), "delivered more than once: {twice:?}; logs:\n{}", gw.logs());
    wait_server("INBOX emptied", WAIT, || imap.count("INBOX") == 0);
    assert_eq!(imap.count("Processed"), 250);
    // Backlog first, in UID order.
    let order: Vec<usize> =
        got.iter().map(|p| p["subject"].as_str().unwrap().trim_start_matches("backlog ").parse().unwrap()).collect();
    let mut sorted = order.clone();
    sorted.sort_unstable();
    assert_eq!(order.len(), 250);
    assert_eq!(sorted, (0..250).collect::<Vec<_>>());
    assert_eq!(gw.stop(), 0);
}

#[test]
fn delete_removes_spooled_mail_from_the_server() {
    let dovecot = Dovecot::start();
    let mut imap = dovecot.client(USER, PASSWORD);
    for n in 0..3 {
        imap.append("INBOX", &message(n, "to delete"));
    }
    let mut gw = gateway(&dovecot, "after = \"delete\"\npoll = \"1h\"");
    gw.start();
    wait_delivered(&gw, 3, WAIT);
    wait_server("INBOX emptied", WAIT, || imap.count("INBOX") == 0);
    imap.append("INBOX", &message(3, "to delete"));
    wait_delivered(&gw, 4, WAIT);
    wait_server("INBOX emptied again", WAIT, || imap.count("INBOX") == 0);
    assert_eq!(gw.stop(), 0);
}

#[test]
fn two_folders_are_watched_at_once() {
    let dovecot = Dovecot::start();
    let mut imap = dovecot.client(USER, PASSWORD);
    imap.create("Alerts");
    imap.append("INBOX", &message(0, "inbox"));
    imap.append("Alerts", &message(1, "alerts"));
    let rules = "[[rule]]\nname = \"from-alerts\"\nto = [\"out\"]\n[rule.when]\nsource = \"imap:alerts/Alerts\"\n\n\
                 [[rule]]\nname = \"other\"\nto = [\"out\"]\n";
    let mut gw = Gateway::new(&config(&dovecot, "folders = [\"INBOX\", \"Alerts\"]\npoll = \"1h\""), rules)
        .env("IMAP_PASSWORD", PASSWORD);
    gw.start();
    wait_log(&gw, "IMAP folder selected", 2, WAIT);
    std::thread::sleep(Duration::from_millis(300));
    imap.append("Alerts", &message(2, "alerts"));
    imap.append("INBOX", &message(3, "inbox"));
    let got = wait_delivered(&gw, 4, WAIT);
    let rule_of: HashMap<String, String> = got
        .iter()
        .map(|p| (p["subject"].as_str().unwrap().to_string(), p["rule"].as_str().unwrap().to_string()))
        .collect();
    assert_eq!(rule_of["inbox 0"], "other");
    assert_eq!(rule_of["inbox 3"], "other");
    assert_eq!(rule_of["alerts 1"], "from-alerts");
    assert_eq!(rule_of["alerts 2"], "from-alerts");
    assert_eq!(gw.stop(), 0);
}

#[test]
fn the_watcher_reconnects_when_the_server_goes_away_and_comes_back() {
    let mut dovecot = Dovecot::start();
    let mut gw = gateway(&dovecot, "poll = \"1h\"");
    gw.start();
    wait_log(&gw, "IMAP folder selected", 1, WAIT);
    dovecot.stop();
    wait_log(&gw, "IMAP connection lost; reconnecting", 1, WAIT);
    std::thread::sleep(Duration::from_secs(2));
    dovecot.restart();
    let mut imap = dovecot.client(USER, PASSWORD);
    imap.append("INBOX", &message(0, "after restart"));
    let got = wait_delivered(&gw, 1, Duration::from_secs(30));
    assert_eq!(got[0]["subject"], "after restart 0");
    assert_eq!(gw.stop(), 0);
}

#[test]
fn uidvalidity_change_rescans_without_sending_anything_twice() {
    let mut dovecot = Dovecot::start();
    let mut imap = dovecot.client(USER, PASSWORD);
    for n in 0..3 {
        imap.append("INBOX", &message(n, "before reset"));
    }
    let mut gw = gateway(&dovecot, "after = \"seen\"\npoll = \"1h\"");
    gw.start();
    wait_delivered(&gw, 3, WAIT);
    wait_server("seen flags", WAIT, || imap.unseen("INBOX").is_empty());
    assert_eq!(gw.stop(), 0);

    let before = imap.uidvalidity("INBOX");
    imap.logout();
    dovecot.reset_uidvalidity(USER, "INBOX");
    let mut imap = dovecot.client(USER, PASSWORD);
    assert_ne!(imap.uidvalidity("INBOX"), before);
    // Flags cleared too: only the fingerprints can tell these were sent.
    for uid in imap.uids("INBOX") {
        imap.store("INBOX", uid, "-FLAGS (\\Seen)");
    }
    imap.append("INBOX", &message(3, "after reset"));
    gw.start();
    wait_log(&gw, "IMAP folder selected", 2, WAIT);
    let got = wait_delivered(&gw, 4, WAIT);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(delivered(&gw).len(), 4, "{:#?}", delivered(&gw));
    assert_eq!(subjects(&got)["after reset 3"], 1);
    assert!(gw.logs().contains("UIDVALIDITY changed"));
    assert_eq!(gw.stop(), 0);
}

#[test]
fn a_10_mb_message_is_spooled_intact() {
    let dovecot = Dovecot::start();
    let mut imap = dovecot.client(USER, PASSWORD);
    let mut big = String::from(
        "From: a@example.com\r\nTo: b@example.com\r\nSubject: big\r\nMessage-ID: <big@example.com>\r\n\r\n",
    );
    let line = "0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz\r\n";
    while big.len() < 10 * 1024 * 1024 {
        big.push_str(line);
    }
    let uid = imap.append("INBOX", big.as_bytes());
    let mut gw = gateway(&dovecot, "after = \"seen\"\npoll = \"1h\"");
    gw.start();
    let got = wait_delivered(&gw, 1, Duration::from_secs(60));
    assert_eq!(got[0]["subject"], "big");
    // All 10 MB were read: the text is whole, or cut to fit the destination's max_body.
    assert!(got[0]["text"].as_str().unwrap().len() > 10_000_000 || got[0]["truncated"] == true);
    wait_server("seen flag", WAIT, || imap.flags("INBOX", uid).contains(&"\\Seen".to_string()));
    assert_eq!(gw.stop(), 0);
}

#[test]
fn a_wrong_password_is_one_clear_line_per_retry_and_no_crash() {
    let dovecot = Dovecot::start();
    let mut imap = dovecot.client(USER, PASSWORD);
    imap.append("INBOX", &message(0, "waiting"));
    let mut gw = Gateway::new(&config(&dovecot, "poll = \"1h\""), RULES).env("IMAP_PASSWORD", "not-the-password");
    gw.start();
    wait_log(&gw, "IMAP login failed; check the account's user and password or token", 2, WAIT);
    assert!(gw.serve_pid().is_some());
    let logs = gw.logs();
    assert!(!logs.contains("not-the-password"), "the password leaked into the logs");
    let line: Value = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["message"] == "IMAP login failed; check the account's user and password or token")
        .unwrap();
    assert_eq!(line["level"], "ERROR");
    assert!(line["error"].as_str().unwrap().contains(USER), "{line}");
    assert!(delivered(&gw).is_empty());
    assert_eq!(imap.unseen("INBOX").len(), 1, "nothing is touched");
    assert_eq!(gw.stop(), 0);
}

#[test]
fn without_idle_the_folder_is_polled() {
    let dovecot = Dovecot::start_with(DovecotOptions { idle: false, ..DovecotOptions::default() });
    let mut gw = gateway(&dovecot, "poll = \"1s\"");
    gw.start();
    wait_log(&gw, "IMAP folder selected", 1, WAIT);
    let mut imap = dovecot.client(USER, PASSWORD);
    imap.append("INBOX", &message(0, "polled"));
    let got = wait_delivered(&gw, 1, Duration::from_secs(10));
    assert_eq!(got[0]["subject"], "polled 0");
    let selected: Value = gw
        .logs()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["message"] == "IMAP folder selected")
        .unwrap();
    assert_eq!(selected["idle"], false);
    assert_eq!(gw.stop(), 0);
}

#[test]
fn implicit_tls_and_starttls_with_an_extra_ca() {
    let dovecot = Dovecot::start_with(DovecotOptions { tls: true, ..DovecotOptions::default() });
    let ca = dovecot.ca_file().unwrap();
    let mut imap = dovecot.client(USER, PASSWORD);
    imap.create("Other");
    imap.append("INBOX", &message(0, "over tls"));
    imap.append("Other", &message(1, "over starttls"));
    let config = format!(
        "[[imap]]\nname = \"implicit\"\nhost = \"localhost\"\nport = {}\ntls = \"implicit\"\nca_file = \"{}\"\n\
         user = \"{USER}\"\npassword = \"${{IMAP_PASSWORD}}\"\nauth = \"plain\"\npoll = \"1h\"\n\n\
         [[imap]]\nname = \"starttls\"\nhost = \"localhost\"\nport = {}\ntls = \"starttls\"\nca_file = \"{}\"\n\
         user = \"{USER}\"\npassword = \"${{IMAP_PASSWORD}}\"\nfolders = [\"Other\"]\npoll = \"1h\"\n\n\
         [destination.out]\ntype = \"file\"\npath = \"out.jsonl\"\n",
        dovecot.tls_port().unwrap(),
        ca.display(),
        dovecot.port(),
        ca.display()
    );
    let mut gw = Gateway::new(&config, RULES).env("IMAP_PASSWORD", PASSWORD);
    gw.start();
    let got = wait_delivered(&gw, 2, WAIT);
    assert_eq!(subjects(&got), HashMap::from([("over tls 0".into(), 1), ("over starttls 1".into(), 1)]));
    assert_eq!(gw.stop(), 0);
}

#[test]
fn xoauth2_reads_the_token_from_a_file_or_a_command_at_each_connect() {
    let dovecot = Dovecot::start_with(DovecotOptions { xoauth2: true, ..DovecotOptions::default() });
    let mut imap = dovecot.client(USER, PASSWORD);
    imap.create("Other");
    imap.append("INBOX", &message(0, "token file"));
    imap.append("Other", &message(1, "token command"));
    let config = format!(
        "[[imap]]\nname = \"file\"\nhost = \"127.0.0.1\"\nport = {port}\ntls = \"none\"\nuser = \"{USER}\"\n\
         auth = \"xoauth2\"\ntoken_file = \"token.txt\"\npoll = \"1h\"\n\n\
         [[imap]]\nname = \"command\"\nhost = \"127.0.0.1\"\nport = {port}\ntls = \"none\"\nuser = \"{USER}\"\n\
         auth = \"xoauth2\"\ntoken_command = \"cat token.txt\"\nfolders = [\"Other\"]\npoll = \"1h\"\n\n\
         [destination.out]\ntype = \"file\"\npath = \"out.jsonl\"\n",
        port = dovecot.port()
    );
    let mut gw = Gateway::new(&config, RULES);
    std::fs::write(gw.path().join("token.txt"), format!("{OAUTH_TOKEN}\n")).unwrap();
    gw.start();
    let got = wait_delivered(&gw, 2, WAIT);
    assert_eq!(subjects(&got), HashMap::from([("token file 0".into(), 1), ("token command 1".into(), 1)]));
    assert_eq!(gw.stop(), 0);
    assert!(!gw.logs().contains(OAUTH_TOKEN), "the access token leaked into the logs");
}

#[test]
fn kill_9_during_a_backlog_loses_nothing_and_resends_almost_nothing() {
    let dovecot = Dovecot::start();
    let mut imap = dovecot.client(USER, PASSWORD);
    let total = 400;
    for n in 0..total {
        imap.append("INBOX", &message(n, "backlog"));
    }
    let mut gw = gateway(&dovecot, "after = \"move:Done\"\npoll = \"1h\"");
    let checkpoint = gw.path().join("spool/imap/alerts/INBOX.json");
    for kill in 0..3 {
        gw.start();
        // Kill at a different point of the drain each time.
        let target = (kill + 1) * total / 5;
        let deadline = Instant::now() + WAIT;
        while delivered(&gw).len() < target && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        std::thread::sleep(Duration::from_millis(fastrand_ms(kill)));
        gw.kill9();
        assert!(checkpoint.is_file() || kill == 0);
    }
    gw.start();
    let deadline = Instant::now() + Duration::from_secs(60);
    while subjects(&delivered(&gw)).len() < total {
        assert!(Instant::now() < deadline, "not every message arrived; logs:\n{}", gw.logs());
        std::thread::sleep(Duration::from_millis(20));
    }
    wait_server("INBOX emptied", WAIT, || imap.count("INBOX") == 0);
    assert_eq!(gw.stop(), 0);
    let got = delivered(&gw);
    let extra = got.len() - total;
    // Duplicates can only come from deliveries in flight at a kill (the file destination's
    // group commit) — never from the watcher fetching a spooled message again.
    let refetched = gw.logs().matches("already spooled from this folder; not sent again").count();
    eprintln!("{extra} duplicate deliveries over 3 kills; {refetched} refetched messages recognised");
    assert_eq!(imap.count("Done"), total);
}

/// A kill after the checkpoint and before the after-action leaves checkpointed messages in the
/// folder: with `move:`, the next connection moves them, and sends none of them again.
#[test]
fn messages_checkpointed_but_not_moved_before_a_kill_are_moved_at_the_next_start() {
    let dovecot = Dovecot::start();
    let mut imap = dovecot.client(USER, PASSWORD);
    imap.append("INBOX", &message(0, "first"));
    let mut gw = gateway(&dovecot, "after = \"move:Done\"\npoll = \"1h\"");
    gw.start();
    wait_delivered(&gw, 1, WAIT);
    wait_server("the first message moved", WAIT, || imap.count("Done") == 1);
    assert_eq!(gw.stop(), 0);

    // What the kill leaves: two more messages spooled and checkpointed, still in INBOX.
    imap.append("INBOX", &message(1, "checkpointed"));
    imap.append("INBOX", &message(2, "checkpointed"));
    let checkpoint = gw.path().join("spool/imap/alerts/INBOX.json");
    let mut position: Value = serde_json::from_slice(&std::fs::read(&checkpoint).unwrap()).unwrap();
    position["last_uid"] = Value::from(3);
    std::fs::write(&checkpoint, position.to_string()).unwrap();

    gw.start();
    wait_server("the checkpointed messages moved", WAIT, || imap.count("INBOX") == 0);
    assert_eq!(imap.count("Done"), 3);
    assert_eq!(gw.stop(), 0);
    assert_eq!(delivered(&gw).len(), 1, "moved, not sent again");
}

#[test]
fn a_message_spooled_just_before_a_kill_is_recognised_not_spooled_again() {
    let dovecot = Dovecot::start();
    let mut imap = dovecot.client(USER, PASSWORD);
    imap.append("INBOX", &message(0, "before"));
    let mut gw = gateway(&dovecot, "after = \"seen\"\npoll = \"1h\"");
    gw.start();
    wait_delivered(&gw, 1, WAIT);
    assert_eq!(gw.stop(), 0);

    // What a kill right after the watcher's commit of a new message leaves: the message in the
    // spool with its fingerprint, but neither the folder's checkpoint nor its fingerprint list
    // updated, and the message not yet flagged on the server. The message is inserted into the
    // spool's database as the spool inserts it: the `raw` bytes, then a `message` row with
    // their `seq`.
    let uid = imap.append("INBOX", &message(1, "spooled before the kill"));
    let raw = imap.fetch("INBOX", uid);
    let fingerprint: String =
        ring::digest::digest(&ring::digest::SHA256, &raw).as_ref().iter().map(|b| format!("{b:02x}")).collect();
    let id = "01KB0000000000000000000000";
    let meta = serde_json::json!({
        "version": 1, "id": id, "size": raw.len(), "attempts": 0, "fingerprint": fingerprint,
        "envelope": {
            "id": id, "source": {"kind": "imap", "account": "alerts", "folder": "INBOX"},
            "mail_from": null, "recipients": [USER], "received_at": "2026-01-01T00:00:00.000Z", "tls": false
        }
    });
    let db = rusqlite::Connection::open(gw.path().join("spool/spool.db")).unwrap();
    db.execute("INSERT INTO raw (bytes) VALUES (?1)", rusqlite::params![raw]).unwrap();
    db.execute(
        "INSERT INTO message (seq, id, state, meta) VALUES (?1, ?2, 'incoming', ?3)",
        rusqlite::params![db.last_insert_rowid(), id, meta.to_string()],
    )
    .unwrap();
    drop(db);

    gw.start();
    wait_log(&gw, "already spooled from this folder; not sent again", 1, WAIT);
    wait_server("the after-action on the recognised message", WAIT, || imap.unseen("INBOX").is_empty());
    let got = wait_delivered(&gw, 2, WAIT);
    std::thread::sleep(Duration::from_millis(500));
    let got = if delivered(&gw).len() > got.len() { delivered(&gw) } else { got };
    assert_eq!(
        subjects(&got),
        HashMap::from([("before 0".into(), 1), ("spooled before the kill 1".into(), 1)]),
        "logs:\n{}",
        gw.logs()
    );
    assert!(got.iter().any(|p| p["id"] == id), "delivered from the spool, under the id it had");
    assert_eq!(gw.stop(), 0);
}

/// A small per-round delay (0–9 ms) so the kills land at different instants.
fn fastrand_ms(round: usize) -> u64 {
    (round as u64 * 7 + 3) % 10
}

#[test]
fn healthz_turns_503_when_the_imap_server_goes_away_and_200_when_it_returns() {
    use support::gateway::http_get;
    let mut dovecot = Dovecot::start();
    let config = format!("{}\n[admin]\nlisten = \"127.0.0.1:0\"\n", config(&dovecot, "poll = \"1h\""));
    let mut gw = Gateway::new(&config, RULES).env("IMAP_PASSWORD", PASSWORD);
    gw.start();
    let admin = gw.listening("admin");
    // Coming back can take up to the watcher's 60 s command timeout plus a backoff: a
    // connection made while the server was going down may hang until that timeout ends it.
    let health = |want: u16| {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let (status, _, body) = http_get(admin, "/healthz", None);
            if status == want {
                return body;
            }
            assert!(Instant::now() < deadline, "/healthz stayed {status} ({body}), wanted {want}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    health(200);
    dovecot.stop();
    let body: Value = serde_json::from_str(&health(503)).unwrap();
    let problems = body["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 1, "{body}");
    assert!(problems[0].as_str().unwrap().starts_with("imap alerts/INBOX: not connected"), "{body}");
    dovecot.restart();
    health(200);
    assert_eq!(gw.stop(), 0);
}
