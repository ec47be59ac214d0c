//! `mailhook shadow` on an archive built in the test through the store's own API: the exact
//! report a rules edit gives, and the exit status (0 nothing changes, 1 something does,
//! 64 usage, 75 no archive, 78 bad rules); `check` loading the trial rules.

use mailhook::model::{Envelope, Source};
use mailhook::store::sqlite::SqliteArchive;
use mailhook::store::{Archive, ArchiveState, ArchivedMessage};
use serde_json::Value;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, SystemTime};

const CONFIG: &str = r#"
[spool]
dir = "spool"

[rules]
dir = "rules"

[destination.orders]
type = "file"
path = "out/events.jsonl"
"#;

const LIVE: &str = r#"
[[rule]]
name = "ups-delivery-notice"
to = ["orders"]
[rule.when]
from = '@ups\.com$'
[rule.extract]
subject = 'Order (?P<order_id>\d+)'

[[rule]]
name = "dhl"
to = ["orders"]
[rule.when]
from = '@dhl\.com$'
[rule.extract]
subject = 'Order (?P<order_id>\d+)'
body = 'Tracking: (?P<tracking>\w+)'
"#;

/// The UPS rule tightened to one address (breaks notify@ups.com); DHL now needs a tracking
/// number (the mail without one becomes a dead letter).
const EDITED: &str = r#"
[[rule]]
name = "ups-delivery-notice"
to = ["orders"]
[rule.when]
from = '^shipping@ups\.com$'
[rule.extract]
subject = 'Order (?P<order_id>\d+)'

[[rule]]
name = "dhl"
to = ["orders"]
require = ["tracking"]
[rule.when]
from = '@dhl\.com$'
[rule.extract]
subject = 'Order (?P<order_id>\d+)'
body = 'Tracking: (?P<tracking>\w+)'
"#;

struct Setup {
    dir: tempfile::TempDir,
    ids: Vec<String>,
}

/// An installation whose archive holds `mails` (from, subject, body), the first the oldest,
/// received `age` ago and one second apart.
fn setup(mails: &[(&str, &str, &str)], age: Duration) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    std::fs::write(p.join("mailhook.toml"), CONFIG).unwrap();
    for (d, rules) in [("rules", LIVE), ("rules.new", EDITED), ("rules.same", LIVE)] {
        std::fs::create_dir(p.join(d)).unwrap();
        std::fs::write(p.join(d).join("10-shipping.toml"), rules).unwrap();
    }
    let archive = SqliteArchive::open(&p.join("spool/archive/archive.db")).unwrap();
    let start = SystemTime::now() - age;
    let mut ids = Vec::new();
    for (i, (from, subject, body)) in mails.iter().enumerate() {
        let at = start + Duration::from_secs(i as u64);
        let ms = at.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_millis() as u64;
        let mut envelope = Envelope::new(Source::Smtp);
        envelope.id = ulid::Ulid::from_parts(ms, i as u128).to_string();
        envelope.mail_from = Some(from.to_string());
        envelope.recipients = vec!["hook@example.com".into()];
        let raw = format!(
            "From: {from}\r\nTo: hook@example.com\r\nSubject: {subject}\r\nMessage-ID: <m{i}@example.com>\r\n\r\n{body}\r\n"
        );
        let message = ArchivedMessage::build(
            ArchiveState::Delivered,
            envelope.clone(),
            raw.into_bytes(),
            None,
            None,
            vec!["orders".into()],
            None,
            at,
        );
        archive.record(&message).unwrap();
        ids.push(envelope.id);
    }
    Setup { dir, ids }
}

fn shadow(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mailhook"))
        .arg("shadow")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run mailhook shadow")
}

fn text(o: &[u8]) -> String {
    String::from_utf8_lossy(o).into_owned()
}

const MAILS: [(&str, &str, &str); 3] = [
    ("shipping@ups.com", "Order 4711 shipped", "Your parcel is on its way."),
    ("notify@ups.com", "Order 4712 shipped", "Your parcel is on its way."),
    ("sender@dhl.com", "Order 99 on its way", "No tracking yet."),
];

#[test]
fn an_edit_that_breaks_a_sender_is_reported_field_by_field_and_exits_1() {
    let s = setup(&MAILS, Duration::from_secs(3600));
    let out = shadow(s.dir.path(), &["--rules", "rules.new"]);
    assert_eq!(out.status.code(), Some(1), "stderr: {}", text(&out.stderr));
    let expected = format!(
        "judged 3 archived messages: 1 unchanged, 0 changed rule, 0 newly matched, 1 newly unmatched, 1 newly dead, 0 changed fields\n\
         \n\
         newly dead  {dhl}  from sender@dhl.com  \"Order 99 on its way\"\n  \
         action: deliver to orders → dead (rule \"dhl\": missing required field tracking)\n\
         \n\
         newly unmatched  {ups}  from notify@ups.com  \"Order 4712 shipped\"\n  \
         rule: ups-delivery-notice → (none)\n  \
         action: deliver to orders → dead (no rule matched)\n  \
         fields.order_id: 4712 → (missing)\n",
        dhl = s.ids[2],
        ups = s.ids[1],
    );
    assert_eq!(text(&out.stdout), expected);
    assert_eq!(text(&out.stderr), "");
}

#[test]
fn the_same_rules_change_nothing_and_exit_0() {
    let s = setup(&MAILS, Duration::from_secs(3600));
    let out = shadow(s.dir.path(), &["--rules", "rules.same"]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "judged 3 archived messages: 3 unchanged, 0 changed rule, 0 newly matched, 0 newly unmatched, 0 newly dead, 0 changed fields\n"
    );
}

#[test]
fn json_output_and_the_scope_options() {
    let s = setup(&MAILS, Duration::from_secs(3600));
    let out = shadow(s.dir.path(), &["--rules", "rules.new", "--json", "--last", "2"]);
    assert_eq!(out.status.code(), Some(1), "stderr: {}", text(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["counts"]["judged"], 2, "{report:#}");
    assert_eq!(report["counts"]["newlyUnmatched"], 1);
    assert_eq!(report["counts"]["newlyDead"], 1);
    assert_eq!(report["breaking"], 2);
    let ups = &report["differences"][1];
    assert_eq!(ups["id"], s.ids[1].as_str());
    assert_eq!(ups["kind"], "newly_unmatched");
    assert_eq!(ups["ruleBefore"], "ups-delivery-notice");
    assert_eq!(ups["ruleAfter"], Value::Null);
    assert_eq!(
        ups["changes"][2],
        serde_json::json!({"path": "fields.order_id", "before": "4712"}),
        "a missing value has no `after`"
    );

    // --last 1: only the newest message (the DHL one).
    let out = shadow(s.dir.path(), &["--rules", "rules.new", "--last", "1"]);
    assert!(text(&out.stdout).starts_with("judged 1 archived message: 0 unchanged"), "{}", text(&out.stdout));

    // --since counts from now: an archive of messages received an hour ago has none within 10m.
    let out = shadow(s.dir.path(), &["--rules", "rules.new", "--since", "10m"]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    assert!(text(&out.stdout).starts_with("judged 0 archived messages: 0 unchanged"), "{}", text(&out.stdout));
    let out = shadow(s.dir.path(), &["--rules", "rules.new", "--since", "1000000y"]);
    assert!(text(&out.stdout).starts_with("judged 3 archived messages"), "before 1970 is every message");
    let out = shadow(s.dir.path(), &["--rules", "rules.new", "--since", "2h"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stdout).starts_with("judged 3 archived messages"), "{}", text(&out.stdout));
}

#[test]
fn usage_config_and_missing_archive_errors() {
    let s = setup(&MAILS, Duration::from_secs(60));
    let out = shadow(s.dir.path(), &["--rules", "rules.new", "--since", "7d", "--last", "5"]);
    assert_eq!(out.status.code(), Some(64), "both scopes: {}", text(&out.stderr));
    let out = shadow(s.dir.path(), &[]);
    assert_eq!(out.status.code(), Some(64), "--rules is required");

    std::fs::write(s.dir.path().join("rules.new/20-bad.toml"), "[[rule]]\nname = \"x\"\nto = [\"nowhere\"]\n").unwrap();
    let out = shadow(s.dir.path(), &["--rules", "rules.new"]);
    assert_eq!(out.status.code(), Some(78), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("unknown destination \"nowhere\""), "{}", text(&out.stderr));

    std::fs::remove_dir_all(s.dir.path().join("spool")).unwrap();
    let out = shadow(s.dir.path(), &["--rules", "rules.same"]);
    assert_eq!(out.status.code(), Some(75));
    assert!(text(&out.stderr).starts_with("no archive at "), "{}", text(&out.stderr));
}

#[test]
fn check_loads_the_trial_rules_too() {
    let s = setup(&[], Duration::from_secs(60));
    let p = s.dir.path();
    let config = CONFIG.replace("dir = \"rules\"\n", "dir = \"rules\"\ntrial_dir = \"trial\"\n");
    std::fs::write(p.join("mailhook.toml"), config).unwrap();
    std::fs::create_dir(p.join("trial")).unwrap();
    std::fs::write(p.join("trial/10-ups.toml"), EDITED).unwrap();
    let check =
        |dir: &Path| Command::new(env!("CARGO_BIN_EXE_mailhook")).args(["check"]).current_dir(dir).output().unwrap();
    let out = check(p);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("  trial rules: 2 from "), "{}", text(&out.stdout));
    std::fs::write(p.join("trial/20-bad.toml"), "[[rule]]\nname = \"x\"\nto = [\"nowhere\"]\n").unwrap();
    let out = check(p);
    assert_eq!(out.status.code(), Some(78));
    assert!(text(&out.stderr).contains("unknown destination \"nowhere\""), "{}", text(&out.stderr));
}
