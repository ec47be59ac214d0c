//! Secure defaults, checked the way an attacker or a careless operator would meet them, through
//! the real binary and real sockets on loopback: a relay that offers no STARTTLS, web-hook
//! tokens over http://, a brute-force AUTH client, slow clients and one client taking every
//! slot, an open recipient policy and hostile RCPTs, queue ids that try to be paths, file
//! permissions, a receiver that echoes the token back, control characters in text logs,
//! `queue` commands without the delivery secrets, and route probing on the admin endpoint.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};
use support::gateway::{Gateway, http_get, message};
use support::hook::{HookServer, Scripted};
use support::smtp::{SmtpOptions, SmtpSink};
use support::smtp_client::SmtpClient;

const WAIT: Duration = Duration::from_secs(20);

/// No message matches: everything accepted stays in the spool as a dead letter.
const KEEP_RULES: &str = "[[rule]]\nname = \"never\"\nto = []\n[rule.when]\nsubject = '^never$'\n";

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn b64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

// ---------------------------------------------------------------------------------------------
// 1. TLS to the email hook's relay; tokens over http://

#[test]
fn a_relay_without_starttls_gets_neither_the_password_nor_the_mail() {
    let sink = SmtpSink::start(SmtpOptions {
        auth: Some(("relay-user".into(), "relay-pw-7731".into())),
        ..Default::default()
    });
    // A loopback relay may stay plaintext unless tls = "starttls" is written: it is written.
    let config = format!(
        "[delivery]\ntimeout = \"5s\"\nretry_for = \"1h\"\nbackoff = {{ initial = \"200ms\", max = \"500ms\" }}\nrate = \"off\"\n\
         [destination.mail]\ntype = \"kustomer-email-hook\"\naddress = \"abc@hooks.kustomerapp.com\"\nkey = \"hook-key-5521\"\n\
         relay = \"{}\"\ntls = \"starttls\"\nfrom = \"mailhook@example.com\"\nusername = \"relay-user\"\npassword = \"relay-pw-7731\"\n",
        sink.relay_url()
    );
    let mut gw = Gateway::new(&config, "[[rule]]\nname = \"all\"\nto = [\"mail\"]\n");
    gw.ingest(&message(1, "stripped"));
    gw.start();
    let q = gw.wait_queue(WAIT, "a deferred delivery", |q| {
        q.len() == 1 && q[0]["state"] == "deferred" && q[0]["last_error"].as_str().is_some()
    });
    let err = q[0]["last_error"].as_str().unwrap();
    assert!(err.to_lowercase().contains("tls"), "the reason names TLS: {err}");
    std::thread::sleep(Duration::from_millis(700));
    assert!(sink.connections() >= 1, "the relay was tried");
    assert!(sink.messages().is_empty() && sink.rejected().is_empty(), "no mail crossed in the clear");
}

#[test]
fn check_warns_about_tls_none_and_refuses_a_token_over_http() {
    let relay = "[destination.mail]\ntype = \"kustomer-email-hook\"\naddress = \"abc@hooks.kustomerapp.com\"\nkey = \"k\"\n\
                 relay = \"smtp://smtp.example.com:587\"\nfrom = \"mailhook@example.com\"\n";
    let gw = Gateway::new(&format!("{relay}tls = \"none\"\n"), KEEP_RULES);
    let out = gw.run(&["check", "--config", "mailhook.toml"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("warning") && stderr(&out).contains("destination.mail.tls"), "{}", stderr(&out));
    let gw = Gateway::new(relay, KEEP_RULES);
    let out = gw.run(&["check", "--config", "mailhook.toml"]);
    assert!(out.status.success() && !stderr(&out).contains("warning"), "{}", stderr(&out));

    let web = "[destination.orders]\ntype = \"kustomer-web-hook\"\nurl = \"http://acme.example.com/v1/hooks/web/HASH\"\ntoken = \"t0ken\"\n";
    let out = Gateway::new(web, KEEP_RULES).run(&["check", "--config", "mailhook.toml"]);
    assert_eq!(out.status.code(), Some(78), "{}", stderr(&out));
    assert!(stderr(&out).contains("destination.orders.url") && stderr(&out).contains("plaintext"), "{}", stderr(&out));
    let local = web.replace("acme.example.com", "127.0.0.1:8080");
    let out = Gateway::new(&local, KEEP_RULES).run(&["check", "--config", "mailhook.toml"]);
    assert!(out.status.success(), "a loopback hook may be plain http: {}", stderr(&out));
}

#[test]
fn a_key_that_does_not_belong_to_the_type_is_refused_by_name() {
    let out = Gateway::new("[destination.audit]\ntype = \"file\"\npath = \"out.jsonl\"\ntoken = \"x\"\n", KEEP_RULES)
        .run(&["check", "--config", "mailhook.toml"]);
    assert_eq!(out.status.code(), Some(78));
    assert!(
        stderr(&out).contains("mailhook.toml:8: destination.audit.token: is not used by type \"file\""),
        "{}",
        stderr(&out)
    );
}

// ---------------------------------------------------------------------------------------------
// 2. AUTH guessing

#[test]
fn auth_guessing_is_cut_off_per_session_and_per_address() {
    let config = "[smtp]\nlisten = [\"127.0.0.1:0\"]\nhostname = \"mx.test\"\n\
                  auth = { users = { legacy = \"right-password\" }, failure_delay = \"50ms\", max_failures_per_minute = 5 }\n\
                  [admin]\nlisten = \"127.0.0.1:0\"\n";
    let mut gw = Gateway::new(config, KEEP_RULES);
    gw.start();
    let addr = gw.listening("smtp");
    let admin = gw.listening("admin");
    let wrong = format!("AUTH PLAIN {}", b64(b"\0legacy\0guess"));

    // One session: three failures, then the session is closed.
    let mut c = SmtpClient::connect(addr);
    c.hello("EHLO", "guesser.test");
    let started = Instant::now();
    for _ in 0..2 {
        c.expect(&wrong, &["535"]);
    }
    c.expect(&wrong, &["535"]);
    c.expect_reply(&["421 4.7.0"]);
    c.expect_closed();
    assert!(started.elapsed() >= Duration::from_millis(50 + 100 + 150), "each failure waited longer");

    // A new session from the same address: two more failures reach the per-address limit.
    let mut c = SmtpClient::connect(addr);
    c.hello("EHLO", "guesser.test");
    c.expect(&wrong, &["535"]);
    c.expect(&wrong, &["535"]);
    c.expect_reply(&["421 4.7.0"]);
    c.expect_closed();

    // Even the right password is refused to that address for now.
    let mut c = SmtpClient::connect(addr);
    c.hello("EHLO", "guesser.test");
    c.expect(&format!("AUTH PLAIN {}", b64(b"\0legacy\0right-password")), &["421 4.7.0"]);
    c.expect_closed();

    let logs = gw.logs();
    let named = logs.lines().filter(|l| l.contains("too many authentication failures from this address")).count();
    assert_eq!(named, 1, "the offender is named once:\n{logs}");
    assert!(!logs.contains("authentication failed"), "no line per failure at the default level:\n{logs}");
    let (_, _, metrics) = http_get(admin, "/metrics", None);
    assert!(
        metrics.contains("mailhook_rejections_total{protocol=\"smtp\",reason=\"auth_client_blocked\"} 1"),
        "{metrics}"
    );
}

// ---------------------------------------------------------------------------------------------
// 3. Slow clients and slot hogs

/// Sends `bytes` one at a time, `gap` apart, until they are all sent or the server closes;
/// returns what the server answered meanwhile and how long it took.
fn drip(stream: &mut TcpStream, bytes: &[u8], gap: Duration) -> (String, Duration) {
    let started = Instant::now();
    stream.set_nonblocking(true).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    for b in bytes {
        if stream.write_all(std::slice::from_ref(b)).is_err() {
            break;
        }
        std::thread::sleep(gap);
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => break,
        }
        if got.windows(4).any(|w| w == b"421 ") {
            break;
        }
    }
    (String::from_utf8_lossy(&got).into_owned(), started.elapsed())
}

#[test]
fn a_sender_of_one_byte_at_a_time_is_cut_by_the_overall_deadlines() {
    let config = "[smtp]\nlisten = [\"127.0.0.1:0\"]\nhostname = \"mx.test\"\n\
                  command_timeout = \"1s\"\ndata_timeout = \"2s\"\n";
    let mut gw = Gateway::new(config, KEEP_RULES);
    gw.start();
    let addr = gw.listening("smtp");

    // A command line trickling in at 5 bytes a second: each byte comes well within the
    // timeout, the whole line does not.
    let mut s = TcpStream::connect(addr).unwrap();
    let line = format!("EHLO {}\r\n", "a".repeat(60));
    let (got, took) = drip(&mut s, line.as_bytes(), Duration::from_millis(200));
    assert!(got.contains("421 4.4.2"), "cut with 421 after {took:?}: {got:?}");
    assert!(took < Duration::from_secs(6), "{took:?}");

    // A body trickling in: the DATA deadline (plus the little the bytes earned) ends it.
    let mut c = SmtpClient::connect(addr);
    c.hello("EHLO", "slow.test");
    c.expect("MAIL FROM:<a@example.com>", &["250"]);
    c.expect("RCPT TO:<b@example.com>", &["250"]);
    c.expect("DATA", &["354"]);
    let body = "x".repeat(200);
    c.send_bulk(b"Subject: slow\r\n\r\n", "headers");
    let started = Instant::now();
    let mut cut = false;
    for b in body.bytes() {
        if c.try_send_raw(&[b]).is_err() {
            cut = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        if started.elapsed() > Duration::from_secs(8) {
            break;
        }
        if let Ok(reply) = c.read_reply(Duration::from_millis(1)) {
            assert!(reply.is("421 4.4.2"), "{reply}");
            cut = true;
            break;
        }
    }
    assert!(cut, "the slow body was not cut within {:?}", started.elapsed());
    assert!(gw.queue().is_empty(), "nothing half-received was stored");
}

#[test]
fn one_address_cannot_take_every_connection_slot() {
    let config = "[smtp]\nlisten = [\"127.0.0.1:0\"]\nhostname = \"mx.test\"\nmax_connections_per_ip = 3\n";
    let mut gw = Gateway::new(config, KEEP_RULES);
    gw.start();
    let addr = gw.listening("smtp");
    let mut held: Vec<SmtpClient> = (0..3)
        .map(|_| {
            let mut c = SmtpClient::connect(addr);
            c.expect_reply(&["220"]);
            c
        })
        .collect();
    let mut fourth = SmtpClient::connect(addr);
    fourth.expect_reply(&["421 4.7.0"]);
    fourth.expect_closed();
    // A slot given back is free again.
    held.pop().unwrap().expect("QUIT", &["221"]);
    std::thread::sleep(Duration::from_millis(200));
    let mut again = SmtpClient::connect(addr);
    again.expect_reply(&["220"]);
}

// ---------------------------------------------------------------------------------------------
// 4. Recipient policy

#[test]
fn an_open_listener_is_refused_unless_written_explicitly() {
    let open = "[smtp]\nlisten = [\"0.0.0.0:2525\"]\nallow = [\"0.0.0.0/0\"]\n";
    let out = Gateway::new(open, KEEP_RULES).run(&["check", "--config", "mailhook.toml"]);
    assert_eq!(out.status.code(), Some(78), "{}", stderr(&out));
    assert!(stderr(&out).contains("smtp.recipients"), "{}", stderr(&out));

    let explicit = format!("{open}recipients = ['.*']\n");
    let out = Gateway::new(&explicit, KEEP_RULES).run(&["check", "--config", "mailhook.toml"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("warning") && stderr(&out).contains("smtp.recipients"), "{}", stderr(&out));
}

#[test]
fn hostile_rcpts_postmaster_and_quoted_local_parts() {
    let config = "[rules]\ndir = \"rules\"\nunmatched = \"dead\"\n\
                  [smtp]\nlisten = [\"127.0.0.1:0\"]\nhostname = \"mx.test\"\n\
                  recipients = ['^\"x@evil\\.com\"@hooks\\.example\\.com$', '^orders@hooks\\.example\\.com$']\n";
    let mut gw = Gateway::new(config, KEEP_RULES);
    gw.start();
    let addr = gw.listening("smtp");
    let mut c = SmtpClient::connect(addr);
    c.hello("EHLO", "client.test");
    c.expect("MAIL FROM:<a@example.com>", &["250"]);
    c.expect("RCPT TO:<postmaster>", &["250"]);
    c.expect("RCPT TO:<\"x@evil.com\"@hooks.example.com>", &["250"]);
    c.expect("RCPT TO:<user%other@hooks.example.com>", &["550"]);
    c.expect("RCPT TO:<@relay.example:orders@elsewhere.example>", &["550", "501"]);
    let reply = c.data(b"Subject: hostile\r\n\r\nbody\r\n");
    assert!(reply.is("250 2.0.0"), "{reply}");
    let id = reply.text().split("queued as ").nth(1).unwrap().trim().to_string();
    let shown = gw.wait_queue(WAIT, "the message kept", |q| q.len() == 1);
    assert_eq!(shown[0]["id"], id.as_str());
    let meta = gw.show(&id);
    assert_eq!(
        meta["meta"]["envelope"]["recipients"],
        serde_json::json!(["postmaster", "\"x@evil.com\"@hooks.example.com"]),
        "{meta}"
    );
}

// ---------------------------------------------------------------------------------------------
// 6. Queue ids are never paths

#[test]
fn queue_ids_that_are_paths_are_refused_before_touching_files() {
    let gw = Gateway::new("", KEEP_RULES);
    let id = gw.ingest(&message(1, "inside"));
    let victim = gw.path().join("victim.json");
    std::fs::write(&victim, "{\"precious\": true}\n").unwrap();
    let hostile =
        ["../../victim".to_string(), format!("../msg/{id}"), format!("{id}/../{id}"), id.to_lowercase() + "x"];
    for bad in hostile.iter().map(String::as_str) {
        for args in [
            vec!["queue", "drop", "--config", "mailhook.toml", bad],
            vec!["queue", "show", "--config", "mailhook.toml", bad],
            vec!["queue", "retry", "--config", "mailhook.toml", bad],
            vec!["replay", "--config", "mailhook.toml", bad],
        ] {
            let out = gw.run(&args);
            assert_eq!(out.status.code(), Some(64), "{args:?}: {}", stderr(&out));
            assert!(stderr(&out).contains("is not a message id"), "{args:?}: {}", stderr(&out));
            assert!(!String::from_utf8_lossy(&out.stdout).contains("precious"), "{args:?} printed an outside file");
        }
    }
    assert!(victim.exists(), "the outside file is still there");
    let q = gw.queue();
    assert_eq!(q.len(), 1, "the spool is untouched: {q:?}");
    assert_eq!(q[0]["id"], id.as_str());
}

// ---------------------------------------------------------------------------------------------
// 7. Permissions

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).permissions().mode() & 0o777
}

#[test]
fn the_spool_and_file_output_are_private() {
    let mut gw = Gateway::new(
        "[destination.audit]\ntype = \"file\"\npath = \"out/events.jsonl\"\n",
        "[[rule]]\nname = \"all\"\nto = [\"audit\"]\n",
    );
    let id = gw.ingest(&message(1, "private"));
    let spool = gw.path().join("spool");
    assert_eq!(mode(&spool), 0o700, "the spool directory");
    for sub in ["tmp", "corrupt"] {
        assert_eq!(mode(&spool.join(sub)), 0o700, "spool/{sub}");
    }
    assert_eq!(gw.queue().len(), 1, "{id} is in the spool");
    for name in ["spool.db", "spool.db-wal", "spool.db-shm"] {
        if name == "spool.db" || spool.join(name).exists() {
            assert_eq!(mode(&spool.join(name)), 0o600, "spool/{name}");
        }
    }
    gw.start();
    gw.wait_queue(WAIT, "the message delivered", |q| q.is_empty());
    assert_eq!(mode(&gw.path().join("out")), 0o700);
    assert_eq!(mode(&gw.path().join("out/events.jsonl")), 0o600);
}

// ---------------------------------------------------------------------------------------------
// 8. Secrets echoed back by a receiver

#[test]
fn a_token_echoed_by_the_receiver_is_neither_stored_nor_logged() {
    let hook = HookServer::start(Default::default());
    let token = "echo-me-token-9913";
    hook.push_response(Scripted {
        body: format!("bad request: Authorization: Bearer {token}"),
        ..Scripted::status(400)
    });
    let config = format!(
        "[delivery]\nrate = \"off\"\n[destination.orders]\ntype = \"kustomer-web-hook\"\nurl = \"{}\"\ntoken = \"${{TOKEN}}\"\n",
        hook.url("/hook")
    );
    let mut gw = Gateway::new(&config, "[[rule]]\nname = \"all\"\nto = [\"orders\"]\n").env("TOKEN", token);
    let id = gw.ingest(&message(1, "echo"));
    gw.start();
    let q = gw.wait_queue(WAIT, "a dead letter", |q| q.len() == 1 && q[0]["state"] == "dead");
    let shown = gw.run(&["queue", "show", "--json", "--config", "mailhook.toml", &id]);
    let shown = String::from_utf8_lossy(&shown.stdout).into_owned();
    assert!(shown.contains("Bearer ***"), "the echo is kept, redacted: {shown}");
    for (what, text) in [("queue list", format!("{q:?}")), ("queue show", shown), ("logs", gw.logs())] {
        assert!(!text.contains(token), "the token is in the {what}:\n{text}");
    }
}

// ---------------------------------------------------------------------------------------------
// 9. Control characters in text logs

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[test]
fn text_logs_escape_what_a_client_sends() {
    let port = free_port();
    let config = format!(
        "[smtp]\nlisten = [\"127.0.0.1:{port}\"]\nhostname = \"mx.test\"\n\
         auth = {{ users = {{ legacy = \"pw\" }}, failure_delay = \"10ms\" }}\n"
    );
    let mut gw = Gateway::new(&config, KEEP_RULES).text_logs().env("RUST_LOG", "debug");
    gw.start();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut c = loop {
        match SmtpClient::try_connect(addr) {
            Ok(c) => break c,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => panic!("serve did not listen: {e}\n{}", gw.logs()),
        }
    };
    c.hello("EHLO", "client.test");
    let user = b"evil\n2026-12-06T00:00:00Z  INFO mailhook: forged line\x1b[2J";
    let mut plain = vec![0u8];
    plain.extend_from_slice(user);
    plain.extend_from_slice(b"\0wrong");
    c.expect(&format!("AUTH PLAIN {}", b64(&plain)), &["535"]);
    c.expect("QUIT", &["221"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !gw.logs().contains("authentication failed") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let logs = gw.logs();
    assert!(logs.contains("authentication failed"), "{logs}");
    assert!(!logs.contains('\x1b'), "a raw escape character reached the log:\n{logs:?}");
    assert!(!logs.lines().any(|l| l.starts_with("2026-12-06T00:00:00Z")), "a forged line:\n{logs}");
    assert!(logs.contains("evil\\n2026-12-06T00:00:00Z") && logs.contains("\\x1b[2J"), "{logs}");
}

// ---------------------------------------------------------------------------------------------
// 10. queue commands without the delivery secrets

#[test]
fn queue_commands_need_only_the_variables_they_use() {
    let config = "[destination.orders]\ntype = \"kustomer-web-hook\"\nurl = \"https://acme.example.com/hook\"\n\
                  token = \"${UNSET_HOOK_TOKEN}\"\n[admin]\ntoken = \"${UNSET_ADMIN_TOKEN}\"\n";
    let gw = Gateway::new(config, "[[rule]]\nname = \"all\"\nto = [\"orders\"]\n");
    let id = gw.ingest(&message(1, "no secrets here"));
    let out = gw.run(&["queue", "list", "--config", "mailhook.toml"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = gw.run(&["queue", "show", "--config", "mailhook.toml", &id]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = gw.run(&["replay", "--config", "mailhook.toml", &id]);
    assert!(out.status.success(), "{}", stderr(&out));
    // What delivers still needs them all.
    let out = gw.run(&["check", "--config", "mailhook.toml"]);
    assert_eq!(out.status.code(), Some(78));
    assert!(
        stderr(&out).contains("UNSET_HOOK_TOKEN") && stderr(&out).contains("UNSET_ADMIN_TOKEN"),
        "{}",
        stderr(&out)
    );
    // And what a queue command does use must be set.
    let gw = Gateway::new("[spool]\ndir = \"${UNSET_SPOOL}\"\n", KEEP_RULES);
    let out = gw.run(&["queue", "list", "--config", "mailhook.toml"]);
    assert_eq!(out.status.code(), Some(78));
    assert!(stderr(&out).contains("spool.dir") && stderr(&out).contains("UNSET_SPOOL"), "{}", stderr(&out));
}

// ---------------------------------------------------------------------------------------------
// 11. Admin: authentication before routing

fn http(addr: SocketAddr, method: &str, path: &str) -> u16 {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw);
    text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or_else(|| panic!("no status in {text:?}"))
}

#[test]
fn the_admin_endpoint_answers_401_before_revealing_any_route() {
    let mut gw = Gateway::new("[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"admin-t0ken\"\n", KEEP_RULES);
    gw.start();
    let admin = gw.listening("admin");
    for (method, path) in
        [("POST", "/metrics"), ("POST", "/nope"), ("GET", "/nope"), ("DELETE", "/healthz"), ("GET", "/metrics")]
    {
        assert_eq!(http(admin, method, path), 401, "{method} {path}");
    }
    let (status, _, _) = http_get(admin, "/metrics", Some("admin-t0ken"));
    assert_eq!(status, 200);
    let (status, _, _) = http_get(admin, "/nope", Some("admin-t0ken"));
    assert_eq!(status, 404);
}
