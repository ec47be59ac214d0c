//! The console and its JSON API over real HTTP, against the real `mailhook serve` with a local
//! hook server: every route, every refusal (no login, no token, no CSRF token, unknown id), and
//! the archive they read (written by the pipeline as messages finish).

mod support;

use serde_json::Value;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use support::gateway::Gateway;
use support::hook::{HookOptions, HookServer};
use support::http::{Answer, http};

const TOKEN: &str = "console-test-token-0123";

const RULES: &str = r#"
[[rule]]
name = "orders"
to = ["hook"]

[rule.when]
subject = 'Order'
from = 'example\.com$'

[rule.extract]
subject = 'Order (?P<order>\d+)'
"#;

fn gateway(hook: &HookServer, token: bool) -> Gateway {
    let token = if token { format!("token = \"{TOKEN}\"\n") } else { String::new() };
    let config = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n{token}\n\
         [delivery]\ntimeout = \"5s\"\nretry_for = \"1h\"\nbackoff = {{ initial = \"200ms\", max = \"500ms\" }}\nrate = \"off\"\n\n\
         [destination.hook]\ntype = \"webhook\"\nurl = \"{}\"\n",
        hook.url("/hook")
    );
    Gateway::new(&config, RULES)
}

fn bearer() -> (&'static str, String) {
    ("Authorization", format!("Bearer {TOKEN}"))
}

fn api(addr: SocketAddr, method: &str, path: &str) -> Answer {
    let (k, v) = bearer();
    http(addr, method, path, &[(k, &v)], "")
}

/// Logs in; returns the cookie header value and the session's CSRF token.
fn login(addr: SocketAddr) -> (String, String) {
    let a = http(addr, "POST", "/login", &[], &format!("token={TOKEN}"));
    assert_eq!(a.status, 303, "{}", a.text());
    assert_eq!(a.header("location"), Some("/"));
    let set = a.header("set-cookie").expect("a session cookie").to_string();
    assert!(set.contains("HttpOnly") && set.contains("SameSite=Strict"), "{set}");
    let cookie = set.split(';').next().unwrap().to_string();
    let page = http(addr, "GET", "/", &[("Cookie", &cookie)], "");
    assert_eq!(page.status, 200, "{}", page.text());
    (cookie, csrf_of(&page.text()))
}

fn csrf_of(page: &str) -> String {
    let at = page.find("<meta name=\"csrf\" content=\"").expect("a csrf meta") + 27;
    page[at..at + 64].to_string()
}

/// Waits until the API lists `n` messages for `query`.
fn wait_listed(addr: SocketAddr, query: &str, n: usize, gw: &Gateway) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let a = api(addr, "GET", &format!("/api/v1/messages?{query}"));
        assert_eq!(a.status, 200, "{}", a.text());
        let list = a.json()["messages"].as_array().unwrap().clone();
        if list.len() == n {
            return list;
        }
        if Instant::now() > deadline {
            panic!("{query}: {} messages listed, not {n}: {list:#?}\nlogs:\n{}", list.len(), gw.logs());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn order(n: u32, subject: &str) -> Vec<u8> {
    format!("From: Shop <shop@example.com>\r\nTo: hook@example.com\r\nSubject: {subject}\r\n\r\nOrder number {n}, thank you.\r\n")
        .into_bytes()
}

#[test]
fn pages_ask_for_a_login_the_api_for_the_token_and_posts_for_the_csrf_token() {
    let hook = HookServer::start(HookOptions::default());
    let mut gw = gateway(&hook, true);
    gw.start();
    let addr = gw.listening("admin");
    let id = "01JXXXXXXXXXXXXXXXXXXXXXXX";

    for path in ["/", "/messages", "/dead", "/playground", "/tail", "/tail/events", "/changes", "/drift"] {
        let a = http(addr, "GET", path, &[], "");
        assert_eq!((a.status, a.header("location")), (303, Some("/login")), "{path}");
    }
    for path in ["/messages/ID", "/messages/ID/raw", "/messages/ID/html", "/messages/ID/attachments/0"] {
        let a = http(addr, "GET", &path.replace("ID", id), &[], "");
        assert_eq!(a.status, 303, "{path}");
    }
    for (method, path) in [
        ("GET", "/api/v1/messages".to_string()),
        ("GET", format!("/api/v1/messages/{id}")),
        ("POST", format!("/api/v1/messages/{id}/retry")),
        ("POST", format!("/api/v1/messages/{id}/replay")),
        ("POST", format!("/api/v1/messages/{id}/drop")),
    ] {
        let a = http(addr, method, &path, &[], "");
        assert_eq!(a.status, 401, "{method} {path}");
        assert_eq!(a.header("www-authenticate"), Some("Bearer"));
        let a = http(addr, method, &path, &[("Authorization", "Bearer wrong")], "");
        assert_eq!(a.status, 401, "{method} {path} with a wrong token");
        let a = http(addr, method, &path, &[("Cookie", "mailhook_session=forged")], "");
        assert_eq!(a.status, 401, "{method} {path}: a cookie is no API credential");
    }
    // /healthz and /metrics keep their Bearer token.
    assert_eq!(http(addr, "GET", "/healthz", &[], "").status, 401);
    assert_eq!(api(addr, "GET", "/healthz").status, 200);

    let wrong = http(addr, "POST", "/login", &[], "token=nope");
    assert_eq!(wrong.status, 401);
    assert!(wrong.header("set-cookie").is_none());
    assert_eq!(http(addr, "GET", "/login", &[], "").status, 200);

    let (cookie, csrf) = login(addr);
    let page = http(addr, "GET", "/", &[("Cookie", &cookie)], "");
    let csp = page.header("content-security-policy").unwrap();
    assert!(csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"), "{csp}");
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    assert_eq!(page.header("x-content-type-options"), Some("nosniff"));
    assert_eq!(page.header("referrer-policy"), Some("no-referrer"));
    assert!(!page.text().contains(TOKEN), "the token never appears on a page");
    for path in ["/messages", "/dead", "/playground", "/tail", "/changes", "/drift"] {
        let a = http(addr, "GET", path, &[("Cookie", &cookie)], "");
        assert_eq!(a.status, 200, "{path}: {}", a.text());
        assert!(a.header("content-security-policy").is_some(), "{path}");
        assert!(!a.text().contains(TOKEN), "{path}");
    }
    assert_eq!(http(addr, "GET", "/static/console.js", &[], "").status, 200);
    assert_eq!(http(addr, "GET", "/static/console.css", &[], "").status, 200);

    // Every state-changing POST wants the session's CSRF token.
    for path in [format!("/messages/{id}/retry"), "/dead".into(), "/playground".into(), "/logout".into()] {
        let a = http(addr, "POST", &path, &[("Cookie", &cookie)], "action=retry");
        assert_eq!(a.status, 403, "{path} without a CSRF token");
        let a = http(addr, "POST", &path, &[("Cookie", &cookie)], "csrf=0000&action=retry");
        assert_eq!(a.status, 403, "{path} with a wrong CSRF token");
    }
    // Unknown ids: 404 on pages and in the API.
    for path in [format!("/messages/{id}"), format!("/messages/{id}/raw"), "/messages/..%2F..%2Fetc/raw".into()] {
        assert_eq!(http(addr, "GET", &path, &[("Cookie", &cookie)], "").status, 404, "{path}");
    }
    assert_eq!(api(addr, "GET", &format!("/api/v1/messages/{id}")).status, 404);
    assert_eq!(api(addr, "POST", &format!("/api/v1/messages/{id}/retry")).status, 404);
    assert_eq!(api(addr, "POST", "/api/v1/messages/..%2Fx/drop").status, 404);
    let a = http(addr, "POST", &format!("/messages/{id}/drop"), &[("Cookie", &cookie)], &format!("csrf={csrf}"));
    assert_eq!(a.status, 404, "{}", a.text());

    let out = http(addr, "POST", "/logout", &[("Cookie", &cookie)], &format!("csrf={csrf}"));
    assert_eq!(out.status, 303);
    assert_eq!(http(addr, "GET", "/", &[("Cookie", &cookie)], "").status, 303, "the session is over");
}

#[test]
fn finished_messages_are_archived_listed_searched_and_shown() {
    let hook = HookServer::start(HookOptions::default());
    let mut gw = gateway(&hook, true);
    let order_raw = order(4711, "Order 4711 shipped");
    let delivered = gw.ingest(&order_raw);
    let unmatched = gw.ingest(b"From: Someone <who@other.org>\r\nSubject: Hello there\r\n\r\nNo rule for me.\r\n");
    gw.start();
    let addr = gw.listening("admin");

    let all = wait_listed(addr, "", 2, &gw);
    let d = all.iter().find(|m| m["id"] == delivered.as_str()).expect("the delivered message is listed");
    assert_eq!(d["id"], delivered);
    assert_eq!(d["state"], "delivered");
    assert_eq!(d["from"], "shop@example.com");
    assert_eq!(d["subject"], "Order 4711 shipped");
    assert_eq!(d["rule"], "orders");
    assert_eq!(d["destinations"], serde_json::json!(["hook"]));
    assert!(d["receivedAt"].as_str().unwrap().starts_with("20"), "{d}");
    let u = all.iter().find(|m| m["id"] == unmatched.as_str()).expect("the dead letter is listed");
    assert_eq!(u["state"], "dead");

    let ids = |q: &str| -> Vec<Value> { wait_listed(addr, q, 1, &gw).iter().map(|m| m["id"].clone()).collect() };
    assert_eq!(ids("q=4711"), vec![Value::from(delivered.clone())]);
    assert_eq!(ids("q=rule+for"), vec![Value::from(unmatched.clone())], "the text is searched too");
    assert_eq!(ids("state=dead"), vec![Value::from(unmatched.clone())]);
    assert_eq!(ids("rule=orders"), vec![Value::from(delivered.clone())]);
    assert_eq!(ids("from=WHO%40other.org"), vec![Value::from(unmatched.clone())]);
    assert_eq!(ids("since=1h&state=delivered"), vec![Value::from(delivered.clone())]);
    let first = api(addr, "GET", "/api/v1/messages?limit=1").json();
    let next = first["next"].as_str().expect("a next cursor");
    let second = api(addr, "GET", &format!("/api/v1/messages?limit=1&cursor={next}")).json();
    let mut paged = vec![first["messages"][0]["id"].clone(), second["messages"][0]["id"].clone()];
    paged.sort_by_key(|v| v.to_string());
    let mut both = vec![Value::from(delivered.clone()), Value::from(unmatched.clone())];
    both.sort_by_key(|v| v.to_string());
    assert_eq!(paged, both, "two pages of one, each message once");
    assert!(second["next"].is_null());
    assert_eq!(api(addr, "GET", "/api/v1/messages?state=bogus").status, 400);
    assert_eq!(api(addr, "GET", "/api/v1/messages?cursor=..%2F").status, 400);

    let record = api(addr, "GET", &format!("/api/v1/messages/{delivered}")).json();
    assert_eq!(record["envelope"]["recipients"], serde_json::json!(["hook@example.com"]));
    assert_eq!(record["fields"]["order"], "4711");
    assert_eq!(record["payload"]["fields"]["order"], "4711");
    let attempts = record["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 1, "{record:#}");
    assert_eq!(attempts[0]["destination"], "hook");
    assert_eq!(attempts[0]["outcome"], "delivered");
    assert_eq!(attempts[0]["status"], 200);
    assert_eq!(attempts[0]["body"], "{\"ok\":true}");
    assert!(record["headers"].as_array().unwrap().iter().any(|h| h["name"] == "Subject"), "{record:#}");

    let (cookie, _) = login(addr);
    let page = http(addr, "GET", &format!("/messages/{delivered}"), &[("Cookie", &cookie)], "");
    assert_eq!(page.status, 200);
    assert!(page.text().contains("Order 4711 shipped") && page.text().contains("HTTP 200"), "{}", page.text());
    let raw = http(addr, "GET", &format!("/messages/{delivered}/raw"), &[("Cookie", &cookie)], "");
    assert_eq!(raw.body, order_raw, "the raw message exactly as received");
    assert_eq!(raw.header("content-type"), Some("message/rfc822"));
    let html = http(addr, "GET", &format!("/messages/{delivered}/html"), &[("Cookie", &cookie)], "");
    assert_eq!(html.status, 200);
    assert_eq!(
        html.header("content-security-policy")
            .map(|c| c.starts_with("default-src 'none'; img-src data:; style-src 'unsafe-inline'")),
        Some(true)
    );
    let list = http(addr, "GET", "/messages?q=shipped", &[("Cookie", &cookie)], "");
    assert!(list.text().contains(&format!("/messages/{delivered}")) && !list.text().contains(&unmatched));
    let overview = http(addr, "GET", "/", &[("Cookie", &cookie)], "");
    assert!(overview.text().contains("orders") && overview.text().contains("order 100 %"), "{}", overview.text());
}

#[test]
fn a_dead_letters_payload_is_kept_as_a_destination_would_take_it() {
    // A rule that reads the whole body into a field, then misses a field it requires: a dead
    // letter whose payload holds the body twice (its text and the field).
    let rules = r#"
[[rule]]
name = "whole"
to = ["hook"]
require = ["reference"]

[rule.when]
subject = '^Report'

[rule.extract]
subject = 'Ref (?P<reference>\d+)'
body = ['(?s)(?P<whole>Line .*)']
"#;
    let hook = HookServer::start(HookOptions::default());
    let config = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\n\
         [delivery]\nmax_body = \"4KB\"\nrate = \"off\"\n\n\
         [destination.hook]\ntype = \"webhook\"\nurl = \"{}\"\n",
        hook.url("/hook")
    );
    let mut gw = Gateway::new(&config, rules);
    let report = |subject: &str, lines: usize| {
        let body: String = (0..lines).map(|i| format!("Line {i:04} of the nightly report\r\n")).collect();
        format!("From: cron@example.com\r\nTo: hook@example.com\r\nSubject: {subject}\r\n\r\n{body}").into_bytes()
    };
    // 3 lines: about 100 bytes. 60 lines: 2 KB of text, and the same 2 KB as a field (over 4 KB
    // with both, under it with the text cut). 200 lines: a 6.6 KB field, which no destination takes.
    let small = gw.ingest(&report("Report small", 3));
    let cut = gw.ingest(&report("Report cut", 60));
    let huge = gw.ingest(&report("Report huge", 200));
    gw.start();
    let addr = gw.listening("admin");
    wait_listed(addr, "state=dead", 3, &gw);
    assert!(hook.requests().is_empty(), "nothing was sent");

    let record = |id: &str| api(addr, "GET", &format!("/api/v1/messages/{id}")).json();
    let small = record(&small);
    assert_eq!(small["payload"]["fields"]["whole"].as_str().unwrap().lines().count(), 3, "{small:#}");
    assert!(small["payload"].get("truncated").is_none(), "{small:#}");

    let cut = record(&cut);
    assert_eq!(cut["payload"]["truncated"], true, "{cut:#}");
    assert_eq!(cut["payload"]["fields"]["whole"].as_str().unwrap().lines().count(), 60, "the field is whole");
    assert!(cut["payload"]["text"].as_str().unwrap().len() < 2000, "the text is cut: {cut:#}");
    assert!(serde_json::to_vec(&cut["payload"]).unwrap().len() <= 4000);

    let huge = record(&huge);
    assert!(huge["payload"].is_null(), "no destination would take it: not kept: {huge:#}");
    assert!(huge["reason"].as_str().unwrap().contains("reference"), "{huge:#}");
    let (cookie, _) = login(addr);
    let raw = http(addr, "GET", &format!("/messages/{}/raw", huge["id"].as_str().unwrap()), &[("Cookie", &cookie)], "");
    assert_eq!(raw.body, report("Report huge", 200), "the raw message is kept whole");
}

#[test]
fn a_dead_letter_retried_from_the_console_is_delivered() {
    let hook = HookServer::start(HookOptions::default());
    hook.push_status(400);
    let mut gw = gateway(&hook, true);
    let id = gw.ingest(&order(7, "Order 7 refused once"));
    gw.start();
    let addr = gw.listening("admin");
    let dead = wait_listed(addr, "state=dead", 1, &gw);
    assert_eq!(dead[0]["id"], id);

    let (cookie, csrf) = login(addr);
    let page = http(addr, "GET", "/dead", &[("Cookie", &cookie)], "");
    assert!(page.text().contains(&id) && page.text().contains("HTTP 400"), "{}", page.text());
    let a = http(addr, "POST", "/dead", &[("Cookie", &cookie)], &format!("csrf={csrf}&action=retry&id={id}"));
    assert_eq!(a.status, 200, "{}", a.text());
    assert!(a.text().contains("queued for delivery now"), "{}", a.text());

    wait_listed(addr, "state=delivered", 1, &gw);
    let record = api(addr, "GET", &format!("/api/v1/messages/{id}")).json();
    let statuses: Vec<&Value> = record["attempts"].as_array().unwrap().iter().map(|a| &a["status"]).collect();
    assert_eq!(statuses, vec![&Value::from(400), &Value::from(200)], "{record:#}");
    assert_eq!(hook.accepted().len(), 1);
    assert!(wait_listed(addr, "", 1, &gw).len() == 1, "one entry per message, not one per round");

    // Retry of a message no longer in the spool: 404; replay from the archive: a new message.
    assert_eq!(api(addr, "POST", &format!("/api/v1/messages/{id}/retry")).status, 404);
    let replay = api(addr, "POST", &format!("/api/v1/messages/{id}/replay"));
    assert_eq!(replay.status, 200, "{}", replay.text());
    assert!(replay.json()["result"].as_str().unwrap().contains("queued again from the archive"));
    wait_listed(addr, "state=delivered", 2, &gw);
    assert_eq!(hook.accepted().len(), 2);
}

#[test]
fn the_playground_shows_what_an_edited_rule_would_send() {
    let hook = HookServer::start(HookOptions::default());
    let mut gw = gateway(&hook, true);
    gw.start();
    let addr = gw.listening("admin");
    let (cookie, csrf) = login(addr);
    let eml = "From: Shop <shop@example.com>\r\nSubject: Order 99 packed\r\n\r\nhello\r\n";
    let enc = |s: &str| -> String { s.bytes().map(|b| format!("%{b:02X}")).collect() };
    // The file as the page offers it.
    let form = http(addr, "GET", "/playground", &[("Cookie", &cookie)], "").text();
    let at = form.find("<option value=\"").expect("a rules file to choose") + 15;
    // As the browser reads the attribute (the template escapes `/`).
    let file = form[at..at + form[at..].find('"').unwrap()].replace("&#x2f;", "/");
    assert!(file.ends_with("10-test.toml"), "{file}");
    let run = |rules: &str| {
        let body = format!("csrf={csrf}&eml={}&file={}&rules={}", enc(eml), enc(&file), enc(rules));
        let a = http(addr, "POST", "/playground", &[("Cookie", &cookie)], &body);
        assert_eq!(a.status, 200, "{}", a.text());
        a.text()
    };
    let before = run(RULES);
    assert!(before.contains("id=\"matched-rule\">orders<"), "{before}");
    assert!(before.contains("&quot;order&quot;: &quot;99&quot;"), "{before}");
    let edited = format!("{RULES}\n[rule.payload]\nticket = \"T-{{{{ order }}}}\"\n");
    let after = run(&edited);
    assert!(after.contains("&quot;ticket&quot;: &quot;T-99&quot;"), "{after}");
    let saved = std::fs::read_to_string(gw.path().join("rules/10-test.toml")).unwrap();
    assert!(!saved.contains("ticket"), "nothing is saved");
    // A rule that does not match says which `when` key failed.
    let other = run(&RULES.replace("'Order'", "'Invoice'"));
    assert!(other.contains("<code>when.subject</code> did not match"), "{other}");
    let broken = run("[[rule]]\nname = 1\n");
    assert!(broken.contains("do not compile"), "{broken}");
}

#[test]
fn without_a_token_the_console_is_loopback_only() {
    let hook = HookServer::start(HookOptions::default());
    let mut gw = gateway(&hook, false);
    gw.start();
    let addr = gw.listening("admin");
    // A session opens by itself; posts still need its CSRF token.
    let page = http(addr, "GET", "/", &[], "");
    assert_eq!(page.status, 200);
    let cookie = page.header("set-cookie").unwrap().split(';').next().unwrap().to_string();
    let csrf = csrf_of(&page.text());
    assert_eq!(http(addr, "POST", "/playground", &[("Cookie", &cookie)], "eml=x").status, 403);
    let ok = http(addr, "POST", "/playground", &[("Cookie", &cookie)], &format!("csrf={csrf}&eml=Subject%3A+x%0A%0Ay"));
    assert_eq!(ok.status, 200);
    // A name that is not this machine (DNS rebinding) and a cross-site POST are refused.
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET / HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    assert!(text.starts_with("HTTP/1.1 403"), "{text}");
    let id = "01JXXXXXXXXXXXXXXXXXXXXXXX";
    let a = http(addr, "POST", &format!("/api/v1/messages/{id}/drop"), &[("Origin", "http://evil.example")], "");
    assert_eq!(a.status, 403);
    assert_eq!(api(addr, "GET", "/api/v1/messages").status, 200);
    gw.stop();

    // On an address beyond this machine, serve refuses to start.
    let open = Gateway::new(
        &format!(
            "[admin]\nlisten = \"0.0.0.0:0\"\n\n[destination.hook]\ntype = \"webhook\"\nurl = \"{}\"\n",
            hook.url("/h")
        ),
        RULES,
    );
    let out = open.run(&["serve", "--config", "mailhook.toml"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("admin.token"), "{err}");
}

/// The raw message is written once: the spool keeps it when the message is delivered, and the
/// archive's entry refers to it. Kept bytes that no entry refers to (an entry a crash lost) are
/// given back at the next start; those an entry refers to stay.
#[test]
fn the_raw_message_is_kept_once_by_the_spool_and_an_orphan_given_back_at_start() {
    let hook = HookServer::start(HookOptions::default());
    let mut gw = gateway(&hook, true);
    let (kept_raw, lost_raw) = (order(1, "Order 1 kept"), order(2, "Order 2 lost"));
    let kept = gw.ingest(&kept_raw);
    let lost = gw.ingest(&lost_raw);
    gw.start();
    let addr = gw.listening("admin");
    wait_listed(addr, "state=delivered", 2, &gw);
    let (cookie, _) = login(addr);
    let raw = http(addr, "GET", &format!("/messages/{kept}/raw"), &[("Cookie", &cookie)], "");
    assert_eq!(raw.body, kept_raw, "read back from the spool, byte for byte");
    assert_eq!(gw.stop(), 0);

    let spool = rusqlite::Connection::open(gw.path().join("spool/spool.db")).unwrap();
    let archive = rusqlite::Connection::open(gw.path().join("spool/archive/archive.db")).unwrap();
    let count = |c: &rusqlite::Connection, sql: &str| -> i64 { c.query_row(sql, [], |r| r.get(0)).unwrap() };
    assert_eq!(count(&archive, "SELECT count(*) FROM raw"), 0, "no second copy in the archive");
    assert_eq!(count(&archive, "SELECT count(*) FROM message WHERE raw_kept = 1"), 2);
    assert_eq!(count(&spool, "SELECT count(*) FROM message"), 0, "out of the queue");
    assert_eq!(count(&spool, "SELECT count(*) FROM kept JOIN raw USING (seq)"), 2, "kept by the spool");

    // What a crash before the second entry was committed leaves: kept bytes, no entry.
    archive.execute("DELETE FROM message WHERE id = ?1", [&lost]).unwrap();
    drop((spool, archive));
    gw.start();
    let addr = gw.listening("admin");
    let opened = gw.wait_log("archive open", 1, Duration::from_secs(20), |v| v["message"] == "archive open");
    assert_eq!(opened[0]["released"], 1, "{}", opened[0]);
    let spool = rusqlite::Connection::open(gw.path().join("spool/spool.db")).unwrap();
    let ids: Vec<String> = spool
        .prepare("SELECT id FROM kept")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(ids, vec![kept.clone()]);
    assert_eq!(count(&spool, "SELECT count(*) FROM raw"), 1, "the orphan's bytes are gone");
    let (cookie, _) = login(addr);
    let raw = http(addr, "GET", &format!("/messages/{kept}/raw"), &[("Cookie", &cookie)], "");
    assert_eq!(raw.body, kept_raw);
}
