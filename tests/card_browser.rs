//! The Kustomer Card in a real browser (Chromium through chromedriver, as the console's
//! browser test): a page served from *another* loopback origin frames `/kustomer/card` the
//! way Kustomer does, with a stub of the Cards SDK (`window.Kustomer`, served from that origin
//! as `[web] kustomer_card_js`) that hands the card a customer context. The card must list that
//! customer's emails and no one else's, open one in the viewer showing the original, keep a
//! hostile email inert (nothing it names is loaded: every URL in it points at the hook server,
//! which counts requests), call `Kustomer.resize()`, and be refused by the browser when framed
//! from an origin not in `[web] frame_ancestors`.
//!
//! Needs `/usr/bin/chromedriver` and `/usr/bin/chromium`.

mod support;

use fantoccini::{Client, Locator};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::browser::Driver;
use support::gateway::Gateway;
use support::hook::{HookOptions, HookServer};

const LINK_KEY: &str = "card-test-link-key-0123456789-abcdefgh";
const CARD_KEY: &str = "card-test-key-0123456789";

const RULES: &str = r#"
[[rule]]
name = "orders"
to = ["hook"]

[rule.when]
subject = 'Order'

[rule.extract]
subject = 'Order (?P<order>\d+)'
"#;

/// A tiny web server of fixed pages (path → content type, body), standing for Kustomer's
/// origin; pages can be set after it started.
#[derive(Clone)]
struct Site {
    addr: SocketAddr,
    pages: Arc<Mutex<HashMap<String, (&'static str, String)>>>,
}

impl Site {
    fn start() -> Site {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let site = Site { addr: listener.local_addr().unwrap(), pages: Arc::default() };
        let pages = site.pages.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let pages = pages.clone();
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 8192];
                    let n = stream.read(&mut buf).unwrap_or(0);
                    let head = String::from_utf8_lossy(&buf[..n]);
                    let path = head.split(' ').nth(1).unwrap_or("/").split('?').next().unwrap_or("/").to_string();
                    let page = pages.lock().unwrap().get(&path).cloned();
                    let (status, ctype, body) = match page {
                        Some((ctype, body)) => ("200 OK", ctype, body),
                        None => ("404 Not Found", "text/plain", "not found".to_string()),
                    };
                    let _ = write!(
                        stream,
                        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                });
            }
        });
        site
    }

    fn origin(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn set(&self, path: &str, ctype: &'static str, body: String) {
        self.pages.lock().unwrap().insert(path.to_string(), (ctype, body));
    }
}

/// A message whose subject and HTML try everything; every URL in it counts a hit on the hook.
fn hostile(hits: &str) -> Vec<u8> {
    format!(
        "From: Shop <shop@example.com>\r\nTo: hook@example.com\r\nSubject: Order 666 <img src=x onerror=\"fetch('{hits}/subject')\">\r\n\
         MIME-Version: 1.0\r\nContent-Type: multipart/alternative; boundary=b\r\n\r\n--b\r\n\
         Content-Type: text/plain\r\n\r\nplain text part\r\n--b\r\nContent-Type: text/html\r\n\r\n\
         <html><head><base href=\"{hits}/base/\"><meta http-equiv=\"refresh\" content=\"0;url={hits}/refresh\">\
         <style>body {{ background: url({hits}/style) }}</style></head><body>\
         <script>fetch('{hits}/script'); top.document.title = 'pwned';</script>\
         <img src=\"x\" onerror=\"fetch('{hits}/onerror')\"><img src=\"{hits}/remote-image\">\
         <a href=\"javascript:fetch('{hits}/javascript')\">click me</a>\
         <svg onload=\"fetch('{hits}/svg')\"></svg><iframe src=\"{hits}/iframe\"></iframe>\
         <p>Hostile but harmless</p></body></html>\r\n--b--\r\n"
    )
    .into_bytes()
}

fn order(n: u32, from: &str) -> Vec<u8> {
    format!(
        "From: Shop <{from}>\r\nTo: hook@example.com\r\nSubject: Order {n}\r\nMIME-Version: 1.0\r\n\
         Content-Type: multipart/alternative; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\n\
         Order number {n}, thank you.\r\n--b\r\nContent-Type: text/html\r\n\r\n<p>The original of order <b>{n}</b></p>\r\n--b--\r\n"
    )
    .into_bytes()
}

/// The stub of the Cards SDK: `initialize` hands over `context`; `resize` is counted.
fn sdk_stub(context: &Value) -> String {
    format!(
        "window.Kustomer = {{\n  initialize: function (cb) {{ setTimeout(function () {{ cb({context}); }}, 10); }},\n  \
         resize: function () {{ var n = Number(document.documentElement.getAttribute('data-resized') || 0); \
         document.documentElement.setAttribute('data-resized', String(n + 1)); }}\n}};\n"
    )
}

async fn wait_for(browser: &Client, css: &str) -> fantoccini::elements::Element {
    browser
        .wait()
        .at_most(Duration::from_secs(15))
        .for_element(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css}: {e}"))
}

async fn texts(browser: &Client, css: &str) -> Vec<String> {
    let mut out = Vec::new();
    for e in browser.find_all(Locator::Css(css)).await.unwrap() {
        out.push(e.text().await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_card_framed_by_kustomer_in_a_real_browser() {
    let hook = HookServer::start(HookOptions::default());
    let hits = hook.url("/hit");
    let kustomer = Site::start();
    let elsewhere = Site::start();
    let config = format!(
        "[web]\nlisten = \"127.0.0.1:0\"\npublic_url = \"http://127.0.0.1:9\"\nlink_key = \"{LINK_KEY}\"\n\
         card_keys = [\"{CARD_KEY}\"]\nkustomer_card_js = \"{}/sdk.js\"\nframe_ancestors = [\"{}\"]\n\n\
         [delivery]\ntimeout = \"5s\"\nretry_for = \"1h\"\nbackoff = {{ initial = \"200ms\", max = \"500ms\" }}\nrate = \"off\"\n\n\
         [destination.hook]\ntype = \"webhook\"\nurl = \"{}\"\n",
        kustomer.origin(),
        kustomer.origin(),
        hook.url("/hook")
    );
    let mut gw = Gateway::new(&config, RULES);
    gw.ingest(&order(1, "shop@example.com"));
    gw.ingest(&order(2, "shop@example.com"));
    gw.ingest(&hostile(&hits));
    gw.ingest(&order(3, "someone-else@example.org"));
    gw.start();
    let web = gw.listening("web");
    hook.wait_for_accepted(4, Duration::from_secs(20));
    // Every message is archived once the card's API lists it.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, _, body) = support::gateway::http_get(
            web,
            "/kustomer/api/messages?email=shop@example.com&email=someone-else@example.org",
            Some(CARD_KEY),
        );
        if status == 200 && serde_json::from_str::<Value>(&body).unwrap()["messages"].as_array().unwrap().len() == 4 {
            break;
        }
        assert!(Instant::now() < deadline, "not archived: {status} {body}");
        std::thread::sleep(Duration::from_millis(50));
    }

    let context = json!({
        "customer": {"type": "customer", "id": "c1", "attributes": {"name": "Shop", "emails": [{"type": "work", "email": "shop@example.com"}]}},
        "conversation": {"type": "conversation", "id": "conv1", "attributes": {"custom": {}}},
    });
    kustomer.set("/sdk.js", "text/javascript", sdk_stub(&context));
    let card = format!("http://{web}/kustomer/card?key={CARD_KEY}&parentUrl=http%3A%2F%2F{}&id=card1", kustomer.addr);
    let frame_page = format!(
        "<!doctype html><title>Kustomer</title><iframe id=\"card\" src=\"{card}\" width=\"800\" height=\"900\"></iframe>"
    );
    kustomer.set("/timeline", "text/html", frame_page.clone());
    elsewhere.set("/timeline", "text/html", frame_page);

    let driver = Driver::start();
    let browser = driver.browser().await;
    browser.goto(&format!("{}/timeline", kustomer.origin())).await.unwrap();
    browser.enter_frame(0).await.unwrap();
    wait_for(&browser, "li.mail").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while browser.find_all(Locator::Css("li.mail")).await.unwrap().len() < 3 {
        assert!(Instant::now() < deadline, "the card did not list three emails");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The customer's three emails, newest first, and not the other customer's.
    let subjects = texts(&browser, "li.mail .subject").await;
    assert_eq!(subjects.len(), 3, "{subjects:?}");
    assert!(subjects[0].starts_with("Order 666 <img src=x onerror="), "the subject shown as text: {subjects:?}");
    assert_eq!(&subjects[1..], ["Order 2", "Order 1"]);
    let fields = texts(&browser, "li.mail .fields").await;
    assert_eq!(fields[1], "order: 2");
    let resized =
        browser.execute("return document.documentElement.getAttribute('data-resized')", vec![]).await.unwrap();
    assert!(
        resized.as_str().is_some_and(|n| n.parse::<u32>().unwrap() >= 1),
        "Kustomer.resize() was called: {resized}"
    );

    // Expand "Order 2": the viewer shows the original.
    browser.find_all(Locator::Css("li.mail button")).await.unwrap()[1].click().await.unwrap();
    let viewer = wait_for(&browser, "li.mail iframe.viewer").await;
    viewer.enter_frame().await.unwrap();
    assert_eq!(wait_for(&browser, "#subject").await.text().await.unwrap(), "Order 2");
    assert_eq!(wait_for(&browser, "#text").await.text().await.unwrap().trim(), "Order number 2, thank you.");
    wait_for(&browser, "#email-html").await.enter_frame().await.unwrap();
    let original =
        browser.wait().at_most(Duration::from_secs(15)).for_element(Locator::XPath("//p[contains(., 'original')]"));
    assert_eq!(original.await.unwrap().text().await.unwrap(), "The original of order 2");
    browser.enter_parent_frame().await.unwrap();
    browser.enter_parent_frame().await.unwrap();

    // The hostile email, expanded: shown, and nothing of it runs or loads.
    browser.find_all(Locator::Css("li.mail button")).await.unwrap()[0].click().await.unwrap();
    let viewers = browser.wait().at_most(Duration::from_secs(15));
    viewers.for_element(Locator::Css("li.mail:first-child iframe.viewer")).await.unwrap().enter_frame().await.unwrap();
    wait_for(&browser, "#email-html").await.enter_frame().await.unwrap();
    let p = browser.wait().at_most(Duration::from_secs(15)).for_element(Locator::XPath("//p[contains(., 'harmless')]"));
    assert_eq!(p.await.unwrap().text().await.unwrap(), "Hostile but harmless");
    let js = browser.find(Locator::LinkText("click me")).await.unwrap();
    assert_eq!(js.attr("href").await.unwrap(), None);
    js.click().await.unwrap();
    browser.enter_parent_frame().await.unwrap();
    browser.enter_parent_frame().await.unwrap();
    browser.enter_parent_frame().await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let title = browser.execute("return document.title", vec![]).await.unwrap();
    assert_eq!(title, "Kustomer", "no script reached the top page");
    let loaded: Vec<String> = hook.requests().into_iter().map(|r| r.path).filter(|p| p.starts_with("/hit")).collect();
    assert!(loaded.is_empty(), "the hostile email reached out: {loaded:?}");
    browser.goto(&format!("{hits}/probe")).await.unwrap();
    assert!(hook.requests().iter().any(|r| r.path == "/hit/probe"), "the hook server counts what the browser loads");

    // Framed from an origin not in frame_ancestors: the browser refuses to show the card.
    browser.goto(&format!("{}/timeline", elsewhere.origin())).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    browser.enter_frame(0).await.unwrap();
    let inside = browser
        .execute("return document.getElementById('mails') === null ? location.href : 'card shown'", vec![])
        .await;
    let inside =
        inside.map(|v| v.as_str().unwrap_or_default().to_string()).unwrap_or_else(|e| format!("no access: {e}"));
    assert_ne!(inside, "card shown", "the card was shown inside a frame of {}", elsewhere.origin());
    // ...while the same page from the allowed origin shows it (the refusal is the CSP's).
    browser.goto(&format!("{}/timeline", kustomer.origin())).await.unwrap();
    browser.enter_frame(0).await.unwrap();
    wait_for(&browser, "li.mail").await;
    browser.close().await.unwrap();
    assert_eq!(gw.stop(), 0);
}
