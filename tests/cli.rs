//! The `mailhook` binary as an operator uses it: `try`, `test`, `check`, their output and
//! their exit codes (0 ok, 1 golden mismatch, 64 usage, 65 unreadable input, 78 bad config/rules).

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn mailhook(args: &[&str], dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mailhook"))
        .args(args)
        .current_dir(dir)
        .env_remove("KUSTOMER_HOOK_TOKEN")
        .output()
        .expect("run mailhook")
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn code(o: &Output) -> i32 {
    o.status.code().expect("exit code")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A temporary workspace with a rules dir and a fixtures dir.
struct Workspace {
    dir: tempfile::TempDir,
}

impl Workspace {
    fn new() -> Workspace {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("rules")).unwrap();
        std::fs::create_dir(dir.path().join("cases")).unwrap();
        Workspace { dir }
    }
    fn path(&self) -> &Path {
        self.dir.path()
    }
    fn write(&self, rel: &str, content: &str) -> &Self {
        std::fs::write(self.path().join(rel), content).unwrap();
        self
    }
    fn copy_fixture(&self, name: &str, to: &str) -> &Self {
        std::fs::copy(root().join("fixtures").join(name), self.path().join(to)).unwrap();
        self
    }
}

const BAD_RULES: &str =
    "[[rule]]\nname = \"ups\"\nto = [\"orders\"]\n\n[rule.extract]\nsubject = 'Order (?P<order_id>\\d+'\n";
const BAD_RULES_ERROR: &str =
    "rules/20-bad.toml:6: rule \"ups\": extract.subject: invalid regex \"Order (?P<order_id>\\\\d+\": unclosed group";

#[test]
fn try_prints_one_json_object_per_file() {
    let fixtures: Vec<String> = std::fs::read_dir(root().join("fixtures"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "eml"))
        .map(|p| p.display().to_string())
        .collect();
    let mut args = vec!["try", "--rules", "rules"];
    args.extend(fixtures.iter().map(String::as_str));
    let out = mailhook(&args, &root());
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let lines: Vec<Value> = stdout(&out).lines().map(|l| serde_json::from_str(l).expect("each line is JSON")).collect();
    assert_eq!(lines.len(), fixtures.len());
    for line in &lines {
        for key in ["file", "rule", "to", "payload"] {
            assert!(line.get(key).is_some(), "{key} missing in {line}");
        }
    }
    let ups = lines.iter().find(|l| l["file"].as_str().unwrap().ends_with("/shipping-ups.eml")).unwrap();
    assert_eq!(ups["rule"], "ups-delivery-notice");
    assert_eq!(ups["to"], serde_json::json!(["orders"]));
    assert_eq!(ups["payload"]["fields"]["tracking_number"], "1Z999AA10123456784");
    assert_eq!(ups["payload"]["source"], "stdin");
    assert!(ups.get("dead").is_none());
}

#[test]
fn try_reports_unreadable_files_and_goes_on() {
    let out = mailhook(&["try", "--rules", "rules", "no-such-file.eml", "fixtures/shipping-ups.eml"], &root());
    assert_eq!(code(&out), 65);
    assert!(stderr(&out).contains("no-such-file.eml: cannot read"), "{}", stderr(&out));
    assert_eq!(stdout(&out).lines().count(), 1);
}

#[test]
fn try_marks_dead_letters_with_the_reason() {
    let out = mailhook(
        &["try", "--rules", "rules", "fixtures/shipping-ups-missing-tracking.eml", "fixtures/unmatched-newsletter.eml"],
        &root(),
    );
    assert_eq!(code(&out), 0);
    let lines: Vec<Value> = stdout(&out).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines[0]["dead"], "rule \"ups-delivery-notice\": missing required field tracking_number");
    assert_eq!(lines[0]["to"], serde_json::json!([]));
    assert_eq!(lines[1]["rule"], Value::Null);
    assert_eq!(lines[1]["dead"], "no rule matched");
}

#[test]
fn envelope_from_flags_and_sidecar_reaches_the_rules() {
    let ws = Workspace::new();
    ws.write(
        "rules/10-imap.toml",
        "[[rule]]\nname = \"from-imap\"\nto = [\"alerts\"]\n[rule.when]\nsource = '^imap:alerts/INBOX$'\nrecipient = '^alerts@example\\.com$'\n",
    )
    .copy_fixture("monitoring-problem.eml", "cases/alert.eml");

    let out = mailhook(&["try", "--rules", "rules", "cases/alert.eml"], ws.path());
    assert_eq!(code(&out), 0);
    assert!(stdout(&out).contains("\"rule\":null"), "{}", stdout(&out));

    let out = mailhook(
        &[
            "try",
            "--rules",
            "rules",
            "--source",
            "imap:alerts/INBOX",
            "--recipient",
            "alerts@example.com",
            "cases/alert.eml",
        ],
        ws.path(),
    );
    assert!(stdout(&out).contains("\"rule\":\"from-imap\""), "{}", stdout(&out));

    ws.write("cases/alert.envelope.toml", "source = \"imap:alerts/INBOX\"\nrecipients = [\"alerts@example.com\"]\n");
    let out = mailhook(&["try", "--rules", "rules", "cases/alert.eml"], ws.path());
    assert!(stdout(&out).contains("\"rule\":\"from-imap\""), "{}", stdout(&out));

    let out = mailhook(&["try", "--rules", "rules", "--source", "pigeon", "cases/alert.eml"], ws.path());
    assert_eq!(code(&out), 64);
    assert!(stderr(&out).contains("unknown source \"pigeon\""));
}

#[test]
fn unclosed_regex_group_is_refused_by_try_test_and_check_with_file_rule_and_key() {
    let ws = Workspace::new();
    ws.write("rules/10-good.toml", "[[rule]]\nname = \"good\"\nto = [\"orders\"]\n")
        .write("rules/20-bad.toml", BAD_RULES)
        .copy_fixture("shipping-ups.eml", "cases/ups.eml")
        .write(
            "mailhook.toml",
            "[rules]\ndir = \"rules\"\n[destination.orders]\ntype = \"file\"\npath = \"out.jsonl\"\n",
        );
    for args in [
        &["try", "--rules", "rules", "cases/ups.eml"][..],
        &["test", "--rules", "rules", "cases"][..],
        &["check", "--config", "mailhook.toml"][..],
    ] {
        let out = mailhook(args, ws.path());
        assert_eq!(code(&out), 78, "{args:?}: {}", stderr(&out));
        let err = stderr(&out);
        let first = err.lines().next().unwrap_or_default();
        assert!(first.ends_with(BAD_RULES_ERROR), "{args:?}: {err}");
        assert!(stdout(&out).is_empty(), "{args:?} printed {}", stdout(&out));
    }
}

#[test]
fn golden_tests_pass_over_the_shipped_rules_and_fixtures() {
    let out = mailhook(&["test", "--rules", "rules", "fixtures"], &root());
    assert_eq!(code(&out), 0, "{}", stdout(&out));
    let last = stdout(&out).lines().last().unwrap().to_string();
    assert!(last.ends_with("passed, 0 failed"), "{last}");
}

#[test]
fn golden_mismatch_shows_a_diff_and_update_rewrites() {
    let ws = Workspace::new();
    ws.write(
        "rules/10-ups.toml",
        "[[rule]]\nname = \"ups\"\nto = [\"orders\"]\n[rule.extract]\nbody = 'Tracking Number:\\s*(?P<tracking>\\S+)'\n",
    )
    .copy_fixture("shipping-ups.eml", "cases/ups.eml");

    // No golden yet: a failure that says how to create it.
    let out = mailhook(&["test", "--rules", "rules", "cases"], ws.path());
    assert_eq!(code(&out), 1);
    assert!(stdout(&out).contains("MISSING cases/ups.eml"), "{}", stdout(&out));

    let out = mailhook(&["test", "--rules", "rules", "--update", "cases"], ws.path());
    assert_eq!(code(&out), 0, "{}", stdout(&out));
    let golden = std::fs::read_to_string(ws.path().join("cases/ups.json")).unwrap();
    let parsed: Value = serde_json::from_str(&golden).unwrap();
    assert_eq!(parsed["payload"]["fields"]["tracking"], "1Z999AA10123456784");
    assert!(parsed["payload"].get("id").is_none() && parsed["payload"].get("receivedAt").is_none(), "{golden}");

    // Volatile keys present in a golden are ignored.
    let mut with_volatile = parsed.clone();
    with_volatile["payload"]["id"] = "01OLDID".into();
    with_volatile["payload"]["receivedAt"] = "2001-01-01T00:00:00Z".into();
    ws.write("cases/ups.json", &serde_json::to_string_pretty(&with_volatile).unwrap());
    let out = mailhook(&["test", "--rules", "rules", "cases"], ws.path());
    assert_eq!(code(&out), 0, "{}", stdout(&out));
    assert_eq!(stdout(&out).lines().last(), Some("1 passed, 0 failed"));

    // A rule change shows up as a readable diff of the one value that changed.
    ws.write(
        "rules/10-ups.toml",
        "[[rule]]\nname = \"ups\"\nto = [\"orders\"]\n[rule.extract]\nbody = 'Tracking Number:\\s*(?P<tracking>\\S{6})'\n",
    );
    let out = mailhook(&["test", "--rules", "rules", "cases"], ws.path());
    assert_eq!(code(&out), 1);
    let text = stdout(&out);
    assert!(text.contains("FAIL    cases/ups.eml"), "{text}");
    assert!(text.contains("-      \"tracking\": \"1Z999AA10123456784\""), "{text}");
    assert!(text.contains("+      \"tracking\": \"1Z999A\""), "{text}");
    assert_eq!(
        text.lines()
            .filter(|l| l.trim_start().starts_with(['-', '+']) && !l.contains("---") && !l.contains("+++"))
            .count(),
        2,
        "{text}"
    );
    assert_eq!(text.lines().last(), Some("0 passed, 1 failed"));
}

#[test]
fn check_accepts_the_example_config() {
    let out = mailhook(&["check"], &root());
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(stdout(&out).starts_with("mailhook.toml: ok"), "{}", stdout(&out));

    let out = Command::new(env!("CARGO_BIN_EXE_mailhook"))
        .args(["check", "--config", "examples/kustomer.toml"])
        .current_dir(root())
        .env("IMAP_PASSWORD", "imap-pass-1234")
        .env("KUSTOMER_HOOK_TOKEN", "token-abcdef")
        .env("KUSTOMER_EMAIL_HOOK_KEY", "key-abcdef")
        .env("RELAY_PASSWORD", "relay-pass-1234")
        .output()
        .unwrap();
    // Everything in it is valid; only its rules directory (/etc/mailhook/rules) is absent here.
    assert_eq!(code(&out), 78);
    let err = stderr(&out);
    assert!(err.starts_with("/etc/mailhook/rules: cannot read rules directory"), "{err}");
    for secret in ["imap-pass-1234", "token-abcdef", "key-abcdef", "relay-pass-1234"] {
        assert!(!err.contains(secret) && !stdout(&out).contains(secret));
    }
}

#[test]
fn check_names_every_config_problem() {
    let ws = Workspace::new();
    ws.write("rules/10-r.toml", "[[rule]]\nname = \"r\"\nto = [\"nowhere\"]\n").write(
        "mailhook.toml",
        "[rules]\ndir = \"rules\"\n[destination.hook]\ntype = \"kustomer-web-hook\"\nurl = \"https://x.example/hooks/web/1\"\ntoken = \"${KUSTOMER_HOOK_TOKEN}\"\n",
    );
    let out = mailhook(&["check"], ws.path());
    assert_eq!(code(&out), 78);
    assert!(
        stderr(&out)
            .contains("mailhook.toml:6: destination.hook.token: environment variable KUSTOMER_HOOK_TOKEN is not set"),
        "{}",
        stderr(&out)
    );

    let out = Command::new(env!("CARGO_BIN_EXE_mailhook"))
        .arg("check")
        .current_dir(ws.path())
        .env("KUSTOMER_HOOK_TOKEN", "t0ken-value")
        .output()
        .unwrap();
    assert_eq!(code(&out), 78);
    assert!(
        stderr(&out).contains("rules/10-r.toml:1: rule \"r\": to[0]: unknown destination \"nowhere\""),
        "{}",
        stderr(&out)
    );

    ws.write("mailhook.toml", "[rules]\ndir = \"rules\"\n[smtp]\nlisten = [\"127.0.0.1:2525\"]\nmax_sise = \"1MB\"\n");
    let out = mailhook(&["check"], ws.path());
    assert_eq!(code(&out), 78);
    assert!(stderr(&out).contains("smtp") && stderr(&out).contains("max_sise"), "{}", stderr(&out));

    let out = mailhook(&["check", "--config", "missing.toml"], ws.path());
    assert_eq!(code(&out), 78);
    assert!(stderr(&out).contains("missing.toml: cannot read"), "{}", stderr(&out));
}

#[test]
fn check_reports_config_and_rule_errors_together() {
    let ws = Workspace::new();
    ws.write("rules/10-r.toml", "[[rule]]\nname = \"r\"\nto = [\"nowhere\", \"hook\"]\n").write(
        "mailhook.toml",
        "[rules]\ndir = \"rules\"\n\n[smtp]\nlisten = [\"127.0.0.1:2525\"]\nmax_sise = \"1MB\"\n\n\
         [destination.hook]\ntype = \"kustomer-web-hook\"\nurl = \"https://x.example/hooks/web/1\"\n\
         token = \"${KUSTOMER_HOOK_TOKEN}\"\n",
    );
    let out = mailhook(&["check"], ws.path());
    assert_eq!(code(&out), 78);
    let err = stderr(&out);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 5, "{err}");
    assert_eq!(
        lines[..3],
        [
            "mailhook.toml:6: smtp.max_sise: unknown key `max_sise` \u{2014} did you mean `max_size`?",
            "mailhook.toml:11: destination.hook.token: environment variable KUSTOMER_HOOK_TOKEN is not set",
            "2 errors in config",
        ],
        "{err}"
    );
    // The rules directory is printed as the config resolves it (relative to the config file).
    assert!(
        lines[3].ends_with(
            "rules/10-r.toml:1: rule \"r\": to[0]: unknown destination \"nowhere\" (not a [destination.*] in the config)"
        ),
        "{err}"
    );
    assert_eq!(lines[4], "1 error in rules; nothing was loaded");
    assert!(stdout(&out).is_empty(), "{}", stdout(&out));
}

#[test]
fn usage_errors_exit_64() {
    for args in [&["frobnicate"][..], &["try"][..], &["test", "--no-such-flag"][..], &[][..]] {
        let out = mailhook(args, &root());
        assert_eq!(code(&out), 64, "{args:?}");
    }
}

#[test]
fn every_command_explains_itself_with_an_example() {
    for cmd in ["try", "test", "check"] {
        let out = mailhook(&[cmd, "--help"], &root());
        assert_eq!(code(&out), 0);
        let text = stdout(&out);
        assert!(text.contains("Example"), "{cmd} --help has no example:\n{text}");
        assert!(text.contains(&format!("mailhook {cmd}")), "{cmd} --help shows no invocation:\n{text}");
    }
    let out = mailhook(&["--help"], &root());
    assert_eq!(code(&out), 0);
    assert!(stdout(&out).contains("Exit codes"));
}
