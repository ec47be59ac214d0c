//! The console in a real browser: Debian's Chromium, headless, driven through chromedriver
//! (WebDriver, on 127.0.0.1) by `fantoccini`, against the real `mailhook serve` and a local hook
//! server. It logs in, finds a message by its subject, opens it, checks that a hostile email
//! is inert (nothing of it runs or loads: every URL it names points at the hook server, which
//! counts the requests), retries a dead letter and sees it delivered, and changes a rule in the
//! playground. With `MAILHOOK_SCREENSHOTS=1` it saves the main pages to `docs/screenshots/`.
//!
//! Needs `/usr/bin/chromedriver` and `/usr/bin/chromium` (`apt-get install -y chromium
//! chromium-driver`; `.ci/run` installs them).

mod support;

use fantoccini::{Client, Locator};
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use support::browser::Driver;
use support::gateway::Gateway;
use support::hook::{HookOptions, HookServer};

const TOKEN: &str = "browser-test-token-4567";

const RULES: &str = r#"
[[rule]]
name = "orders"
to = ["hook"]

[rule.when]
subject = 'Order'

[rule.extract]
subject = 'Order (?P<order>\d+)'
"#;

/// A message whose HTML tries everything; every URL in it counts a hit on the hook server.
fn hostile(hits: &str) -> String {
    format!(
        "From: Mallory <mallory@example.com>\r\nSubject: Order 666 <img src=x onerror=\"fetch('{hits}/subject')\">\r\n\
         MIME-Version: 1.0\r\nContent-Type: multipart/alternative; boundary=b\r\n\r\n--b\r\n\
         Content-Type: text/plain\r\n\r\nplain text part\r\n--b\r\nContent-Type: text/html\r\n\r\n\
         <html><head><base href=\"{hits}/base/\"><meta http-equiv=\"refresh\" content=\"0;url={hits}/refresh\">\
         <style>body {{ background: url({hits}/style) }}</style></head><body>\
         <script>fetch('{hits}/script'); parent.document.title = 'pwned';</script>\
         <img src=\"x\" onerror=\"fetch('{hits}/onerror')\">\
         <img src=\"relative.png\"><img src=\"{hits}/remote-image\">\
         <a id=\"js\" href=\"javascript:fetch('{hits}/javascript')\">click me</a>\
         <div style=\"background-image: url({hits}/css)\">styled</div>\
         <svg onload=\"fetch('{hits}/svg')\"></svg><iframe src=\"{hits}/iframe\"></iframe>\
         <p id=\"visible\">Hostile but harmless</p></body></html>\r\n--b--\r\n"
    )
}

fn order(n: u32) -> Vec<u8> {
    format!("From: Shop <shop@example.com>\r\nSubject: Order {n} shipped\r\n\r\nYour order {n} is on its way.\r\n")
        .into_bytes()
}

/// Waits until the API lists `n` messages for `query`.
fn wait_listed(addr: SocketAddr, query: &str, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, _, body) = support::gateway::http_get(addr, &format!("/api/v1/messages?{query}"), Some(TOKEN));
        assert_eq!(status, 200, "{body}");
        let list = serde_json::from_str::<Value>(&body).unwrap()["messages"].as_array().unwrap().clone();
        if list.len() == n {
            return list;
        }
        assert!(Instant::now() < deadline, "{query}: {} listed, not {n}", list.len());
        std::thread::sleep(Duration::from_millis(50));
    }
}

async fn screenshot(browser: &Client, name: &str) {
    if std::env::var_os("MAILHOOK_SCREENSHOTS").is_none() {
        return;
    }
    let png = browser.screenshot().await.unwrap();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
}

/// The hostile message's one harmless paragraph (ids are stripped by the sanitiser).
async fn visible_text(browser: &Client) -> String {
    let p = browser.wait().at_most(Duration::from_secs(15)).for_element(Locator::XPath("//p[contains(., 'harmless')]"));
    p.await.expect("the paragraph is shown").text().await.unwrap()
}

/// The text of `css` once `ready` accepts it (pages change under a click: an element found
/// on the page being left goes stale, so it is looked up again until then, at most 15 s).
async fn wait_text(browser: &Client, css: &str, ready: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut last = String::new();
    loop {
        if let Ok(e) = browser.find(Locator::Css(css)).await
            && let Ok(text) = e.text().await
        {
            if ready(&text) {
                return text;
            }
            last = text;
        }
        assert!(Instant::now() < deadline, "{css}: still {last:?} after 15 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_in_a_real_browser() {
    let hook = HookServer::start(HookOptions::default());
    let hits = hook.url("/hit");
    let config = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\n\n\
         [delivery]\ntimeout = \"5s\"\nretry_for = \"1h\"\nbackoff = {{ initial = \"200ms\", max = \"500ms\" }}\nrate = \"off\"\n\n\
         [destination.hook]\ntype = \"webhook\"\nurl = \"{}\"\n",
        hook.url("/hook")
    );
    let mut gw = Gateway::new(&config, RULES);
    // The first delivery is refused for good: a dead letter to retry.
    hook.push_status(400);
    let dead_id = gw.ingest(&order(1));
    gw.start();
    let addr = gw.listening("admin");
    wait_listed(addr, "state=dead", 1);
    let shipped = gw.ingest(&order(4711));
    let evil = gw.ingest(hostile(&hits).as_bytes());
    wait_listed(addr, "state=delivered", 2);
    let base = format!("http://{addr}");

    let driver = Driver::start();
    let browser = driver.browser().await;

    // Log in.
    browser.goto(&format!("{base}/")).await.unwrap();
    assert!(browser.current_url().await.unwrap().path().ends_with("/login"), "sent to the login page");
    browser.find(Locator::Css("#token")).await.unwrap().send_keys(TOKEN).await.unwrap();
    browser.find(Locator::Css("button[type=submit]")).await.unwrap().click().await.unwrap();
    wait_text(&browser, "h1", |t| t == "Overview").await;
    screenshot(&browser, "overview").await;

    // Find a message by its subject and open it.
    browser.goto(&format!("{base}/messages")).await.unwrap();
    browser.find(Locator::Css("input[name=q]")).await.unwrap().send_keys("4711").await.unwrap();
    browser.find(Locator::Css("form.filters button")).await.unwrap().click().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while !browser.current_url().await.unwrap().query().is_some_and(|q| q.contains("q=4711")) {
        assert!(Instant::now() < deadline, "the search did not load");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let link = browser
        .wait()
        .at_most(Duration::from_secs(15))
        .for_element(Locator::LinkText("Order 4711 shipped"))
        .await
        .unwrap();
    assert_eq!(browser.find_all(Locator::Css("table.list a")).await.unwrap().len(), 1, "only the match is listed");
    screenshot(&browser, "messages").await;
    link.click().await.unwrap();
    wait_text(&browser, "h1", |t| t == "Order 4711 shipped").await;
    assert!(browser.current_url().await.unwrap().path().ends_with(&shipped));
    screenshot(&browser, "message").await;

    // The hostile message: shown, and nothing of it runs or loads, framed or opened alone.
    browser.goto(&format!("{base}/messages/{evil}")).await.unwrap();
    let title = wait_text(&browser, "h1", |t| t.starts_with("Order 666")).await;
    assert!(title.contains("onerror"), "the subject is shown as text: {title}");
    let frame =
        browser.wait().at_most(Duration::from_secs(15)).for_element(Locator::Css("iframe.email")).await.unwrap();
    assert_eq!(frame.attr("sandbox").await.unwrap().as_deref(), Some(""));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let page_title = browser.execute("return document.title", vec![]).await.unwrap();
    assert!(page_title.as_str().unwrap().starts_with("Order 666 <img"), "no script renamed the page: {page_title}");
    screenshot(&browser, "hostile").await;
    // The javascript: link, clicked inside the frame, does nothing.
    browser.enter_frame(0).await.unwrap();
    assert_eq!(visible_text(&browser).await, "Hostile but harmless");
    // The sanitiser dropped the javascript: URL; clicking what is left of the link does nothing.
    let js = browser.find(Locator::LinkText("click me")).await.unwrap();
    assert_eq!(js.attr("href").await.unwrap(), None);
    js.click().await.unwrap();
    browser.enter_parent_frame().await.unwrap();
    browser.goto(&format!("{base}/messages/{evil}/html")).await.unwrap();
    assert_eq!(visible_text(&browser).await, "Hostile but harmless");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(browser.current_url().await.unwrap().path().ends_with("/html"), "no refresh took the page away");
    let loaded: Vec<String> = hook.requests().into_iter().map(|r| r.path).filter(|p| p.starts_with("/hit")).collect();
    assert!(loaded.is_empty(), "the hostile email reached out: {loaded:?}");
    // The counter itself works: the browser loading one of those URLs on purpose is seen.
    browser.goto(&format!("{hits}/probe")).await.unwrap();
    let counted = hook.requests().iter().any(|r| r.path == "/hit/probe");
    assert!(counted, "the hook server counts what the browser loads");

    // Retry a dead letter and see it delivered.
    browser.goto(&format!("{base}/dead")).await.unwrap();
    browser.find(Locator::Css(&format!("input[value='{dead_id}']"))).await.unwrap().click().await.unwrap();
    screenshot(&browser, "dead").await;
    browser.find(Locator::Css("button[value=retry]")).await.unwrap().click().await.unwrap();
    let notice = wait_text(&browser, "ul.notices", |_| true).await;
    assert!(notice.contains("queued for delivery now"), "{notice}");
    wait_listed(addr, "state=dead", 0);
    browser.goto(&format!("{base}/messages/{dead_id}")).await.unwrap();
    wait_text(&browser, "p.meta .state", |t| t == "delivered").await;
    let outcomes = browser.find_all(Locator::Css("table.attempts td[class^=outcome]")).await.unwrap();
    let mut seen = Vec::new();
    for o in outcomes {
        seen.push(o.text().await.unwrap());
    }
    assert_eq!(seen, vec!["dead", "delivered"]);

    // The playground: the archived message through a rule edited in the browser.
    browser.goto(&format!("{base}/playground?id={shipped}")).await.unwrap();
    browser.find(Locator::Css("form.playground > button")).await.unwrap().click().await.unwrap();
    let before = wait_text(&browser, "#payload", |_| true).await;
    assert!(before.contains("\"order\": \"4711\"") && !before.contains("ticket"), "{before}");
    let rules = browser.find(Locator::Css("#rules")).await.unwrap();
    rules.send_keys("\n[rule.payload]\nticket = \"T-{{ order }}\"\n").await.unwrap();
    browser.find(Locator::Css("form.playground > button")).await.unwrap().click().await.unwrap();
    let after = wait_text(&browser, "#payload", |t| t.contains("ticket")).await;
    assert_eq!(serde_json::from_str::<Value>(&after).unwrap(), json!({"ticket": "T-4711"}), "{after}");
    wait_text(&browser, "#matched-rule", |t| t == "orders").await;
    screenshot(&browser, "playground").await;

    browser.goto(&format!("{base}/tail")).await.unwrap();
    let state = browser.wait().at_most(Duration::from_secs(15)).for_element(Locator::Css("#tail-state")).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while state.text().await.unwrap() != "live" {
        assert!(Instant::now() < deadline, "the live tail did not connect");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    gw.ingest(&order(99));
    let row = browser
        .wait()
        .at_most(Duration::from_secs(15))
        .for_element(Locator::LinkText("Order 99 shipped"))
        .await
        .unwrap();
    assert!(row.attr("href").await.unwrap().unwrap().starts_with("/messages/"));
    screenshot(&browser, "tail").await;

    browser.close().await.unwrap();
}
