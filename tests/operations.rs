//! The operating side of `mailhook serve`, through the real binary and real sockets on
//! 127.0.0.1: the admin endpoint (`/healthz`, `/metrics`, its token), hot reload of the rules
//! (directory changes and SIGHUP), and SIGTERM while mail is coming in or going out.

mod support;

use serde_json::Value;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};
use support::gateway::{Gateway, http_get, message};
use support::hook::{HookOptions, HookServer};
use support::smtp_client::SmtpClient;
use support::tmpfs::Tmpfs;

const WAIT: Duration = Duration::from_secs(20);

/// SMTP and the admin endpoint on free loopback ports; fast retries.
const BASE: &str = "[smtp]\nlisten = [\"127.0.0.1:0\"]\nrecipients = ['@example\\.com$']\n\n\
                    [admin]\nlisten = \"127.0.0.1:0\"\n\n\
                    [delivery]\ntimeout = \"5s\"\nretry_for = \"1h\"\nbackoff = { initial = \"200ms\", max = \"500ms\" }\nrate = \"off\"\n";

/// `file` destinations `a`, `b`, `c` and `rest` (where unmatched mail goes), under `out/`.
const FILES: &str = "[rules]\ndir = \"rules\"\nunmatched = \"rest\"\n\n\
                     [destination.a]\ntype = \"file\"\npath = \"out/a.jsonl\"\n\
                     [destination.b]\ntype = \"file\"\npath = \"out/b.jsonl\"\n\
                     [destination.c]\ntype = \"file\"\npath = \"out/c.jsonl\"\n\
                     [destination.rest]\ntype = \"file\"\npath = \"out/rest.jsonl\"\n";

/// A rule `name` sending mail whose subject contains `subject` to `to`.
fn rule(name: &str, subject: &str, to: &str) -> String {
    format!("[[rule]]\nname = \"{name}\"\nto = [\"{to}\"]\n\n[rule.when]\nsubject = '{subject}'\n")
}

/// Sends one message over SMTP; returns the spool id from the `250` reply.
fn send(addr: SocketAddr, rcpt: &str, n: usize, subject: &str) -> String {
    let mut c = SmtpClient::connect(addr);
    c.hello("EHLO", "client.test");
    c.expect("MAIL FROM:<sender@example.com>", &["250"]);
    c.expect(&format!("RCPT TO:<{rcpt}>"), &["250"]);
    let reply = c.data(&message(n, subject));
    if reply.code != 250 {
        c.fail("message not accepted");
    }
    c.expect("QUIT", &["221"]);
    reply.text().rsplit(' ').next().unwrap().to_string()
}

/// The JSON lines a `file` destination has written so far (whole lines only).
fn lines(gw: &Gateway, dest: &str) -> Vec<Value> {
    std::fs::read_to_string(gw.path().join("out").join(format!("{dest}.jsonl")))
        .unwrap_or_default()
        .split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

/// Waits until destination `dest` has a payload with spool id `id`; returns it.
fn wait_delivered(gw: &Gateway, dest: &str, id: &str) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = lines(gw, dest).into_iter().find(|v| v["id"] == id) {
            return v;
        }
        if Instant::now() > deadline {
            let others: Vec<String> =
                ["a", "b", "c", "rest"].iter().map(|d| format!("{d}: {:?}", lines(gw, d))).collect();
            panic!("{id} never reached {dest}; {}\nlogs:\n{}", others.join("\n"), gw.logs());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn is_reload(v: &Value) -> bool {
    v["message"] == "rules reloaded"
}

fn is_refusal(v: &Value) -> bool {
    v["message"].as_str().is_some_and(|m| m.starts_with("rules reload refused"))
}

/// How many log lines of the current run `pred` accepts.
fn count(gw: &Gateway, pred: fn(&Value) -> bool) -> usize {
    gw.log_lines().iter().filter(|v| pred(v)).count()
}

/// Runs `change`, then waits for the next reload log line `pred` accepts.
fn after_reload(gw: &Gateway, what: &str, pred: fn(&Value) -> bool, change: impl FnOnce()) -> Value {
    let before = count(gw, pred);
    change();
    gw.wait_log(what, before + 1, WAIT, pred).pop().unwrap()
}

fn scrape(admin: SocketAddr, token: Option<&str>) -> prometheus_parse::Scrape {
    let (status, content_type, body) = http_get(admin, "/metrics", token);
    assert_eq!(status, 200, "{body}");
    assert_eq!(content_type, "text/plain; version=0.0.4");
    prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string())))
        .unwrap_or_else(|e| panic!("not the Prometheus text format: {e}\n{body}"))
}

/// The value of the sample `name` whose labels include `labels`.
fn sample(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    let found = scrape
        .samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .unwrap_or_else(|| panic!("no sample {name} {labels:?}"));
    match &found.value {
        prometheus_parse::Value::Counter(v)
        | prometheus_parse::Value::Gauge(v)
        | prometheus_parse::Value::Untyped(v) => *v,
        prometheus_parse::Value::Histogram(buckets) => buckets.last().map_or(0.0, |b| b.count),
        other => panic!("{name}: unexpected {other:?}"),
    }
}

#[test]
fn metrics_count_the_mail_sent_in_prometheus_text_format() {
    // invoices needs a total that its mail does not have: a dead letter.
    let rules = format!(
        "{}\n[[rule]]\nname = \"invoices\"\nto = [\"b\"]\nrequire = [\"total\"]\n[rule.when]\nsubject = 'Invoice'\n\
         [rule.extract]\nbody = 'total (?P<total>\\d+)'\n",
        rule("orders", "Order", "a")
    );
    let mut gw = Gateway::new(&format!("{BASE}{FILES}"), &rules);
    gw.start();
    let smtp = gw.listening("smtp");
    let admin = gw.listening("admin");

    let o1 = send(smtp, "hook@example.com", 1, "Order");
    let o2 = send(smtp, "hook@example.com", 2, "Order");
    let other = send(smtp, "hook@example.com", 3, "Newsletter");
    send(smtp, "hook@example.com", 4, "Invoice"); // no total in the body: a dead letter
    let stdin = gw.ingest(&message(5, "Order"));
    // A recipient outside `recipients` is refused.
    let mut c = SmtpClient::connect(smtp);
    c.hello("EHLO", "client.test");
    c.expect("MAIL FROM:<sender@example.com>", &["250"]);
    c.expect("RCPT TO:<someone@elsewhere.test>", &["550"]);
    c.expect("QUIT", &["221"]);

    for id in [&o1, &o2, &stdin] {
        wait_delivered(&gw, "a", id);
    }
    wait_delivered(&gw, "rest", &other);
    gw.wait_queue(WAIT, "one dead letter", |q| q.len() == 1 && q[0]["state"] == "dead");

    let s = scrape(admin, None);
    let received = |source| sample(&s, "mailhook_messages_received_total", &[("source", source)]);
    assert_eq!((received("smtp"), received("stdin"), received("lmtp")), (4.0, 1.0, 0.0));
    assert_eq!(sample(&s, "mailhook_rule_matches_total", &[("rule", "orders")]), 3.0);
    assert_eq!(sample(&s, "mailhook_rule_matches_total", &[("rule", "invoices")]), 1.0);
    assert_eq!(sample(&s, "mailhook_unmatched_total", &[]), 1.0);
    assert_eq!(sample(&s, "mailhook_extraction_failures_total", &[("rule", "invoices")]), 1.0);
    assert_eq!(sample(&s, "mailhook_extraction_failures_total", &[("rule", "orders")]), 0.0);
    let deliveries =
        |dest, outcome| sample(&s, "mailhook_deliveries_total", &[("destination", dest), ("outcome", outcome)]);
    assert_eq!(deliveries("a", "delivered"), 3.0);
    assert_eq!(deliveries("rest", "delivered"), 1.0);
    assert_eq!(deliveries("b", "delivered"), 0.0);
    assert_eq!(deliveries("a", "deferred"), 0.0);
    assert_eq!(sample(&s, "mailhook_delivery_duration_seconds", &[("destination", "a")]), 3.0);
    assert_eq!(sample(&s, "mailhook_dead_letters", &[]), 1.0);
    assert_eq!(sample(&s, "mailhook_deferred_messages", &[]), 0.0);
    assert_eq!(sample(&s, "mailhook_connections_total", &[("protocol", "smtp")]), 5.0);
    assert_eq!(sample(&s, "mailhook_rejections_total", &[("protocol", "smtp"), ("reason", "unknown_recipient")]), 1.0);
    assert_eq!(sample(&s, "mailhook_listener_up", &[("protocol", "smtp"), ("addr", &smtp.to_string())]), 1.0);
    assert_eq!(sample(&s, "mailhook_rules", &[]), 2.0);
    assert_eq!(sample(&s, "mailhook_rules_reloads_total", &[("result", "ok")]), 0.0);

    // Every log line about a message carries its spool id.
    let about = |id: &str| -> Vec<String> {
        gw.log_lines().iter().filter(|v| v["id"] == id).map(|v| v["message"].as_str().unwrap().to_string()).collect()
    };
    assert_eq!(about(&o1), ["accepted", "matched", "delivered"]);
    assert_eq!(about(&stdin), ["matched", "delivered"]);
    let dead: Vec<Value> = gw.log_lines().into_iter().filter(|v| v["message"] == "dead letter").collect();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!((dead[0]["level"].as_str(), dead[0]["rule"].as_str()), (Some("ERROR"), Some("invoices")));
    assert_eq!(dead[0]["id"].as_str().map(str::len), Some(26));
    assert_eq!(gw.stop(), 0);
}

#[test]
fn healthz_is_ok_and_other_paths_are_404() {
    let mut gw = Gateway::new(&format!("{BASE}{FILES}"), &rule("orders", "Order", "a"));
    gw.start();
    gw.listening("smtp");
    let admin = gw.listening("admin");
    let (status, content_type, body) = http_get(admin, "/healthz", None);
    assert_eq!((status, content_type.as_str()), (200, "application/json"), "{body}");
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap(), serde_json::json!({"status": "ok"}));
    assert_eq!(http_get(admin, "/nothing-here", None).0, 404);
    assert_eq!(gw.stop(), 0);
}

#[test]
fn healthz_is_503_while_the_spool_cannot_be_written() {
    let mut gw = Gateway::new(&format!("{BASE}{FILES}"), &rule("orders", "Order", "a"));
    // spool/tmp/ on its own small tmpfs, which the test turns read-only and back (needs the
    // right to mount; root alone ignores file modes, so chmod would prove nothing).
    let tmpfs = match Tmpfs::mount(&gw.path().join("spool/tmp"), "1m") {
        Ok(t) => t,
        Err(e) => {
            eprintln!("skipping: cannot mount a tmpfs here: {e}");
            return;
        }
    };
    gw.start();
    gw.listening("smtp");
    let admin = gw.listening("admin");
    assert_eq!(http_get(admin, "/healthz", None).0, 200);

    tmpfs.remount(true).expect("remount read-only");
    let (status, _, body) = http_get(admin, "/healthz", None);
    assert_eq!(status, 503, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["status"], "unhealthy");
    let problems: Vec<&str> = v["problems"].as_array().unwrap().iter().map(|p| p.as_str().unwrap()).collect();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].starts_with("spool ") && problems[0].contains("cannot write"), "{problems:?}");
    assert!(problems[0].contains("Read-only file system"), "{problems:?}");

    tmpfs.remount(false).expect("remount read-write");
    assert_eq!(http_get(admin, "/healthz", None).0, 200);
    assert_eq!(gw.stop(), 0);
}

#[test]
fn admin_token_is_required_and_never_logged() {
    let token = "adm1n-t0ken-XYZ";
    let config = format!("{BASE}{FILES}").replace(
        "[admin]\nlisten = \"127.0.0.1:0\"\n",
        "[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"${ADMIN_TOKEN}\"\n",
    );
    let mut gw = Gateway::new(&config, &rule("orders", "Order", "a")).env("ADMIN_TOKEN", token);
    gw.start();
    gw.listening("smtp");
    let admin = gw.listening("admin");
    for path in ["/healthz", "/metrics", "/nothing-here"] {
        assert_eq!(http_get(admin, path, None).0, 401, "{path} without a token");
        assert_eq!(http_get(admin, path, Some("adm1n-t0ken-XY")).0, 401, "{path} with a prefix of the token");
        assert_eq!(http_get(admin, path, Some("adm1n-t0ken-XYZW")).0, 401, "{path} with a longer token");
    }
    assert_eq!(http_get(admin, "/healthz", Some(token)).0, 200);
    assert_eq!(http_get(admin, "/nothing-here", Some(token)).0, 404);
    let s = scrape(admin, Some(token));
    assert_eq!(sample(&s, "mailhook_rules", &[]), 1.0);
    assert_eq!(gw.stop(), 0);
    assert!(!gw.logs().contains("t0ken"), "the admin token leaked into the logs:\n{}", gw.logs());
}

#[test]
fn an_admin_port_in_use_refuses_to_start() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let config = format!("{BASE}{FILES}").replace("listen = \"127.0.0.1:0\"", &format!("listen = \"{addr}\""));
    let mut gw = Gateway::new(&config, &rule("orders", "Order", "a"));
    gw.start();
    assert_eq!(gw.wait_exit(WAIT), 75, "{}", gw.logs());
    assert!(gw.logs().contains(&format!("admin.listen: cannot listen on {addr}")), "{}", gw.logs());
}

#[test]
fn rules_reload_when_a_file_is_created_changed_or_removed() {
    let mut gw = Gateway::new(&format!("{BASE}{FILES}"), &rule("alpha", "alpha", "a"));
    gw.start();
    let smtp = gw.listening("smtp");
    gw.wait_log("the rules watcher", 1, WAIT, |v| v["message"] == "watching the rules directory");
    let id = send(smtp, "hook@example.com", 1, "beta");
    assert_eq!(wait_delivered(&gw, "rest", &id)["rule"], Value::Null);

    // Created: beta mail now goes to b.
    let reload = after_reload(&gw, "a reload after a new file", is_reload, || {
        gw.write_rules("20-beta.toml", &rule("beta", "beta", "b"));
    });
    assert_eq!((reload["rules"].as_u64(), reload["files"].as_u64()), (Some(2), Some(2)), "{reload}");
    let id = send(smtp, "hook@example.com", 2, "beta");
    assert_eq!(wait_delivered(&gw, "b", &id)["rule"], "beta");

    // Changed: to c.
    after_reload(&gw, "a reload after a change", is_reload, || {
        gw.write_rules("20-beta.toml", &rule("beta", "beta", "c"));
    });
    let id = send(smtp, "hook@example.com", 3, "beta");
    assert_eq!(wait_delivered(&gw, "c", &id)["rule"], "beta");

    // Removed: unmatched again; alpha still served.
    let reload = after_reload(&gw, "a reload after a removal", is_reload, || {
        std::fs::remove_file(gw.path().join("rules/20-beta.toml")).unwrap();
    });
    assert_eq!(reload["rules"].as_u64(), Some(1), "{reload}");
    let id = send(smtp, "hook@example.com", 4, "beta");
    assert_eq!(wait_delivered(&gw, "rest", &id)["rule"], Value::Null);
    let id = send(smtp, "hook@example.com", 5, "alpha");
    assert_eq!(wait_delivered(&gw, "a", &id)["rule"], "alpha");

    let s = scrape(gw.listening("admin"), None);
    assert_eq!(sample(&s, "mailhook_rules_reloads_total", &[("result", "ok")]), 3.0);
    assert_eq!(sample(&s, "mailhook_rule_matches_total", &[("rule", "beta")]), 2.0);
    assert_eq!(gw.stop(), 0);
}

#[test]
fn a_broken_edit_is_refused_and_the_old_rules_serve_until_it_is_fixed() {
    let mut gw = Gateway::new(&format!("{BASE}{FILES}"), &rule("alpha", "alpha", "a"));
    gw.start();
    let smtp = gw.listening("smtp");
    gw.wait_log("the rules watcher", 1, WAIT, |v| v["message"] == "watching the rules directory");

    // An unclosed group and an unclosed class.
    let broken = format!("{}\n{}", rule("alpha", "(alpha", "a"), rule("gamma", "[gamma", "c"));
    let summary = after_reload(&gw, "a refused reload", is_refusal, || gw.write_rules("10-test.toml", &broken));
    assert_eq!(summary["level"], "ERROR");
    assert_eq!(summary["errors"].as_u64(), Some(2), "{summary}");
    let errors: Vec<Value> = gw
        .log_lines()
        .into_iter()
        .filter(|v| v["message"].as_str().is_some_and(|m| m.starts_with("rules error:")))
        .collect();
    assert_eq!(errors.len(), 2, "{errors:#?}");
    let regex = errors.iter().find(|e| e["rule"] == "alpha").expect("the regex error names its rule");
    assert_eq!(regex["level"], "ERROR");
    assert_eq!(regex["key"], "when.subject");
    assert!(regex["file"].as_str().unwrap().ends_with("rules/10-test.toml"), "{regex}");
    assert!(regex["line"].as_u64().is_some(), "{regex}");
    let class = errors.iter().find(|e| e["rule"] == "gamma").expect("the second error names its rule");
    assert_eq!(class["key"], "when.subject");
    assert!(class["message"].as_str().unwrap().contains("[gamma"), "{class}");

    // The old set still serves.
    let id = send(smtp, "hook@example.com", 1, "alpha");
    assert_eq!(wait_delivered(&gw, "a", &id)["rule"], "alpha");

    // The fix is picked up.
    after_reload(&gw, "a reload after the fix", is_reload, || {
        gw.write_rules("10-test.toml", &format!("{}\n{}", rule("alpha", "alpha", "b"), rule("gamma", "gamma", "c")));
    });
    let id = send(smtp, "hook@example.com", 2, "alpha");
    assert_eq!(wait_delivered(&gw, "b", &id)["rule"], "alpha");
    let id = send(smtp, "hook@example.com", 3, "gamma");
    assert_eq!(wait_delivered(&gw, "c", &id)["rule"], "gamma");

    let s = scrape(gw.listening("admin"), None);
    assert_eq!(sample(&s, "mailhook_rules_reloads_total", &[("result", "error")]), 1.0);
    assert_eq!(sample(&s, "mailhook_rules_reloads_total", &[("result", "ok")]), 1.0);
    assert_eq!(gw.stop(), 0);
}

#[test]
fn sighup_reloads_the_rules() {
    // The rule file is a symlink to a file outside the watched directory: changing it makes no
    // event there, so only SIGHUP can bring the change in.
    let mut gw = Gateway::new(&format!("{BASE}{FILES}"), &rule("alpha", "alpha", "a"));
    let outside = gw.path().join("managed");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("beta.toml"), rule("beta", "beta", "b")).unwrap();
    std::os::unix::fs::symlink(Path::new("../managed/beta.toml"), gw.path().join("rules/20-beta.toml")).unwrap();
    gw.start();
    let smtp = gw.listening("smtp");
    gw.wait_log("the rules watcher", 1, WAIT, |v| v["message"] == "watching the rules directory");
    let id = send(smtp, "hook@example.com", 1, "beta");
    wait_delivered(&gw, "b", &id);

    std::fs::write(outside.join("beta.toml"), rule("beta", "beta", "c")).unwrap();
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(count(&gw, is_reload), 0, "the watcher saw a change outside its directory");
    let reload = after_reload(&gw, "a reload on SIGHUP", is_reload, || gw.hup());
    assert_eq!(reload["trigger"], "Hangup", "{reload}");
    assert_eq!(reload["rules"].as_u64(), Some(2), "{reload}");
    let id = send(smtp, "hook@example.com", 2, "beta");
    assert_eq!(wait_delivered(&gw, "c", &id)["rule"], "beta");
    assert_eq!(gw.stop(), 0);
}

/// Writes `raw` under `id` in the file format of older versions: `incoming/ID.msg`, the raw
/// message followed by a line of metadata and a footer giving the raw message's size.
fn write_old_spool_entry(gw: &Gateway, id: &str, raw: &[u8], meta: &Value) {
    let incoming = gw.path().join("spool/incoming");
    std::fs::create_dir_all(&incoming).unwrap();
    let mut meta = meta.clone();
    meta["id"] = id.into();
    meta["envelope"]["id"] = id.into();
    meta["size"] = raw.len().into();
    let mut file = raw.to_vec();
    file.extend_from_slice(format!("\n{meta}\nmailhook-spool-1 {:020}\n", raw.len()).as_bytes());
    std::fs::write(incoming.join(format!("{id}.msg")), file).unwrap();
}

#[test]
fn a_spool_left_by_an_older_version_is_drained_and_delivered() {
    let mut gw = Gateway::new(&format!("{BASE}{FILES}"), &rule("orders", "Order", "a"));
    let meta = gw.show(&gw.ingest(&message(0, "Order template")))["meta"].clone();
    let ids: Vec<String> = (1..=20).map(|_| ulid::Ulid::generate().to_string()).collect();
    for (n, id) in ids.iter().enumerate() {
        write_old_spool_entry(&gw, id, &message(n + 1, &format!("Order {n}")), &meta);
    }
    gw.start();
    for (n, id) in ids.iter().enumerate() {
        assert_eq!(wait_delivered(&gw, "a", id)["subject"], format!("Order {n} {}", n + 1));
    }
    gw.wait_queue(WAIT, "an empty spool", |q| q.is_empty());
    assert!(!gw.path().join("spool/incoming").exists(), "the old directory is removed once drained");
    assert_eq!(gw.stop(), 0);
}

#[test]
fn sigterm_while_starting_ends_the_run_cleanly() {
    let mut gw = Gateway::new(&format!("{BASE}{FILES}"), &rule("orders", "Order", "a"));
    // A spool with 5,000 messages waiting in the file format of older versions, so that
    // start-up has a while of recovering (draining them into the database) to do.
    let raw = message(0, "Order waiting");
    let meta = gw.show(&gw.ingest(&raw))["meta"].clone();
    for _ in 1..5_000 {
        write_old_spool_entry(&gw, &ulid::Ulid::generate().to_string(), &raw, &meta);
    }
    gw.start();
    // The rules are loaded before the spool is recovered and the listeners bound.
    gw.wait_log("rules loaded", 1, WAIT, |v| v["message"] == "rules loaded");
    gw.term();
    assert_eq!(gw.wait_exit(WAIT), 0, "logs:\n{}", gw.logs());
    assert_eq!(gw.log_lines().last().map(|v| v["message"].clone()), Some("stopped".into()), "logs:\n{}", gw.logs());
}

#[test]
fn sigterm_mid_data_loses_no_acknowledged_message() {
    let mut gw = Gateway::new(&format!("{BASE}{FILES}"), &rule("all", ".", "a"));
    gw.start();
    let smtp = gw.listening("smtp");
    let mut c = SmtpClient::connect(smtp);
    c.hello("EHLO", "client.test");
    c.expect("MAIL FROM:<sender@example.com>", &["250"]);
    c.expect("RCPT TO:<hook@example.com>", &["250"]);
    c.expect("DATA", &["354"]);
    let full = message(1, "in flight");
    let (head, tail) = full.split_at(full.len() / 2);
    c.send_raw(head);

    gw.term();
    gw.wait_log("shutdown", 1, WAIT, |v| v["message"] == "shutting down: refusing new connections");
    // New connections are turned away while the open transaction may finish.
    let mut late = SmtpClient::connect(smtp);
    late.expect_reply(&["421 4.3.2"]);

    c.send_raw(tail);
    c.send_raw(b".\r\n");
    let reply = c.reply();
    let acknowledged = reply.code == 250;
    assert!(acknowledged || reply.code >= 400, "unexpected reply: {reply}");
    let _ = c.cmd("QUIT");
    assert_eq!(gw.wait_exit(Duration::from_secs(40)), 0, "exit code after SIGTERM");

    if acknowledged {
        // Acknowledged: it was on disk; the next run delivers it.
        let id = reply.text().rsplit(' ').next().unwrap().to_string();
        gw.start();
        wait_delivered(&gw, "a", &id);
        gw.wait_queue(WAIT, "an empty spool", |q| q.is_empty());
        assert_eq!(gw.stop(), 0);
    } else {
        // Not acknowledged: the client keeps it; nothing half-written may be delivered.
        gw.start();
        gw.listening("smtp");
        std::thread::sleep(Duration::from_millis(1500));
        assert!(lines(&gw, "a").is_empty());
        assert_eq!(gw.stop(), 0);
    }
}

#[test]
fn sigterm_during_a_slow_delivery_loses_nothing() {
    let hook = HookServer::start(HookOptions::default());
    hook.set_delay(Duration::from_secs(2));
    let config = format!("{BASE}[destination.hook]\ntype = \"webhook\"\nurl = \"{}\"\n", hook.url("/hook"));
    let mut gw = Gateway::new(&config, "[[rule]]\nname = \"all\"\nto = [\"hook\"]\n");
    gw.start();
    let smtp = gw.listening("smtp");
    let id = send(smtp, "hook@example.com", 1, "slow");
    hook.wait_for_requests(1, WAIT); // the request is in, its answer held back
    gw.term();
    assert_eq!(gw.wait_exit(Duration::from_secs(40)), 0, "exit code after SIGTERM");
    let got: Vec<_> =
        hook.accepted().into_iter().filter(|r| r.idempotency_key.as_deref() == Some(id.as_str())).collect();
    assert_eq!(got.len(), 1, "delivered once before stopping");

    // Whatever the first run left, the next one finishes: nothing is lost.
    hook.set_delay(Duration::ZERO);
    gw.start();
    gw.listening("smtp");
    gw.wait_queue(WAIT, "an empty spool", |q| q.is_empty());
    assert!(hook.accepted().iter().any(|r| r.idempotency_key.as_deref() == Some(id.as_str())));
    assert_eq!(gw.stop(), 0);
}
