//! Rule changes and sender changes through a real `mailhook serve`: the shadow run of a reload
//! and its guard, trial rules counted in `/metrics`, and a drift raised by a sender's layout
//! change (metric, `/healthz` warning, notify payload), kept over a restart, then resolved.

mod support;

use serde_json::Value;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use support::gateway::{Gateway, http_get};
use support::hook::{HookOptions, HookServer};

const WAIT: Duration = Duration::from_secs(20);

const UPS: &str = r#"
[[rule]]
name = "ups-delivery-notice"
to = ["orders"]
[rule.when]
from = '@ups\.com$'
[rule.extract]
subject = 'Order (?P<order_id>\d+)'
"#;

/// The UPS rule tightened to one address: notify@ups.com falls through.
const UPS_TIGHT: &str = r#"
[[rule]]
name = "ups-delivery-notice"
to = ["orders"]
[rule.when]
from = '^shipping@ups\.com$'
[rule.extract]
subject = 'Order (?P<order_id>\d+)'
"#;

fn config(rules: &str, extra: &str) -> String {
    format!(
        "[rules]\ndir = \"rules\"\n{rules}\n\
         [destination.orders]\ntype = \"file\"\npath = \"out/events.jsonl\"\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n{extra}"
    )
}

fn mail(from: &str, subject: &str, body: &str) -> Vec<u8> {
    format!("From: {from}\r\nTo: hook@example.com\r\nSubject: {subject}\r\n\r\n{body}\r\n").into_bytes()
}

fn get_json(admin: SocketAddr, path: &str) -> Value {
    let (status, _, body) = http_get(admin, path, None);
    assert_eq!(status, 200, "GET {path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"))
}

/// Waits until the archive (through the console's API) holds `n` messages.
fn wait_archived(admin: SocketAddr, n: usize) {
    let deadline = Instant::now() + WAIT;
    loop {
        let list = get_json(admin, "/api/v1/messages?limit=500");
        if list["messages"].as_array().map_or(0, Vec::len) >= n {
            return;
        }
        assert!(Instant::now() < deadline, "the archive did not reach {n} messages: {list}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn metric(admin: SocketAddr, series: &str) -> Option<f64> {
    let (status, _, body) = http_get(admin, "/metrics", None);
    assert_eq!(status, 200);
    body.lines().find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')).map(|v| v.parse().unwrap()))
}

fn wait_metric(admin: SocketAddr, series: &str, value: f64) {
    let deadline = Instant::now() + WAIT;
    while metric(admin, series) != Some(value) {
        assert!(Instant::now() < deadline, "{series} is {:?}, not {value}", metric(admin, series));
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn delivered_rules(gw: &Gateway) -> Vec<Value> {
    let text = std::fs::read_to_string(gw.path().join("out/events.jsonl")).unwrap_or_default();
    text.lines().map(|l| serde_json::from_str::<Value>(l).unwrap()["rule"].clone()).collect()
}

fn wait_delivered(gw: &Gateway, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + WAIT;
    loop {
        let rules = delivered_rules(gw);
        if rules.len() >= n {
            return rules;
        }
        assert!(Instant::now() < deadline, "only {} of {n} delivered; logs:\n{}", rules.len(), gw.logs());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Starts serve with the UPS rule, and archives one mail of each of two UPS senders.
fn running_with_history(guard: &str) -> (Gateway, SocketAddr) {
    let mut gw = Gateway::new(&config(guard, ""), UPS);
    gw.start();
    let admin = gw.listening("admin");
    gw.ingest(&mail("shipping@ups.com", "Order 4711 shipped", "On its way."));
    gw.ingest(&mail("notify@ups.com", "Order 4712 shipped", "On its way."));
    wait_archived(admin, 2);
    (gw, admin)
}

#[test]
fn guard_refuse_keeps_the_old_rules_when_a_matched_sender_would_fall_through() {
    let (gw, admin) = running_with_history("guard = \"refuse\"");
    gw.write_rules("10-test.toml", UPS_TIGHT);
    let refused = gw.wait_log("the guard's refusal", 1, WAIT, |v| {
        v["message"].as_str().is_some_and(|m| m.starts_with("rules reload refused by [rules] guard = \"refuse\""))
    });
    let message = refused[0]["message"].as_str().unwrap();
    assert!(message.contains("1 message(s) that a rule matched would be unmatched or dead"), "{message}");
    assert!(message.contains("from notify@ups.com (newly unmatched)"), "{message}");

    let changes = get_json(admin, "/api/v1/changes");
    let reload = &changes["reload"];
    assert_eq!(reload["applied"], false, "{changes:#}");
    assert_eq!(reload["counts"]["judged"], 2);
    assert_eq!(reload["counts"]["newlyUnmatched"], 1);
    assert_eq!(reload["differences"][0]["sender"], "notify@ups.com");
    assert_eq!(
        reload["differences"][0]["lines"],
        serde_json::json!([
            "rule: ups-delivery-notice → (none)",
            "action: deliver to orders → dead (no rule matched)",
            "fields.order_id: 4712 → (missing)"
        ])
    );

    // The old rules still serve: notify@ups.com is still delivered by the UPS rule.
    gw.ingest(&mail("notify@ups.com", "Order 4713 shipped", "On its way."));
    let rules = wait_delivered(&gw, 3);
    assert_eq!(rules[2], "ups-delivery-notice");
    assert_eq!(metric(admin, "mailhook_rules_reloads_total{result=\"error\"}"), Some(1.0));
}

#[test]
fn guard_warn_applies_the_new_rules_and_the_console_shows_the_diff() {
    let (gw, admin) = running_with_history("");
    gw.write_rules("10-test.toml", UPS_TIGHT);
    gw.wait_log("rules reloaded", 1, WAIT, |v| v["message"] == "rules reloaded");
    let warned = gw.log_lines().into_iter().filter(|v| {
        v["level"] == "WARN"
            && v["message"].as_str().is_some_and(|m| m.starts_with("the new rules break mail that worked"))
    });
    assert_eq!(warned.count(), 1);
    let summary = gw.wait_log("the shadow summary", 1, WAIT, |v| {
        v["message"].as_str().is_some_and(|m| m.starts_with("shadow run of the new rules:"))
    });
    assert_eq!(
        summary[0]["message"],
        "shadow run of the new rules: 1 unchanged, 0 changed rule, 0 newly matched, 1 newly unmatched, 0 newly dead, 0 changed fields"
    );
    assert_eq!(get_json(admin, "/api/v1/changes")["reload"]["applied"], true);

    let (status, _, page) = http_get(admin, "/changes", None);
    assert_eq!(status, 200);
    assert!(page.contains("fields.order_id: 4712 → (missing)"), "{page}");
    assert!(page.contains("notify@ups.com"), "{page}");

    // The new rules serve: notify@ups.com is now a dead letter.
    let id = gw.ingest(&mail("notify@ups.com", "Order 4714 shipped", "On its way."));
    gw.wait_queue(WAIT, "the new mail dead", |q| q.iter().any(|m| m["id"] == id.as_str() && m["state"] == "dead"));
}

#[test]
fn trial_rules_are_judged_beside_the_live_ones_and_counted_never_delivered() {
    let mut gw = Gateway::new(&config("trial_dir = \"trial\"", ""), UPS);
    std::fs::create_dir(gw.path().join("trial")).unwrap();
    std::fs::write(gw.path().join("trial/10-ups.toml"), UPS_TIGHT).unwrap();
    gw.start();
    let admin = gw.listening("admin");
    gw.ingest(&mail("shipping@ups.com", "Order 1 shipped", "x"));
    gw.ingest(&mail("notify@ups.com", "Order 2 shipped", "x"));
    gw.ingest(&mail("notify@ups.com", "Order 3 shipped", "x"));
    let rules = wait_delivered(&gw, 3);
    assert!(rules.iter().all(|r| r == "ups-delivery-notice"), "the live rules decide: {rules:?}");
    wait_metric(admin, "mailhook_trial_diff_total{kind=\"newly_unmatched\"}", 2.0);
    assert_eq!(metric(admin, "mailhook_trial_diff_total{kind=\"changed_rule\"}"), Some(0.0));
    let trial = &get_json(admin, "/api/v1/changes")["trial"];
    assert_eq!(trial["recent"].as_array().unwrap().len(), 2, "{trial:#}");
    assert_eq!(trial["recent"][0]["kind"], "newly_unmatched");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(delivered_rules(&gw).len(), 3, "nothing more was delivered");

    // A change in the trial directory alone is seen before the next message is judged: the
    // trial now holds the live rule, so it agrees.
    std::fs::write(gw.path().join("trial/10-ups.toml"), UPS).unwrap();
    gw.ingest(&mail("notify@ups.com", "Order 4 shipped", "x"));
    wait_delivered(&gw, 4);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(metric(admin, "mailhook_trial_diff_total{kind=\"newly_unmatched\"}"), Some(2.0), "the new trial agrees");
}

const ERP: &str = r#"
[[rule]]
name = "erp-order"
to = ["orders"]
[rule.when]
from = '@erp\.example$'
[rule.extract]
body = ['Order No\.\s*(?P<order_id>\d+)', 'Customer:\s*(?P<customer>\w+)']
"#;

fn erp_mail(n: usize, new_layout: bool) -> Vec<u8> {
    let label = if new_layout { "Order number:" } else { "Order No." };
    mail("erp@erp.example", &format!("Order confirmation {n}"), &format!("{label} {n}\r\nCustomer: acme{n}"))
}

/// Ingests mails `range` in one layout and waits until all `total` so far are delivered.
fn phase(gw: &Gateway, range: std::ops::Range<usize>, new_layout: bool, total: usize) {
    for n in range {
        gw.ingest(&erp_mail(n, new_layout));
    }
    wait_delivered(gw, total);
}

#[test]
fn a_layout_change_raises_one_drift_that_survives_a_restart_and_resolves_on_return() {
    let hook = HookServer::start(HookOptions::default());
    let extra = format!(
        "[drift]\nwindow = 10\nmin_messages = 5\nnotify = \"alerts\"\n\
         [destination.alerts]\ntype = \"webhook\"\nurl = \"{}\"\n",
        hook.url("/drift")
    );
    let mut gw = Gateway::new(&config("", &extra), ERP);
    gw.start();
    let admin = gw.listening("admin");
    phase(&gw, 0..20, false, 20);
    assert_eq!(metric(admin, "mailhook_rule_field_fill_ratio{rule=\"erp-order\",field=\"order_id\"}"), Some(1.0));
    assert!(hook.requests().is_empty());

    phase(&gw, 20..35, true, 35);
    let sent = hook.wait_for_accepted(1, WAIT);
    let drift = sent[0].json.clone().unwrap();
    assert_eq!(drift["event"], "rule.drift");
    assert_eq!(drift["rule"], "erp-order");
    assert_eq!(drift["field"], "order_id");
    assert_eq!(drift["sender"], "erp@erp.example");
    assert_eq!(drift["before"], 1.0);
    assert_eq!(drift["now"], 0.4);
    let examples = drift["examples"].as_str().unwrap();
    assert_eq!(examples.split(',').count(), 3, "{examples}");
    assert!(examples.split(',').all(|u| u.starts_with(&format!("http://{admin}/messages/"))), "{examples}");
    wait_metric(admin, "mailhook_drift_active{rule=\"erp-order\",field=\"order_id\"}", 1.0);
    assert_eq!(metric(admin, "mailhook_rule_field_fill_ratio{rule=\"erp-order\",field=\"order_id\"}"), Some(0.0));
    let health = get_json(admin, "/healthz");
    assert_eq!(health["status"], "ok");
    let warnings = health["warnings"].as_array().unwrap();
    assert_eq!(warnings.len(), 1, "{health}");
    // The warning follows the last window: all 10 of the new layout now.
    let warning = warnings[0].as_str().unwrap();
    assert!(
        warning.starts_with("drift: rule erp-order field order_id from erp@erp.example: 100% before, 0% now"),
        "{warning}"
    );

    let drifts = get_json(admin, "/api/v1/changes")["drifts"].clone();
    assert_eq!(drifts.as_array().map(Vec::len), Some(1), "{drifts}");
    assert_eq!(
        (drifts[0]["field"].as_str(), drifts[0]["sender"].as_str()),
        (Some("order_id"), Some("erp@erp.example"))
    );
    let example = drifts[0]["examples"][0].as_str().unwrap().to_string();
    let (status, _, page) = http_get(admin, "/drift", None);
    assert_eq!(status, 200);
    assert!(page.contains(&format!("<a href=\"/messages/{example}\">{example}</a>")), "{page}");
    assert!(page.contains(&format!("<a href=\"/playground?id={example}\">try in the playground</a>")), "{page}");
    let (status, _, page) = http_get(admin, "/changes", None);
    assert_eq!(status, 200);
    assert!(page.contains("1 drift in progress: see <a href=\"/drift\">Drift</a>."), "{page}");

    // A restart keeps the drift (and does not announce it again).
    assert_eq!(gw.stop(), 0);
    assert!(gw.path().join("spool/lifecycle/drift.json").is_file());
    gw.start();
    let admin = gw.listening("admin");
    assert_eq!(get_json(admin, "/healthz")["warnings"].as_array().map(Vec::len), Some(1));
    wait_metric(admin, "mailhook_drift_active{rule=\"erp-order\",field=\"order_id\"}", 1.0);

    phase(&gw, 35..50, false, 50);
    let sent = hook.wait_for_accepted(2, WAIT);
    let resolved = sent[1].json.clone().unwrap();
    assert_eq!(resolved["event"], "rule.drift.resolved");
    assert_eq!((resolved["field"].as_str(), resolved["before"].as_f64()), (Some("order_id"), Some(1.0)));
    wait_metric(admin, "mailhook_drift_active{rule=\"erp-order\",field=\"order_id\"}", 0.0);
    assert_eq!(get_json(admin, "/healthz").get("warnings"), None);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(hook.requests().len(), 2, "exactly one drift and one resolution");
}

#[test]
fn the_rule_changes_page_needs_the_login_and_carries_the_security_headers() {
    let token = "ch4nges-t0ken";
    let mut gw = Gateway::new(&config("", &format!("token = \"{token}\"\n")), UPS);
    gw.start();
    let admin = gw.listening("admin");
    let (status, _, _) = http_get(admin, "/api/v1/changes", None);
    assert_eq!(status, 401, "the API wants the bearer token");
    let (status, _, body) = http_get(admin, "/api/v1/changes", Some(token));
    assert_eq!(status, 200, "{body}");
    let changes: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(changes["reload"], Value::Null, "no reload yet");
    assert_eq!(changes["trial"], Value::Null, "no trial_dir");
    assert_eq!(changes["drifts"], serde_json::json!([]));

    // The page without a session goes to the login, with the console's headers.
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(admin).unwrap();
    write!(stream, "GET /changes HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n").unwrap();
    let mut head = String::new();
    stream.read_to_string(&mut head).unwrap();
    let head = head.to_lowercase();
    assert!(head.starts_with("http/1.1 303"), "{head}");
    assert!(head.contains("location: /login"), "{head}");
    assert!(head.contains("content-security-policy:"), "{head}");
    assert!(head.contains("referrer-policy: no-referrer"), "{head}");
}
