//! The test-support servers in `tests/support/` behave as specified, checked with real clients:
//! reqwest against `HookServer`, lettre (and a raw TCP client for protocol details) against
//! `SmtpSink`, and a raw IMAP client plus rustls against a real `Dovecot`.

mod support;

use lettre::message::header::ContentType;
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};
use support::dovecot::{Dovecot, DovecotOptions, OAUTH_TOKEN, OTHER_PASSWORD, OTHER_USER, PASSWORD, USER};
use support::hook::{HookOptions, HookServer, Scripted};
use support::smtp::{SmtpOptions, SmtpSink, json_ld, json_ld_in_html};

const WAIT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------- hook server

async fn post(url: &str, token: Option<&str>, body: &str) -> reqwest::Response {
    let mut request =
        support::http_client().post(url).header("content-type", "application/json").body(body.to_string());
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request.send().await.expect("request reaches the hook server")
}

/// A JSON object whose serialised form is exactly `len` bytes.
fn json_of_len(len: usize) -> String {
    let overhead = r#"{"p":""}"#.len();
    let body = format!(r#"{{"p":"{}"}}"#, "x".repeat(len - overhead));
    assert_eq!(body.len(), len);
    body
}

#[tokio::test]
async fn bearer_token_missing_wrong_right() {
    let hook = HookServer::with_token("s3cret");
    let url = hook.url("/v1/hooks/web/abc");

    let missing = post(&url, None, r#"{"a":1}"#).await;
    assert_eq!(missing.status(), 401);
    let error: Value = missing.json().await.expect("401 body is JSON");
    assert!(error.is_object(), "{error}");

    assert_eq!(post(&url, Some("wrong"), r#"{"a":2}"#).await.status(), 401);

    let ok = post(&url, Some("s3cret"), r#"{"a":3}"#).await;
    assert_eq!(ok.status(), 200);
    assert_eq!(ok.json::<Value>().await.unwrap(), json!({"ok": true}));

    let all = hook.requests();
    assert_eq!(all.iter().map(|r| r.status).collect::<Vec<_>>(), [401, 401, 200]);
    assert_eq!(all[0].authorization, None);
    assert_eq!(all[1].authorization.as_deref(), Some("Bearer wrong"));
    assert_eq!(all[2].authorization.as_deref(), Some("Bearer s3cret"));
    assert_eq!(all[0].json, Some(json!({"a": 1})), "rejected requests keep their body");
    let accepted = hook.accepted();
    assert_eq!(accepted.len(), 1);
    assert_eq!(accepted[0].json, Some(json!({"a": 3})));
    assert_eq!(accepted[0].path, "/v1/hooks/web/abc");
    assert_eq!(accepted[0].method, "POST");
}

#[tokio::test]
async fn no_token_configured_accepts_any_authorization() {
    let hook = HookServer::start(HookOptions::default());
    assert_eq!(post(&hook.url("form/org/hash"), None, "{}").await.status(), 200);
    assert_eq!(post(&hook.url("/form/org/hash"), Some("x"), "{}").await.status(), 200);
    assert_eq!(hook.accepted()[0].path, "/form/org/hash");
}

#[tokio::test]
async fn body_limit_is_kustomers_400kb() {
    let hook = HookServer::start(HookOptions::default());
    let url = hook.url("/v1/hooks/web/abc");
    assert_eq!(post(&url, None, &json_of_len(399_999)).await.status(), 200);
    assert_eq!(post(&url, None, &json_of_len(400_000)).await.status(), 200);
    assert_eq!(post(&url, None, &json_of_len(400_001)).await.status(), 413);

    let all = hook.requests();
    assert_eq!(all.iter().map(|r| r.body_len).collect::<Vec<_>>(), [399_999, 400_000, 400_001]);
    assert_eq!(all.iter().map(|r| r.status).collect::<Vec<_>>(), [200, 200, 413]);
}

#[tokio::test]
async fn body_limit_is_configurable() {
    let hook = HookServer::start(HookOptions { max_body: 100, ..HookOptions::default() });
    assert_eq!(post(&hook.url("/h"), None, &json_of_len(100)).await.status(), 200);
    assert_eq!(post(&hook.url("/h"), None, &json_of_len(101)).await.status(), 413);
}

#[tokio::test]
async fn bodies_must_be_json_objects() {
    let hook = HookServer::start(HookOptions::default());
    let url = hook.url("/h");
    assert_eq!(post(&url, None, "not json").await.status(), 400);
    assert_eq!(post(&url, None, "[1,2]").await.status(), 400);
    assert_eq!(post(&url, None, "").await.status(), 400);
    assert_eq!(post(&url, None, r#"{"k":"v"}"#).await.status(), 200);
    let all = hook.requests();
    assert_eq!(all[0].json, None);
    assert_eq!(all[1].json, Some(json!([1, 2])));
    assert_eq!(all[0].body, b"not json");
}

#[tokio::test]
async fn non_post_is_405() {
    let hook = HookServer::start(HookOptions::default());
    let response = support::http_client().get(hook.url("/h")).send().await.unwrap();
    assert_eq!(response.status(), 405);
    assert_eq!(hook.requests()[0].method, "GET");
    assert!(hook.accepted().is_empty());
}

#[tokio::test]
async fn scripted_statuses_are_used_once_in_order() {
    let hook = HookServer::with_token("t");
    let url = hook.url("/h");
    hook.push_status(500);
    hook.push_status(503);
    hook.push_status(400);
    assert_eq!(post(&url, Some("t"), "{}").await.status(), 500);
    assert_eq!(post(&url, Some("t"), "{}").await.status(), 503);
    let bad = post(&url, Some("t"), "{}").await;
    assert_eq!(bad.status(), 400);
    assert!(bad.text().await.unwrap().contains("400"));
    assert_eq!(post(&url, Some("t"), "{}").await.status(), 200);
    assert_eq!(hook.requests().iter().map(|r| r.status).collect::<Vec<_>>(), [500, 503, 400, 200]);
    assert_eq!(hook.accepted().len(), 1);
}

#[tokio::test]
async fn scripted_response_with_custom_headers() {
    let hook = HookServer::start(HookOptions::default());
    hook.push_response(Scripted::status(429).header("x-ratelimit-reset", "1767225600"));
    let response = post(&hook.url("/h"), None, "{}").await;
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()["x-ratelimit-reset"], "1767225600");
    assert!(response.headers().get("retry-after").is_none());
}

#[tokio::test]
async fn rate_limited_429_carries_retry_after_and_ratelimit_headers() {
    let hook = HookServer::start(HookOptions::default());
    hook.push_429(7);
    let limited = post(&hook.url("/v1/hooks/web/abc"), None, "{}").await;
    assert_eq!(limited.status(), 429);
    let h = limited.headers();
    assert_eq!(h["retry-after"], "7");
    assert_eq!(h["x-ratelimit-limit"], "1000");
    assert_eq!(h["x-ratelimit-remaining"], "0");
    assert_eq!(h["x-ratelimit-reset"], "7");
    assert_eq!(post(&hook.url("/v1/hooks/web/abc"), None, "{}").await.status(), 200);
}

#[tokio::test]
async fn down_answers_503_until_back_up() {
    let hook = HookServer::with_token("t");
    hook.push_status(500);
    hook.set_down(true);
    let url = hook.url("/h");
    assert_eq!(post(&url, Some("t"), "{}").await.status(), 503);
    assert_eq!(post(&url, None, "{}").await.status(), 503, "down wins over auth");
    hook.set_down(false);
    assert_eq!(post(&url, Some("t"), "{}").await.status(), 500, "queued answer kept while down");
    assert_eq!(post(&url, Some("t"), "{}").await.status(), 200);
}

#[tokio::test]
async fn delay_holds_answers_back_but_requests_are_recorded() {
    let hook = HookServer::start(HookOptions::default());
    hook.set_delay(Duration::from_millis(400));
    let started = Instant::now();
    assert_eq!(post(&hook.url("/h"), None, "{}").await.status(), 200);
    assert!(started.elapsed() >= Duration::from_millis(400), "{:?}", started.elapsed());

    // A client that gives up early still reached the server: it was recorded (and accepted).
    support::init_crypto();
    let impatient = reqwest::Client::builder().timeout(Duration::from_millis(100)).build().unwrap();
    let err = impatient.post(hook.url("/h")).body(r#"{"id":"late"}"#).send().await.expect_err("client times out");
    assert!(err.is_timeout(), "{err}");
    let accepted = hook.wait_for_accepted(2, WAIT);
    assert_eq!(accepted[1].json, Some(json!({"id": "late"})));

    hook.set_delay(Duration::ZERO);
    let started = Instant::now();
    assert_eq!(post(&hook.url("/h"), None, "{}").await.status(), 200);
    assert!(started.elapsed() < Duration::from_millis(400));
}

#[tokio::test]
async fn records_headers_and_idempotency_key() {
    let hook = HookServer::with_token("tok");
    let client = support::http_client();
    for _ in 0..2 {
        let response = client
            .post(hook.url("/v1/hooks/web/abc?x=1"))
            .bearer_auth("tok")
            .header("idempotency-key", "01JTESTSPOOLID")
            .header("user-agent", "mailhook/0.1.0")
            .header("x-api-key", "k1")
            .json(&json!({"id": "01JTESTSPOOLID", "rule": "r"}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    let accepted = hook.wait_for_accepted(2, WAIT);
    for r in &accepted {
        assert_eq!(r.idempotency_key.as_deref(), Some("01JTESTSPOOLID"));
        assert_eq!(r.content_type.as_deref(), Some("application/json"));
        assert_eq!(r.user_agent.as_deref(), Some("mailhook/0.1.0"));
        assert_eq!(r.authorization.as_deref(), Some("Bearer tok"));
        assert_eq!(r.header("X-Api-Key"), Some("k1"));
        assert_eq!(r.path, "/v1/hooks/web/abc");
        assert_eq!(r.query.as_deref(), Some("x=1"));
        assert_eq!(r.json.as_ref().unwrap()["id"], "01JTESTSPOOLID");
        assert_eq!(r.body_len, r.body.len());
    }
    assert!(accepted[0].at <= accepted[1].at);
    hook.clear();
    assert!(hook.requests().is_empty());
}

#[tokio::test]
async fn wait_for_accepted_async_sees_later_requests() {
    let hook = HookServer::start(HookOptions::default());
    let url = hook.url("/h");
    let sender = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        post(&url, None, r#"{"n":1}"#).await.status()
    });
    let got = hook.wait_for_accepted_async(1, WAIT).await;
    assert_eq!(got[0].json, Some(json!({"n": 1})));
    assert_eq!(sender.await.unwrap(), 200);
}

#[tokio::test]
#[should_panic(expected = "expected 1 request(s) accepted")]
async fn wait_for_accepted_panics_listing_what_arrived() {
    let hook = HookServer::with_token("t");
    assert_eq!(post(&hook.url("/h"), None, r#"{"id":"x1"}"#).await.status(), 401);
    hook.wait_for_accepted(1, Duration::from_millis(200));
}

#[test]
fn wait_message_lists_the_requests() {
    let hook = HookServer::with_token("t");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(post(&hook.url("/v1/hooks/web/z"), None, r#"{"id":"x1"}"#));
    let panic = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        hook.wait_for_accepted(1, Duration::from_millis(100));
    }))
    .expect_err("times out");
    let msg = panic.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(msg.contains("1 arrived"), "{msg}");
    assert!(msg.contains("POST /v1/hooks/web/z -> 401"), "{msg}");
    assert!(msg.contains("\"x1\""), "{msg}");
}

#[test]
fn servers_stop_when_dropped() {
    let hook = HookServer::start(HookOptions::default());
    let hook_addr = hook.addr();
    let sink = SmtpSink::start(SmtpOptions::default());
    let sink_addr = sink.addr();
    assert!(TcpStream::connect(hook_addr).is_ok());
    assert!(TcpStream::connect(sink_addr).is_ok());
    drop(hook);
    drop(sink);
    assert!(TcpStream::connect(hook_addr).is_err(), "hook server still listening");
    assert!(TcpStream::connect(sink_addr).is_err(), "SMTP sink still listening");
}

#[test]
fn urls_are_loopback() {
    let hook = HookServer::start(HookOptions::default());
    let port = hook.addr().port();
    assert_eq!(hook.url("/v1/hooks/web/abc"), format!("http://127.0.0.1:{port}/v1/hooks/web/abc"));
    assert_eq!(hook.url("x"), format!("http://127.0.0.1:{port}/x"));
    let sink = SmtpSink::start(SmtpOptions::default());
    assert_eq!(sink.relay_url(), format!("smtp://127.0.0.1:{}", sink.port()));
}

// ---------------------------------------------------------------- SMTP sink

fn transport(sink: &SmtpSink) -> AsyncSmtpTransport<Tokio1Executor> {
    AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous("127.0.0.1")
        .port(sink.port())
        .timeout(Some(Duration::from_secs(10)))
        .build()
}

fn transport_with_auth(
    sink: &SmtpSink,
    user: &str,
    pass: &str,
    mechanism: Mechanism,
) -> AsyncSmtpTransport<Tokio1Executor> {
    AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous("127.0.0.1")
        .port(sink.port())
        .timeout(Some(Duration::from_secs(10)))
        .credentials(Credentials::new(user.to_string(), pass.to_string()))
        .authentication(vec![mechanism])
        .build()
}

/// An email-hook message: the payload in a JSON-LD script tag of the HTML body.
fn hook_email(key: &str, payload: &Value) -> lettre::Message {
    let json = serde_json::to_string(payload).unwrap().replace("</", "<\\/");
    let html = format!(
        "<!DOCTYPE html><html><body><p>Event from mailhook</p>\
         <script type=\"application/ld+json\" data-kustomer-key=\"{key}\">{json}</script></body></html>"
    );
    lettre::Message::builder()
        .from("mailhook@example.com".parse().unwrap())
        .to("hash123@hooks.example.com".parse().unwrap())
        .subject("mailhook event")
        .header(ContentType::TEXT_HTML)
        .body(html)
        .unwrap()
}

fn simple_email() -> lettre::Message {
    hook_email("k", &json!({"n": 1}))
}

#[tokio::test]
async fn lettre_delivers_html_email_and_json_ld_reads_it_back() {
    support::init_crypto();
    let sink = SmtpSink::start(SmtpOptions::default());
    let payload = json!({
        "id": "01JTESTSPOOLID",
        "subject": "Order 42 </script> shipped — café",
        "fields": {"order_id": 42, "tracking": "1Z999AA10123456784"},
        "text": "line 1\n.line starting with a dot\n"
    });
    transport(&sink).send(hook_email("KEY-abc_123", &payload)).await.expect("lettre sends");

    let messages = sink.wait_for_messages(1, WAIT);
    let m = &messages[0];
    assert_eq!(m.mail_from, "mailhook@example.com");
    assert_eq!(m.rcpt, ["hash123@hooks.example.com"]);
    assert_eq!(m.auth_user, None);
    assert_eq!(m.reply, 250);
    assert!(m.data.ends_with(b"\r\n"), "data keeps its final CRLF, not the dot line");
    let (key, got) = json_ld(&m.data).expect("JSON-LD found in the HTML body");
    assert_eq!(key, "KEY-abc_123");
    assert_eq!(got, payload);
    assert_eq!(m.json_ld(), Some((key, got)));
    assert_eq!(m.email().subject, "mailhook event");
}

#[tokio::test]
async fn data_replies_451_is_transient_554_is_permanent() {
    let sink = SmtpSink::start(SmtpOptions::default());
    let mailer = transport(&sink);
    sink.push_data_reply(451, "4.3.0 Try again later");
    sink.push_data_reply(554, "5.6.0 Message rejected");

    let e = mailer.send(simple_email()).await.expect_err("451");
    assert!(e.is_transient() && !e.is_permanent(), "{e:?}");
    let e = mailer.send(simple_email()).await.expect_err("554");
    assert!(e.is_permanent() && !e.is_transient(), "{e:?}");
    mailer.send(simple_email()).await.expect("third message accepted");

    assert_eq!(sink.messages().len(), 1);
    let rejected = sink.rejected();
    assert_eq!(rejected.iter().map(|m| m.reply).collect::<Vec<_>>(), [451, 554]);
}

#[tokio::test]
async fn a_standing_data_reply_refuses_every_message_until_cleared() {
    let sink = SmtpSink::start(SmtpOptions::default());
    let mailer = transport(&sink);
    sink.push_data_reply(554, "5.6.0 one-off first");
    sink.set_data_reply(Some((451, "4.3.0 Busy")));
    assert!(mailer.send(simple_email()).await.expect_err("554").is_permanent());
    for _ in 0..3 {
        assert!(mailer.send(simple_email()).await.expect_err("451").is_transient());
    }
    sink.set_data_reply(None);
    mailer.send(simple_email()).await.expect("accepted once cleared");
    assert_eq!(sink.messages().len(), 1);
    assert_eq!(sink.rejected().iter().map(|m| m.reply).collect::<Vec<_>>(), [554, 451, 451, 451]);
}

#[tokio::test]
async fn dropping_connections_also_closes_open_sessions() {
    let sink = SmtpSink::start(SmtpOptions::default());
    // A pooled transport keeps its connection open between messages.
    let mailer = transport(&sink);
    mailer.send(simple_email()).await.expect("first message");
    sink.set_drop_connections(true);
    let e = mailer.send(simple_email()).await.expect_err("the open session is closed without an answer");
    assert!(!e.is_permanent(), "{e:?}");
    sink.set_drop_connections(false);
    mailer.send(simple_email()).await.expect("accepted again");
    assert_eq!(sink.messages().len(), 2);
    assert!(sink.rejected().is_empty(), "a dropped message is neither accepted nor answered");
}

#[tokio::test]
async fn lettre_auth_plain_and_login_on_a_plain_connection() {
    let sink = SmtpSink::with_auth("hookuser", "hookpass");

    transport_with_auth(&sink, "hookuser", "hookpass", Mechanism::Plain)
        .send(simple_email())
        .await
        .expect("AUTH PLAIN with the right credentials");
    transport_with_auth(&sink, "hookuser", "hookpass", Mechanism::Login)
        .send(simple_email())
        .await
        .expect("AUTH LOGIN with the right credentials");

    let e = transport_with_auth(&sink, "hookuser", "nope", Mechanism::Plain)
        .send(simple_email())
        .await
        .expect_err("wrong password");
    assert!(e.is_permanent(), "535 is permanent: {e:?}");

    let e = transport(&sink).send(simple_email()).await.expect_err("no AUTH");
    assert!(e.is_permanent(), "530 is permanent: {e:?}");

    let messages = sink.wait_for_messages(2, WAIT);
    assert_eq!(messages.len(), 2);
    assert!(messages.iter().all(|m| m.auth_user.as_deref() == Some("hookuser")));
}

#[tokio::test]
async fn dropped_connections_fail_then_recover() {
    let sink = SmtpSink::start(SmtpOptions::default());
    sink.set_drop_connections(true);
    let e = transport(&sink).send(simple_email()).await.expect_err("connection dropped");
    assert!(!e.is_permanent(), "{e:?}");
    assert!(sink.connections() >= 1);
    assert!(sink.messages().is_empty());

    sink.set_drop_connections(false);
    transport(&sink).send(simple_email()).await.expect("sends once connections are kept");
    assert_eq!(sink.messages().len(), 1);
}

#[tokio::test]
#[should_panic(expected = "expected 1 message(s)")]
async fn wait_for_messages_panics_on_timeout() {
    let sink = SmtpSink::start(SmtpOptions::default());
    sink.wait_for_messages(1, Duration::from_millis(100));
}

/// A line-based SMTP client over a plain TCP socket, for checking the protocol by hand.
struct RawSmtp {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl RawSmtp {
    fn connect(sink: &SmtpSink) -> RawSmtp {
        let stream = TcpStream::connect(sink.addr()).unwrap();
        stream.set_read_timeout(Some(WAIT)).unwrap();
        let mut raw = RawSmtp { reader: BufReader::new(stream.try_clone().unwrap()), writer: stream };
        assert_eq!(raw.reply().0, 220);
        raw
    }

    fn send(&mut self, text: &str) {
        self.writer.write_all(text.as_bytes()).unwrap();
    }

    /// Reads one (possibly multi-line) reply: its code and the text of each line.
    fn reply(&mut self) -> (u16, Vec<String>) {
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            self.reader.read_line(&mut line).unwrap();
            assert!(line.len() >= 4 && line.ends_with("\r\n"), "bad reply line {line:?}");
            let code: u16 = line[..3].parse().unwrap();
            lines.push(line[4..line.len() - 2].to_string());
            if &line[3..4] == " " {
                return (code, lines);
            }
        }
    }

    fn cmd(&mut self, line: &str) -> (u16, Vec<String>) {
        self.send(&format!("{line}\r\n"));
        self.reply()
    }
}

#[test]
fn raw_protocol_without_auth() {
    let sink = SmtpSink::start(SmtpOptions::default());
    let mut c = RawSmtp::connect(&sink);
    let (code, ehlo) = c.cmd("EHLO client.test");
    assert_eq!(code, 250);
    for ext in ["8BITMIME", "PIPELINING"] {
        assert!(ehlo.iter().any(|l| l == ext), "{ehlo:?}");
    }
    assert!(ehlo.iter().any(|l| l.starts_with("SIZE ")), "{ehlo:?}");
    assert!(!ehlo.iter().any(|l| l.starts_with("STARTTLS") || l.starts_with("AUTH")), "{ehlo:?}");

    assert_eq!(c.cmd("AUTH PLAIN AHUAcA==").0, 503, "AUTH not offered");
    assert_eq!(c.cmd("RCPT TO:<a@example.com>").0, 503, "RCPT before MAIL");
    assert_eq!(c.cmd("DATA").0, 503, "DATA before MAIL");
    assert_eq!(c.cmd("MAIL FROM:<>").0, 250);
    assert_eq!(c.cmd("RSET").0, 250);
    assert_eq!(c.cmd("NOOP").0, 250);
    assert_eq!(c.cmd("VRFY someone").0, 500);
    assert_eq!(c.cmd("STARTTLS").0, 500);
    assert_eq!(c.cmd("HELO client.test").0, 250);

    // Pipelined transaction with dot-stuffed lines.
    c.send(
        "MAIL FROM:<s@example.com> BODY=8BITMIME SIZE=100\r\nRCPT TO:<a@example.com>\r\n\
         RCPT TO:<b@example.com>\r\nDATA\r\n",
    );
    assert_eq!(c.reply().0, 250);
    assert_eq!(c.reply().0, 250);
    assert_eq!(c.reply().0, 250);
    assert_eq!(c.reply().0, 354);
    c.send("Subject: t\r\n\r\n..leading dot\r\nnot the end\r\n...\r\n.\r\n");
    assert_eq!(c.reply().0, 250);
    assert_eq!(c.cmd("QUIT").0, 221);

    let m = &sink.wait_for_messages(1, WAIT)[0];
    assert_eq!(m.mail_from, "s@example.com");
    assert_eq!(m.rcpt, ["a@example.com", "b@example.com"]);
    assert_eq!(m.data, b"Subject: t\r\n\r\n.leading dot\r\nnot the end\r\n..\r\n");
}

#[test]
fn raw_protocol_with_auth() {
    let sink = SmtpSink::with_auth("u", "p");
    let mut c = RawSmtp::connect(&sink);
    let (_, ehlo) = c.cmd("EHLO client.test");
    assert!(ehlo.iter().any(|l| l == "AUTH PLAIN LOGIN"), "{ehlo:?}");
    assert_eq!(c.cmd("MAIL FROM:<s@example.com>").0, 530, "MAIL before AUTH");

    // "\0u\0wrong", then a cancelled continuation, then an unknown mechanism.
    assert_eq!(c.cmd("AUTH PLAIN AHUAd3Jvbmc=").0, 535);
    assert_eq!(c.cmd("AUTH PLAIN").0, 334);
    assert_eq!(c.cmd("*").0, 501);
    assert_eq!(c.cmd("AUTH CRAM-MD5").0, 504);
    assert_eq!(c.cmd("AUTH PLAIN !!!").0, 501, "bad base64");

    // AUTH LOGIN: "u" / "p".
    let (code, prompt) = c.cmd("AUTH LOGIN");
    assert_eq!((code, prompt[0].as_str()), (334, "VXNlcm5hbWU6"));
    let (code, prompt) = c.cmd("dQ==");
    assert_eq!((code, prompt[0].as_str()), (334, "UGFzc3dvcmQ6"));
    assert_eq!(c.cmd("cA==").0, 235);
    assert_eq!(c.cmd("AUTH PLAIN AHUAcA==").0, 503, "already authenticated");
    assert_eq!(c.cmd("MAIL FROM:<s@example.com>").0, 250);
    assert_eq!(c.cmd("RCPT TO:<r@example.com>").0, 250);
    assert_eq!(c.cmd("DATA").0, 354);
    assert_eq!(c.cmd("Subject: x\r\n\r\nbody\r\n.").0, 250);
    assert_eq!(c.cmd("QUIT").0, 221);

    // AUTH PLAIN with the credentials on a continuation line ("\0u\0p").
    let mut c = RawSmtp::connect(&sink);
    c.cmd("EHLO client.test");
    assert_eq!(c.cmd("AUTH PLAIN").0, 334);
    assert_eq!(c.cmd("AHUAcA==").0, 235);
    assert_eq!(c.cmd("MAIL FROM:<s@example.com>").0, 250);

    let messages = sink.wait_for_messages(1, WAIT);
    assert_eq!(messages[0].auth_user.as_deref(), Some("u"));
    assert_eq!(messages[0].rcpt, ["r@example.com"]);
}

#[test]
fn oversized_message_is_552() {
    let sink = SmtpSink::start(SmtpOptions { max_size: 64, ..SmtpOptions::default() });
    let mut c = RawSmtp::connect(&sink);
    c.cmd("EHLO client.test");
    assert_eq!(c.cmd("MAIL FROM:<s@example.com>").0, 250);
    assert_eq!(c.cmd("RCPT TO:<r@example.com>").0, 250);
    assert_eq!(c.cmd("DATA").0, 354);
    let big = format!("Subject: big\r\n\r\n{}\r\n.", "y".repeat(200));
    assert_eq!(c.cmd(&big).0, 552);
    assert!(sink.messages().is_empty());
    assert_eq!(sink.rejected()[0].reply, 552);
}

// ---------------------------------------------------------------- json_ld

#[test]
fn json_ld_accepts_any_attribute_order_and_quotes() {
    let cases = [
        r#"<script type="application/ld+json" data-kustomer-key="K1">{"a":1}</script>"#,
        r#"<script data-kustomer-key="K1" type="application/ld+json">{"a":1}</script>"#,
        r#"<SCRIPT data-kustomer-key='K1' id="x" TYPE='application/ld+json' >
             {"a":1}
           </SCRIPT >"#,
        r#"<script type=application/ld+json data-kustomer-key=K1>{"a":1}</script>"#,
    ];
    for html in cases {
        assert_eq!(json_ld_in_html(html), Some(("K1".to_string(), json!({"a": 1}))), "{html}");
    }
}

#[test]
fn json_ld_handles_escaped_script_end_and_skips_other_scripts() {
    let html = r#"<html><script>var a = "<b>";</script>
        <script type="application/ld+json">{"no":"key"}</script>
        <script type="text/javascript" data-kustomer-key="X">{"wrong":"type"}</script>
        <script type="application/ld+json" data-kustomer-key="a&amp;b">{"t":"<\/script> and <\/p>"}</script>"#;
    assert_eq!(json_ld_in_html(html), Some(("a&b".to_string(), json!({"t": "</script> and </p>"}))));
    assert_eq!(json_ld_in_html("<p>no script here</p>"), None);
}

#[test]
fn json_ld_reads_encoded_email_bodies() {
    let raw = b"From: a@example.com\r\nTo: b@example.com\r\nSubject: s\r\nMIME-Version: 1.0\r\n\
Content-Type: multipart/alternative; boundary=\"b1\"\r\n\r\n\
--b1\r\nContent-Type: text/plain\r\n\r\nplain\r\n\
--b1\r\nContent-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n\
<script data-kustomer-key=3D\"QP\" type=3D\"application/ld+json\">{\"caf=C3=A9\":\r\n\
 true}</script>\r\n--b1--\r\n";
    assert_eq!(json_ld(raw), Some(("QP".to_string(), json!({"café": true}))));

    let text_only = b"From: a@example.com\r\nSubject: s\r\n\r\n<script type=\"application/ld+json\" \
data-kustomer-key=\"K\">{}</script>\r\n";
    assert_eq!(json_ld(text_only), None, "a text/plain body is not HTML");
}

// ---------------------------------------------------------------- dovecot

/// A small message with CRLF line ends.
fn mail(subject: &str, body: &str) -> Vec<u8> {
    format!(
        "From: sender@example.com\r\nTo: alice@example.com\r\nSubject: {subject}\r\n\
         Message-ID: <{subject}@example.com>\r\n\r\n{body}\r\n"
    )
    .into_bytes()
}

/// Reads from `stream` until a complete line starting with `tag ` (or, for `*`, any complete
/// line) has arrived; returns everything read.
fn read_until_tagged(stream: &mut impl Read, tag: &str) -> String {
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&all).into_owned();
        let done = text.ends_with("\r\n")
            && (tag == "*" || text.starts_with(&format!("{tag} ")) || text.contains(&format!("\r\n{tag} ")));
        if done {
            return text;
        }
        let n = stream.read(&mut buf).unwrap_or_else(|e| panic!("read after {text:?}: {e}"));
        assert!(n > 0, "connection closed after {text:?}");
        all.extend_from_slice(&buf[..n]);
    }
}

/// The greeting line of the IMAP server on `port`.
fn imap_greeting(port: u16) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to dovecot");
    stream.set_read_timeout(Some(WAIT)).unwrap();
    read_until_tagged(&mut stream, "*")
}

/// A rustls client configuration that trusts only the CA in `ca_file`.
fn trusting(ca_file: &std::path::Path) -> std::sync::Arc<rustls::ClientConfig> {
    support::init_crypto();
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(ca_file).expect("read CA file");
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(cert.expect("CA PEM")).expect("add CA");
    }
    std::sync::Arc::new(rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth())
}

#[test]
fn dovecot_append_fetch_flags_and_folders() {
    let dovecot = Dovecot::start();
    let mut imap = dovecot.client(USER, PASSWORD);
    for capability in ["IDLE", "UIDPLUS", "MOVE"] {
        assert!(imap.has_capability(capability), "{capability} missing from {:?}", imap.capabilities());
    }

    let first = imap.append("INBOX", &mail("one", "first"));
    let second = imap.append_with_flags("INBOX", "\\Seen", &mail("two", "second"));
    // 8-bit text, lines that look like IMAP and SMTP syntax, no final line break.
    let tricky = b"Subject: tricky\r\nContent-Type: text/plain; charset=utf-8\r\n\r\ncaf\xc3\xa9 {5}\r\n\
* 1 FETCH (FLAGS ())\r\n.\r\nt9 OK done\r\nno final line break"
        .to_vec();
    let third = imap.append_with_flags("INBOX", "(\\Flagged \\Seen)", &tricky);
    assert!(first < second && second < third, "UIDs {first} {second} {third}");
    assert_eq!(imap.uids("INBOX"), [first, second, third]);
    assert_eq!(imap.count("INBOX"), 3);
    assert_eq!(imap.fetch("INBOX", third), tricky);
    assert_eq!(imap.fetch("INBOX", first), mail("one", "first"));

    assert_eq!(imap.flags("INBOX", first), Vec::<String>::new());
    assert_eq!(imap.flags("INBOX", second), ["\\Seen"]);
    let mut flags = imap.flags("INBOX", third);
    flags.sort();
    assert_eq!(flags, ["\\Flagged", "\\Seen"]);
    assert_eq!(imap.unseen("INBOX"), [first], "fetching does not mark messages seen");
    imap.store("INBOX", first, "+FLAGS (\\Seen)");
    assert_eq!(imap.unseen("INBOX"), Vec::<u32>::new());
    imap.expunge("INBOX", second);
    assert_eq!(imap.uids("INBOX"), [first, third]);
    let fourth = imap.append("INBOX", &mail("four", "fourth"));
    assert!(fourth > third, "UIDs are not reused");

    assert!(imap.exists("INBOX") && imap.exists("inbox"));
    for folder in ["Archive/2024", "Entrée & Co", "a.b"] {
        assert!(!imap.exists(folder), "{folder}");
        imap.create(folder);
        assert!(imap.exists(folder), "{folder}");
        let uid = imap.append(folder, &mail("filed", folder));
        assert_eq!(imap.uids(folder), [uid]);
        assert_eq!(imap.fetch(folder, uid), mail("filed", folder));
    }
    assert!(dovecot.dir().join("mail/alice/Entr&AOk-e &- Co/cur").is_dir(), "names are modified UTF-7 on disk");
    imap.delete("a.b");
    assert!(!imap.exists("a.b"));
    imap.logout();

    let mut bob = dovecot.client(OTHER_USER, OTHER_PASSWORD);
    assert_eq!(bob.count("INBOX"), 0, "each user has their own mailboxes");
    assert!(!bob.exists("Archive/2024"));
}

#[test]
fn dovecot_ten_megabyte_message_round_trip() {
    let dovecot = Dovecot::start();
    let mut imap = dovecot.client(USER, PASSWORD);
    let mut message = b"From: big@example.com\r\nSubject: big\r\n\r\n".to_vec();
    let line = format!("{}\r\n", "0123456789abcdefghijklmnopqrstuvwxyz".repeat(2));
    while message.len() < 10 * 1024 * 1024 {
        message.extend_from_slice(line.as_bytes());
    }
    let started = Instant::now();
    let uid = imap.append("INBOX", &message);
    let appended = started.elapsed();
    assert!(imap.fetch("INBOX", uid) == message, "the 10 MB message comes back unchanged");
    eprintln!("10 MB: append {appended:?}, append + fetch {:?}", started.elapsed());
}

#[test]
fn dovecot_stop_and_restart_keep_messages_and_uidvalidity() {
    let mut dovecot = Dovecot::start();
    let port = dovecot.port();
    let mut imap = dovecot.client(USER, PASSWORD);
    let uids = [imap.append("INBOX", &mail("a", "1")), imap.append_with_flags("INBOX", "\\Seen", &mail("b", "2"))];
    imap.create("Archive");
    imap.append("Archive", &mail("c", "3"));
    let validity = imap.uidvalidity("INBOX");
    let mut idle = dovecot.client(USER, PASSWORD);
    idle.run("SELECT INBOX");

    dovecot.stop();
    assert!(!dovecot.is_running());
    assert!(imap.try_run("NOOP").is_err(), "open connections drop");
    assert!(idle.try_run("NOOP").is_err(), "open connections drop");
    assert!(dovecot.try_client(USER, PASSWORD).is_err(), "nothing listens while stopped");
    dovecot.stop();

    dovecot.restart();
    assert!(dovecot.is_running());
    assert_eq!(dovecot.port(), port, "same port after restart");
    let mut imap = dovecot.client(USER, PASSWORD);
    assert_eq!(imap.uids("INBOX"), uids);
    assert_eq!(imap.uidvalidity("INBOX"), validity);
    assert_eq!(imap.fetch("INBOX", uids[0]), mail("a", "1"));
    assert_eq!(imap.unseen("INBOX"), [uids[0]]);
    assert_eq!(imap.count("Archive"), 1);

    dovecot.restart();
    assert_eq!(dovecot.client(USER, PASSWORD).count("INBOX"), 2, "restart also works while running");
}

#[test]
fn dovecot_reset_uidvalidity_keeps_messages() {
    let mut dovecot = Dovecot::start();
    let mut imap = dovecot.client(USER, PASSWORD);
    let bodies: Vec<Vec<u8>> = (0..3).map(|i| mail(&format!("m{i}"), &format!("body {i}"))).collect();
    imap.append("INBOX", &bodies[0]);
    imap.append_with_flags("INBOX", "\\Seen", &bodies[1]);
    imap.append("INBOX", &bodies[2]);
    let oldest = imap.uids("INBOX")[0];
    imap.expunge("INBOX", oldest);
    imap.append("INBOX", &bodies[0]);
    assert_eq!(imap.uids("INBOX"), [2, 3, 4]);
    imap.create("Entrée/Sub");
    imap.append("Entrée/Sub", &mail("sub", "sub"));
    let (inbox_before, sub_before) = (imap.uidvalidity("INBOX"), imap.uidvalidity("Entrée/Sub"));

    dovecot.reset_uidvalidity(USER, "INBOX");
    assert!(dovecot.is_running(), "a running server is started again");
    let mut imap = dovecot.client(USER, PASSWORD);
    assert_ne!(imap.uidvalidity("INBOX"), inbox_before);
    assert_eq!(imap.count("INBOX"), 3);
    let uids = imap.uids("INBOX");
    assert_eq!(uids, [1, 2, 3], "UIDs start again");
    let mut fetched: Vec<Vec<u8>> = uids.iter().map(|&uid| imap.fetch("INBOX", uid)).collect();
    fetched.sort();
    assert_eq!(fetched, bodies, "same messages");
    assert_eq!(imap.unseen("INBOX").len(), 2, "flags are kept");
    assert_eq!(imap.uidvalidity("Entrée/Sub"), sub_before, "other folders keep theirs");

    dovecot.stop();
    dovecot.reset_uidvalidity(USER, "Entrée/Sub");
    assert!(!dovecot.is_running(), "a stopped server stays stopped");
    dovecot.restart();
    let mut imap = dovecot.client(USER, PASSWORD);
    assert_ne!(imap.uidvalidity("Entrée/Sub"), sub_before);
    assert_eq!(imap.fetch("Entrée/Sub", 1), mail("sub", "sub"));
}

#[test]
fn dovecot_wrong_password_is_refused_at_once() {
    let dovecot = Dovecot::start();
    let started = Instant::now();
    let refused = dovecot.try_client(USER, "wrong").err().expect("wrong password refused");
    assert!(refused.contains("AUTHENTICATIONFAILED"), "{refused}");
    assert!(dovecot.try_client("mallory", PASSWORD).is_err(), "unknown user");
    assert!(dovecot.try_client(OTHER_USER, PASSWORD).is_err(), "alice's password is not bob's");
    dovecot.client(USER, PASSWORD).logout();
    dovecot.client(USER, PASSWORD).logout();
    assert!(started.elapsed() < Duration::from_secs(1), "no failure delay: {:?}", started.elapsed());
}

#[test]
fn dovecot_idle_can_be_left_out() {
    let with = Dovecot::start();
    assert!(with.client(USER, PASSWORD).has_capability("IDLE"));
    assert!(imap_greeting(with.port()).contains(" IDLE "));

    let without = Dovecot::start_with(DovecotOptions { idle: false, ..DovecotOptions::default() });
    let greeting = imap_greeting(without.port());
    assert!(greeting.starts_with("* OK") && !greeting.contains("IDLE"), "{greeting}");
    let mut imap = without.client(USER, PASSWORD);
    assert!(!imap.has_capability("IDLE"), "{:?}", imap.capabilities());
    assert!(imap.has_capability("UIDPLUS") && imap.has_capability("MOVE"), "{:?}", imap.capabilities());
    let listed = imap.run("CAPABILITY").join(" ");
    assert!(listed.contains("UIDPLUS") && !listed.contains("IDLE"), "{listed}");
}

#[test]
fn dovecot_tls_port_and_starttls() {
    let dovecot = Dovecot::start_with(DovecotOptions { tls: true, ..DovecotOptions::default() });
    let config = trusting(&dovecot.ca_file().expect("CA file with tls"));

    // Implicit TLS, verified for the name "localhost".
    let tcp = TcpStream::connect(("127.0.0.1", dovecot.tls_port().expect("tls port"))).unwrap();
    tcp.set_read_timeout(Some(WAIT)).unwrap();
    let conn = rustls::ClientConnection::new(config.clone(), "localhost".try_into().unwrap()).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    assert!(read_until_tagged(&mut tls, "*").starts_with("* OK"));
    tls.write_all(format!("a LOGIN {USER} {PASSWORD}\r\n").as_bytes()).unwrap();
    assert!(read_until_tagged(&mut tls, "a").contains("a OK"));
    assert!(tls.conn.protocol_version().is_some());

    // STARTTLS on the plain port, verified for the address 127.0.0.1.
    let mut tcp = TcpStream::connect(dovecot.addr()).unwrap();
    tcp.set_read_timeout(Some(WAIT)).unwrap();
    assert!(read_until_tagged(&mut tcp, "*").contains("STARTTLS"));
    tcp.write_all(b"s STARTTLS\r\n").unwrap();
    assert!(read_until_tagged(&mut tcp, "s").starts_with("s OK"));
    let conn = rustls::ClientConnection::new(config, "127.0.0.1".try_into().unwrap()).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    tls.write_all(b"c CAPABILITY\r\n").unwrap();
    let capabilities = read_until_tagged(&mut tls, "c");
    assert!(capabilities.contains("AUTH=PLAIN") && !capabilities.contains("STARTTLS"), "{capabilities}");
    tls.write_all(format!("a LOGIN {USER} {PASSWORD}\r\n").as_bytes()).unwrap();
    assert!(read_until_tagged(&mut tls, "a").contains("a OK"));

    // Plain IMAP keeps working on the plain port.
    dovecot.client(USER, PASSWORD).logout();
}

#[test]
fn dovecot_xoauth2_checks_tokens() {
    let dovecot = Dovecot::start_with(DovecotOptions { xoauth2: true, ..DovecotOptions::default() });
    assert!(imap_greeting(dovecot.port()).contains("AUTH=XOAUTH2"));

    let mut imap = dovecot.try_client_xoauth2(USER, OAUTH_TOKEN).expect("the known token is accepted");
    let uid = imap.append("INBOX", &mail("oauth", "hello"));
    assert_eq!(imap.uids("INBOX"), [uid]);
    let refused = dovecot.try_client_xoauth2(USER, "wrong-token").err().expect("unknown token refused");
    assert!(refused.contains("AUTHENTICATIONFAILED"), "{refused}");
    assert!(dovecot.try_client_xoauth2(OTHER_USER, OAUTH_TOKEN).is_err(), "alice's token is not bob's");

    dovecot.grant_token("bob-token", OTHER_USER);
    assert_eq!(dovecot.try_client_xoauth2(OTHER_USER, "bob-token").expect("granted token").count("INBOX"), 0);
    dovecot.revoke_token(OAUTH_TOKEN);
    assert!(dovecot.try_client_xoauth2(USER, OAUTH_TOKEN).is_err(), "revoked token refused");
    assert_eq!(dovecot.oauth_requests(), 5, "every attempt is checked, nothing cached");
    assert_eq!(dovecot.client(USER, PASSWORD).count("INBOX"), 1, "passwords still work");
}

#[test]
fn dovecot_instances_are_independent() {
    let a = Dovecot::start();
    let b = Dovecot::start();
    assert_ne!(a.port(), b.port());
    a.client(USER, PASSWORD).append("INBOX", &mail("only-a", "a"));
    assert_eq!(b.client(USER, PASSWORD).count("INBOX"), 0);
    drop(a);
    assert_eq!(b.client(USER, PASSWORD).count("INBOX"), 0, "dropping one leaves the other running");
}
