//! Delivery end to end: `mailhook ingest` → spool → `mailhook serve` → real local servers that
//! behave like Kustomer's hooks (tests/support). Loopback only.

mod support;

use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};
use support::gateway::{Gateway, message};
use support::hook::{HookOptions, HookServer};
use support::smtp::{SmtpOptions, SmtpSink};

const WAIT: Duration = Duration::from_secs(20);

/// Fast retries for tests.
const DELIVERY: &str = "[delivery]\ntimeout = \"3s\"\nretry_for = \"1h\"\nbackoff = { initial = \"200ms\", max = \"500ms\" }\nrate = \"off\"\n";

fn rule_to(dests: &[&str]) -> String {
    let to: Vec<String> = dests.iter().map(|d| format!("{d:?}")).collect();
    format!("[[rule]]\nname = \"all\"\nto = [{}]\n", to.join(", "))
}

fn web_hook(name: &str, server: &HookServer, token_var: &str) -> String {
    format!(
        "[destination.{name}]\ntype = \"kustomer-web-hook\"\nurl = \"{}\"\ntoken = \"${{{token_var}}}\"\n",
        server.url("/v1/hooks/web/abc")
    )
}

fn form_hook(name: &str, server: &HookServer) -> String {
    format!("[destination.{name}]\ntype = \"kustomer-form-hook\"\nurl = \"{}\"\n", server.url("/v1/hooks/form/org/abc"))
}

#[test]
fn web_hook_gets_bearer_key_and_idempotency_key_equal_to_the_spool_id() {
    let hook = HookServer::with_token("s3cret-hook-token");
    let mut gw =
        Gateway::new(&format!("{DELIVERY}{}", web_hook("kustomer", &hook, "HOOK_TOKEN")), &rule_to(&["kustomer"]))
            .env("HOOK_TOKEN", "s3cret-hook-token");
    let ids: HashSet<String> = (0..3).map(|n| gw.ingest(&message(n, "alert"))).collect();
    gw.start();
    let got = hook.wait_for_accepted(3, WAIT);
    let mut seen = HashSet::new();
    for r in &got {
        assert_eq!(r.authorization.as_deref(), Some("Bearer s3cret-hook-token"));
        assert_eq!(r.content_type.as_deref(), Some("application/json"));
        let json = r.json.as_ref().unwrap();
        let id = json["id"].as_str().unwrap().to_string();
        assert_eq!(r.idempotency_key.as_deref(), Some(id.as_str()));
        assert_eq!(json["rule"], "all");
        assert_eq!(json["source"], "stdin");
        seen.insert(id);
    }
    assert_eq!(seen, ids);
    gw.wait_queue(WAIT, "an empty spool", |q| q.is_empty());
    assert_eq!(gw.stop(), 0);
    assert!(!gw.logs().contains("s3cret-hook-token"), "the token leaked into the logs");
}

#[test]
fn wrong_bearer_key_is_a_dead_letter_at_once() {
    let hook = HookServer::with_token("right");
    let mut gw =
        Gateway::new(&format!("{DELIVERY}{}", web_hook("kustomer", &hook, "HOOK_TOKEN")), &rule_to(&["kustomer"]))
            .env("HOOK_TOKEN", "wrong");
    let id = gw.ingest(&message(1, "x"));
    gw.start();
    let q = gw.wait_queue(WAIT, "a dead letter", |q| q.len() == 1 && q[0]["state"] == "dead");
    assert_eq!(q[0]["id"], id.as_str());
    let err = q[0]["last_error"].as_str().unwrap();
    assert!(err.starts_with("kustomer: HTTP 401"), "{err}");
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(hook.requests().len(), 1, "a 401 is not retried");
    assert!(!gw.logs().contains("wrong\""), "{}", gw.logs());
}

#[test]
fn form_hook_webhook_with_headers_and_file_each_get_the_message() {
    let form = HookServer::start(HookOptions::default());
    let ops = HookServer::start(HookOptions::default());
    let config = format!(
        "{DELIVERY}{}[destination.ops]\ntype = \"webhook\"\nurl = \"{}\"\nheaders = {{ \"X-Api-Key\" = \"${{OPS_KEY}}\" }}\n\
         [destination.audit]\ntype = \"file\"\npath = \"out/audit.jsonl\"\n",
        form_hook("form", &form),
        ops.url("/hook")
    );
    let mut gw = Gateway::new(&config, &rule_to(&["form", "ops", "audit"])).env("OPS_KEY", "ops-key-123");
    let id = gw.ingest(&message(7, "order"));
    gw.start();
    let f = form.wait_for_accepted(1, WAIT);
    assert_eq!(f[0].authorization, None);
    assert_eq!(f[0].json.as_ref().unwrap()["id"], id.as_str());
    let o = ops.wait_for_accepted(1, WAIT);
    assert_eq!(o[0].header("x-api-key"), Some("ops-key-123"));
    assert_eq!(o[0].json.as_ref().unwrap()["subject"], "order 7");
    gw.wait_queue(WAIT, "an empty spool", |q| q.is_empty());
    let lines = std::fs::read_to_string(gw.path().join("out/audit.jsonl")).unwrap();
    let line: Value = serde_json::from_str(lines.lines().next().unwrap()).unwrap();
    assert_eq!(line["id"], id.as_str());
    assert_eq!(lines.lines().count(), 1);
}

#[test]
fn email_hook_carries_the_payload_as_json_ld_with_the_key() {
    let sink = SmtpSink::start(SmtpOptions::default());
    let config = format!(
        "{DELIVERY}[destination.mail]\ntype = \"kustomer-email-hook\"\naddress = \"abc123@hooks.kustomerapp.com\"\n\
         key = \"${{EMAIL_KEY}}\"\nrelay = \"{}\"\nfrom = \"mailhook@example.com\"\n",
        sink.relay_url()
    );
    let mut gw = Gateway::new(&config, &rule_to(&["mail"])).env("EMAIL_KEY", "kustomer-key-xyz");
    let mut raw = message(3, "shipment").to_vec();
    raw.extend_from_slice(b"a line with </script> in it\r\n");
    let id = gw.ingest(&raw);
    gw.start();
    let m = sink.wait_for_messages(1, WAIT);
    assert_eq!(m[0].rcpt, vec!["abc123@hooks.kustomerapp.com".to_string()]);
    assert_eq!(m[0].mail_from, "mailhook@example.com");
    let (key, json) = m[0].json_ld().expect("JSON-LD script tag in the HTML body");
    assert_eq!(key, "kustomer-key-xyz");
    assert_eq!(json["id"], id.as_str());
    assert_eq!(json["subject"], "shipment 3");
    assert!(json["text"].as_str().unwrap().contains("a line with </script> in it"));
    gw.wait_queue(WAIT, "an empty spool", |q| q.is_empty());
    assert!(!gw.logs().contains("kustomer-key-xyz"));
}

#[test]
fn email_hook_authenticates_to_the_relay() {
    let sink = SmtpSink::with_auth("relay-user", "relay-pass-123");
    let config = format!(
        "{DELIVERY}[destination.mail]\ntype = \"kustomer-email-hook\"\naddress = \"h@hooks.kustomerapp.com\"\n\
         key = \"k\"\nrelay = \"{}\"\nfrom = \"mailhook@example.com\"\nusername = \"relay-user\"\npassword = \"${{RELAY_PASSWORD}}\"\n",
        sink.relay_url()
    );
    let mut gw = Gateway::new(&config, &rule_to(&["mail"])).env("RELAY_PASSWORD", "relay-pass-123");
    gw.ingest(&message(1, "a"));
    gw.start();
    let m = sink.wait_for_messages(1, WAIT);
    assert_eq!(m[0].auth_user.as_deref(), Some("relay-user"));
    gw.wait_queue(WAIT, "an empty spool", |q| q.is_empty());
    assert!(!gw.logs().contains("relay-pass-123"));
}

#[test]
fn email_hook_relay_refusal_is_retried_then_dead_when_permanent() {
    let sink = SmtpSink::start(SmtpOptions::default());
    sink.push_data_reply(451, "4.3.0 try later");
    let config = format!(
        "{DELIVERY}[destination.mail]\ntype = \"kustomer-email-hook\"\naddress = \"h@hooks.kustomerapp.com\"\n\
         key = \"k\"\nrelay = \"{}\"\nfrom = \"mailhook@example.com\"\n",
        sink.relay_url()
    );
    let mut gw = Gateway::new(&config, &rule_to(&["mail"]));
    gw.ingest(&message(1, "a"));
    gw.start();
    sink.wait_for_messages(1, WAIT);
    assert_eq!(sink.rejected().len(), 1, "first try answered 451, then retried");
    gw.wait_queue(WAIT, "an empty spool", |q| q.is_empty());
    sink.push_data_reply(554, "5.7.1 rejected");
    gw.ingest(&message(2, "b"));
    let q = gw.wait_queue(WAIT, "a dead letter", |q| q.len() == 1 && q[0]["state"] == "dead");
    assert!(q[0]["last_error"].as_str().unwrap().contains("554"), "{q:?}");
}

#[test]
fn server_errors_are_retried_with_the_same_idempotency_key() {
    let hook = HookServer::start(HookOptions::default());
    hook.push_status(500);
    hook.push_status(503);
    let mut gw = Gateway::new(&format!("{DELIVERY}{}", form_hook("form", &hook)), &rule_to(&["form"]));
    let id = gw.ingest(&message(1, "x"));
    gw.start();
    hook.wait_for_accepted(1, WAIT);
    gw.wait_queue(WAIT, "an empty spool", |q| q.is_empty());
    let all = hook.requests();
    assert_eq!(all.iter().map(|r| r.status).collect::<Vec<_>>(), vec![500, 503, 200]);
    for r in &all {
        assert_eq!(r.idempotency_key.as_deref(), Some(id.as_str()));
        assert_eq!(r.json.as_ref().unwrap()["id"], id.as_str());
    }
}

#[test]
fn client_errors_are_dead_at_once_with_status_and_body() {
    let hook = HookServer::start(HookOptions::default());
    hook.push_status(400);
    let mut gw = Gateway::new(&format!("{DELIVERY}{}", form_hook("form", &hook)), &rule_to(&["form"]));
    gw.ingest(&message(1, "x"));
    gw.start();
    let q = gw.wait_queue(WAIT, "a dead letter", |q| q.len() == 1 && q[0]["state"] == "dead");
    let err = q[0]["last_error"].as_str().unwrap();
    assert!(err.starts_with("form: HTTP 400: {"), "{err}");
    assert_eq!(q[0]["attempts"], 1);
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(hook.requests().len(), 1);
}

#[test]
fn gives_up_after_retry_for() {
    let hook = HookServer::start(HookOptions::default());
    hook.set_down(true);
    let config = format!(
        "[delivery]\ntimeout = \"2s\"\nretry_for = \"3s\"\nbackoff = {{ initial = \"100ms\", max = \"200ms\" }}\nrate = \"off\"\n{}",
        form_hook("form", &hook)
    );
    let mut gw = Gateway::new(&config, &rule_to(&["form"]));
    // retry_for counts from reception: start serve first so the first attempt is early.
    gw.start();
    std::thread::sleep(Duration::from_millis(300));
    gw.ingest(&message(1, "x"));
    let q = gw.wait_queue(WAIT, "a dead letter", |q| q.len() == 1 && q[0]["state"] == "dead");
    let err = q[0]["last_error"].as_str().unwrap();
    assert!(err.starts_with("form: gave up after 3s: HTTP 503"), "{err}");
    assert!(hook.requests().len() >= 3, "retried before giving up: {}", hook.requests().len());
}

#[test]
fn a_429_pauses_the_whole_destination() {
    let hook = HookServer::start(HookOptions::default());
    hook.push_429(2);
    let config = format!(
        "[delivery]\ntimeout = \"3s\"\nretry_for = \"1h\"\nbackoff = {{ initial = \"100ms\", max = \"200ms\" }}\nrate = \"off\"\nconcurrency = 1\n{}",
        form_hook("form", &hook)
    );
    let mut gw = Gateway::new(&config, &rule_to(&["form"]));
    for n in 0..4 {
        gw.ingest(&message(n, "x"));
    }
    gw.start();
    let accepted = hook.wait_for_accepted(4, WAIT);
    let all = hook.requests();
    let limited = all.iter().find(|r| r.status == 429).expect("a 429 was answered");
    for r in &accepted {
        let after = r.at.duration_since(limited.at);
        assert!(after >= Duration::from_millis(1900), "a request came {after:?} after the 429 asked for 2s");
    }
    assert_eq!(all.len(), 5, "one 429 and four deliveries: {:?}", all.iter().map(|r| r.summary()).collect::<Vec<_>>());
}

#[test]
fn token_bucket_paces_a_destination() {
    let hook = HookServer::start(HookOptions::default());
    let config =
        format!("[delivery]\ntimeout = \"3s\"\nretry_for = \"1h\"\nrate = \"5/s\"\n{}", form_hook("form", &hook));
    let mut gw = Gateway::new(&config, &rule_to(&["form"]));
    for n in 0..15 {
        gw.ingest(&message(n, "x"));
    }
    gw.start();
    let got = hook.wait_for_accepted(15, WAIT);
    let first = got.iter().map(|r| r.at).min().unwrap();
    let last = got.iter().map(|r| r.at).max().unwrap();
    // Burst of 5, then 5 per second: the last of 15 comes after about 2 s.
    assert!(last.duration_since(first) >= Duration::from_millis(1700), "{:?}", last.duration_since(first));
}

#[test]
fn oversized_payload_is_shrunk_under_400kb() {
    let hook = HookServer::start(HookOptions::default());
    let mut gw = Gateway::new(&format!("{DELIVERY}{}", form_hook("form", &hook)), &rule_to(&["form"]));
    let mut raw = message(1, "big").to_vec();
    let line = "0123456789 abcdefghijklmnopqrstuvwxyz \"quoted\" äöü\r\n";
    raw.extend_from_slice(line.repeat(600_000 / line.len()).as_bytes());
    gw.ingest(&raw);
    gw.start();
    let got = hook.wait_for_accepted(1, WAIT);
    assert!(got[0].body_len <= 400_000, "{} bytes sent", got[0].body_len);
    assert!(got[0].body_len > 390_000, "shrunk more than needed: {}", got[0].body_len);
    let json = got[0].json.as_ref().unwrap();
    assert_eq!(json["truncated"], true);
    assert!(json["text"].as_str().unwrap().starts_with("body of message 1"));
    assert!(hook.requests().iter().all(|r| r.status != 413));
}

#[test]
fn each_destination_is_tracked_on_its_own() {
    let up = HookServer::start(HookOptions::default());
    let down = HookServer::start(HookOptions::default());
    down.set_down(true);
    let config = format!("{DELIVERY}{}{}", form_hook("up", &up), form_hook("down", &down));
    let mut gw = Gateway::new(&config, &rule_to(&["up", "down"]));
    let id = gw.ingest(&message(1, "x"));
    gw.start();
    up.wait_for_accepted(1, WAIT);
    down.wait_for_requests(3, WAIT);
    let q = gw.queue();
    assert_eq!(q.len(), 1);
    assert_eq!(q[0]["destinations"], "down:pending,up:done");
    down.set_down(false);
    let got = down.wait_for_accepted(1, WAIT);
    assert_eq!(got[0].idempotency_key.as_deref(), Some(id.as_str()));
    gw.wait_queue(WAIT, "an empty spool", |q| q.is_empty());
    assert_eq!(up.requests().len(), 1, "the destination that took it never got it again");
}

#[test]
fn replay_after_a_rules_change_delivers_dead_letters() {
    let hook = HookServer::start(HookOptions::default());
    let config = format!("{DELIVERY}{}", form_hook("form", &hook));
    let mut gw =
        Gateway::new(&config, "[[rule]]\nname = \"invoices\"\nto = [\"form\"]\n[rule.when]\nsubject = '^invoice'\n");
    let id = gw.ingest(&message(1, "shipment"));
    gw.start();
    let q = gw.wait_queue(WAIT, "a dead letter", |q| q.len() == 1 && q[0]["state"] == "dead");
    assert_eq!(q[0]["last_error"], "no rule matched");

    gw.write_rules(
        "20-shipments.toml",
        "[[rule]]\nname = \"shipments\"\nto = [\"form\"]\n[rule.when]\nsubject = '^shipment'\n[rule.extract]\nsubject = '(?P<n>\\d+)$'\n",
    );
    let out = gw.run(&["replay", "--config", "mailhook.toml", "--dead"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("{id}: rule shipments → form"));
    let got = hook.wait_for_accepted(1, WAIT);
    let json = got[0].json.as_ref().unwrap();
    assert_eq!(json["rule"], "shipments");
    assert_eq!(json["fields"]["n"], "1");
    assert_eq!(json["id"], id.as_str());
    gw.wait_queue(WAIT, "an empty spool", |q| q.is_empty());
}

#[test]
fn queue_retry_and_drop() {
    let hook = HookServer::start(HookOptions::default());
    hook.push_status(422);
    hook.push_status(422);
    let mut gw = Gateway::new(&format!("{DELIVERY}{}", form_hook("form", &hook)), &rule_to(&["form"]));
    let a = gw.ingest(&message(1, "a"));
    let b = gw.ingest(&message(2, "b"));
    gw.start();
    gw.wait_queue(WAIT, "two dead letters", |q| q.len() == 2 && q.iter().all(|m| m["state"] == "dead"));

    let show = gw.run(&["queue", "show", "--config", "mailhook.toml", &a]);
    let text = String::from_utf8_lossy(&show.stdout);
    assert!(text.contains("state:       dead") && text.contains("HTTP 422"), "{text}");
    assert!(text.contains("Subject: a 1"), "raw headers are shown: {text}");

    let out = gw.run(&["queue", "drop", "--config", "mailhook.toml", &b]);
    assert!(out.status.success());
    let out = gw.run(&["queue", "retry", "--config", "mailhook.toml", "--all-dead"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("{a}: queued for delivery now"));
    let got = hook.wait_for_accepted(1, WAIT);
    assert_eq!(got[0].idempotency_key.as_deref(), Some(a.as_str()));
    gw.wait_queue(WAIT, "an empty spool", |q| q.is_empty());
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(hook.accepted().len(), 1, "the dropped message was never sent");

    let out = gw.run(&["queue", "show", "--config", "mailhook.toml", &b]);
    assert_eq!(out.status.code(), Some(65));
}

#[test]
fn sigterm_lets_a_delivery_in_flight_finish() {
    let hook = HookServer::start(HookOptions::default());
    hook.set_delay(Duration::from_millis(1500));
    // The archive lives beside the tmpfs: its database, open for writing, would keep the kernel
    // from remounting the spool read-only.
    let archive = "[archive]\npath = \"archive/archive.db\"\n";
    let mut gw = Gateway::new(&format!("{DELIVERY}{archive}{}", form_hook("form", &hook)), &rule_to(&["form"]));
    gw.ingest(&message(1, "x"));
    gw.start();
    hook.wait_for_requests(1, WAIT);
    let started = Instant::now();
    assert_eq!(gw.stop(), 0);
    assert!(started.elapsed() >= Duration::from_millis(1000), "serve waited for the answer");
    assert!(gw.queue().is_empty(), "the delivery in flight completed before exit: {:?}", gw.queue());
    assert_eq!(hook.requests().len(), 1);
}

#[test]
fn acknowledged_messages_survive_kill_9_at_any_moment() {
    let hook = HookServer::start(HookOptions::default());
    hook.set_delay(Duration::from_millis(150));
    let config = format!(
        "[delivery]\ntimeout = \"3s\"\nretry_for = \"1h\"\nbackoff = {{ initial = \"100ms\", max = \"300ms\" }}\nrate = \"off\"\nconcurrency = 4\n{}",
        form_hook("form", &hook)
    );
    let mut gw = Gateway::new(&config, &rule_to(&["form"]));
    let mut ids = HashSet::new();
    for n in 0..40 {
        ids.insert(gw.ingest(&message(n, "crash")));
    }
    let mut rng = 0x2545F4914F6CDD1Du64;
    let mut kills = Vec::new();
    for round in 0..5 {
        gw.start();
        // More mail arrives while serve runs.
        for n in 0..5 {
            ids.insert(gw.ingest(&message(100 + round * 10 + n, "crash")));
        }
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        std::thread::sleep(Duration::from_millis(100 + rng % 700));
        kills.push(Instant::now());
        gw.kill9();
    }
    gw.start();
    gw.wait_queue(Duration::from_secs(60), "every message delivered", |q| q.is_empty());
    let accepted = hook.accepted();
    let mut by_id: HashMap<String, Vec<Instant>> = HashMap::new();
    for r in &accepted {
        let id = r.json.as_ref().unwrap()["id"].as_str().unwrap().to_string();
        assert_eq!(r.idempotency_key.as_deref(), Some(id.as_str()), "a duplicate carries the same key");
        by_id.entry(id).or_default().push(r.at);
    }
    let delivered: HashSet<String> = by_id.keys().cloned().collect();
    let missing: Vec<&String> = ids.difference(&delivered).collect();
    assert!(missing.is_empty(), "acknowledged but never delivered: {missing:?}");
    let duplicates = accepted.len() - delivered.len();
    // A message is sent again only if its attempt was in flight when serve was killed: its
    // first delivery arrived shortly before a kill (the answer takes 150 ms, recording it a
    // few ms more), not at some unrelated time.
    for (id, times) in &by_id {
        if times.len() > 1 {
            let first = times.iter().min().unwrap();
            let near_a_kill = kills.iter().any(|k| *k >= *first && k.duration_since(*first) < Duration::from_secs(2));
            assert!(
                near_a_kill,
                "{id} was delivered {} times, but its first delivery was not in flight at a kill",
                times.len()
            );
        }
    }
    eprintln!("{} messages, {} deliveries, {duplicates} duplicates after 5 kills", ids.len(), accepted.len());
}

#[test]
fn ingest_refuses_with_75_when_the_spool_cannot_take_the_message() {
    let gw =
        Gateway::new(&format!("{DELIVERY}[destination.f]\ntype = \"file\"\npath = \"out.jsonl\"\n"), &rule_to(&["f"]));
    std::fs::remove_dir(gw.path().join("spool")).unwrap();
    let (code, _, err) = gw.ingest_raw(&message(1, "x"), &["a@example.com"]);
    assert_eq!(code, 75, "{err}");
    assert!(err.contains("does not exist"), "{err}");

    // A full and a read-only file system, with a small tmpfs (needs the right to mount).
    let mnt = gw.path().join("spool");
    std::fs::create_dir(&mnt).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=256k", "tmpfs"])
        .arg(&mnt)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("skipping the disk-full and read-only cases: cannot mount a tmpfs here");
        return;
    }
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _guard = Unmount(mnt.clone());
    assert_eq!(gw.ingest_raw(&message(1, "fits"), &["a@example.com"]).0, 0);
    let mut big = message(2, "too big").to_vec();
    big.extend(std::iter::repeat_n(b'x', 400_000));
    let (code, _, err) = gw.ingest_raw(&big, &["a@example.com"]);
    assert_eq!(code, 75, "disk full: {err}");
    assert!(std::fs::read_dir(mnt.join("tmp")).unwrap().next().is_none(), "nothing half-written is left in tmp/");
    assert_eq!(gw.queue().len(), 1, "the one message that fitted");

    let remount = std::process::Command::new("mount").args(["-o", "remount,ro"]).arg(&mnt).status().unwrap();
    assert!(remount.success());
    let (code, _, err) = gw.ingest_raw(&message(3, "read-only"), &["a@example.com"]);
    assert_eq!(code, 75, "read-only: {err}");
}

#[test]
fn a_read_only_spool_pauses_deliveries_instead_of_repeating_them() {
    let hook = HookServer::start(HookOptions::default());
    // The answer comes 1.5 s after the request: time to turn the spool read-only meanwhile.
    hook.set_delay(Duration::from_millis(1500));
    // The archive lives beside the tmpfs: its database, open for writing, would keep the kernel
    // from remounting the spool read-only.
    let archive = "[archive]\npath = \"archive/archive.db\"\n";
    let mut gw = Gateway::new(&format!("{DELIVERY}{archive}{}", form_hook("form", &hook)), &rule_to(&["form"]));
    let mnt = gw.path().join("spool");
    let mount =
        |args: &[&str]| std::process::Command::new("mount").args(args).arg(&mnt).status().is_ok_and(|s| s.success());
    if !mount(&["-t", "tmpfs", "-o", "size=64m", "tmpfs"]) {
        eprintln!("skipping: cannot mount a tmpfs here");
        return;
    }
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _guard = Unmount(mnt.clone());
    let id = gw.ingest(&message(1, "read-only"));
    gw.start();
    hook.wait_for_requests(1, WAIT);
    // The kernel refuses while a file on it is open for writing (serve holds none while idle:
    // its database is closed once unused for a moment).
    let deadline = Instant::now() + Duration::from_secs(5);
    while !mount(&["-o", "remount,ro"]) {
        assert!(Instant::now() < deadline, "cannot remount the spool read-only");
        std::thread::sleep(Duration::from_millis(10));
    }
    // The delivery succeeds but cannot be recorded: the message stays in incoming/. It must not
    // be sent again at every scan while the spool stays read-only.
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(hook.requests().len(), 1, "sent again while the spool could not record it");
    gw.wait_log("the pause", 1, WAIT, |v| v["message"] == "the spool cannot be written; deliveries pause until it can");
    assert!(mount(&["-o", "remount,rw"]));
    gw.wait_queue(WAIT, "an empty spool", |q| q.is_empty());
    gw.wait_log("the resumption", 1, WAIT, |v| v["message"] == "the spool can be written again; deliveries resume");
    // Sent once more (it was never recorded as delivered), with the same id.
    let requests = hook.requests();
    assert_eq!(requests.len(), 2, "{:?}", requests.iter().map(|r| r.summary()).collect::<Vec<_>>());
    assert!(requests.iter().all(|r| r.idempotency_key.as_deref() == Some(id.as_str())));
    assert_eq!(gw.stop(), 0);
}

/// Standard Webhooks: every request carries webhook-id (the spool id), webhook-timestamp and one
/// `v1,` signature per configured secret, which the receiver checks with the spec's formula.
#[test]
fn webhook_with_signing_secrets_is_signed_with_each() {
    use base64::Engine;
    use ring::hmac;
    let hook = HookServer::start(HookOptions::default());
    hook.push_status(503);
    let (old, new) = ("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "whsec_c2VjcmV0LW9mLWEtcm90YXRlZC1lbmRwb2ludA==");
    let config = format!(
        "{DELIVERY}[destination.ops]\ntype = \"webhook\"\nurl = \"{}\"\nsigning_secret = [\"${{OLD}}\", \"${{NEW}}\"]\n",
        hook.url("/hook")
    );
    let mut gw = Gateway::new(&config, &rule_to(&["ops"])).env("OLD", old).env("NEW", new);
    let id = gw.ingest(&message(0, "signed"));
    gw.start();
    let got = hook.wait_for_accepted(1, WAIT);
    let requests = hook.requests();
    assert_eq!(requests.len(), 2, "one refused, one accepted: {requests:?}");
    let expected = |secret: &str, r: &support::hook::Recorded| {
        let key = base64::engine::general_purpose::STANDARD.decode(secret.strip_prefix("whsec_").unwrap()).unwrap();
        let ts = r.header("webhook-timestamp").unwrap();
        let mut signed = format!("{}.{ts}.", r.header("webhook-id").unwrap()).into_bytes();
        signed.extend_from_slice(&r.body);
        let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, &key), &signed);
        format!("v1,{}", base64::engine::general_purpose::STANDARD.encode(tag.as_ref()))
    };
    for r in &requests {
        assert_eq!(r.header("webhook-id"), Some(id.as_str()), "the spool id, the same on the retry");
        let ts: u64 = r.header("webhook-timestamp").unwrap().parse().unwrap();
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
        assert!(ts <= now && now - ts < 60, "timestamp {ts} is not now ({now})");
        assert_eq!(r.header("webhook-signature").unwrap(), format!("{} {}", expected(old, r), expected(new, r)));
    }
    assert_eq!(got[0].header("webhook-id"), Some(id.as_str()));
    assert_eq!(gw.stop(), 0);
    let logs = gw.logs();
    assert!(!logs.contains("MfKQ9r8G") && !logs.contains("c2VjcmV0LW9m"), "a signing secret leaked into the logs");
}

#[test]
fn a_bad_signing_secret_refuses_the_config_without_showing_it() {
    let config = "[destination.ops]\ntype = \"webhook\"\nurl = \"https://ops.example.com/hook\"\nsigning_secret = \"${S}\"\n[destination.k]\ntype = \"kustomer-form-hook\"\nurl = \"https://acme.api.kustomerapp.com/v1/hooks/form/o/h\"\nsigning_secret = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"\n";
    let gw = Gateway::new(config, &rule_to(&["ops"])).env("S", "whsec_c2VjcmV0!!notbase64-secretvalue");
    let out = gw.run(&["check"]);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(78), "{text}");
    assert!(text.contains("destination.ops.signing_secret[0]: the part after \"whsec_\" is not base64"), "{text}");
    assert!(text.contains("destination.k.signing_secret: is not used by type \"kustomer-form-hook\""), "{text}");
    assert!(!text.contains("notbase64-secretvalue"), "{text}");
}
