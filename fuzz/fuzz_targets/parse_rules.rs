//! Arbitrary bytes as a received message: `parse`, then the repository's example rules
//! (`rules/*.toml`) and a catch-all rule whose extraction and templates touch every part of
//! the parsed email. Nothing may panic, and every outcome's payload must serialise.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailhook::model::{Action, Envelope, Source};
use mailhook::rules::{RuleSet, Unmatched};
use std::path::{Path, PathBuf};
use std::sync::{Once, OnceLock};

/// Extracts from every target and renders every context value, so that whatever `parse`
/// produced goes through the template engine too.
const CATCH_ALL: &str = r#"
[[rule]]
name = "catch-all"
to = ["ops"]
[rule.extract]
subject = '(?P<word>\w+)'
body = ['(?P<number>\d+)', '(?P<line>[^\r\n]{1,40})']
html = '(?i)<a href="(?P<link>[^"]*)"'
attachment = '(?P<attachment_ext>\.\w+)$'
from = '@(?P<domain>.+)$'
"header.Content-Type" = '(?P<ctype>[a-z]+/[a-z]+)'
[rule.fields]
n = { expr = "number | int" }
f = { expr = "number | float" }
everything = "{{ from }} {{ from.name }} {{ to | join(',') }} {{ cc | length }} {{ reply_to | length }} {{ subject }} {{ date }} {{ message_id }} {{ headers['content-type'] }} {{ attachments | length }} {% for a in attachments %}{{ a.name }}{{ a.content_type }}{{ a.size }}{{ a.message.subject if a.message }}{% endfor %} {{ envelope.source }} {{ text | length }} {{ html | length }} {{ fields | length }}"
[rule.payload]
body = "{{ text }}"
nested = { word = "{{ word }}", n = { expr = "n" }, list = ["{{ domain }}", { expr = "ctype" }] }
"#;

struct Rules {
    shipped: RuleSet,
    catch_all: RuleSet,
}

fn rules() -> &'static Rules {
    static RULES: OnceLock<Rules> = OnceLock::new();
    RULES.get_or_init(|| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../rules");
        let shipped = RuleSet::load_dir(&dir, Unmatched::Dead).expect("the example rules load");
        let catch_all =
            RuleSet::from_sources(&[(PathBuf::from("catch-all.toml"), CATCH_ALL.to_string())], Unmatched::Drop)
                .expect("the catch-all rule loads");
        Rules { shipped, catch_all }
    })
}

/// A fixed envelope (no clock, no random id), so that a crash reproduces exactly.
fn envelope() -> Envelope {
    let mut envelope = Envelope::new(Source::Smtp);
    envelope.id = "01JFUZZ0000000000000000000".into();
    envelope.received_at = "2026-12-01T08:31:00Z".into();
    envelope.mail_from = Some("erp@legacy.example".into());
    envelope.recipients = vec!["orders@hooks.example.com".into(), "alerts@hooks.example.com".into()];
    envelope.client = Some("127.0.0.1".into());
    envelope.helo = Some("client.test".into());
    envelope
}

/// The one panic let through: mail-parser 0.11 checks its own state with
/// `debug_assert!(false, "Invalid part ID, could not find multipart.")`, which a malformed
/// nested multipart reaches. Its release build goes on from that state and recovers what it
/// can (`tests/never_panics.rs` reads such a message, with that crate's debug assertions off
/// as in production). Fuzz builds turn debug assertions on for every crate, so that panic is
/// caught and the input skipped; any other panic still aborts.
const MAIL_PARSER_DEBUG_ASSERTION: &str = "Invalid part ID, could not find multipart.";

fn parse(data: &[u8]) -> Option<mailhook::model::Email> {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let abort = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let known = info.payload_as_str() == Some(MAIL_PARSER_DEBUG_ASSERTION)
                && info.location().is_some_and(|l| l.file().contains("mail-parser"));
            if !known {
                abort(info);
            }
        }));
    });
    std::panic::catch_unwind(|| mailhook::parse::parse(data)).ok()
}

fuzz_target!(|data: &[u8]| {
    let Some(email) = parse(data) else { return };
    let envelope = envelope();
    for set in [&rules().shipped, &rules().catch_all] {
        let outcome = set.evaluate(&email, &envelope);
        serde_json_check(&outcome.payload);
        if let Action::Deliver { to } = &outcome.action {
            assert!(!to.is_empty(), "a delivery names its destinations");
        }
    }
});

/// Every payload is the text of a JSON object, which reads back and serialises to that text.
fn serde_json_check(payload: &mailhook::model::Payload) {
    let back = payload.to_map().expect("the payload reads back as an object");
    assert_eq!(serde_json::to_string(&back).expect("the payload serialises"), payload.as_str());
}
