//! `[cluster]` against a real PostgreSQL (a private cluster, see `tests/support/postgres.rs`):
//! the archive meets the same contract as SQLite's, the schema is migrated once under a lock,
//! `synchronous_commit = off` and a newer schema refuse to start, `mailhook check` verifies the
//! database, `serve` refuses mail (SMTP 451, `ingest` 75) while the database that holds its
//! queue is away and takes and delivers mail again once it is back, and the operator commands
//! work on the shared queue.

mod support;

use mailhook::config::{ClusterConfig, PostgresUrl};
use mailhook::store::postgres::{ClusterError, PostgresArchive, schema_version};
use mailhook::store::{Archive, MessageQuery};
use std::path::{Path, PathBuf};
use std::time::Duration;
use support::gateway::{Gateway, message};
use support::postgres::{PASSWORD, Postgres, USER};
use support::smtp_client::SmtpClient;
use support::wait_for;

fn cluster(url: String) -> ClusterConfig {
    ClusterConfig { postgres: PostgresUrl::new(url), lease: Duration::from_secs(30), ca_file: None }
}

fn same(p: &Path) -> PathBuf {
    p.to_path_buf()
}

fn open(pg: &Postgres, db: &str) -> Result<PostgresArchive, ClusterError> {
    PostgresArchive::open(&cluster(pg.url(db)), &same)
}

#[test]
fn the_private_cluster_takes_sql_and_passwords() {
    let pg = Postgres::shared();
    let db = pg.database();
    assert_eq!(pg.sql(&db, "SELECT 1 + 1"), "2");
    assert_eq!(pg.sql(&db, "SHOW synchronous_commit"), "on");
    assert_eq!(pg.sql(&db, "SHOW listen_addresses"), "127.0.0.1");
    assert!(pg.try_sql(&db, "SELECT nonsense").is_err());
    // TCP needs the password.
    let wrong = PostgresArchive::open(&cluster(pg.url_with(&db, "wrong-password")), &same);
    let e = wrong.err().expect("a wrong password is refused").to_string();
    assert!(e.contains("password") && !e.contains("wrong-password"), "{e}");
}

#[test]
fn postgres_meets_the_archive_contract() {
    let pg = Postgres::shared();
    let fresh = || -> Box<dyn Archive> { Box::new(open(pg, &pg.database()).expect("open the archive")) };
    mailhook::store::conformance::run_all(&fresh);
}

#[test]
fn the_schema_is_migrated_once_by_instances_starting_together() {
    let pg = Postgres::shared();
    let db = pg.database();
    let url = pg.url(&db);
    let starts: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || PostgresArchive::open(&cluster(url), &same).map(|_| ()))
        })
        .collect();
    for s in starts {
        s.join().unwrap().expect("every instance starts");
    }
    let versions = pg.sql(&db, "SELECT version FROM refinery_schema_history ORDER BY version");
    assert_eq!(versions, "1\n2\n3\n4", "each migration applied once");
    assert_eq!(schema_version(), 4);
    for table in [
        "message",
        "message_raw",
        "address",
        "attempt",
        "queue",
        "imap_checkpoint",
        "imap_seen",
        "folder_lease",
        "pacing",
        "instance",
    ] {
        assert_eq!(pg.sql(&db, &format!("SELECT to_regclass('{table}') IS NOT NULL")), "t", "{table}");
    }
    let search = pg.sql(&db, "SELECT indexdef FROM pg_indexes WHERE indexname = 'message_search'");
    assert!(search.contains("USING gin (search)"), "{search}");
}

#[test]
fn synchronous_commit_off_refuses_to_start() {
    let pg = Postgres::shared();
    let db = pg.database();
    pg.sql("postgres", &format!("ALTER DATABASE {db} SET synchronous_commit = off"));
    let e = open(pg, &db).err().expect("synchronous_commit = off is refused");
    assert!(matches!(e, ClusterError::SynchronousCommit { .. }), "{e:?}");
    let text = e.to_string();
    assert!(text.contains("synchronous_commit = off") && text.contains("127.0.0.1"), "{text}");
    assert_eq!(pg.sql(&db, "SELECT to_regclass('message') IS NULL"), "t", "nothing was migrated");
    pg.sql("postgres", &format!("ALTER DATABASE {db} SET synchronous_commit = remote_apply"));
    open(pg, &db).expect("remote_apply is as safe as on for one server");
}

#[test]
fn a_newer_schema_refuses_to_start() {
    let pg = Postgres::shared();
    let db = pg.database();
    open(pg, &db).unwrap();
    pg.sql(
        &db,
        "INSERT INTO refinery_schema_history (version, name, applied_on, checksum) VALUES (99, 'later', '2027-01-01', '0')",
    );
    let e = open(pg, &db).err().expect("a newer schema is refused");
    assert!(matches!(e, ClusterError::Newer { found: 99, known: 4, .. }), "{e:?}");
}

/// A gateway with `[cluster]` on `db`, the password in `PGPASS`, and a file destination.
fn gateway(pg: &Postgres, db: &str) -> Gateway {
    gateway_with(pg, db, "")
}

/// [`gateway`] with more config (listeners) in front.
fn gateway_with(pg: &Postgres, db: &str, more: &str) -> Gateway {
    let config = format!(
        "{more}[cluster]\npostgres = \"{}\"\n\n\
         [delivery]\nbackoff = {{ initial = \"200ms\", max = \"500ms\" }}\nrate = \"off\"\n\n\
         [destination.out]\ntype = \"file\"\npath = \"out/events.jsonl\"\n",
        pg.url_with(db, "${PGPASS}")
    );
    let rules = "[[rule]]\nname = \"all\"\nto = [\"out\"]\n[rule.when]\nsubject = '.'\n";
    Gateway::new(&config, rules).env("PGPASS", PASSWORD)
}

#[test]
fn check_verifies_the_database() {
    let pg = Postgres::shared();
    let db = pg.database();
    let gw = gateway(pg, &db);
    let run = || {
        let out = gw.run(&["check", "--config", "mailhook.toml"]);
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(!text.contains(PASSWORD), "the password is shown: {text}");
        (out.status.code(), text)
    };
    let (code, text) = run();
    assert_eq!(code, Some(78), "{text}");
    assert!(text.contains("schema version 0, this mailhook needs 4: start mailhook serve once"), "{text}");

    open(pg, &db).unwrap();
    let (code, text) = run();
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains(&format!("cluster: postgres://postgres:***@127.0.0.1:{}/{db}, schema version 4", pg.port())),
        "{text}"
    );

    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let away = gateway(pg, &db);
    let text =
        std::fs::read_to_string(away.config()).unwrap().replace(&format!(":{}/", pg.port()), &format!(":{closed}/"));
    std::fs::write(away.config(), text).unwrap();
    let out = away.run(&["check", "--config", "mailhook.toml"]);
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(75), "{text}");
    assert!(text.contains(&format!("cluster.postgres: database 127.0.0.1:{closed} is unreachable")), "{text}");
}

/// Lines in the file destination's output.
fn delivered(gw: &Gateway) -> usize {
    std::fs::read_to_string(gw.path().join("out/events.jsonl")).map_or(0, |t| t.lines().count())
}

/// One SMTP transaction of `raw` to `addr`: the reply to the end of data.
fn smtp_send(addr: std::net::SocketAddr, raw: &[u8]) -> String {
    let mut c = SmtpClient::connect(addr);
    c.hello("EHLO", "client.example");
    c.expect("MAIL FROM:<sender@example.com>", &["250"]);
    c.expect("RCPT TO:<hook@example.com>", &["250"]);
    let reply = c.data(raw);
    let _ = c.cmd("QUIT");
    format!("{} {}", reply.code, reply.text())
}

#[test]
fn serve_refuses_mail_while_the_database_is_away_and_resumes_once_it_is_back() {
    // A cluster of its own: this test stops and starts it.
    let pg = Postgres::start();
    let db = pg.database();
    let archived = |pg: &Postgres| -> usize {
        pg.try_sql(&db, "SELECT count(*) FROM message").ok().and_then(|n| n.parse().ok()).unwrap_or(0)
    };
    let mut gw = gateway_with(
        &pg,
        &db,
        "[smtp]\nlisten = [\"127.0.0.1:0\"]\nrecipients = ['@example\\.com$']\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n",
    );
    gw.start();
    let smtp = gw.listening("smtp");
    let admin = gw.listening("admin");
    let health = |want: u16| {
        let (status, _, body) = support::gateway::http_get(admin, "/healthz", None);
        assert_eq!(status, want, "{body}");
        body
    };
    health(200);
    let first = gw.ingest(&message(1, "before"));
    wait_for("the first delivery", Duration::from_secs(20), || delivered(&gw) == 1);
    wait_for("the first message in the archive", Duration::from_secs(30), || archived(&pg) == 1);
    assert_eq!(pg.sql(&db, "SELECT id FROM message"), first);
    assert_eq!(pg.sql(&db, "SELECT count(*) FROM queue"), "0", "a delivered message leaves the queue");
    assert!(!gw.path().join("spool/spool.db").exists(), "the queue is in PostgreSQL: no local database");

    // Away: the queue cannot be written, so nothing is acknowledged.
    pg.stop();
    let (code, _, err) = gw.ingest_raw(&message(2, "while away"), &["hook@example.com"]);
    assert_eq!(code, 75, "ingest keeps the message for the MTA: {err}");
    assert!(err.contains("unreachable"), "{err}");
    assert!(!err.contains(PASSWORD), "the password is shown: {err}");
    let reply = smtp_send(smtp, &message(3, "while away"));
    assert!(reply.starts_with("451 4.3.0"), "{reply}");
    let body = health(503);
    assert!(body.contains("unreachable"), "{body}");

    // Back: serve takes and delivers mail again, without a restart.
    pg.restart();
    let reply = smtp_send(smtp, &message(4, "after"));
    assert!(reply.starts_with("250"), "{reply}\n{}", gw.logs());
    health(200);
    let fourth = gw.ingest(&message(5, "after"));
    wait_for("the deliveries after the outage", Duration::from_secs(30), || delivered(&gw) == 3);
    wait_for("every message in the archive", Duration::from_secs(30), || archived(&pg) == 3);
    assert!(pg.sql(&db, "SELECT id FROM message").contains(&fourth));
    let text = std::fs::read_to_string(gw.path().join("out/events.jsonl")).unwrap();
    assert!(!text.contains("while away"), "a refused message was delivered: {text}");
    assert_eq!(pg.sql(&db, "SELECT count(*) FROM attempt WHERE outcome = 'delivered'"), "3");
    assert!(!gw.logs().contains(PASSWORD), "the password is logged");
    assert_eq!(gw.stop(), 0, "serve stops cleanly: {}", gw.logs());

    // `shadow` judges what every instance archived: the messages in PostgreSQL.
    let out = gw.run(&["shadow", "--config", "mailhook.toml", "--rules", "rules"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("judged 3 archived messages"), "{text}");
}

#[test]
fn the_archive_reads_fail_fast_while_the_database_is_away() {
    let pg = Postgres::start();
    let db = pg.database();
    let archive = open(&pg, &db).unwrap();
    pg.stop();
    let e = archive.list(&MessageQuery::default()).expect_err("no database, no list");
    assert!(e.to_string().contains("unreachable"), "{e}");
    pg.restart();
    assert!(archive.list(&MessageQuery::default()).unwrap().items.is_empty(), "back without reopening");
}

#[test]
fn a_rules_change_is_shadowed_over_the_shared_archive() {
    let pg = Postgres::shared();
    let db = pg.database();
    let mut gw = gateway(pg, &db);
    gw.start();
    gw.ingest(&message(1, "before"));
    wait_for("the first message in the archive", Duration::from_secs(20), || {
        pg.try_sql(&db, "SELECT count(*) FROM message").is_ok_and(|n| n == "1")
    });
    // A new rules file, and at once a message: the watcher or the pipeline (whichever sees
    // the change first) shadow-runs it over the archive before it applies.
    gw.write_rules("20-more.toml", "[[rule]]\nname = \"more\"\nto = [\"out\"]\n[rule.when]\nsubject = 'never'\n");
    gw.ingest(&message(2, "after"));
    wait_for("the second delivery", Duration::from_secs(20), || delivered(&gw) == 2);
    gw.wait_log("the shadow run", 1, Duration::from_secs(20), |l| {
        l["message"].as_str().is_some_and(|m| m.starts_with("shadow run of the new rules:"))
    });
    let logs = gw.logs();
    assert!(!logs.contains("panicked"), "{logs}");
    assert_eq!(gw.stop(), 0, "{logs}");
}

/// The pipeline checks the rules directory from its own async task before judging, and a changed
/// directory is shadow-run over the archive right there: the archive must answer a call made
/// from an async task of a multi-threaded runtime, as from any thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_archive_answers_calls_from_an_async_task() {
    let pg = Postgres::shared();
    let db = pg.database();
    let archive = open(pg, &db).unwrap();
    assert!(archive.list(&MessageQuery::default()).unwrap().items.is_empty());
    assert_eq!(archive.size().unwrap(), 0);
    drop(archive);
}

#[test]
fn tls_is_used_and_the_certificate_checked() {
    let pg = Postgres::start_tls();
    let db = pg.database();
    let url = format!("postgres://{USER}:{PASSWORD}@localhost:{}/{db}?sslmode=require", pg.port());
    let mut with_ca = cluster(url.clone());
    with_ca.ca_file = Some(pg.ca_file().unwrap().to_path_buf());
    let archive = PostgresArchive::open(&with_ca, &same).expect("TLS with the test CA");
    assert!(archive.list(&MessageQuery::default()).unwrap().items.is_empty());
    let tls = pg.sql(
        &db,
        &format!("SELECT bool_and(s.ssl) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE a.datname = '{db}' AND a.usename = '{USER}' AND a.pid <> pg_backend_pid() AND a.client_addr IS NOT NULL"),
    );
    assert_eq!(tls, "t", "the archive's connections use TLS");

    // The public roots alone do not know the test CA: refused, not waited for.
    let e = PostgresArchive::open(&cluster(url), &same).err().expect("an unknown issuer is refused");
    assert!(!e.is_unreachable(), "{e}");
    assert!(e.to_string().to_lowercase().contains("certificate"), "{e}");
}

/// A database gone for longer than the archive waits: writes fail (the writer skips their
/// entries) instead of holding the writer, and so delivery, until it answers; then they work.
#[test]
fn writes_stop_waiting_for_a_database_gone_too_long() {
    use mailhook::model::{Envelope, Source};
    use mailhook::store::{ArchiveState, ArchivedMessage, Entry};
    let pg = Postgres::start();
    let db = pg.database();
    let archive = std::sync::Arc::new(open(&pg, &db).unwrap().with_outage_wait(Duration::from_secs(1)));
    let entry = || {
        let raw = b"Subject: kept\r\n\r\nbody\r\n".to_vec();
        let m = ArchivedMessage::build(
            ArchiveState::Delivered,
            Envelope::new(Source::Stdin),
            raw,
            None,
            None,
            vec![],
            None,
            std::time::SystemTime::now(),
        );
        vec![Entry::Message(Box::new(m))]
    };
    // Each write runs on a thread of its own: a write that never gives up fails the test
    // instead of hanging it.
    let write = |entries: Vec<Entry>| {
        let (done, result) = std::sync::mpsc::channel();
        let archive = archive.clone();
        std::thread::spawn(move || {
            let _ = done.send(archive.write_batch(&entries).map_err(|e| e.to_string()));
        });
        result.recv_timeout(Duration::from_secs(30)).expect("a write gives up on a database gone too long")
    };
    assert!(write(entry()).is_ok());

    pg.stop();
    let e = write(entry()).expect_err("the database is gone");
    assert!(e.contains("unreachable"), "{e}");
    assert!(write(entry()).is_err(), "still gone: fails again");

    pg.restart();
    assert!(write(entry()).is_ok(), "back: written again");
    assert_eq!(pg.sql(&db, "SELECT count(*) FROM message"), "2");
}

#[test]
fn queue_and_replay_work_on_the_shared_queue() {
    let pg = Postgres::shared();
    let db = pg.database();
    let mut gw = gateway(pg, &db);
    gw.write_rules("10-test.toml", "[[rule]]\nname = \"orders\"\nto = [\"out\"]\n[rule.when]\nsubject = '^order'\n");

    // Taken by `ingest` with no instance running: in the database, for any instance.
    let first = gw.ingest(&message(1, "hello"));
    assert_eq!(pg.sql(&db, "SELECT id || ' ' || state FROM queue"), format!("{first} incoming"));
    let q = gw.queue();
    assert_eq!((q.len(), q[0]["id"].as_str(), q[0]["state"].as_str()), (1, Some(first.as_str()), Some("incoming")));
    let shown = gw.show(&first);
    assert_eq!(shown["meta"]["id"], first.as_str(), "{shown}");
    assert_eq!(shown["payload"]["subject"], "hello 1", "{shown}");
    let (code, out, err) = run(&gw, &["queue", "drop", &first]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out.trim(), format!("{first}: dropped from incoming"));
    assert!(gw.queue().is_empty());
    let (code, _, err) = run(&gw, &["queue", "drop", &first]);
    assert_eq!(code, Some(65), "{err}");
    assert!(err.contains("not in the spool"), "{err}");

    // Dead letters of the running instance, replayed by a command with new rules.
    let second = gw.ingest(&message(2, "shipment"));
    gw.start();
    let q = gw.wait_queue(Duration::from_secs(20), "a dead letter", |q| q.len() == 1 && q[0]["state"] == "dead");
    assert_eq!(q[0]["id"], second.as_str());
    assert_eq!(q[0]["last_error"], "no rule matched");
    let (code, _, err) = run(&gw, &["queue", "retry", &second]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("the rules still reject it"), "{err}");
    let (code, out, err) = run(&gw, &["queue", "retry", "--force", &second]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains(&second), "{out}");
    gw.wait_queue(Duration::from_secs(20), "dead again", |q| q.len() == 1 && q[0]["state"] == "dead");
    gw.write_rules(
        "20-shipments.toml",
        "[[rule]]\nname = \"shipments\"\nto = [\"out\"]\n[rule.when]\nsubject = '^shipment'\n",
    );
    let (code, out, err) = run(&gw, &["replay", "--dead"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out.trim(), format!("{second}: rule shipments → out"));
    wait_for("the replayed delivery", Duration::from_secs(20), || delivered(&gw) == 1);
    gw.wait_queue(Duration::from_secs(20), "an empty queue", |q| q.is_empty());
    assert_eq!(gw.stop(), 0, "{}", gw.logs());

    // The database away: the commands say so and exit 75, never "not in the spool".
    let away = gateway(pg, &db);
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let text =
        std::fs::read_to_string(away.config()).unwrap().replace(&format!(":{}/", pg.port()), &format!(":{closed}/"));
    std::fs::write(away.config(), text).unwrap();
    let out = away.run(&["queue", "drop", "--config", "mailhook.toml", &second]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(75), "{err}");
    assert!(err.contains("unreachable"), "{err}");
}

/// Runs `mailhook ARGS --config mailhook.toml`: (exit code, stdout, stderr).
fn run(gw: &Gateway, args: &[&str]) -> (Option<i32>, String, String) {
    let mut all = args.to_vec();
    all.extend_from_slice(&["--config", "mailhook.toml"]);
    let out = gw.run(&all);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
