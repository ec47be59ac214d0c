//! The public listener (`[web] listen`) over real HTTP, against the real `mailhook serve`: the
//! links in payloads, the signed page and its refusals (forged, expired, rotated out: one 403),
//! 410 once the archive lost the email, the lookup API (401, 404, one object, the rate limit),
//! the card's API, and 404 for every console and metrics path.

mod support;

use base64::Engine;
use serde_json::Value;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};
use support::gateway::Gateway;
use support::hook::{HookOptions, HookServer};
use support::http::Answer;

const LINK_KEY: &str = "link-key-0123456789-0123456789-abcdef";
const OLD_KEY: &str = "old-link-key-9876543210-9876543210-xyz";
const API_KEY: &str = "api-key-0123456789abcdef";
const CARD_KEY: &str = "card-key-0123456789abcdef";
const WAIT: Duration = Duration::from_secs(20);

const RULES: &str = r#"
[[rule]]
name = "orders"
to = ["hook"]

[rule.when]
subject = 'Order'

[rule.extract]
subject = 'Order (?P<order>\d+)'

[rule.fields]
page = "{{ links.url }}"
files = "{{ links.attachment_urls }}"

[[rule]]
name = "other"
to = ["hook"]
"#;

fn config(hook: &HookServer, extra: &str) -> String {
    format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [web]\nlisten = \"127.0.0.1:0\"\npublic_url = \"https://mailhook.example.com\"\nlink_key = \"${{LINK_KEY}}\"\n\
         old_link_keys = [\"${{OLD_KEY}}\"]\napi_key = \"${{API_KEY}}\"\ncard_keys = [\"${{CARD_KEY}}\"]\n{extra}\n\
         [delivery]\ntimeout = \"5s\"\nretry_for = \"1h\"\nbackoff = {{ initial = \"200ms\", max = \"500ms\" }}\nrate = \"off\"\n\n\
         [destination.hook]\ntype = \"webhook\"\nurl = \"{}\"\n",
        hook.url("/hook")
    )
}

fn gateway(hook: &HookServer, extra: &str) -> Gateway {
    Gateway::new(&config(hook, extra), RULES)
        .env("LINK_KEY", LINK_KEY)
        .env("OLD_KEY", OLD_KEY)
        .env("API_KEY", API_KEY)
        .env("CARD_KEY", CARD_KEY)
}

/// A link signed the way the documentation says (`mailhook-link-v1|{resource}|{exp}`), with
/// an HMAC of another library than the one mailhook uses.
/// A request with no body (the public listener takes none).
fn http(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)]) -> Answer {
    support::http::http(addr, method, path, headers, "")
}

fn sign(key: &str, resource: &str, exp: u64) -> String {
    let tag = ring::hmac::sign(
        &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key.as_bytes()),
        format!("mailhook-link-v1|{resource}|{exp}").as_bytes(),
    );
    format!("/{resource}?exp={exp}&sig={}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(tag.as_ref()))
}

fn now() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs()
}

/// The path and query of a full link.
fn local(url: &str) -> String {
    url.strip_prefix("https://mailhook.example.com").unwrap_or_else(|| panic!("not a public link: {url}")).to_string()
}

pub fn order_with_attachment(n: u32, from: &str) -> Vec<u8> {
    format!(
        "From: Shop <{from}>\r\nTo: hook@example.com\r\nSubject: Order {n}\r\nMIME-Version: 1.0\r\n\
Content-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n--b1\r\nContent-Type: multipart/alternative; boundary=\"b2\"\r\n\r\n\
--b2\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nOrder number {n}, thank you.\r\n\
--b2\r\nContent-Type: text/html; charset=utf-8\r\n\r\n<p>Order <b>{n}</b></p><script>alert(1)</script><img src=x onerror=alert(2)>\r\n--b2--\r\n\
--b1\r\nContent-Type: text/csv; name=\"report.csv\"\r\nContent-Disposition: attachment; filename=\"report.csv\"\r\n\
Content-Transfer-Encoding: base64\r\n\r\n{}\r\n--b1--\r\n",
        base64::engine::general_purpose::STANDARD.encode(format!("order,{n}\n"))
    )
    .into_bytes()
}

/// Waits until the archive (through the lookup API) has `n` emails from `from`.
fn wait_archived(web: SocketAddr, from: &str, n: u64) -> Value {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let a = http(
            web,
            "GET",
            &format!("/api/v1/lookup?email={from}"),
            &[("Authorization", &format!("Bearer {API_KEY}"))],
        );
        if a.status == 200 && a.json()["count"] == n {
            return a.json();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{n} emails from {from} never archived: {} {}",
            a.status,
            a.text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn payload_links_open_the_page_html_and_attachments_and_nothing_else() {
    let hook = HookServer::start(HookOptions::default());
    let mut gw = gateway(&hook, "");
    let id = gw.ingest(&order_with_attachment(4711, "shop@example.com"));
    gw.start();
    let web = gw.listening("web");
    let admin = gw.listening("admin");
    let got = hook.wait_for_accepted(1, WAIT);
    let payload = got[0].json.clone().unwrap();
    let url = payload["url"].as_str().expect("the payload carries url").to_string();
    assert!(url.starts_with(&format!("https://mailhook.example.com/m/{id}?exp=")), "{url}");
    let attachment = payload["attachmentUrls"].as_str().unwrap().to_string();
    assert!(attachment.starts_with(&format!("https://mailhook.example.com/m/{id}/a/0?exp=")), "{attachment}");
    // Templates see the same links.
    assert_eq!(payload["fields"]["page"], url.as_str());
    assert_eq!(payload["fields"]["files"], attachment.as_str());
    wait_archived(web, "shop@example.com", 1);

    let page = http(web, "GET", &local(&url), &[]);
    assert_eq!(page.status, 200, "{}", page.text());
    let text = page.text();
    for shown in ["Order 4711", "shop@example.com", "hook@example.com", "Order number 4711, thank you.", "report.csv"] {
        assert!(text.contains(shown), "{shown} missing from the page: {text}");
    }
    assert!(!text.contains("<script>alert"), "{text}");
    assert!(page.header("content-security-policy").unwrap().contains("default-src 'none'"));
    assert_eq!(page.header("referrer-policy"), Some("no-referrer"));
    // The HTML frame: sandboxed, its source sanitised and under the email CSP.
    let frame = text.split("id=\"email-html\"").nth(1).unwrap();
    let src =
        frame.split("src=\"").nth(1).unwrap().split('"').next().unwrap().replace("&amp;", "&").replace("&#x2f;", "/");
    assert!(text.contains("sandbox=\"\""), "{text}");
    let html = http(web, "GET", &src, &[]);
    assert_eq!(html.status, 200, "{src}: {}", html.text());
    assert!(
        html.text().contains("<b>4711</b>") && !html.text().contains("<script") && !html.text().contains("onerror")
    );
    let csp = html.header("content-security-policy").unwrap();
    assert!(csp.contains("sandbox") && csp.contains("frame-ancestors 'self' https://*.kustomerapp.com"), "{csp}");
    // The attachment, by its own link, as a download.
    let a = http(web, "GET", &local(&attachment), &[]);
    assert_eq!(a.status, 200);
    assert_eq!(a.body, b"order,4711\n");
    assert_eq!(a.header("content-disposition"), Some("attachment; filename=\"report.csv\""));

    // The same on the listener of the operator: the console's own paths answer there...
    assert_ne!(http(admin, "GET", "/metrics", &[]).status, 404);
    // ...and none of them, nor the metrics, on the public one.
    for path in [
        "/",
        "/login",
        "/messages",
        &format!("/messages/{id}"),
        &format!("/messages/{id}/raw"),
        &format!("/messages/{id}/html"),
        "/dead",
        "/playground",
        "/tail",
        "/tail/events",
        "/api/v1/messages",
        &format!("/api/v1/messages/{id}"),
        "/metrics",
        "/healthz",
        "/static/console.js",
        "/static/console.css",
        &format!("/m/{id}/raw"),
    ] {
        assert_eq!(http(web, "GET", path, &[]).status, 404, "GET {path} on the public listener");
    }
    for path in
        [format!("/messages/{id}/retry"), format!("/api/v1/messages/{id}/replay"), "/login".into(), "/dead".into()]
    {
        let status = http(web, "POST", &path, &[]).status;
        assert!(status == 404 || status == 405, "POST {path} on the public listener: {status}");
    }
    assert_eq!(gw.stop(), 0);
    let logs = gw.logs();
    for secret in [LINK_KEY, OLD_KEY, API_KEY, CARD_KEY] {
        assert!(!logs.contains(secret), "a secret is in the logs");
        assert!(!text.contains(secret), "a secret is in the page");
    }
}

#[test]
fn forged_expired_and_rotated_out_links_get_one_403_and_a_lost_email_410() {
    let hook = HookServer::start(HookOptions::default());
    let mut gw = gateway(&hook, "");
    let id = gw.ingest(&order_with_attachment(1, "shop@example.com"));
    gw.start();
    let web = gw.listening("web");
    hook.wait_for_accepted(1, WAIT);
    wait_archived(web, "shop@example.com", 1);
    let resource = format!("m/{id}");
    let later = now() + 3600;

    assert_eq!(http(web, "GET", &sign(LINK_KEY, &resource, later), &[]).status, 200);
    // A rotated key still listed in old_link_keys verifies.
    assert_eq!(http(web, "GET", &sign(OLD_KEY, &resource, later), &[]).status, 200);

    let good = sign(LINK_KEY, &resource, later);
    let refused = [
        format!("/{resource}"),                                               // missing
        format!("/{resource}?exp={later}"),                                   // no signature
        good.replace(&format!("exp={later}"), &format!("exp={}", later + 1)), // another expiry
        sign(LINK_KEY, &resource, now() - 5),                                 // expired
        sign("a-key-that-was-rotated-out-0123456789", &resource, later),      // no longer listed
        sign(LINK_KEY, &format!("m/{id}/a/0"), later).replace("/a/0", ""),    // another resource's
        sign(LINK_KEY, "m/not-an-id", later),
    ];
    let mut bodies = Vec::new();
    for path in &refused {
        let a = http(web, "GET", path, &[]);
        assert_eq!(a.status, 403, "{path}: {}", a.text());
        bodies.push(a.body);
    }
    assert!(bodies.windows(2).all(|w| w[0] == w[1]), "403 bodies differ: they must not say why");
    assert_eq!(http(web, "GET", &sign(LINK_KEY, &format!("m/{id}/a/0"), now() - 1), &[]).status, 403);
    assert_eq!(http(web, "GET", &format!("{}/html", good.split('?').next().unwrap()), &[]).status, 403);

    // Well signed, but the archive does not have it (retention removed it): 410.
    let gone = "01ARZ3NDEKTSV4RRFFQ69G5FAV";
    let a = http(web, "GET", &sign(LINK_KEY, &format!("m/{gone}"), later), &[]);
    assert_eq!(a.status, 410, "{}", a.text());
    assert!(a.text().contains("no longer kept"));
    assert_eq!(gw.stop(), 0);
}

#[test]
fn lookup_answers_one_object_and_the_card_api_checks_its_key() {
    let hook = HookServer::start(HookOptions::default());
    let mut gw = gateway(&hook, "card_rules = [\"orders\"]\napi_rate = \"off\"\n");
    gw.ingest(&order_with_attachment(1, "shop@example.com"));
    gw.ingest(&order_with_attachment(2, "Shop@Example.com"));
    gw.ingest(b"From: other@example.org\r\nTo: hook@example.com\r\nSubject: Hello\r\n\r\nhi\r\n");
    gw.start();
    let web = gw.listening("web");
    hook.wait_for_accepted(3, WAIT);
    let auth = format!("Bearer {API_KEY}");
    let latest = wait_archived(web, "shop@example.com", 2);
    assert!(latest.is_object());
    assert_eq!(latest["rule"], "orders");
    assert_eq!(latest["subject"], "Order 2");
    assert_eq!(latest["fields_order"], "2");
    assert_eq!(latest["count"], 2);
    let url = latest["url"].as_str().unwrap();
    assert_eq!(http(web, "GET", &local(url), &[]).status, 200, "the lookup's url opens the page");
    assert!(latest.as_object().unwrap().values().all(|v| !v.is_array()), "{latest}");

    let to = http(web, "GET", "/api/v1/lookup?email=hook@example.com&direction=to", &[("Authorization", &auth)]);
    assert_eq!(to.status, 200);
    assert_eq!(to.json()["count"], 3);
    let none = http(web, "GET", "/api/v1/lookup?email=nobody@example.net", &[("Authorization", &auth)]);
    assert_eq!(none.status, 404);
    assert!(none.json().is_object());
    for bad in [None, Some("Bearer wrong-key-0123456789abc"), Some("Basic x")] {
        let headers: Vec<(&str, &str)> = bad.map(|b| ("Authorization", b)).into_iter().collect();
        let a = http(web, "GET", "/api/v1/lookup?email=shop@example.com", &headers);
        assert_eq!(a.status, 401, "{bad:?}");
        assert!(a.json().is_object());
    }

    // Many generated requests: whatever is asked, by whomever, the answer is one JSON object
    // with no array anywhere.
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let addresses = [
        "shop@example.com",
        "SHOP@example.com",
        "other@example.org",
        "hook@example.com",
        "x@y",
        "",
        "%40",
        "a%2Cb@c.d",
    ];
    let directions = ["", "&direction=to", "&direction=from", "&direction=up", "&direction="];
    let keys = [Some(auth.as_str()), Some("Bearer nope"), None];
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..300 {
        let path = format!(
            "/api/v1/lookup?email={}{}",
            addresses[next(addresses.len() as u64) as usize],
            directions[next(directions.len() as u64) as usize]
        );
        let headers: Vec<(&str, &str)> = keys[next(3) as usize].map(|k| ("Authorization", k)).into_iter().collect();
        let a = http(web, "GET", &path, &headers);
        let body = a.json();
        fn has_array(v: &Value) -> bool {
            match v {
                Value::Array(_) => true,
                Value::Object(m) => m.values().any(has_array),
                _ => false,
            }
        }
        assert!(body.is_object() && !has_array(&body), "{path}: {} {body}", a.status);
        assert!([200, 400, 401, 404].contains(&a.status), "{path}: {}", a.status);
        seen.insert(a.status);
    }
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), [200, 400, 401, 404], "every kind of answer was generated");

    // The card's API: a card key lists the customer's mail (only card_rules' rules)...
    let card = format!("Bearer {CARD_KEY}");
    let api = "/kustomer/api/messages?email=shop@example.com&email=other@example.org";
    let listed = http(web, "GET", api, &[("Authorization", &card)]).json();
    let subjects: Vec<&str> =
        listed["messages"].as_array().unwrap().iter().map(|m| m["subject"].as_str().unwrap()).collect();
    assert_eq!(subjects, ["Order 2", "Order 1"]);
    // ...nothing without a key or with a wrong one...
    assert_eq!(http(web, "GET", api, &[]).status, 403);
    assert_eq!(http(web, "GET", api, &[("Authorization", "Bearer card-key-0123456789abcdeX")]).status, 403);
    // ...and a signed link alone shows that email only.
    let link = form_urlencoded::byte_serialize(url.as_bytes()).collect::<String>();
    let one = http(web, "GET", &format!("/kustomer/api/messages?email=shop@example.com&link={link}"), &[]).json();
    let one = one["messages"].as_array().unwrap();
    assert_eq!(one.len(), 1);
    assert_eq!(one[0]["subject"], "Order 2");
    assert_eq!(one[0]["current"], true);
    let view = one[0]["view"].as_str().unwrap();
    assert_eq!(http(web, "GET", view, &[]).status, 200);
    // The card page: framed only by frame_ancestors, no X-Frame-Options.
    let page = http(web, "GET", "/kustomer/card?parentUrl=https%3A%2F%2Facme.kustomerapp.com&id=c1", &[]);
    assert_eq!(page.status, 200);
    let csp = page.header("content-security-policy").unwrap();
    assert!(csp.contains("frame-ancestors 'self' https://*.kustomerapp.com"), "{csp}");
    assert!(csp.contains("script-src 'self' https://cdn.kustomerapp.com/card-js/latest/kustomer-card.min.js"), "{csp}");
    assert_eq!(page.header("x-frame-options"), None);
    assert!(!page.text().contains(CARD_KEY) && !page.text().contains(LINK_KEY));
    assert_eq!(gw.stop(), 0);
}

#[test]
fn lookup_is_throttled_by_api_rate() {
    let hook = HookServer::start(HookOptions::default());
    let mut gw = gateway(&hook, "api_rate = \"2/min\"\n");
    gw.start();
    let web = gw.listening("web");
    let auth = format!("Bearer {API_KEY}");
    let statuses: Vec<u16> = (0..4)
        .map(|_| http(web, "GET", "/api/v1/lookup?email=a@example.com", &[("Authorization", &auth)]).status)
        .collect();
    assert_eq!(statuses, [404, 429, 429, 429], "a burst of one second's worth, at least one");
    let a = http(web, "GET", "/api/v1/lookup?email=a@example.com", &[("Authorization", &auth)]);
    assert_eq!(a.status, 429);
    assert!(a.json().is_object());
    assert!(a.header("retry-after").unwrap().parse::<u64>().unwrap() >= 1);
    assert_eq!(gw.stop(), 0);
}

#[test]
fn serve_refuses_a_web_table_that_would_leak() {
    let hook = HookServer::start(HookOptions::default());
    let cases = [
        ("public_url = \"https://m.example.com\"\n", "web.link_key: is required with web.public_url"),
        ("public_url = \"https://m.example.com\"\nlink_key = \"${K}\"\n", "web.link_key: is too short"),
        ("public_url = \"http://m.example.com\"\nlink_key = \"${L}\"\n", "web.public_url: must be https://"),
        ("listen = \"0.0.0.0:0\"\n", "web.public_url: is required with web.listen"),
        (
            "public_url = \"https://m.example.com\"\nlink_key = \"${L}\"\napi_key = \"${K}\"\n",
            "web.api_key: is too short",
        ),
    ];
    for (web, expected) in cases {
        let config = format!("[web]\n{web}\n[destination.hook]\ntype = \"webhook\"\nurl = \"{}\"\n", hook.url("/hook"));
        let gw = Gateway::new(&config, RULES).env("K", "short-secret").env("L", LINK_KEY);
        for command in [&["check"][..], &["serve", "--config", "mailhook.toml"][..]] {
            let out = gw.run(command);
            let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
            assert_eq!(out.status.code(), Some(78), "{web}: {text}");
            assert!(text.contains(expected), "{web}: expected {expected:?} in {text}");
            assert!(!text.contains("short-secret") && !text.contains(LINK_KEY), "a secret in the error: {text}");
        }
    }
}
