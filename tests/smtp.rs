//! The SMTP and LMTP listeners of `mailhook serve`, end to end: the real binary listens on
//! `127.0.0.1:0`, and real clients talk to it — lettre (plain, and STARTTLS with AUTH) and
//! scripted raw-socket dialogues (`support::smtp_client`) for the protocol details: reply codes,
//! pipelining, dot-stuffing, BDAT, line and size limits, access control, AUTH, timeouts,
//! connection limits, LMTP's per-recipient replies, the stored envelope, and kill -9 safety.
//!
//! Messages that should stay in the spool for inspection go to a gateway whose only rule never
//! matches and whose `unmatched` policy is `dead`: each accepted message is then a dead letter
//! whose envelope (`queue show --json`) and raw bytes (the message file in the spool) can be checked.
//! Failed expectations print the whole SMTP dialogue.

mod support;

use lettre::message::header::ContentType;
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::transport::smtp::extension::ClientId;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use rustls::pki_types::CertificateDer;
use serde_json::Value;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use support::gateway::Gateway;
use support::hook::{HookOptions, HookServer};
use support::smtp_client::{Reply, SmtpClient};

const WAIT: Duration = Duration::from_secs(20);

/// Fast retries, so that no test waits long for a delivery.
const DELIVERY: &str = "[delivery]\ntimeout = \"3s\"\nretry_for = \"1h\"\nbackoff = { initial = \"200ms\", max = \"500ms\" }\nrate = \"off\"\n";

/// No message matches this rule; with `unmatched = "dead"` every accepted message stays in the
/// spool as a dead letter.
const KEEP_RULES: &str =
    "[[rule]]\nname = \"never\"\nto = []\n\n[rule.when]\nsubject = '^no message has this subject$'\n";

const FILE_DESTINATION: &str = "[destination.out]\ntype = \"file\"\npath = \"out/mail.jsonl\"\n";

const PASSWORD: &str = "s3cret-smtp-pw";

/// `[smtp]` or `[lmtp]` on a free loopback port, plus `extra` keys.
fn listener(table: &str, extra: &str) -> String {
    format!("[{table}]\nlisten = [\"127.0.0.1:0\"]\nhostname = \"mx.test\"\n{extra}")
}

/// A gateway (not started) with `config` after the common settings.
fn gateway(config: &str, rules: &str) -> Gateway {
    Gateway::new(&format!("[rules]\ndir = \"rules\"\nunmatched = \"dead\"\n{DELIVERY}{config}"), rules)
}

/// Starts serve; returns the address of its `protocol` listener.
fn start(gw: &mut Gateway, protocol: &str) -> SocketAddr {
    gw.start();
    gw.listening(protocol)
}

/// An SMTP gateway that keeps every message (dead letters), with `extra` `[smtp]` keys.
fn keeping_smtp(extra: &str) -> (Gateway, SocketAddr) {
    let mut gw = gateway(&listener("smtp", extra), KEEP_RULES);
    let addr = start(&mut gw, "smtp");
    (gw, addr)
}

/// A small message; `body` lines must end with CRLF.
fn mail(subject: &str, body: &str) -> String {
    format!(
        "From: Legacy ERP <erp@legacy.example>\r\nTo: orders@hooks.example.com\r\nSubject: {subject}\r\n\
         Message-ID: <{}@legacy.example>\r\nDate: Tue, 01 Dec 2026 09:30:00 +0100\r\n\r\n{body}",
        subject.replace(' ', "-")
    )
}

/// The first spool id (a ULID) in `text`.
fn spool_id(text: &str) -> Option<String> {
    let re = regex::Regex::new(r"\b[0-9A-HJKMNP-TV-Z]{26}\b").unwrap();
    re.find(text).map(|m| m.as_str().to_string())
}

/// The spool id the server named in its reply to the end of data.
#[track_caller]
fn stored_id(c: &SmtpClient, reply: &Reply) -> String {
    spool_id(&reply.text()).unwrap_or_else(|| c.fail(&format!("the reply {reply} names no spool id")))
}

/// MAIL FROM, RCPT TO (each must be accepted), then DATA with `content` (dot-stuffed, ending in
/// CRLF); returns the reply to the end of data.
#[track_caller]
fn transaction(c: &mut SmtpClient, from: &str, rcpts: &[&str], content: &str) -> Reply {
    c.expect(&format!("MAIL FROM:<{from}>"), &["250 2.1.0"]);
    for r in rcpts {
        c.expect(&format!("RCPT TO:<{r}>"), &["250 2.1.5"]);
    }
    c.data(content.as_bytes())
}

/// A transaction that must be stored; returns the spool id from the 250.
#[track_caller]
fn store(c: &mut SmtpClient, subject: &str) -> String {
    let reply = transaction(c, "erp@legacy.example", &["orders@hooks.example.com"], &mail(subject, "hello\r\n"));
    if !reply.is("250 2.0.0") {
        c.fail(&format!("expected 250 2.0.0 after the end of data, got: {reply}"));
    }
    stored_id(c, &reply)
}

/// Waits until the spool holds exactly the messages `ids`, each a dead letter.
#[track_caller]
fn wait_kept(gw: &Gateway, ids: &[&str]) -> Vec<Value> {
    let want: BTreeSet<&str> = ids.iter().copied().collect();
    gw.wait_queue(WAIT, &format!("exactly the dead letters {want:?}"), |q| {
        q.iter().all(|m| m["state"] == "dead")
            && q.iter().filter_map(|m| m["id"].as_str()).collect::<BTreeSet<_>>() == want
            && q.len() == want.len()
    })
}

fn envelope(gw: &Gateway, id: &str) -> Value {
    gw.show(id)["meta"]["envelope"].clone()
}

/// Waits until the file destination holds `n` lines; returns them parsed.
#[track_caller]
fn wait_file_lines(gw: &Gateway, n: usize) -> Vec<Value> {
    let path = gw.path().join("out/mail.jsonl");
    let deadline = Instant::now() + WAIT;
    loop {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect();
        if lines.len() >= n {
            return lines;
        }
        if Instant::now() > deadline {
            panic!("timed out waiting for {n} line(s) in {}: {text}\nlogs:\n{}", path.display(), gw.logs());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

struct TestCert {
    cert_pem: String,
    der: CertificateDer<'static>,
}

/// A self-signed certificate for `localhost`, written to `cert.pem` and `key.pem` in the
/// gateway's directory (what `tls = { cert = "cert.pem", key = "key.pem" }` points at).
fn install_cert(gw: &Gateway) -> TestCert {
    let generated = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("certificate");
    let cert_pem = generated.cert.pem();
    std::fs::write(gw.path().join("cert.pem"), &cert_pem).unwrap();
    std::fs::write(gw.path().join("key.pem"), generated.signing_key.serialize_pem()).unwrap();
    TestCert { cert_pem, der: generated.cert.der().clone() }
}

const TLS_AND_AUTH: &str =
    "tls = { cert = \"cert.pem\", key = \"key.pem\" }\nauth = { users = { legacy = \"${SMTP_PASSWORD}\" } }\n";

fn b64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn plain_auth(user: &str, pass: &str) -> String {
    b64(format!("\0{user}\0{pass}").as_bytes())
}

/// The extensions every EHLO must list, whatever the configuration.
#[track_caller]
fn assert_base_extensions(c: &SmtpClient, ehlo: &Reply, max_size: u64) {
    for kw in ["PIPELINING", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES", "CHUNKING"] {
        if !ehlo.has_extension(kw) {
            c.fail(&format!("EHLO does not list {kw}"));
        }
    }
    if ehlo.extension("SIZE") != Some(max_size.to_string()) {
        c.fail(&format!("EHLO should list SIZE {max_size}"));
    }
}

/// Whether an EHLO reply offers AUTH with both PLAIN and LOGIN.
fn offers_plain_and_login(ehlo: &Reply) -> bool {
    ehlo.extension("AUTH").is_some_and(|m| {
        let m: Vec<String> = m.split_whitespace().map(str::to_ascii_uppercase).collect();
        m.iter().any(|x| x == "PLAIN") && m.iter().any(|x| x == "LOGIN")
    })
}

fn default_max_size() -> u64 {
    bytesize::ByteSize::mb(25).as_u64()
}

// ---------------------------------------------------------------- lettre

fn lettre_message(subject: &str) -> Message {
    Message::builder()
        .from("Legacy ERP <erp@legacy.example>".parse().unwrap())
        .to("orders@hooks.example.com".parse().unwrap())
        .subject(subject)
        .header(ContentType::TEXT_PLAIN)
        .body("Order 4711 has shipped.\r\nTracking: 1Z999AA10123456784\r\n".to_string())
        .unwrap()
}

#[tokio::test]
async fn lettre_over_plain_smtp_message_is_judged_by_the_rules_and_delivered() {
    let rules = "[[rule]]\nname = \"from-smtp\"\nto = [\"out\"]\n\n[rule.when]\nsource = '^smtp$'\n\
                 recipient = '^orders@hooks\\.example\\.com$'\n";
    let mut gw = gateway(&format!("{}{FILE_DESTINATION}", listener("smtp", "")), rules);
    let addr = start(&mut gw, "smtp");

    let mailer = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous("127.0.0.1")
        .port(addr.port())
        .tls(Tls::None)
        .hello_name(ClientId::Domain("erp.legacy.example".into()))
        .timeout(Some(Duration::from_secs(10)))
        .build();
    let response = mailer.send(lettre_message("Order 4711 shipped")).await.expect("the listener takes the message");
    assert_eq!(response.code().to_string(), "250");
    let text = response.message().collect::<Vec<_>>().join(" ");
    let id = spool_id(&text).unwrap_or_else(|| panic!("the 250 names no spool id: {text:?}"));

    let lines = wait_file_lines(&gw, 1);
    assert_eq!(lines.len(), 1, "{lines:#?}");
    let payload = &lines[0];
    assert_eq!(payload["id"], id.as_str(), "the id in the 250 is the payload's id");
    assert_eq!(payload["rule"], "from-smtp", "the rule saw source smtp and the RCPT TO recipient");
    assert_eq!(payload["source"], "smtp");
    assert_eq!(payload["subject"], "Order 4711 shipped");
    assert_eq!(payload["from"], "erp@legacy.example");
    assert!(payload["text"].as_str().unwrap().contains("Tracking: 1Z999AA10123456784"), "{payload}");
    gw.wait_queue(WAIT, "an empty spool", |q| q.is_empty());
}

#[tokio::test]
async fn lettre_with_starttls_and_auth_plain_is_accepted_and_recorded() {
    support::init_crypto();
    let mut gw = gateway(&listener("smtp", TLS_AND_AUTH), KEEP_RULES).env("SMTP_PASSWORD", PASSWORD);
    let cert = install_cert(&gw);
    let addr = start(&mut gw, "smtp");

    let transport = |user: &str, pass: &str| {
        let params = TlsParameters::builder("localhost".into())
            .add_root_certificate(Certificate::from_pem(cert.cert_pem.as_bytes()).unwrap())
            .build_rustls()
            .unwrap();
        AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous("127.0.0.1")
            .port(addr.port())
            .tls(Tls::Required(params))
            .hello_name(ClientId::Domain("erp.legacy.example".into()))
            .credentials(Credentials::new(user.into(), pass.into()))
            .authentication(vec![Mechanism::Plain])
            .timeout(Some(Duration::from_secs(10)))
            .build()
    };

    let response = transport("legacy", PASSWORD)
        .send(lettre_message("over tls"))
        .await
        .expect("STARTTLS, AUTH PLAIN and the message are accepted");
    assert_eq!(response.code().to_string(), "250");
    let text = response.message().collect::<Vec<_>>().join(" ");
    let id = spool_id(&text).unwrap_or_else(|| panic!("the 250 names no spool id: {text:?}"));

    let wrong = transport("legacy", "not-the-password").send(lettre_message("wrong password")).await;
    let err = wrong.expect_err("a wrong password is refused");
    assert!(err.is_permanent(), "{err:?}");
    assert_eq!(err.status().map(|c| c.to_string()).as_deref(), Some("535"), "{err:?}");

    wait_kept(&gw, &[&id]);
    let env = envelope(&gw, &id);
    assert_eq!(env["source"]["kind"], "smtp", "{env:#}");
    assert_eq!(env["tls"], true, "{env:#}");
    assert_eq!(env["auth_user"], "legacy", "{env:#}");
    assert_eq!(env["helo"], "erp.legacy.example", "{env:#}");
    assert_eq!(env["mail_from"], "erp@legacy.example", "{env:#}");
    assert_eq!(env["recipients"], serde_json::json!(["orders@hooks.example.com"]), "{env:#}");
    assert!(!gw.logs().contains(PASSWORD), "the password reached the logs");
}

// ---------------------------------------------------------------- raw dialogues

#[test]
fn basic_commands_and_commands_out_of_order() {
    let (gw, addr) = keeping_smtp("max_size = \"10KB\"\n");
    let mut c = SmtpClient::connect(addr);
    c.expect_reply(&["220"]);
    c.expect("MAIL FROM:<erp@legacy.example>", &["503 5.5.1"]);
    c.expect("HELO client.test", &["250"]);
    let ehlo = c.expect("EHLO client.test", &["250"]);
    let max_size: bytesize::ByteSize = "10KB".parse().unwrap();
    assert_base_extensions(&c, &ehlo, max_size.as_u64());
    if ehlo.has_extension("STARTTLS") || ehlo.has_extension("AUTH") {
        c.fail("STARTTLS and AUTH must not be offered without tls and auth configured");
    }
    c.expect("NOOP", &["250 2.0.0"]);
    c.expect("RSET", &["250 2.0.0"]);
    c.expect("VRFY postmaster", &["252"]);
    c.expect("HELP", &["214"]);
    c.expect("FROBNICATE now", &["500 5.5.1", "500 5.5.2"]);
    c.expect("RCPT TO:<orders@hooks.example.com>", &["503 5.5.1"]);
    c.expect("DATA", &["503 5.5.1", "554 5.5.1"]);
    c.expect("BDAT 0 LAST", &["503"]);
    c.expect("MAIL FROM:<erp@legacy.example>", &["250 2.1.0"]);
    c.expect("MAIL FROM:<erp@legacy.example>", &["503"]);
    c.expect("DATA", &["503 5.5.1", "554 5.5.1"]);
    c.expect("BDAT 0 LAST", &["503"]);
    c.expect("RSET", &["250 2.0.0"]);
    c.expect("RCPT TO:<orders@hooks.example.com>", &["503 5.5.1"]);
    c.expect("QUIT", &["221"]);
    c.expect_closed();
    std::thread::sleep(Duration::from_millis(200));
    assert!(gw.queue().is_empty(), "nothing was sent, nothing is stored: {:#?}", gw.queue());
}

#[test]
fn a_whole_transaction_in_one_write_gets_every_reply_in_order() {
    let (gw, addr) = keeping_smtp("");
    let mut c = SmtpClient::connect(addr);
    c.expect_reply(&["220"]);
    let content = mail("pipelined", "Gr\u{fc}\u{df}e aus K\u{f6}ln\r\n");
    let script = format!(
        "EHLO client.test\r\nMAIL FROM:<erp@legacy.example> BODY=8BITMIME SIZE={}\r\n\
         RCPT TO:<orders@hooks.example.com>\r\nRCPT TO:<billing@hooks.example.com>\r\nDATA\r\n{content}.\r\nQUIT\r\n",
        content.len()
    );
    c.send_raw(script.as_bytes());
    c.expect_reply(&["250"]);
    c.expect_reply(&["250 2.1.0"]);
    c.expect_reply(&["250 2.1.5"]);
    c.expect_reply(&["250 2.1.5"]);
    c.expect_reply(&["354"]);
    let done = c.expect_reply(&["250 2.0.0"]);
    let id = stored_id(&c, &done);
    c.expect_reply(&["221"]);
    c.expect_closed();

    wait_kept(&gw, &[&id]);
    let env = envelope(&gw, &id);
    assert_eq!(env["recipients"], serde_json::json!(["orders@hooks.example.com", "billing@hooks.example.com"]));
    let raw = gw.raw_message(&id);
    assert!(raw.ends_with(content.as_bytes()), "stored:\n{}", String::from_utf8_lossy(&raw));
}

#[test]
fn dot_stuffed_lines_arrive_unstuffed() {
    let (gw, addr) = keeping_smtp("");
    let mut c = SmtpClient::connect(addr);
    c.hello("EHLO", "client.test");
    let sent = mail("dots", "..a line that starts with a dot\r\n...\r\n..\r\nnot . stuffed..\r\n");
    let want = mail("dots", ".a line that starts with a dot\r\n..\r\n.\r\nnot . stuffed..\r\n");
    let reply = transaction(&mut c, "erp@legacy.example", &["orders@hooks.example.com"], &sent);
    if !reply.is("250 2.0.0") {
        c.fail(&format!("expected 250 2.0.0, got {reply}"));
    }
    let id = stored_id(&c, &reply);
    wait_kept(&gw, &[&id]);
    let raw = gw.raw_message(&id);
    assert!(raw.ends_with(want.as_bytes()), "stored:\n{}", String::from_utf8_lossy(&raw).escape_debug());
}

#[test]
fn bare_lf_is_kept_and_lf_dot_lf_does_not_end_the_data() {
    let (gw, addr) = keeping_smtp("");
    let mut c = SmtpClient::connect(addr);
    c.hello("EHLO", "client.test");
    let content = mail("bare lf", "first\nsecond\n.\nthird\r\nlast\r\n");
    let reply = transaction(&mut c, "erp@legacy.example", &["orders@hooks.example.com"], &content);
    if !reply.is("250 2.0.0") {
        c.fail(&format!("expected 250 2.0.0, got {reply}"));
    }
    let id = stored_id(&c, &reply);
    // Had the data ended at LF . LF, "third", "last" and "." would now be answered as commands.
    c.expect("NOOP", &["250 2.0.0"]);
    c.expect("QUIT", &["221"]);
    wait_kept(&gw, &[&id]);
    let raw = gw.raw_message(&id);
    assert!(raw.ends_with(content.as_bytes()), "stored:\n{}", String::from_utf8_lossy(&raw).escape_debug());
}

#[test]
fn bdat_chunks_are_stored_verbatim() {
    let (gw, addr) = keeping_smtp("");
    let mut c = SmtpClient::connect(addr);
    c.hello("EHLO", "client.test");
    let whole = mail("chunks", "..two dots stay two\r\n.\r\na line split across chun|ks\r\nend\r\n");
    let (first, second) = whole.split_once('|').unwrap();
    let whole = format!("{first}{second}");

    c.expect("MAIL FROM:<erp@legacy.example>", &["250 2.1.0"]);
    c.expect("RCPT TO:<orders@hooks.example.com>", &["250 2.1.5"]);
    c.send_raw(format!("BDAT {}\r\n{first}", first.len()).as_bytes());
    c.expect_reply(&["250 2.0.0"]);
    c.send_raw(format!("BDAT {} LAST\r\n{second}", second.len()).as_bytes());
    let done = c.expect_reply(&["250 2.0.0"]);
    let id1 = stored_id(&c, &done);

    // The same, pipelined in one write, then a DATA transaction on the same session.
    c.send_raw(
        format!(
            "MAIL FROM:<erp@legacy.example>\r\nRCPT TO:<orders@hooks.example.com>\r\nBDAT {}\r\n{first}BDAT {} LAST\r\n{second}",
            first.len(),
            second.len()
        )
        .as_bytes(),
    );
    c.expect_reply(&["250 2.1.0"]);
    c.expect_reply(&["250 2.1.5"]);
    c.expect_reply(&["250 2.0.0"]);
    let done = c.expect_reply(&["250 2.0.0"]);
    let id2 = stored_id(&c, &done);
    let id3 = store(&mut c, "after bdat");
    c.expect("QUIT", &["221"]);

    wait_kept(&gw, &[&id1, &id2, &id3]);
    for id in [&id1, &id2] {
        let raw = gw.raw_message(id);
        assert!(raw.ends_with(whole.as_bytes()), "{id} stored:\n{}", String::from_utf8_lossy(&raw).escape_debug());
    }
}

#[test]
fn an_overlong_command_line_is_refused_and_the_session_continues() {
    let (gw, addr) = keeping_smtp("");
    let mut c = SmtpClient::connect(addr);
    c.hello("EHLO", "client.test");
    c.send(&format!("NOOP {}", "x".repeat(100 * 1024)));
    c.expect_reply(&["500 5.5.2"]);
    c.expect("NOOP", &["250 2.0.0"]);
    c.send(&format!("MAIL FROM:<{}@legacy.example>", "a".repeat(2000)));
    c.expect_reply(&["500 5.5.2"]);
    let id = store(&mut c, "after a long line");
    c.expect("QUIT", &["221"]);
    wait_kept(&gw, &[&id]);
}

#[test]
fn an_overlong_text_line_is_refused_after_the_data_and_nothing_is_stored() {
    let (gw, addr) = keeping_smtp("");
    let mut c = SmtpClient::connect(addr);
    c.hello("EHLO", "client.test");
    let too_long = mail("too long", &format!("{}\r\nafter\r\n", "y".repeat(999)));
    let reply = transaction(&mut c, "erp@legacy.example", &["orders@hooks.example.com"], &too_long);
    if !reply.is("500 5.5.2") {
        c.fail(&format!("a 999-octet line: expected 500 5.5.2 after the end of data, got {reply}"));
    }
    c.expect("RSET", &["250 2.0.0"]);
    let longest = mail("longest", &format!("{}\r\nafter\r\n", "z".repeat(998)));
    let reply = transaction(&mut c, "erp@legacy.example", &["orders@hooks.example.com"], &longest);
    if !reply.is("250 2.0.0") {
        c.fail(&format!("a 998-octet line is allowed: expected 250 2.0.0, got {reply}"));
    }
    let id = stored_id(&c, &reply);
    c.expect("QUIT", &["221"]);
    // Only the second message: the first was refused before the second was sent.
    wait_kept(&gw, &[&id]);
    assert!(gw.raw_message(&id).ends_with(longest.as_bytes()));
}

#[test]
fn an_oversize_message_is_refused_and_the_session_stays_usable() {
    let (gw, addr) = keeping_smtp("max_size = \"10KB\"\n");
    let limit = "10KB".parse::<bytesize::ByteSize>().unwrap().as_u64();
    let mut c = SmtpClient::connect(addr);
    let ehlo = c.hello("EHLO", "client.test");
    assert_base_extensions(&c, &ehlo, limit);
    c.expect(&format!("MAIL FROM:<erp@legacy.example> SIZE={}", limit + 1), &["552 5.3.4"]);
    c.expect(&format!("MAIL FROM:<erp@legacy.example> SIZE={limit}"), &["250 2.1.0"]);
    c.expect("RSET", &["250 2.0.0"]);
    // Exactly max_size octets of content are taken; one more is not.
    let exact = content_of_len(limit as usize);
    let reply = transaction(&mut c, "erp@legacy.example", &["orders@hooks.example.com"], &exact);
    if !reply.is("250 2.0.0") {
        c.fail(&format!("{limit} octets of content: expected 250 2.0.0, got {reply}"));
    }
    let at_limit = stored_id(&c, &reply);
    let over = content_of_len(limit as usize + 1);
    let reply = transaction(&mut c, "erp@legacy.example", &["orders@hooks.example.com"], &over);
    if !reply.is("552 5.3.4") {
        c.fail(&format!("{} octets of content: expected 552 5.3.4, got {reply}", limit + 1));
    }
    c.expect("RSET", &["250 2.0.0"]);
    let big = mail("big", &format!("{}\r\n", "0123456789".repeat(9)).repeat(300));
    assert!(big.len() as u64 > limit * 2);
    let reply = transaction(&mut c, "erp@legacy.example", &["orders@hooks.example.com"], &big);
    if !reply.is("552 5.3.4") {
        c.fail(&format!("expected 552 5.3.4 after the end of data, got {reply}"));
    }
    c.expect("RSET", &["250 2.0.0"]);
    let id = store(&mut c, "small");
    c.expect("QUIT", &["221"]);
    wait_kept(&gw, &[&at_limit, &id]);
    assert_eq!(gw.raw_message(&at_limit).len() as u64, limit);
}

/// A message of exactly `len` octets (headers, 98-octet lines, a last shorter line, each
/// ending in CRLF) with no line starting with a dot.
fn content_of_len(len: usize) -> String {
    let mut content = mail("exact size", "");
    while content.len() + 100 <= len {
        content.push_str(&format!("{}\r\n", "a".repeat(98)));
    }
    let rest = len - content.len();
    assert!(rest >= 2, "choose another length");
    content.push_str(&format!("{}\r\n", "b".repeat(rest - 2)));
    assert_eq!(content.len(), len);
    content
}

/// The peak resident memory of a process, in bytes.
fn peak_memory(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).expect("VmHWM in /proc/PID/status");
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

#[test]
fn a_huge_command_line_and_a_huge_message_are_discarded_without_buffering() {
    let (gw, addr) = keeping_smtp("max_size = \"10KB\"\n");
    let pid = gw.serve_pid().unwrap();
    let mut c = SmtpClient::connect(addr);
    c.hello("EHLO", "client.test");
    let warm_up = store(&mut c, "warm up");
    let before = peak_memory(pid);

    const MB: usize = 1024 * 1024;
    c.send_raw(b"NOOP ");
    let filler = vec![b'x'; MB];
    for _ in 0..32 {
        c.send_bulk(&filler, "1 MB of one command line");
    }
    c.send_raw(b"\r\n");
    c.expect_reply(&["500 5.5.2"]);
    c.expect("NOOP", &["250 2.0.0"]);

    c.expect("MAIL FROM:<erp@legacy.example>", &["250 2.1.0"]);
    c.expect("RCPT TO:<orders@hooks.example.com>", &["250 2.1.5"]);
    c.expect("DATA", &["354"]);
    c.send_raw(mail("huge", "").as_bytes());
    let lines = format!("{}\r\n", "0123456789".repeat(9)).repeat(MB / 92);
    for _ in 0..32 {
        c.send_bulk(lines.as_bytes(), "1 MB of text lines");
    }
    c.send_raw(b".\r\n");
    c.expect_reply(&["552 5.3.4"]);
    c.expect("RSET", &["250 2.0.0"]);
    let id = store(&mut c, "after the huge ones");
    c.expect("QUIT", &["221"]);

    let grown = peak_memory(pid).saturating_sub(before);
    assert!(grown < 16 * MB as u64, "peak memory grew by {} MB while 2 × 32 MB were discarded", grown / MB as u64);
    wait_kept(&gw, &[&warm_up, &id]);
}

#[test]
fn unknown_recipients_and_too_many_recipients_are_refused() {
    let (gw, addr) = keeping_smtp("recipients = ['@hooks\\.example\\.com$']\nmax_recipients = 2\n");
    let mut c = SmtpClient::connect(addr);
    c.hello("EHLO", "client.test");
    c.expect("MAIL FROM:<erp@legacy.example>", &["250 2.1.0"]);
    c.expect("RCPT TO:<someone@elsewhere.example>", &["550 5.1.1"]);
    c.expect("RCPT TO:<orders@hooks.example.com>", &["250 2.1.5"]);
    c.expect("RCPT TO:<billing@hooks.example.com>", &["250 2.1.5"]);
    c.expect("RCPT TO:<third@hooks.example.com>", &["452 4.5.3"]);
    let reply = c.data(mail("recipients", "hi\r\n").as_bytes());
    if !reply.is("250 2.0.0") {
        c.fail(&format!("expected 250 2.0.0, got {reply}"));
    }
    let id = stored_id(&c, &reply);
    c.expect("QUIT", &["221"]);
    wait_kept(&gw, &[&id]);
    let env = envelope(&gw, &id);
    assert_eq!(env["recipients"], serde_json::json!(["orders@hooks.example.com", "billing@hooks.example.com"]));
}

#[test]
fn a_client_outside_allow_is_refused_at_connect() {
    let allow = "allow = [\"10.0.0.0/8\"]\n";
    let mut gw = gateway(&format!("{}{}", listener("smtp", allow), listener("lmtp", allow)), KEEP_RULES);
    gw.start();
    for protocol in ["smtp", "lmtp"] {
        let addr = gw.listening(protocol);
        let mut c = SmtpClient::connect(addr);
        c.note(protocol);
        c.expect_reply(&["554 5.7.1"]);
        c.expect_closed();
    }
    assert!(gw.queue().is_empty());
}

#[test]
fn auth_required_refuses_mail_until_authenticated() {
    let mut gw = gateway(
        &listener("smtp", "auth = { users = { legacy = \"${SMTP_PASSWORD}\" }, required = true }\n"),
        KEEP_RULES,
    )
    .env("SMTP_PASSWORD", PASSWORD);
    let addr = start(&mut gw, "smtp");

    let mut c = SmtpClient::connect(addr);
    let ehlo = c.hello("EHLO", "client.test");
    if !offers_plain_and_login(&ehlo) || ehlo.has_extension("STARTTLS") {
        c.fail("on loopback without tls: AUTH PLAIN LOGIN offered, STARTTLS not");
    }
    c.expect("MAIL FROM:<erp@legacy.example>", &["530 5.7.0"]);
    c.expect(&format!("AUTH PLAIN {}", plain_auth("legacy", "wrong")), &["535 5.7.8"]);
    c.expect("AUTH PLAIN", &["334"]);
    c.expect(&plain_auth("nobody", PASSWORD), &["535 5.7.8"]);
    c.expect("AUTH LOGIN", &["334"]);
    c.expect(&b64(b"legacy"), &["334"]);
    c.expect(&b64(PASSWORD.as_bytes()), &["235 2.7.0"]);
    c.expect(&format!("AUTH PLAIN {}", plain_auth("legacy", PASSWORD)), &["503"]);
    let id = store(&mut c, "authenticated");
    c.expect("QUIT", &["221"]);

    // AUTH PLAIN with the credentials after a 334.
    let mut c = SmtpClient::connect(addr);
    c.hello("EHLO", "client.test");
    c.expect("AUTH PLAIN", &["334"]);
    c.expect(&plain_auth("legacy", PASSWORD), &["235 2.7.0"]);
    c.expect("MAIL FROM:<erp@legacy.example>", &["250 2.1.0"]);
    c.expect("QUIT", &["221"]);

    wait_kept(&gw, &[&id]);
    let env = envelope(&gw, &id);
    assert_eq!(env["auth_user"], "legacy", "{env:#}");
    assert_eq!(env["tls"], false, "{env:#}");
    assert!(!gw.logs().contains(PASSWORD), "the password reached the logs");
}

#[test]
fn starttls_changes_the_ehlo_list_and_auth_works_over_it() {
    let mut gw = gateway(&listener("smtp", TLS_AND_AUTH), KEEP_RULES).env("SMTP_PASSWORD", PASSWORD);
    let cert = install_cert(&gw);
    let addr = start(&mut gw, "smtp");

    let mut c = SmtpClient::connect(addr);
    let before = c.hello("EHLO", "client.test");
    assert_base_extensions(&c, &before, default_max_size());
    if !before.has_extension("STARTTLS") {
        c.fail("STARTTLS must be offered before TLS when tls is configured");
    }
    if !offers_plain_and_login(&before) {
        c.fail("AUTH PLAIN LOGIN must be offered to a loopback client");
    }
    c.starttls("localhost", cert.der.clone());
    c.expect("MAIL FROM:<erp@legacy.example>", &["503 5.5.1"]);
    let after = c.expect("EHLO client.test", &["250"]);
    assert_base_extensions(&c, &after, default_max_size());
    if after.has_extension("STARTTLS") {
        c.fail("STARTTLS must not be offered once the session is TLS");
    }
    if !offers_plain_and_login(&after) {
        c.fail("AUTH PLAIN LOGIN must be offered over TLS");
    }
    c.expect("STARTTLS", &["503"]);
    c.expect(&format!("AUTH PLAIN {}", plain_auth("legacy", "wrong")), &["535 5.7.8"]);
    c.expect(&format!("AUTH PLAIN {}", plain_auth("legacy", PASSWORD)), &["235 2.7.0"]);
    c.expect("AUTH LOGIN", &["503"]);
    let id = store(&mut c, "over starttls");
    c.expect("QUIT", &["221"]);

    wait_kept(&gw, &[&id]);
    let env = envelope(&gw, &id);
    assert_eq!(env["tls"], true, "{env:#}");
    assert_eq!(env["auth_user"], "legacy", "{env:#}");
    assert_eq!(env["helo"], "client.test", "{env:#}");
}

#[test]
fn commands_pipelined_behind_starttls_are_not_run_inside_tls() {
    let mut gw = gateway(&listener("smtp", TLS_AND_AUTH), KEEP_RULES).env("SMTP_PASSWORD", PASSWORD);
    let cert = install_cert(&gw);
    let addr = start(&mut gw, "smtp");
    let mut c = SmtpClient::connect(addr);
    c.hello("EHLO", "client.test");
    // Plaintext a man in the middle could append: it must not count as sent inside TLS.
    c.send_raw(b"STARTTLS\r\nMAIL FROM:<injected@attacker.example>\r\n");
    c.expect_reply(&["220"]);
    match c.tls_handshake("localhost", cert.der.clone()) {
        // The server fed the plaintext to TLS and gave up: nothing was run.
        Err(_) => {}
        Ok(()) => {
            let ehlo = c.expect("EHLO client.test", &["250"]);
            if !ehlo.has_extension("PIPELINING") {
                c.fail("the first reply inside TLS is not EHLO's: plaintext sent before the handshake was run");
            }
            c.expect("RCPT TO:<orders@hooks.example.com>", &["503 5.5.1"]);
            c.expect("QUIT", &["221"]);
        }
    }
    assert!(gw.queue().is_empty());
}

#[test]
fn a_silent_client_gets_421_after_the_command_timeout() {
    let (_gw, addr) = keeping_smtp("command_timeout = \"1s\"\n");
    let mut quiet = SmtpClient::connect(addr);
    quiet.expect_reply(&["220"]);
    let mut after_ehlo = SmtpClient::connect(addr);
    after_ehlo.hello("EHLO", "client.test");
    let since = Instant::now();
    for c in [&mut quiet, &mut after_ehlo] {
        c.timeout = Duration::from_secs(5);
        c.expect_reply(&["421 4.4.2"]);
        c.expect_closed();
    }
    let waited = since.elapsed();
    assert!(waited >= Duration::from_millis(800), "421 came after {waited:?}, before the 1 s timeout");
}

#[test]
fn the_connection_limit_refuses_one_more_with_421() {
    let (_gw, addr) = keeping_smtp("max_connections = 2\n");
    let mut first = SmtpClient::connect(addr);
    first.expect_reply(&["220"]);
    let mut second = SmtpClient::connect(addr);
    second.expect_reply(&["220"]);
    let mut third = SmtpClient::connect(addr);
    third.expect_reply(&["421 4.7.0"]);
    third.expect_closed();

    first.expect("QUIT", &["221"]);
    first.expect_closed();
    // The slot is free again (the server may need a moment to notice).
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut again = loop {
        let mut c = SmtpClient::connect(addr);
        match c.read_reply(Duration::from_secs(5)) {
            Ok(r) if r.is("220") => break c,
            Ok(r) if r.is("421") && Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            _ => c.fail("a connection after one of the two closed should be greeted with 220"),
        }
    };
    again.expect("NOOP", &["250 2.0.0"]);
    second.expect("NOOP", &["250 2.0.0"]);
}

#[test]
fn lmtp_replies_once_per_accepted_recipient() {
    let mut gw =
        gateway(&listener("lmtp", "recipients = ['@hooks\\.example\\.com$']\nmax_size = \"10KB\"\n"), KEEP_RULES);
    let addr = start(&mut gw, "lmtp");
    let mut c = SmtpClient::connect(addr);
    c.expect_reply(&["220"]);
    c.expect("EHLO client.test", &["500"]);
    c.expect("HELO client.test", &["500"]);
    c.expect("MAIL FROM:<erp@legacy.example>", &["503 5.5.1"]);
    c.expect("LHLO client.test", &["250"]);

    // One recipient accepted, one refused: exactly one reply after the data.
    c.expect("MAIL FROM:<erp@legacy.example>", &["250 2.1.0"]);
    c.expect("RCPT TO:<orders@hooks.example.com>", &["250 2.1.5"]);
    c.expect("RCPT TO:<someone@elsewhere.example>", &["550 5.1.1"]);
    let reply = c.data(mail("lmtp one", "one\r\n").as_bytes());
    if !reply.is("250 2.1.5") {
        c.fail(&format!("expected 250 2.1.5 for the one accepted recipient, got {reply}"));
    }
    c.expect("NOOP", &["250 2.0.0"]);

    // Two accepted recipients, data by BDAT: two replies.
    c.expect("MAIL FROM:<erp@legacy.example>", &["250 2.1.0"]);
    c.expect("RCPT TO:<orders@hooks.example.com>", &["250 2.1.5"]);
    c.expect("RCPT TO:<billing@hooks.example.com>", &["250 2.1.5"]);
    let content = mail("lmtp two", "two\r\n");
    c.send_raw(format!("BDAT {} LAST\r\n{content}", content.len()).as_bytes());
    c.expect_reply(&["250 2.1.5"]);
    c.expect_reply(&["250 2.1.5"]);
    c.expect("NOOP", &["250 2.0.0"]);

    // Refused after the data: still one reply per accepted recipient, nothing stored.
    c.expect("MAIL FROM:<erp@legacy.example>", &["250 2.1.0"]);
    c.expect("RCPT TO:<orders@hooks.example.com>", &["250 2.1.5"]);
    c.expect("RCPT TO:<billing@hooks.example.com>", &["250 2.1.5"]);
    let reply = c.data(mail("lmtp too big", &format!("{}\r\n", "x".repeat(98)).repeat(150)).as_bytes());
    if !reply.is("552 5.3.4") {
        c.fail(&format!("expected 552 5.3.4 for the first recipient, got {reply}"));
    }
    c.expect_reply(&["552 5.3.4"]);
    c.expect("NOOP", &["250 2.0.0"]);
    c.expect("QUIT", &["221"]);

    let q = gw.wait_queue(WAIT, "the LMTP messages as dead letters", |q| {
        q.len() >= 2 && q.iter().all(|m| m["state"] == "dead")
    });
    let mut one = Vec::new();
    let mut two = BTreeSet::new();
    for m in &q {
        let id = m["id"].as_str().unwrap();
        assert_eq!(m["source"], "lmtp");
        let env = envelope(&gw, id);
        assert_eq!(env["source"]["kind"], "lmtp", "{env:#}");
        assert_eq!(env["helo"], "client.test", "{env:#}");
        let raw = String::from_utf8_lossy(&gw.raw_message(id)).into_owned();
        let recipients: Vec<String> =
            env["recipients"].as_array().unwrap().iter().map(|r| r.as_str().unwrap().to_string()).collect();
        if raw.contains("Subject: lmtp one") {
            one.push(recipients);
        } else if raw.contains("Subject: lmtp two") {
            two.extend(recipients);
        } else {
            panic!("unexpected message {id}: {raw}");
        }
    }
    assert_eq!(
        one,
        vec![vec!["orders@hooks.example.com".to_string()]],
        "the first message, once, to its one recipient"
    );
    assert_eq!(two, BTreeSet::from(["orders@hooks.example.com".to_string(), "billing@hooks.example.com".to_string()]));
}

#[test]
fn the_stored_envelope_records_the_session() {
    let (gw, addr) = keeping_smtp("");
    let mut c = SmtpClient::connect(addr);
    c.expect_reply(&["220"]);
    c.expect("HELO legacy-erp.local", &["250"]);
    let reply = transaction(
        &mut c,
        "erp@legacy.example",
        &["orders@hooks.example.com", "billing@hooks.example.com"],
        &mail("envelope", "hi\r\n"),
    );
    if !reply.is("250 2.0.0") {
        c.fail(&format!("expected 250 2.0.0, got {reply}"));
    }
    let id = stored_id(&c, &reply);
    let reply = transaction(&mut c, "", &["orders@hooks.example.com"], &mail("bounce", "hi\r\n"));
    if !reply.is("250 2.0.0") {
        c.fail(&format!("the null reverse-path: expected 250 2.0.0, got {reply}"));
    }
    let bounce = stored_id(&c, &reply);
    c.expect("QUIT", &["221"]);

    wait_kept(&gw, &[&id, &bounce]);
    let env = envelope(&gw, &id);
    assert_eq!(env["id"], id.as_str(), "{env:#}");
    assert_eq!(env["source"], serde_json::json!({"kind": "smtp"}), "{env:#}");
    assert_eq!(env["mail_from"], "erp@legacy.example", "{env:#}");
    assert_eq!(env["recipients"], serde_json::json!(["orders@hooks.example.com", "billing@hooks.example.com"]));
    assert_eq!(env["client"], "127.0.0.1", "{env:#}");
    assert_eq!(env["helo"], "legacy-erp.local", "{env:#}");
    assert_eq!(env["tls"], false, "{env:#}");
    assert!(env["auth_user"].is_null(), "{env:#}");
    let env = envelope(&gw, &bounce);
    assert!(env["mail_from"].is_null() || env["mail_from"] == "", "the null reverse-path: {env:#}");
}

#[test]
fn a_message_answered_250_is_delivered_after_kill_9() {
    let hook = HookServer::start(HookOptions::default());
    hook.set_down(true);
    let config = format!(
        "{}[destination.hook]\ntype = \"webhook\"\nurl = \"{}\"\n",
        listener("smtp", "command_timeout = \"5s\"\n"),
        hook.url("/hook")
    );
    let mut gw = gateway(&config, "[[rule]]\nname = \"all\"\nto = [\"hook\"]\n");
    let addr = start(&mut gw, "smtp");
    let mut c = SmtpClient::connect(addr);
    c.hello("EHLO", "client.test");
    let ids: BTreeSet<String> = (0..3).map(|n| store(&mut c, &format!("crash {n}"))).collect();
    gw.kill9();
    assert_eq!(ids.len(), 3);

    hook.set_down(false);
    gw.start();
    gw.wait_queue(WAIT, "every message delivered", |q| q.is_empty());
    let delivered: BTreeSet<String> =
        hook.accepted().iter().map(|r| r.json.as_ref().unwrap()["id"].as_str().unwrap().to_string()).collect();
    assert_eq!(delivered, ids, "every message answered 250 is delivered after the restart");
}

#[test]
fn errors_on_one_connection_do_not_disturb_another() {
    let (gw, addr) = keeping_smtp("max_size = \"10KB\"\n");
    let mut good = SmtpClient::connect(addr);
    good.hello("EHLO", "good.test");
    good.expect("MAIL FROM:<erp@legacy.example>", &["250 2.1.0"]);
    good.expect("RCPT TO:<orders@hooks.example.com>", &["250 2.1.5"]);
    good.expect("DATA", &["354"]);
    let content = mail("undisturbed", "first half\r\nsecond half\r\n");
    let (head, tail) = content.split_at(content.len() / 2);
    good.send_raw(head.as_bytes());

    // Binary garbage, one long line of it.
    let mut garbage = SmtpClient::connect(addr);
    garbage.expect_reply(&["220"]);
    let junk: Vec<u8> = (0..100_000u32).map(|i| (i % 256) as u8).filter(|b| *b != b'\n').collect();
    let _ = garbage.try_send_raw(&junk);
    let _ = garbage.try_send_raw(b"\r\n");
    let _ = garbage.read_reply(Duration::from_secs(5));
    drop(garbage);

    // An oversize message, then the connection dropped in the middle of the data.
    let mut oversize = SmtpClient::connect(addr);
    oversize.hello("EHLO", "bad.test");
    oversize.expect("MAIL FROM:<erp@legacy.example>", &["250 2.1.0"]);
    oversize.expect("RCPT TO:<orders@hooks.example.com>", &["250 2.1.5"]);
    oversize.expect("DATA", &["354"]);
    oversize.send_bulk(format!("{}\r\n", "x".repeat(98)).repeat(300).as_bytes(), "30 KB of text");
    drop(oversize);

    // Connected, then gone without a word.
    drop(SmtpClient::connect(addr));

    let mut pipelined_quitter = SmtpClient::connect(addr);
    pipelined_quitter.expect_reply(&["220"]);
    let _ =
        pipelined_quitter.try_send_raw(b"EHLO x\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\nSubj");
    pipelined_quitter.shutdown_write();
    drop(pipelined_quitter);

    good.send_raw(format!("{tail}.\r\n").as_bytes());
    let reply = good.expect_reply(&["250 2.0.0"]);
    let id = stored_id(&good, &reply);
    good.expect("QUIT", &["221"]);
    wait_kept(&gw, &[&id]);
    assert!(gw.raw_message(&id).ends_with(content.as_bytes()));
}
