//! Arbitrary bytes as a rules file: the loader must return the compiled rules or errors, never
//! panic, and every error must name the file it is about (with a line inside it, when it gives
//! one). Rules that load are then run against a few emails: a rule the loader accepted must not
//! panic at evaluation either.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailhook::model::{Email, Envelope, Source};
use mailhook::rules::{RuleSet, Unmatched};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// A few emails of the repository's fixtures, parsed once.
fn emails() -> &'static [Email] {
    static EMAILS: OnceLock<Vec<Email>> = OnceLock::new();
    EMAILS.get_or_init(|| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures");
        ["shipping-ups.eml", "html-only.eml", "attachments.eml", "forwarded-rfc822.eml"]
            .iter()
            .map(|name| mailhook::parse::parse(&std::fs::read(dir.join(name)).expect("fixture")))
            .collect()
    })
}

fn envelope() -> Envelope {
    let mut envelope = Envelope::new(Source::Imap { account: "alerts".into(), folder: "INBOX".into() });
    envelope.id = "01JFUZZ0000000000000000000".into();
    envelope.received_at = "2026-12-01T08:31:00Z".into();
    envelope.recipients = vec!["alerts@hooks.example.com".into()];
    envelope
}

/// Checks that every error names one of `files` and a line inside it.
fn check_errors(errors: &[mailhook::rules::RuleError], files: &[(PathBuf, String)]) {
    assert!(!errors.is_empty(), "a failed load reports at least one error");
    for e in errors {
        let (_, text) = files
            .iter()
            .find(|(path, _)| *path == e.file)
            .unwrap_or_else(|| panic!("error about an unknown file: {e}"));
        let shown = e.to_string();
        assert!(shown.starts_with(&e.file.display().to_string()), "the message starts with the file: {shown}");
        if let Some(line) = e.line {
            let lines = text.bytes().filter(|&b| b == b'\n').count() + 1;
            assert!(line >= 1 && line <= lines, "line {line} of a {lines}-line file: {shown}");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data).into_owned();
    let one = vec![(PathBuf::from("rules/50-fuzz.toml"), text.clone())];
    match RuleSet::from_sources(&one, Unmatched::Dead) {
        Err(errors) => check_errors(&errors, &one),
        Ok(rules) => {
            let _ = rules.check_destinations(|d| d == "orders");
            let envelope = envelope();
            for email in emails() {
                let outcome = rules.evaluate(email, &envelope);
                assert!(outcome.payload.as_str().starts_with('{'), "a payload is a JSON object");
            }
            // The same file twice: every rule name is now a duplicate.
            let two =
                vec![(PathBuf::from("rules/50-fuzz.toml"), text.clone()), (PathBuf::from("rules/60-copy.toml"), text)];
            match RuleSet::from_sources(&two, Unmatched::Dead) {
                Ok(again) => assert!(again.rules().is_empty(), "a file with rules, loaded twice, has duplicate names"),
                Err(errors) => check_errors(&errors, &two),
            }
        }
    }
});
