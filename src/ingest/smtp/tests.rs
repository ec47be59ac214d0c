//! Sessions driven through an in-memory duplex stream: the real state machine, no sockets.

use super::*;
use crate::config::Secret;
use crate::spool::{SpoolOptions, State};
use std::path::Path;
use tokio::io::{AsyncReadExt, duplex};

struct Harness {
    _dir: tempfile::TempDir,
    spool: Spool,
}

fn config(lmtp: bool) -> SessionConfig {
    SessionConfig {
        lmtp,
        hostname: "mx.test".into(),
        max_size: 10_000,
        recipients: vec![Regex::new(r"@hooks\.example$").unwrap()],
        allow: vec!["127.0.0.0/8".parse().unwrap()],
        tls: None,
        auth_users: None,
        auth_required: false,
        max_connections: 10,
        max_recipients: 3,
        max_connections_per_ip: 10,
        command_timeout: Duration::from_secs(5),
        data_timeout: Duration::from_secs(5),
        min_data_rate: 500,
        auth_max_failures: 3,
        auth_failure_delay: Duration::from_millis(1),
        auth_failures_per_minute: 10,
        clients: Default::default(),
        metrics: crate::metrics::Metrics::new(),
    }
}

impl Harness {
    fn new() -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(&dir.path().join("spool"), SpoolOptions { fsync: false, keep_raw: false }).unwrap();
        Harness { _dir: dir, spool }
    }

    /// Runs a session with `cfg`, sends `script` in one write, returns everything the server
    /// wrote until it closed the connection.
    async fn talk(&self, cfg: SessionConfig, script: &[u8]) -> String {
        self.talk_from(cfg, script, "127.0.0.1:40000").await
    }

    async fn talk_from(&self, cfg: SessionConfig, script: &[u8], peer: &str) -> String {
        self.talk_through(cfg, script, peer, 1 << 20).await
    }

    /// [`Harness::talk_from`] through a pipe that holds `pipe` bytes: with 1, the session reads
    /// the script one byte at a time.
    async fn talk_through(&self, cfg: SessionConfig, script: &[u8], peer: &str, pipe: usize) -> String {
        let (client, server) = duplex(pipe);
        let (_tx, rx) = watch::channel(false);
        let session = Session::new(
            Arc::new(cfg),
            self.spool.clone(),
            Arc::new(crate::spool::Inbox::default()),
            rx,
            server,
            peer.parse().unwrap(),
        );
        let task = tokio::spawn(session.run());
        let (mut read, mut write) = tokio::io::split(client);
        // Written while the replies are read, so that a small pipe cannot block both sides.
        let script = script.to_vec();
        let writer = tokio::spawn(async move {
            write.write_all(&script).await.unwrap();
            write
        });
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), read.read_to_end(&mut out)).await.expect("session ends").unwrap();
        task.await.unwrap();
        drop(writer.await.unwrap());
        String::from_utf8_lossy(&out).into_owned()
    }

    fn stored(&self) -> Vec<(crate::spool::Meta, Vec<u8>)> {
        self.spool
            .list(State::Incoming)
            .unwrap()
            .into_iter()
            .map(|id| (self.spool.read_meta(State::Incoming, &id).unwrap(), self.spool.read_raw(&id).unwrap()))
            .collect()
    }
}

/// The reply codes, in order (continuation lines of multi-line replies skipped).
fn codes(out: &str) -> Vec<String> {
    out.lines().filter(|l| l.len() >= 4 && l.as_bytes()[3] == b' ').map(|l| l[..3].to_string()).collect()
}

fn enhanced(out: &str, code: &str) -> bool {
    out.lines().any(|l| l.starts_with(code))
}

const TX: &str = "EHLO client.test\r\nMAIL FROM:<sender@legacy.test>\r\nRCPT TO:<a@hooks.example>\r\nDATA\r\n";

#[tokio::test]
async fn pipelined_transaction_is_stored_with_its_envelope() {
    let h = Harness::new();
    let script = format!("{TX}Subject: hi\r\n\r\nline one\r\n..dot-stuffed\r\n.\r\nQUIT\r\n");
    let out = h.talk(config(false), script.as_bytes()).await;
    assert_eq!(codes(&out), ["220", "250", "250", "250", "354", "250", "221"], "{out}");
    assert!(out.contains("250-PIPELINING") && out.contains("250-SIZE 10000") && out.contains("250 CHUNKING"), "{out}");
    let stored = h.stored();
    assert_eq!(stored.len(), 1);
    let (meta, raw) = &stored[0];
    assert_eq!(raw, b"Subject: hi\r\n\r\nline one\r\n.dot-stuffed\r\n");
    assert!(out.contains(&format!("250 2.0.0 Ok: queued as {}", meta.id)), "{out}");
    assert_eq!(meta.envelope.mail_from.as_deref(), Some("sender@legacy.test"));
    assert_eq!(meta.envelope.recipients, vec!["a@hooks.example".to_string()]);
    assert_eq!(meta.envelope.client.as_deref(), Some("127.0.0.1"));
    assert_eq!(meta.envelope.helo.as_deref(), Some("client.test"));
    assert_eq!(meta.envelope.source, crate::model::Source::Smtp);
    assert!(!meta.envelope.tls);
}

#[tokio::test]
async fn bare_lf_is_kept_and_does_not_end_data() {
    let h = Harness::new();
    let script = format!("{TX}a\nb\n.\nc\r\n.\r\nQUIT\r\n");
    let out = h.talk(config(false), script.as_bytes()).await;
    assert_eq!(codes(&out), ["220", "250", "250", "250", "354", "250", "221"], "{out}");
    assert_eq!(h.stored()[0].1, b"a\nb\n.\nc\r\n");
}

#[tokio::test]
async fn a_session_read_one_byte_at_a_time_stores_exactly_what_was_sent() {
    // Every read boundary falls somewhere: between the CR and LF of the final CRLF.CRLF too,
    // where the end of data used to leave the CR in the message.
    let h = Harness::new();
    let script = format!("{TX}Subject: one\r\n\r\nline\r\n..dot\r\n.\r\n{TX}bare\n.\nlf\r\r\n.\r\nQUIT\r\n");
    let out = h.talk_through(config(false), script.as_bytes(), "127.0.0.1:40000", 1).await;
    assert_eq!(
        codes(&out),
        ["220", "250", "250", "250", "354", "250", "250", "250", "250", "354", "250", "221"],
        "{out}"
    );
    let mut raws: Vec<Vec<u8>> = h.stored().into_iter().map(|(_, raw)| raw).collect();
    raws.sort();
    assert_eq!(raws, [b"Subject: one\r\n\r\nline\r\n.dot\r\n".to_vec(), b"bare\n.\nlf\r\r\n".to_vec()]);
}

#[tokio::test]
async fn a_bdat_chunk_with_a_long_line_is_stored_however_it_is_read() {
    // BDAT is binary-clean: a line over 998 octets is the client's business. Read at once, such
    // a chunk used to lose its spool draft to the text-line limit and be answered 451.
    let h = Harness::new();
    let content = "b".repeat(1500);
    let script =
        format!("EHLO c\r\nMAIL FROM:<s@x.test>\r\nRCPT TO:<a@hooks.example>\r\nBDAT 1500 LAST\r\n{content}QUIT\r\n");
    for pipe in [1 << 20, 81, 1] {
        let out = h.talk_through(config(false), script.as_bytes(), "127.0.0.1:40000", pipe).await;
        assert_eq!(codes(&out), ["220", "250", "250", "250", "250", "221"], "read through a {pipe}-byte pipe: {out}");
    }
    let stored = h.stored();
    assert_eq!(stored.len(), 3);
    assert!(stored.iter().all(|(_, raw)| raw == content.as_bytes()));
}

#[tokio::test]
async fn bdat_chunks_are_taken_verbatim() {
    let h = Harness::new();
    let script = "EHLO c\r\nMAIL FROM:<s@x.test>\r\nRCPT TO:<a@hooks.example>\r\nBDAT 8\r\n..a\r\n.\r\nBDAT 3 LAST\r\nxyzQUIT\r\n";
    let out = h.talk(config(false), script.as_bytes()).await;
    assert_eq!(codes(&out), ["220", "250", "250", "250", "250", "250", "221"], "{out}");
    assert_eq!(h.stored()[0].1, b"..a\r\n.\r\nxyz");
}

#[tokio::test]
async fn sequence_errors() {
    let h = Harness::new();
    let script = "MAIL FROM:<s@x.test>\r\nHELO c\r\nRCPT TO:<a@hooks.example>\r\nDATA\r\nMAIL FROM:<s@x.test>\r\nMAIL FROM:<t@x.test>\r\nDATA\r\nBDAT 2\r\nxxRSET\r\nFOO\r\nVRFY x\r\nHELP\r\nNOOP\r\nQUIT\r\n";
    let out = h.talk(config(false), script.as_bytes()).await;
    assert_eq!(
        codes(&out),
        ["220", "503", "250", "503", "503", "250", "503", "503", "503", "250", "500", "252", "214", "250", "221"],
        "{out}"
    );
    assert!(h.stored().is_empty());
}

#[tokio::test]
async fn recipient_policy_and_limit() {
    let h = Harness::new();
    let script = "EHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<>\r\nRCPT TO:<x@elsewhere.test>\r\nRCPT TO:<a@hooks.example>\r\nRCPT TO:<b@hooks.example>\r\nRCPT TO:<c@hooks.example>\r\nRCPT TO:<d@hooks.example>\r\nQUIT\r\n";
    let out = h.talk(config(false), script.as_bytes()).await;
    assert_eq!(codes(&out), ["220", "250", "250", "501", "550", "250", "250", "250", "452", "221"], "{out}");
    assert!(enhanced(&out, "550 5.1.1") && enhanced(&out, "452 4.5.3"), "{out}");
}

#[tokio::test]
async fn oversize_is_refused_after_the_data_and_the_session_goes_on() {
    let h = Harness::new();
    let big = "x".repeat(900) + "\r\n";
    let script = format!(
        "EHLO c\r\nMAIL FROM:<s@x.test> SIZE=20000\r\nMAIL FROM:<s@x.test>\r\nRCPT TO:<a@hooks.example>\r\nDATA\r\n{}.\r\n{TX}small\r\n.\r\nQUIT\r\n",
        big.repeat(20)
    );
    let out = h.talk(config(false), script.as_bytes()).await;
    assert_eq!(
        codes(&out),
        ["220", "250", "552", "250", "250", "354", "552", "250", "250", "250", "354", "250", "221"],
        "{out}"
    );
    assert!(enhanced(&out, "552 5.3.4"));
    let stored = h.stored();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].1, b"small\r\n");
    assert!(std::fs::read_dir(h.spool.dir().join("tmp")).unwrap().next().is_none(), "nothing half-written");
}

#[tokio::test]
async fn long_lines() {
    let h = Harness::new();
    let long_cmd = format!("NOOP {}\r\n", "y".repeat(100_000));
    let long_text = "z".repeat(999) + "\r\n";
    let ok_text = "z".repeat(998) + "\r\n";
    let script = format!("{long_cmd}{TX}{long_text}.\r\n{TX}{ok_text}.\r\nQUIT\r\n");
    let out = h.talk(config(false), script.as_bytes()).await;
    assert_eq!(
        codes(&out),
        ["220", "500", "250", "250", "250", "354", "500", "250", "250", "250", "354", "250", "221"],
        "{out}"
    );
    assert!(enhanced(&out, "500 5.5.2"));
    assert_eq!(h.stored().len(), 1);
    assert_eq!(h.stored()[0].1, ok_text.as_bytes());
}

#[tokio::test]
async fn lmtp_answers_once_per_accepted_recipient() {
    let h = Harness::new();
    let script = "EHLO c\r\nLHLO c\r\nMAIL FROM:<s@x.test>\r\nRCPT TO:<a@hooks.example>\r\nRCPT TO:<nobody@else.test>\r\nRCPT TO:<b@hooks.example>\r\nDATA\r\nbody\r\n.\r\nQUIT\r\n";
    let out = h.talk(config(true), script.as_bytes()).await;
    assert_eq!(codes(&out), ["220", "500", "250", "250", "250", "550", "250", "354", "250", "250", "221"], "{out}");
    assert!(out.contains("LMTP"));
    let stored = h.stored();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].0.envelope.source, crate::model::Source::Lmtp);
    assert_eq!(stored[0].0.envelope.recipients, vec!["a@hooks.example".to_string(), "b@hooks.example".to_string()]);
}

fn with_auth(required: bool) -> SessionConfig {
    let mut cfg = config(false);
    cfg.auth_users = Some([("legacy".to_string(), Secret::new("pa55word"))].into_iter().collect());
    cfg.auth_required = required;
    cfg
}

#[tokio::test]
async fn auth_plain_and_login() {
    let h = Harness::new();
    use base64::Engine;
    let b64 = |s: &[u8]| base64::engine::general_purpose::STANDARD.encode(s);
    let script = format!(
        "EHLO c\r\nMAIL FROM:<s@x.test>\r\nRSET\r\nAUTH PLAIN {}\r\nAUTH PLAIN\r\n{}\r\nMAIL FROM:<s@x.test>\r\nAUTH LOGIN\r\nQUIT\r\n",
        b64(b"\0legacy\0wrong"),
        b64(b"\0legacy\0pa55word"),
    );
    let out = h.talk(with_auth(true), script.as_bytes()).await;
    assert!(out.contains("250 AUTH PLAIN LOGIN"), "loopback clients are offered AUTH: {out}");
    assert_eq!(codes(&out), ["220", "250", "530", "250", "535", "334", "235", "250", "503", "221"], "{out}");

    let script = format!("EHLO c\r\nAUTH LOGIN\r\n{}\r\n{}\r\nQUIT\r\n", b64(b"legacy"), b64(b"pa55word"));
    let out = h.talk(with_auth(false), script.as_bytes()).await;
    assert_eq!(codes(&out), ["220", "250", "334", "334", "235", "221"], "{out}");
}

#[tokio::test]
async fn auth_is_not_offered_in_the_clear_to_remote_clients() {
    let h = Harness::new();
    let out = h
        .talk_from(with_auth(false), b"EHLO c\r\nAUTH PLAIN AGxlZ2FjeQBwYTU1d29yZA==\r\nQUIT\r\n", "192.0.2.7:5000")
        .await;
    assert!(!out.contains("AUTH PLAIN LOGIN"), "{out}");
    assert_eq!(codes(&out), ["220", "250", "538", "221"], "{out}");
}

#[tokio::test]
async fn silent_client_times_out() {
    let h = Harness::new();
    let mut cfg = config(false);
    cfg.command_timeout = Duration::from_millis(200);
    let (client, server) = duplex(4096);
    let (_tx, rx) = watch::channel(false);
    let session = Session::new(
        Arc::new(cfg),
        h.spool.clone(),
        Arc::new(crate::spool::Inbox::default()),
        rx,
        server,
        "127.0.0.1:1".parse().unwrap(),
    );
    let task = tokio::spawn(session.run());
    let (mut read, _write) = tokio::io::split(client);
    let mut out = Vec::new();
    read.read_to_end(&mut out).await.unwrap();
    assert_eq!(task.await.unwrap(), End::Timeout);
    assert!(String::from_utf8_lossy(&out).contains("421 4.4.2"));
}

#[tokio::test]
async fn spool_failure_answers_451_and_keeps_nothing() {
    let h = Harness::new();
    // Make the spool unable to commit: its database refuses every new message.
    rusqlite::Connection::open(h.spool.db_path())
        .unwrap()
        .execute_batch("CREATE TRIGGER refuse BEFORE INSERT ON message BEGIN SELECT RAISE(ABORT, 'refused'); END;")
        .unwrap();
    let script = format!("{TX}body\r\n.\r\nQUIT\r\n");
    let out = h.talk(config(false), script.as_bytes()).await;
    assert_eq!(codes(&out), ["220", "250", "250", "250", "354", "451", "221"], "{out}");
    assert!(enhanced(&out, "451 4.3.0"));
    assert!(std::fs::read_dir(h.spool.dir().join("tmp")).unwrap().next().is_none(), "nothing half-written in tmp/");
    assert_eq!(h.spool.list(crate::spool::State::Incoming).unwrap(), Vec::<String>::new());
}

#[tokio::test]
async fn shutdown_refuses_idle_sessions_with_421() {
    let h = Harness::new();
    let (client, server) = duplex(4096);
    let (tx, rx) = watch::channel(false);
    let session = Session::new(
        Arc::new(config(false)),
        h.spool.clone(),
        Arc::new(crate::spool::Inbox::default()),
        rx,
        server,
        "127.0.0.1:1".parse().unwrap(),
    );
    let task = tokio::spawn(session.run());
    let (mut read, mut write) = tokio::io::split(client);
    write.write_all(b"EHLO c\r\n").await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    tx.send(true).unwrap();
    let mut out = Vec::new();
    read.read_to_end(&mut out).await.unwrap();
    assert_eq!(task.await.unwrap(), End::Shutdown);
    assert!(String::from_utf8_lossy(&out).ends_with("421 4.3.2 Service shutting down, try again later\r\n"));
}

#[tokio::test]
async fn refusals_are_counted_by_reason() {
    let h = Harness::new();
    let cfg = with_auth(false);
    let metrics = cfg.metrics.clone();
    use base64::Engine;
    let wrong = base64::engine::general_purpose::STANDARD.encode(b"\0legacy\0wrong");
    let long = "x".repeat(1200);
    let script = format!(
        "EHLO c\r\nAUTH PLAIN {wrong}\r\nMAIL FROM:<s@x.test> SIZE=999999\r\nMAIL FROM:<s@x.test>\r\n\
         RCPT TO:<a@elsewhere.test>\r\nRCPT TO:<a@hooks.example>\r\nDATA\r\n{long}\r\n.\r\nQUIT\r\n"
    );
    let out = h.talk(cfg, script.as_bytes()).await;
    assert_eq!(codes(&out), ["220", "250", "535", "552", "250", "550", "250", "354", "500", "221"], "{out}");
    let text = metrics.render();
    for reason in ["auth_failed", "too_big", "unknown_recipient", "line_too_long"] {
        let line = format!("mailhook_rejections_total{{protocol=\"smtp\",reason=\"{reason}\"}} 1\n");
        assert!(text.contains(&line), "{reason} not counted once:\n{text}");
    }
}

#[tokio::test]
async fn a_port_in_use_is_temporary_and_a_missing_certificate_is_not() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let text = format!("[smtp]\nlisten = [\"{addr}\"]\n");
    let config = Config::parse(&text, Path::new("m.toml"), Path::new("/nonexistent"), &|_| None).unwrap();
    let metrics = crate::metrics::Metrics::new();
    let e = Listener::bind(config.smtp.as_ref().unwrap(), false, &config, &metrics).await.err().expect("port taken");
    assert!(matches!(e, ListenerError::Bind { .. }) && e.is_temporary(), "{e}");

    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, "not a certificate").unwrap();
    std::fs::write(&key, "not a key").unwrap();
    let text = format!("[smtp]\nlisten = [\"127.0.0.1:0\"]\ntls = {{ cert = {cert:?}, key = {key:?} }}\n");
    let config = Config::parse(&text, Path::new("m.toml"), dir.path(), &|_| None).unwrap();
    let e = Listener::bind(config.smtp.as_ref().unwrap(), false, &config, &metrics).await.err().expect("bad cert");
    assert!(matches!(e, ListenerError::Tls { source: TlsError::NoCertificate(_), .. }), "{e}");
    assert!(!e.is_temporary(), "{e}");
    assert_eq!(e.to_string(), format!("smtp.tls: {}: no PEM certificate in it", cert.display()));
}
