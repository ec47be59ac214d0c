//! Property tests: whatever bytes arrive, parse + rules never panic, and rules always reach
//! a decision.

use mailhook::model::{Envelope, Source};
use mailhook::parse::parse;
use mailhook::rules::{RuleSet, Unmatched};
use proptest::prelude::*;
use std::path::PathBuf;
use std::sync::OnceLock;

/// The shipped rules, then a catch-all rule whose templates touch every context value.
fn rules() -> &'static RuleSet {
    static RULES: OnceLock<RuleSet> = OnceLock::new();
    RULES.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("rules");
        let mut sources: Vec<(PathBuf, String)> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .map(|p| (p.clone(), std::fs::read_to_string(&p).unwrap()))
            .collect();
        sources.sort();
        sources.push((
            PathBuf::from("zz-catch-all.toml"),
            r#"
[[rule]]
name = "catch-all"
to = ["ops"]
[rule.extract]
subject = '(?P<word>\w+)'
body = ['(?P<number>\d+)', '(?P<line>[^\r\n]{1,40})']
attachment = '(?P<attachment_ext>\.\w+)$'
"header.Content-Type" = '(?P<ctype>[a-z]+/[a-z]+)'
[rule.fields]
n = { expr = "number | int(default=0)" }
everything = "{{ from }} {{ from.name }} {{ to | join(',') }} {{ cc | length }} {{ subject }} {{ date }} {{ headers['content-type'] }} {{ attachments | length }} {{ envelope.source }} {{ text | length }} {{ html | length }}"
"#
            .to_string(),
        ));
        RuleSet::from_sources(&sources, Unmatched::Dead).expect("rules load")
    })
}

fn judge(raw: &[u8]) {
    let email = parse(raw);
    let outcome = rules().evaluate(&email, &Envelope::new(Source::Smtp));
    // Every outcome has a payload object that serialises.
    serde_json::to_string(&outcome.payload).expect("payload serialises");
}

#[test]
fn a_nested_multipart_that_loses_its_part_is_read_as_far_as_it_goes() {
    // Found by fuzzing: a part's headers cut into a second multipart with the same boundary.
    let raw = std::fs::read(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/nested-multipart-without-its-part.eml"),
    )
    .unwrap();
    let email = parse(&raw);
    assert_eq!(email.subject, "Fwd: Order 4711 cancelled by customer");
    assert_eq!(email.from[0].address, "lena.hoffmann@example.com");
    assert!(email.text.contains("please refund this one"), "{:?}", email.text);
    judge(&raw);
}

const HEADER_NAMES: &[&str] = &[
    "From",
    "To",
    "Cc",
    "Reply-To",
    "Subject",
    "Date",
    "Message-ID",
    "Content-Type",
    "Content-Transfer-Encoding",
    "Content-Disposition",
    "MIME-Version",
    "X-Job-Id",
    "Received",
];

fn header_value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        "[ -~]{0,60}".prop_map(String::into_bytes),
        Just(b"=?utf-8?B?R3LDvMOfZQ==?= =?iso-8859-1?q?M=FCnchen?=".to_vec()),
        Just(b"=?x-unknown?Q?broken=ZZ?= =?utf-8?B?###?=".to_vec()),
        Just(b"=?iso-8859-1?Q?Fr\xf6sche?= J\xf6rg =?iso-8859-7?Q?\xc1\xe8?=".to_vec()),
        Just(b"=?\xff?Q?\xfe?= =?x?Q?\xf6 ?= =?=?=?Q??= \xf6".to_vec()),
        Just(b"\"J\xf6rg\" <j@example.de>, <>, @, a@b@c, ;;".to_vec()),
        Just(b"multipart/mixed; boundary=\"b\"".to_vec()),
        Just(b"multipart/alternative; boundary=b".to_vec()),
        Just(b"message/rfc822".to_vec()),
        Just(b"text/html; charset=\"windows-1252\"".to_vec()),
        Just(b"attachment; filename*=UTF-8''%E2%82%AC%ZZ.pdf".to_vec()),
        Just(b"base64".to_vec()),
        Just(b"quoted-printable".to_vec()),
        Just(b"Tue, 31 Feb 2026 25:61:61 +9999".to_vec()),
        prop::collection::vec(any::<u8>(), 0..40),
    ]
}

fn body_piece() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        "[ -~\r\n]{0,200}".prop_map(String::into_bytes),
        Just(b"\r\n--b\r\nContent-Type: text/plain\r\n\r\nhello\r\n".to_vec()),
        Just(b"\r\n--b\r\nContent-Type: message/rfc822\r\n\r\nSubject: inner\r\n\r\nbody\r\n".to_vec()),
        Just(b"\r\n--b--\r\n".to_vec()),
        Just(b"<html><table><tr><td>a<td>b</table><script>x</script><div><div><div>".to_vec()),
        Just(b"SGVsbG8gV29ybGQ=\r\nSGVsbG8=gV29y\r\n=?=".to_vec()),
        Just(b"=C3=BC=\r\n=ZZ=\r".to_vec()),
        prop::collection::vec(any::<u8>(), 0..200),
    ]
}

/// What old systems put before the headers: a byte-order mark, blank lines, a stray line.
const PREFIXES: &[&[u8]] =
    &[b"", b"\xEF\xBB\xBF", b" \r\n", b"\n\t\n", b">From a@b Tue Dec  1 09:30:00 2026\r\n", b"From a@b\n"];

/// A header's colon: usual, and the obsolete syntax's white space before it (RFC 5322 §4.5).
const COLONS: &[&[u8]] = &[b": ", b"  : ", b"\t:", b":"];

fn email_like() -> impl Strategy<Value = Vec<u8>> {
    (
        prop::sample::select(PREFIXES),
        prop::collection::vec((prop::sample::select(HEADER_NAMES), header_value()), 0..12),
        prop::collection::vec(body_piece(), 0..8),
        any::<bool>(),
        prop::sample::select(COLONS),
    )
        .prop_map(|(prefix, headers, body, crlf, colon)| {
            let nl: &[u8] = if crlf { b"\r\n" } else { b"\n" };
            let mut raw = prefix.to_vec();
            for (name, value) in headers {
                raw.extend_from_slice(name.as_bytes());
                raw.extend_from_slice(colon);
                raw.extend_from_slice(&value);
                raw.extend_from_slice(nl);
            }
            raw.extend_from_slice(nl);
            for piece in body {
                raw.extend_from_slice(&piece);
            }
            raw
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(raw in prop::collection::vec(any::<u8>(), 0..4096)) {
        judge(&raw);
    }

    #[test]
    fn email_like_input_never_panics(raw in email_like()) {
        judge(&raw);
    }

    /// Whatever old systems put before the headers, and however the colon is spaced, the
    /// headers are read, and the body keeps its words with LF line endings.
    #[test]
    fn headers_survive_any_prefix(
        prefix in prop::sample::select(PREFIXES),
        colon in prop::sample::select(COLONS),
        subject in "[A-Za-z0-9][ -~]{0,40}[A-Za-z0-9]",
        crlf in any::<bool>(),
    ) {
        let nl: &[u8] = if crlf { b"\r\n" } else { b"\n" };
        let mut raw = prefix.to_vec();
        raw.extend_from_slice(b"Subject");
        raw.extend_from_slice(colon);
        raw.extend_from_slice(subject.as_bytes());
        raw.extend_from_slice(nl);
        raw.extend_from_slice(nl);
        raw.extend_from_slice(b"line one");
        raw.extend_from_slice(nl);
        raw.extend_from_slice(b"line two");
        raw.extend_from_slice(nl);
        let email = parse(&raw);
        prop_assert_eq!(email.subject, subject);
        prop_assert_eq!(email.text, "line one\nline two\n");
    }
}

#[test]
fn deeply_nested_input_does_not_overflow() {
    // 200 nested message/rfc822 parts and deeply nested HTML.
    let mut raw = Vec::new();
    for _ in 0..200 {
        raw.extend_from_slice(b"Content-Type: message/rfc822\r\n\r\n");
    }
    raw.extend_from_slice(b"Subject: bottom\r\n\r\nbody\r\n");
    judge(&raw);

    let mut html = b"Content-Type: text/html\r\n\r\n".to_vec();
    html.extend(std::iter::repeat_n(&b"<div><table><tr><td>"[..], 2000).flatten());
    html.extend_from_slice(b"deep");
    judge(&html);
}
