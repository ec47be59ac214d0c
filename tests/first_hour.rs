//! What a new operator meets in the first hour, through the real binary: `ingest` as Postfix's
//! pipe(8) runs it (several recipients in one argv, the exit codes Postfix maps), `--wait` and
//! `queue wait`, a rules file saved just before a mail comes in, `queue list`/`retry` on a
//! message a rule rejected, `try -`, golden files without their mail, log colours, paths.

mod support;

use serde_json::Value;
use std::io::Write;
use std::process::{Command, Stdio};
use support::gateway::{BIN, Gateway, message};
use support::smtp_client::SmtpClient;

/// `file` destinations `a` and `b` under `out/`; unmatched mail is a dead letter.
const FILES: &str = "[rules]\ndir = \"rules\"\nunmatched = \"dead\"\n\n\
                     [destination.a]\ntype = \"file\"\npath = \"out/a.jsonl\"\n\
                     [destination.b]\ntype = \"file\"\npath = \"out/b.jsonl\"\n";

fn rule(name: &str, subject: &str, to: &str) -> String {
    format!("[[rule]]\nname = \"{name}\"\nto = [\"{to}\"]\n\n[rule.when]\nsubject = '{subject}'\n")
}

fn lines(gw: &Gateway, dest: &str) -> Vec<Value> {
    std::fs::read_to_string(gw.path().join("out").join(format!("{dest}.jsonl")))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

/// Runs `mailhook ARGS` in the gateway's directory with `input` on stdin: (code, stdout, stderr).
fn run_with_input(gw: &Gateway, args: &[&str], input: &[u8]) -> (i32, String, String) {
    let mut child = Command::new(BIN)
        .args(args)
        .current_dir(gw.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let _ = child.stdin.take().unwrap().write_all(input);
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn ingest_takes_every_recipient_postfix_passes_in_one_argv() {
    let gw = Gateway::new(FILES, &rule("orders", "Order", "a"));
    // master.cf: argv=mailhook ingest --config F --from ${sender} --to ${recipient}, with
    // ${recipient} expanded to one argument per recipient.
    let args = [
        "ingest",
        "--config",
        "mailhook.toml",
        "--from",
        "s@example.org",
        "--to",
        "a@hooks.example",
        "b@hooks.example",
    ];
    let (code, id, err) = run_with_input(&gw, &args, &message(1, "Order"));
    assert_eq!(code, 0, "{err}");
    let id = id.trim();
    let meta = gw.show(id)["meta"].clone();
    assert_eq!(meta["envelope"]["recipients"], serde_json::json!(["a@hooks.example", "b@hooks.example"]));
    assert_eq!(gw.queue().len(), 1, "spooled once for both recipients");
    // The repeated form still works.
    let args = ["ingest", "--config", "mailhook.toml", "--to", "a@hooks.example", "--to", "b@hooks.example"];
    let (code, id, err) = run_with_input(&gw, &args, &message(2, "Order"));
    assert_eq!(code, 0, "{err}");
    assert_eq!(gw.show(id.trim())["meta"]["envelope"]["recipients"].as_array().unwrap().len(), 2);
}

#[test]
fn ingest_exits_75_for_what_the_operator_can_fix_and_65_only_for_a_message_never_taken() {
    let gw = Gateway::new(FILES, &rule("orders", "Order", "a"));
    let ingest = |config: &str, input: &[u8]| {
        run_with_input(&gw, &["ingest", "--config", config, "--to", "a@hooks.example"], input)
    };
    // The config cannot be read.
    let (code, _, err) = ingest("missing.toml", &message(1, "Order"));
    assert_eq!(code, 75, "{err}");
    assert!(err.contains("missing.toml"), "{err}");
    // The config has an error.
    std::fs::write(gw.path().join("typo.toml"), "[spool]\ndir = \"spool\"\nmax_sise = 1\n").unwrap();
    let (code, _, err) = ingest("typo.toml", &message(1, "Order"));
    assert_eq!(code, 75, "{err}");
    // The spool is missing.
    std::fs::write(gw.path().join("nospool.toml"), "[spool]\ndir = \"no-such-spool\"\n").unwrap();
    let (code, _, err) = ingest("nospool.toml", &message(1, "Order"));
    assert_eq!(code, 75, "{err}");
    // The spool is not a directory one can write into.
    std::fs::write(gw.path().join("file-spool"), "").unwrap();
    std::fs::write(gw.path().join("filespool.toml"), "[spool]\ndir = \"file-spool\"\n").unwrap();
    let (code, _, err) = ingest("filespool.toml", &message(1, "Order"));
    assert_eq!(code, 75, "{err}");
    // Nothing to take, ever.
    let (code, _, err) = ingest("mailhook.toml", b"");
    assert_eq!(code, 65, "{err}");
    // And a good one.
    let (code, _, err) = ingest("mailhook.toml", &message(1, "Order"));
    assert_eq!(code, 0, "{err}");
}

#[test]
fn ingest_wait_prints_the_outcome_once_delivered_or_dead() {
    let rules = format!(
        "{}\n[[rule]]\nname = \"invoices\"\nto = [\"b\"]\nrequire = [\"invoice\"]\n\n[rule.when]\nsubject = 'Invoice'\n\n\
         [rule.extract]\nsubject = 'Invoice (?P<invoice>\\d+)'\n",
        rule("orders", "Order", "a")
    );
    let mut gw = Gateway::new(FILES, &rules);
    gw.start();
    let wait = ["ingest", "--config", "mailhook.toml", "--to", "hook@example.com", "--wait"];
    let (code, out, err) = run_with_input(&gw, &wait, &message(1, "Order"));
    assert_eq!(code, 0, "{out}{err}\n{}", gw.logs());
    let (id, outcome) = out.trim().split_once(' ').unwrap();
    assert_eq!(outcome, "delivered");
    // Read at once, without retrying: it is there.
    let a = lines(&gw, "a");
    assert_eq!(a.len(), 1);
    assert_eq!(a[0]["id"], id);

    let (code, out, _) = run_with_input(&gw, &wait, &message(2, "Invoice without a number"));
    assert_eq!(code, 1, "{out}");
    assert!(out.trim().ends_with("dead: rule \"invoices\": missing required field invoice"), "{out}");
    let (code, out, _) = run_with_input(&gw, &wait, &message(3, "Nothing matches"));
    assert_eq!(code, 1, "{out}");
    assert!(out.trim().ends_with("dead: no rule matched"), "{out}");

    // `queue wait` after an SMTP-like hand-over (here: ingest without --wait).
    let (code, id, _) = run_with_input(&gw, &wait[..5], &message(4, "Order"));
    assert_eq!(code, 0);
    let out = gw.run(&["queue", "wait", "--config", "mailhook.toml"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(said.is_empty() || said.trim() == format!("{} delivered", id.trim()), "{said}");
    assert_eq!(lines(&gw, "a").len(), 2);
    assert_eq!(gw.stop(), 0);

    // No serve: the wait ends, saying so, with 75.
    let (code, out, _) =
        run_with_input(&gw, &["ingest", "--config", "mailhook.toml", "--wait=1s"], &message(5, "Order"));
    assert_eq!(code, 75, "{out}");
    assert!(out.contains("still incoming after 1s: is `mailhook serve` running?"), "{out}");
}

/// Sends one message over SMTP, as `curl` does; returns the spool id from the `250` reply.
fn send(addr: std::net::SocketAddr, n: usize, subject: &str) -> String {
    let mut c = SmtpClient::connect(addr);
    c.hello("EHLO", "client.test");
    c.expect("MAIL FROM:<sender@example.com>", &["250"]);
    c.expect("RCPT TO:<hook@example.com>", &["250"]);
    let reply = c.data(&message(n, subject));
    if reply.code != 250 {
        c.fail("message not accepted");
    }
    c.expect("QUIT", &["221"]);
    reply.text().rsplit(' ').next().unwrap().to_string()
}

#[test]
fn a_mail_right_after_a_rules_file_is_saved_is_judged_by_the_new_rules() {
    let config = format!("[smtp]\nlisten = [\"127.0.0.1:0\"]\nrecipients = ['@example\\.com$']\n\n{FILES}");
    let mut gw = Gateway::new(&config, &rule("orders", "Order", "a"));
    gw.start();
    let smtp = gw.listening("smtp");
    let wait = |id: &str| {
        let out = gw.run(&["queue", "wait", "--config", "mailhook.toml", id]);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    for n in 0..3 {
        // A new file, then a mail only it matches, over SMTP (handed to the workers at once):
        // no pause in between.
        gw.write_rules(&format!("2{n}-new.toml"), &rule(&format!("new-{n}"), &format!("Fresh{n}"), "b"));
        let id = send(smtp, n, &format!("Fresh{n}"));
        assert_eq!(wait(&id), format!("{id} delivered"), "{}", gw.logs());
        assert_eq!(lines(&gw, "b").last().unwrap()["rule"], format!("new-{n}"));
    }
    // An edit of an existing file counts too.
    gw.write_rules("10-test.toml", &rule("orders-edited", "Order", "b"));
    let id = send(smtp, 9, "Order");
    assert_eq!(wait(&id), format!("{id} delivered"));
    assert_eq!(lines(&gw, "b").last().unwrap()["rule"], "orders-edited");
    assert_eq!(gw.stop(), 0);
}

#[test]
fn queue_list_names_the_rule_and_retry_says_the_rules_still_reject_it() {
    let rules = "[[rule]]\nname = \"invoices\"\nto = [\"b\"]\nrequire = [\"invoice\"]\n\n[rule.when]\nsubject = 'Invoice'\n\n\
                 [rule.extract]\nsubject = 'Invoice (?P<invoice>\\d+)'\n";
    let mut gw = Gateway::new(FILES, rules);
    gw.start();
    let wait = ["ingest", "--config", "mailhook.toml", "--to", "hook@example.com", "--wait"];
    let (code, out, _) = run_with_input(&gw, &wait, &message(1, "Invoice without a number"));
    assert_eq!(code, 1, "{out}");
    let id = out.split_whitespace().next().unwrap().to_string();

    let list = gw.run(&["queue", "list", "--config", "mailhook.toml", "--json"]);
    let rows: Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(rows[0]["rule"], "invoices", "{rows}");
    let table = String::from_utf8_lossy(&gw.run(&["queue", "list", "--config", "mailhook.toml"]).stdout).into_owned();
    assert!(table.lines().any(|l| l.starts_with(&id) && l.contains(" invoices ")), "{table}");

    // The rules still reject it: not queued, and the way out is named.
    let retry = gw.run(&["queue", "retry", "--config", "mailhook.toml", &id]);
    assert_eq!(retry.status.code(), Some(1));
    let err = String::from_utf8_lossy(&retry.stderr);
    assert!(err.contains("the rules still reject it (rule \"invoices\": missing required field invoice)"), "{err}");
    assert!(err.contains(&format!("mailhook replay {id}")) && err.contains("--force"), "{err}");
    assert!(!String::from_utf8_lossy(&retry.stdout).contains("queued"));
    assert_eq!(gw.show(&id)["state"], "dead");

    // --force queues it anyway (and it dies again, as said).
    let forced = gw.run(&["queue", "retry", "--config", "mailhook.toml", "--force", &id]);
    assert!(forced.status.success(), "{}", String::from_utf8_lossy(&forced.stderr));
    assert!(String::from_utf8_lossy(&forced.stdout).contains("queued"));
    let out = gw.run(&["queue", "wait", "--config", "mailhook.toml", &id]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("dead: rule \"invoices\""));

    // Once the rule is fixed, retry takes it.
    gw.write_rules("10-test.toml", &rule("invoices", "Invoice", "b"));
    let retry = gw.run(&["queue", "retry", "--config", "mailhook.toml", &id]);
    assert!(retry.status.success(), "{}", String::from_utf8_lossy(&retry.stderr));
    let out = gw.run(&["queue", "wait", "--config", "mailhook.toml", &id]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("{id} delivered"));
    assert_eq!(gw.stop(), 0);
}

#[test]
fn try_dash_reads_standard_input() {
    let gw = Gateway::new(FILES, &rule("orders", "Order", "a"));
    let (code, out, err) = run_with_input(&gw, &["try", "--rules", "rules", "-"], &message(1, "Order"));
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["file"], "-");
    assert_eq!(v["rule"], "orders");
    assert_eq!(v["payload"]["subject"], "Order 1");
}

#[test]
fn test_reports_a_golden_whose_mail_is_gone() {
    let gw = Gateway::new(FILES, &rule("orders", "Order", "a"));
    let dir = gw.path().join("cases");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("kept.eml"), message(1, "Order")).unwrap();
    let update = gw.run(&["test", "--rules", "rules", "--update", "cases"]);
    assert!(update.status.success());
    std::fs::write(dir.join("gone.json"), std::fs::read(dir.join("kept.json")).unwrap()).unwrap();
    let out = gw.run(&["test", "--rules", "rules", "cases"]);
    assert_eq!(out.status.code(), Some(1));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("ORPHAN  cases/gone.json: no cases/gone.eml beside it"), "{said}");
    assert!(said.contains("1 passed, 1 failed"), "{said}");
}

#[test]
fn text_logs_have_no_colour_codes_in_a_file_and_paths_have_no_dot_slashes() {
    let gw = Gateway::new(FILES, &rule("orders", "Order", "a"));
    std::fs::write(
        gw.path().join("mailhook.toml"),
        format!("[spool]\ndir = \"./spool\"\n{}", FILES.replace("dir = \"rules\"", "dir = \"./rules\"")),
    )
    .unwrap();
    let check = gw.run(&["check", "--config", "mailhook.toml"]);
    let said = String::from_utf8_lossy(&check.stdout);
    assert!(check.status.success(), "{said}");
    assert!(said.contains("from rules (unmatched: dead)") && said.contains("spool: spool\n"), "{said}");
    assert!(!said.contains("./"), "{said}");

    let log = std::fs::File::create(gw.path().join("text.log")).unwrap();
    let mut serve = Command::new(BIN)
        .args(["serve", "--config", "mailhook.toml", "--log-format", "text"])
        .current_dir(gw.path())
        .stdin(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let text = loop {
        let text = std::fs::read_to_string(gw.path().join("text.log")).unwrap();
        if text.contains("mailhook serving") {
            break text;
        }
        assert!(std::time::Instant::now() < deadline, "serve did not start:\n{text}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    Command::new("kill").args(["-TERM", &serve.id().to_string()]).status().unwrap();
    serve.wait().unwrap();
    assert!(!text.contains('\u{1b}'), "colour codes in a file:\n{text:?}");
    assert!(!text.contains("././"), "{text}");
}

#[test]
fn an_unquoted_header_key_is_told_to_be_quoted() {
    let rules = "[[rule]]\nname = \"sap\"\nto = [\"a\"]\n\n[rule.when]\nheader.X-Mailer = '^SAP'\n";
    let gw = Gateway::new(FILES, rules);
    let out = gw.run(&["check", "--config", "mailhook.toml"]);
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("when.header: a header key is one key with a dot in it: write it quoted: \"header.X-Mailer\""),
        "{err}"
    );
    // Written quoted, it loads.
    gw.write_rules("10-test.toml", &rules.replace("header.X-Mailer", "\"header.X-Mailer\""));
    let out = gw.run(&["check", "--config", "mailhook.toml"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
