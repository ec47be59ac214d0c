use super::*;
use crate::model::{Address, Attachment, Header, Source};
use serde_json::json;

fn rules(text: &str) -> RuleSet {
    RuleSet::from_sources(&[(PathBuf::from("rules/10-test.toml"), text.to_string())], Unmatched::Dead)
        .unwrap_or_else(|e| panic!("rules should load: {e:#?}"))
}

fn errors(files: &[(&str, &str)]) -> Vec<String> {
    let sources: Vec<(PathBuf, String)> = files.iter().map(|(f, t)| (PathBuf::from(f), t.to_string())).collect();
    RuleSet::from_sources(&sources, Unmatched::Dead)
        .expect_err("rules should be refused")
        .iter()
        .map(ToString::to_string)
        .collect()
}

fn addr(a: &str, n: &str) -> Address {
    Address { address: a.into(), name: n.into() }
}

fn ups_email() -> Email {
    Email {
        message_id: "m1@ups.com".into(),
        subject: "UPS Update: Order 4711 shipped".into(),
        date: "2026-12-01T09:30:00+01:00".into(),
        from: vec![addr("pkginfo@ups.com", "UPS")],
        to: vec![addr("orders@shop.example", "Orders"), addr("ops@shop.example", "")],
        cc: vec![addr("audit@shop.example", "")],
        headers: vec![
            Header { name: "X-Customer-Id".into(), value: "C-991".into() },
            Header { name: "Received".into(), value: "from a".into() },
            Header { name: "Received".into(), value: "from b".into() },
        ],
        text: "Tracking Number: 1Z999AA10123456784\nScheduled Delivery: Tuesday, 12/01/2026\nWeight: 2.5 kg\n".into(),
        html: "<p>Tracking</p>".into(),
        attachments: vec![Attachment {
            name: "label.pdf".into(),
            content_type: "application/pdf".into(),
            size: 10,
            message: None,
        }],
        ..Email::default()
    }
}

fn envelope() -> Envelope {
    Envelope {
        id: "01TESTID".into(),
        source: Source::Smtp,
        mail_from: Some("bounce@ups.com".into()),
        recipients: vec!["hook@gw.example".into()],
        received_at: "2026-12-01T08:31:00Z".into(),
        client: Some("127.0.0.1".into()),
        helo: None,
        tls: false,
        auth_user: None,
    }
}

const UPS: &str = r#"
[[rule]]
name = "ups-shipment"
to = ["kustomer-orders"]
require = ["order_id", "tracking"]

[rule.when]
from = '@ups\.com$'
subject = '(?i)order'

[rule.extract]
subject = 'Order (?P<order_id>\d+)'
body = ['Tracking Number:\s*(?P<tracking>1Z[0-9A-Z]{16})',
        'Scheduled Delivery:\s*(?P<delivery>[^\r\n]+)']
"header.X-Customer-Id" = '(?P<customer_id>C-\d+)'

[rule.fields]
carrier = "UPS"
customer_email = "{{ from.address }}"
order_id = { expr = "order_id | int" }
"#;

#[test]
fn design_example_rule_produces_the_default_payload() {
    let out = rules(UPS).evaluate(&ups_email(), &envelope());
    assert_eq!(out.rule.as_deref(), Some("ups-shipment"));
    assert_eq!(out.action, Action::Deliver { to: vec!["kustomer-orders".into()] });
    let expected = json!({
        "id": "01TESTID",
        "rule": "ups-shipment",
        "receivedAt": "2026-12-01T08:31:00Z",
        "source": "smtp",
        "messageId": "m1@ups.com",
        "from": "pkginfo@ups.com",
        "fromName": "UPS",
        "to": "orders@shop.example, ops@shop.example",
        "cc": "audit@shop.example",
        "subject": "UPS Update: Order 4711 shipped",
        "date": "2026-12-01T09:30:00+01:00",
        "text": "Tracking Number: 1Z999AA10123456784\nScheduled Delivery: Tuesday, 12/01/2026\nWeight: 2.5 kg\n",
        "attachments": "label.pdf",
        "fields": {
            "order_id": 4711,
            "tracking": "1Z999AA10123456784",
            "delivery": "Tuesday, 12/01/2026",
            "customer_id": "C-991",
            "carrier": "UPS",
            "customer_email": "pkginfo@ups.com"
        }
    });
    assert_eq!(out.payload.to_json(), expected);
}

#[test]
fn first_matching_rule_wins_across_files_in_order() {
    let a = "[[rule]]\nname = \"a\"\nto = [\"x\"]\n[rule.when]\nsubject = 'Order'\n";
    let b = "[[rule]]\nname = \"b\"\nto = [\"y\"]\n[rule.when]\nsubject = 'UPS'\n";
    let set = RuleSet::from_sources(
        &[(PathBuf::from("10-a.toml"), a.into()), (PathBuf::from("20-b.toml"), b.into())],
        Unmatched::Dead,
    )
    .unwrap();
    assert_eq!(set.evaluate(&ups_email(), &envelope()).rule.as_deref(), Some("a"));
    let mut email = ups_email();
    email.subject = "UPS notice".into();
    assert_eq!(set.evaluate(&email, &envelope()).rule.as_deref(), Some("b"));
}

#[test]
fn every_when_key_must_hold() {
    let set = rules("[[rule]]\nname = \"r\"\nto = [\"x\"]\n[rule.when]\nfrom = '@ups\\.com$'\nsubject = 'nomatch'\n");
    let out = set.evaluate(&ups_email(), &envelope());
    assert_eq!(out.rule, None);
    assert_eq!(out.action, Action::Dead { reason: "no rule matched".into() });
}

#[test]
fn when_targets() {
    let cases = [
        ("to", "^ops@shop", true),
        ("to", "^nobody@", false),
        ("cc", "audit", true),
        ("recipient", "^hook@gw\\.example$", true),
        ("recipient", "orders", false),
        ("source", "^smtp$", true),
        ("source", "imap", false),
        ("body", "Weight: [0-9.]+ kg", true),
        ("html", "<p>", true),
        ("attachment", "\\.pdf$", true),
        ("attachment", "\\.csv$", false),
        ("\"header.x-customer-id\"", "^C-", true),
        ("\"header.Received\"", "from b", true),
        ("\"header.X-Missing\"", ".*", false),
        ("from", "UPS", false), // display names are not matched, only addresses
    ];
    for (key, re, expect) in cases {
        let set = rules(&format!("[[rule]]\nname = \"r\"\nto = [\"x\"]\n[rule.when]\n{key} = '{re}'\n"));
        let got = set.evaluate(&ups_email(), &envelope()).rule.is_some();
        assert_eq!(got, expect, "when.{key} = {re:?}");
    }
}

#[test]
fn imap_source_is_matched_with_account_and_folder() {
    let set = rules("[[rule]]\nname = \"r\"\nto = [\"x\"]\n[rule.when]\nsource = '^imap:alerts/INBOX$'\n");
    let mut env = envelope();
    env.source = Source::Imap { account: "alerts".into(), folder: "INBOX".into() };
    let out = set.evaluate(&ups_email(), &env);
    assert_eq!(out.rule.as_deref(), Some("r"));
    assert_eq!(out.payload.to_json()["source"], "imap");
}

#[test]
fn missing_required_field_is_a_dead_letter_with_the_reason() {
    let mut email = ups_email();
    email.text = "no tracking here".into();
    let out = rules(UPS).evaluate(&email, &envelope());
    assert_eq!(out.rule.as_deref(), Some("ups-shipment"));
    assert_eq!(out.action, Action::Dead { reason: "rule \"ups-shipment\": missing required field tracking".into() });
    assert_eq!(out.payload.to_json()["fields"]["order_id"], "4711");
}

#[test]
fn first_value_of_a_name_wins_and_lists_merge() {
    let set = rules(
        r#"
[[rule]]
name = "r"
to = ["x"]
[rule.extract]
body = ['(?P<word>[A-Z][a-z]+)', '(?P<word>Weight): (?P<weight>[0-9.]+)']
"header.Received" = 'from (?P<hop>\w+)'
"#,
    );
    let out = set.evaluate(&ups_email(), &envelope());
    assert_eq!(out.payload.to_json()["fields"], json!({"word": "Tracking", "weight": "2.5", "hop": "a"}));
}

#[test]
fn a_regex_with_very_many_groups_gives_them_all() {
    // 20 named groups: more than a search keeps on the stack (see `Slots`); anchored on its
    // label, and unanchored.
    let words = "abcdefghijklmnopqrst";
    let groups: String = words.chars().map(|c| format!(r"(?P<g{c}>{c})\s*")).collect();
    let set = rules(&format!(
        "[[rule]]\nname = \"r\"\nto = [\"x\"]\n[rule.extract]\nbody = ['Letters: {groups}', '(?:(?P<none>#)|(?P<x>Weight))']\n"
    ));
    let mut email = ups_email();
    email.text.push_str("Letters: a b c d e f g h i j k l m n o p q r s t\n");
    let fields = set.evaluate(&email, &envelope()).payload.to_json()["fields"].clone();
    let mut expected: serde_json::Map<String, Json> =
        words.chars().map(|c| (format!("g{c}"), json!(c.to_string()))).collect();
    expected.insert("x".into(), json!("Weight"));
    assert_eq!(fields, Json::Object(expected));
}

#[test]
fn expressions_are_typed() {
    let set = rules(
        r#"
[[rule]]
name = "r"
to = ["x"]
[rule.extract]
body = 'Weight: (?P<weight>[0-9.]+)'
subject = 'Order (?P<order>\d+)'
[rule.fields]
weight = { expr = "weight | float" }
order = { expr = "order | int" }
heavy = { expr = "weight > 2" }
label = { expr = "'order-' ~ order" }
nothing = { expr = "none" }
absent_int = { expr = "not_extracted | int" }
absent_float = { expr = "not_extracted | float" }
absent_default = { expr = "not_extracted | int(default=-1)" }
recipients = { expr = "to | length" }
literal_int = 7
literal_bool = false
literal_list = ["a", "{{ order }}"]
nested = { carrier = "UPS", id = { expr = "order + 1" } }
"#,
    );
    let out = set.evaluate(&ups_email(), &envelope());
    assert_eq!(
        out.payload.to_json()["fields"],
        json!({
            "weight": 2.5, "order": 4711, "heavy": true, "label": "order-4711", "nothing": null,
            "absent_int": null, "absent_float": null, "absent_default": -1,
            "recipients": 2, "literal_int": 7, "literal_bool": false, "literal_list": ["a", "4711"],
            "nested": {"carrier": "UPS", "id": 4712}
        })
    );
}

#[test]
fn custom_payload_replaces_the_default() {
    let set = rules(
        r#"
[[rule]]
name = "alert"
to = ["ops"]
[rule.extract]
subject = 'Order (?P<order>\d+)'
[rule.payload]
title = "Order {{ order }} from {{ from.name }} <{{ from }}>"
recipients = "{{ to | join(', ') }}"
customer = "{{ headers['x-customer-id'] }}"
first_attachment = "{{ attachments[0].name }}"
missing_header = "{{ headers['X-Nope'] }}"
env = "{{ envelope.source }} {{ envelope.recipients[0] }} {{ envelope.id }}"
rule = "{{ rule }}"
order = { expr = "order | int" }
"#,
    );
    let out = set.evaluate(&ups_email(), &envelope());
    assert_eq!(
        out.payload.to_json(),
        json!({
            "title": "Order 4711 from UPS <pkginfo@ups.com>",
            "recipients": "orders@shop.example, ops@shop.example",
            "customer": "C-991",
            "first_attachment": "label.pdf",
            "missing_header": "",
            "env": "smtp hook@gw.example 01TESTID",
            "rule": "alert",
            "order": 4711
        })
    );
}

#[test]
fn payload_keys_are_escaped_field_names_need_not_be() {
    let set = rules(
        r#"
[[rule]]
name = "r"
to = ["x"]
[rule.payload]
"say \"hi\"\\ \n" = "{{ subject }}"
plain_key = 1
"#,
    );
    let out = set.evaluate(&ups_email(), &envelope());
    assert_eq!(out.payload.to_json(), json!({"say \"hi\"\\ \n": "UPS Update: Order 4711 shipped", "plain_key": 1}));
}

#[test]
fn computed_fields_see_earlier_ones() {
    let set =
        rules("[[rule]]\nname = \"r\"\nto = [\"x\"]\n[rule.fields]\na = { expr = \"40\" }\nb = { expr = \"a + 2\" }\n");
    assert_eq!(set.evaluate(&ups_email(), &envelope()).payload.to_json()["fields"], json!({"a": 40, "b": 42}));
}

#[test]
fn template_failure_at_run_time_is_a_dead_letter() {
    let set = rules(
        "[[rule]]\nname = \"r\"\nto = [\"x\"]\n[rule.extract]\nsubject = '(?P<word>UPS)'\n[rule.fields]\nn = { expr = \"word | int\" }\n",
    );
    let out = set.evaluate(&ups_email(), &envelope());
    match out.action {
        Action::Dead { reason } => assert!(reason.starts_with("rule \"r\": fields.n: "), "{reason}"),
        other => panic!("expected dead letter, got {other:?}"),
    }
}

#[test]
fn runaway_template_is_stopped_by_fuel() {
    let set = rules(
        "[[rule]]\nname = \"r\"\nto = [\"x\"]\n[rule.fields]\nn = \"{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}\"\n",
    );
    let out = set.evaluate(&ups_email(), &envelope());
    assert!(matches!(out.action, Action::Dead { .. }), "{:?}", out.action);
}

#[test]
fn templates_cannot_read_files() {
    let set = rules("[[rule]]\nname = \"r\"\nto = [\"x\"]\n[rule.fields]\nn = \"{% include '/etc/passwd' %}\"\n");
    let out = set.evaluate(&ups_email(), &envelope());
    match out.action {
        Action::Dead { reason } => assert!(reason.contains("template not found"), "{reason}"),
        other => panic!("expected dead letter, got {other:?}"),
    }
}

#[test]
fn empty_to_drops_and_unmatched_policies() {
    let set = rules("[[rule]]\nname = \"ignore\"\nto = []\n[rule.when]\nfrom = 'ups'\n");
    assert_eq!(set.evaluate(&ups_email(), &envelope()).action, Action::Drop);

    let mut email = ups_email();
    email.from = vec![addr("someone@else.example", "")];
    for (policy, expected) in [
        (Unmatched::Dead, Action::Dead { reason: "no rule matched".into() }),
        (Unmatched::Drop, Action::Drop),
        (Unmatched::Deliver("catchall".into()), Action::Deliver { to: vec!["catchall".into()] }),
    ] {
        let set = RuleSet::from_sources(
            &[(PathBuf::from("r.toml"), "[[rule]]\nname = \"ignore\"\nto = []\n[rule.when]\nfrom = 'ups'\n".into())],
            policy,
        )
        .unwrap();
        let out = set.evaluate(&email, &envelope());
        assert_eq!(out.rule, None);
        if expected == Action::Drop {
            assert_eq!(out.payload.as_str(), "{}", "nothing is built for a dropped message");
        } else {
            assert_eq!(out.payload.to_json()["rule"], Json::Null);
            assert_eq!(out.payload.to_json()["fields"], json!({}));
        }
        assert_eq!(out.action, expected);
    }
}

#[test]
fn lone_variable_templates_keep_their_meaning() {
    // `{{ x }}` is short-cut for text fields; other values still render as templates do.
    let set = rules(
        r#"
[[rule]]
name = "r"
to = ["x"]
[rule.extract]
subject = 'Order (?P<order>\d+)'
[rule.fields]
n = { expr = "order | int" }
[rule.payload]
order = "{{ order }}"
n = "{{n}}"
from = "{{ from }}"
missing = "{{ nothing }}"
"#,
    );
    let out = set.evaluate(&ups_email(), &envelope());
    assert_eq!(out.payload.to_json(), json!({"order": "4711", "n": "4711", "from": "pkginfo@ups.com", "missing": ""}));
}

#[test]
fn unclosed_group_names_file_line_rule_and_key() {
    let errs = errors(&[(
        "rules/20-bad.toml",
        "[[rule]]\nname = \"ups\"\nto = [\"x\"]\n[rule.extract]\nsubject = 'Order (?P<id>\\d+'\n",
    )]);
    assert_eq!(
        errs,
        vec![
            "rules/20-bad.toml:5: rule \"ups\": extract.subject: invalid regex \"Order (?P<id>\\\\d+\": unclosed group"
                .to_string()
        ]
    );
}

#[test]
fn all_errors_of_all_files_are_reported() {
    let errs = errors(&[
        (
            "a.toml",
            r#"
[[rule]]
name = "one"
to = ["x"]
require = ["nope"]
colour = "red"
[rule.when]
subjekt = 'x'
body = '('
[rule.extract]
body = 'no named group'
html = ['(?P<subject>x)', 5]
[rule.fields]
"bad name" = "x"
t = "{{ unclosed"
e = { expr = "1 +" }
f = { expr = "1", other = 2 }

[[rule]]
to = ["x"]
"#,
        ),
        ("b.toml", "[[rule]]\nname = \"one\"\nto = \"x\"\n\n[[rule]]\nname = \"two\"\n"),
        ("c.toml", "[[rule]\nname = 'broken'\n"),
    ]);
    let expect = [
        "a.toml:5: rule \"one\": require[0]: \"nope\" is neither extracted nor computed",
        "a.toml:6: rule \"one\": colour: unknown key",
        "a.toml:8: rule \"one\": when.subjekt: unknown key",
        "a.toml:9: rule \"one\": when.body: invalid regex",
        "a.toml:11: rule \"one\": extract.body: has no named group",
        "a.toml:12: rule \"one\": extract.html[0]: group \"subject\" is a built-in name",
        "a.toml:12: rule \"one\": extract.html[1]: must be a regex string",
        "a.toml:14: rule \"one\": fields.bad name: field name must be",
        "a.toml:15: rule \"one\": fields.t: invalid template",
        "a.toml:16: rule \"one\": fields.e: invalid expression",
        "a.toml:17: rule \"one\": fields.f: an { expr = \"...\" } table takes no other keys",
        "a.toml:19: rule #2: name: is required",
        "b.toml:1: rule \"one\": name: duplicate rule name, first defined at a.toml:2",
        "b.toml:5: rule \"two\": to: is required",
        "c.toml:1: TOML syntax",
    ];
    for e in expect {
        assert!(errs.iter().any(|m| m.starts_with(e)), "missing {e:?} in {errs:#?}");
    }
    assert_eq!(errs.len(), expect.len(), "{errs:#?}");
}

#[test]
fn duplicate_rule_names_across_files() {
    let errs = errors(&[
        ("10-a.toml", "[[rule]]\nname = \"same\"\nto = [\"x\"]\n"),
        ("20-b.toml", "\n[[rule]]\nname = \"same\"\nto = [\"x\"]\n"),
    ]);
    assert_eq!(
        errs,
        vec!["20-b.toml:2: rule \"same\": name: duplicate rule name, first defined at 10-a.toml:1".to_string()]
    );
}

#[test]
fn unknown_destinations_are_named() {
    let set = rules("[[rule]]\nname = \"r\"\nto = [\"known\", \"typo\"]\n");
    let errs: Vec<String> = set.check_destinations(|d| d == "known").iter().map(ToString::to_string).collect();
    assert_eq!(errs, vec!["rules/10-test.toml:1: rule \"r\": to[1]: unknown destination \"typo\" (not a [destination.*] in the config)".to_string()]);
}

#[test]
fn top_level_keys_other_than_rule_are_refused() {
    let errs = errors(&[("x.toml", "unmatched = \"drop\"\n")]);
    assert_eq!(errs.len(), 1);
    assert!(errs[0].starts_with("x.toml:1: unknown top-level key \"unmatched\""), "{}", errs[0]);
}

#[test]
fn catch_all_rule_without_when_matches_everything() {
    let set = rules("[[rule]]\nname = \"all\"\nto = [\"x\"]\n");
    assert_eq!(set.evaluate(&Email::default(), &envelope()).rule.as_deref(), Some("all"));
}

#[test]
fn every_context_name_is_there_when_a_template_uses_it_and_only_then() {
    // Each field uses one name, so each rule's context is built from just what it refers to.
    let mut email = ups_email();
    email.reply_to = vec![addr("replies@ups.com", "")];
    let expected = [
        ("from", "{{ from.name }} <{{ from }}>", "UPS <pkginfo@ups.com>"),
        ("to", "{{ to[1] }}", "ops@shop.example"),
        ("cc", "{{ cc[0].address }}", "audit@shop.example"),
        ("reply_to", "{{ reply_to[0] }}", "replies@ups.com"),
        ("subject", "{{ subject }}", "UPS Update: Order 4711 shipped"),
        ("date", "{{ date }}", "2026-12-01T09:30:00+01:00"),
        ("message_id", "{{ message_id }}", "m1@ups.com"),
        ("headers", "{{ headers['x-customer-id'] }}", "C-991"),
        ("text", "{{ 'Tracking Number' in text }}", "True"),
        ("html", "{{ html }}", "<p>Tracking</p>"),
        ("attachments", "{{ attachments[0].name }}", "label.pdf"),
        ("envelope", "{{ envelope.client }}", "127.0.0.1"),
        ("rule", "{{ rule }}", "uses-rule"),
        ("fields", "{{ fields.x }}", "1"),
    ];
    for (name, template, want) in expected {
        let text = format!(
            "[[rule]]\nname = \"uses-{name}\"\nto = [\"d\"]\n[rule.fields]\nx = \"1\"\nout = \"{}\"\n",
            template.replace('"', "\\\"")
        );
        let out = rules(&text).evaluate(&email, &envelope());
        assert_eq!(out.payload.to_json()["fields"]["out"], json!(want), "{name}: {template}");
    }
    // A rule whose templates use none of them still renders its fields.
    let out = rules("[[rule]]\nname = \"plain\"\nto = [\"d\"]\n[rule.fields]\na = \"x\"\nb = \"{{ a }}-y\"\n")
        .evaluate(&email, &envelope());
    assert_eq!(out.payload.to_json()["fields"]["b"], json!("x-y"));
}

#[test]
fn simple_templates_render_exactly_as_the_template_engine_does() {
    // Each template once as it is (fast path when it is simple) and once with a comment, which
    // always goes through the template engine: both must give the same text.
    let templates = [
        "{{ envelope.id }}",
        "{{ envelope.received_at }}/{{ envelope.mail_from }}/{{ envelope.client }}/{{ envelope.helo }}/{{ envelope.auth_user }}",
        "{{ envelope.source }} {{ envelope.tls }}",
        "{{ rule }}: {{ subject }} at {{ date }} ({{ message_id }})",
        "{{ from }} | {{ from.address }} | {{ from.name }}",
        "{{ host }}/{{ service }} is {{ state }}",
        "{{ host }} {{ missing }} {{ count }} {{ ratio }} {{ flag }}",
        "{{ from.nothing }}{{ host.upper }}{{ to }}",
        "{{text}}{{ html }}",
        "literal only, no braces } {",
        "{{ host }}\n",
        "ends with braces }}",
        "{{ headers.x }}",
        "{{ rule }}",
        "{{ subject }}",
        "{{date}}",
        "{{ message_id }}",
        "{{ from }}",
        "{{ to }}",
        "{{ envelope }}",
        "{{ count }}",
        "{{ missing }}",
        "{{ host | upper }}-{{ service|lower }}-{{ state | trim | lower }}",
        "{{ padded | trim }}|{{ mixed | lower }}|{{ mixed | upper }}|{{ subject | lower }}",
        "{{ from | lower }} {{ from.name | upper }} {{ envelope.id | lower }}",
        "{{ count | lower }}{{ ratio | trim }}{{ flag | upper }}{{ missing | lower }}",
        "{{ headers['X-Customer-Id'] }}/{{ headers[\"received\"] }}/{{ headers['X-None'] }}",
        "{{ headers['x-customer-id'] | lower }}",
        "{{ to | join(', ') }}; {{ cc|join(\"-\") }}; {{ reply_to | join(', ') }}",
        "{{ to | join('') | upper }}",
        "{{ host | join(', ') }} {{ subject | join('.') }}",
        "{{ to.name | join(', ') }}",
        "{{ mixed | title }}|{{ padded | title }}|{{ host | title }}|{{ words | title }}",
        "{{ sigma | title }}",
        "{{ host | replace('-', '') }} {{ state | replace(' ', '') | lower }} {{ host | replace('', '') }}",
        "{{ (to + cc) | join(', ') }}; {{ (cc + to + reply_to)|join('') }}; {{ ( reply_to+to ) | join('-') | upper }}",
        "{{ (to + host) | join(', ') }}",
        "{{ (to + cc) }}",
        "{{ (to) | join(', ') }}",
        "{{ (to + cc) | lower }}",
        "{{ (to + missing) | join(',') }}",
        "{{ count }}/{{ negative }}/{{ big }}/{{ count | upper }}/{{ count.x }}",
        "https://shop.example.de/orders.php?oID={{ count }}&action=edit",
    ];
    let mut email = ups_email();
    email.subject = "Ä \"quoted\" <b>".into();
    email.reply_to = vec![addr("replies@ups.com", "UPS"), addr("", "Only a name")];
    let env = envelope();
    let mut simple = 0;
    for t in templates {
        let escaped = t.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
        let rule = |template: &str| {
            format!(
                "[[rule]]\nname = \"r\"\nto = [\"d\"]\n[rule.fields]\nhost = \"db-01\"\nservice = \"disk\"\nstate = \" OK \"\n\
                 padded = \"\\t two words \\n\"\nmixed = \"İstanbul STRAẞE ǅ Σ\"\nsigma = \"ΟΔΟΣ ΣΑΣ\"\n\
                 words = \"o'neil mcdonald-SMITH (the [third]) <x> {{y}} ǆemal\"\n\
                 count = {{ expr = \"3\" }}\nnegative = {{ expr = \"-42\" }}\nbig = {{ expr = \"18446744073709551615\" }}\nratio = {{ expr = \"2.5\" }}\nflag = {{ expr = \"true\" }}\nout = \"{template}\"\n"
            )
        };
        let set = rules(&rule(&escaped));
        simple +=
            usize::from(matches!(set.rules[0].fields.last(), Some((_, Spec::Simple { .. } | Spec::Field { .. }))));
        let fast = set.evaluate(&email, &env);
        let slow = rules(&rule(&format!("{{# engine #}}{escaped}"))).evaluate(&email, &env);
        assert_eq!(fast.payload.to_json()["fields"]["out"], slow.payload.to_json()["fields"]["out"], "template {t:?}");
        assert_eq!(fast, slow, "template {t:?}");
    }
    // All but the one with a trailing newline, the one without braces, the one ending in braces
    // and the parenthesised single list.
    assert_eq!(simple, templates.len() - 4);
}

#[test]
fn conditions_shared_by_rules_give_the_same_outcomes_as_separate_ones() {
    // Three rules with the same subject condition (one memo slot, evaluated once per message)
    // and the same rules with the condition spelled differently in each (no sharing).
    let rule = |name: &str, subject: &str, from: &str| {
        format!("[[rule]]\nname = \"{name}\"\nto = [\"x\"]\n[rule.when]\nsubject = '{subject}'\nfrom = '{from}'\n")
    };
    let shared = [
        rule("a", "(?i)order", "@fedex\\.com$"),
        rule("b", "(?i)order", "@ups\\.com$"),
        rule("c", "(?i)order", "@"),
        rule("d", "(?i)shipped", "\\."),
    ]
    .concat();
    let separate = [
        rule("a", "(?i)order", "@fedex\\.com$"),
        rule("b", "(?i)(?:order)", "@ups\\.com$"),
        rule("c", "(?i)(?:(?:order))", "@"),
        rule("d", "(?i)shipped", "\\."),
    ]
    .concat();
    let (shared, separate) = (rules(&shared), rules(&separate));
    assert_eq!(shared.memo_slots, 1);
    assert_eq!(separate.memo_slots, 0);
    let mut emails = vec![ups_email()];
    for (subject, from) in [("Order 1", "x@fedex.com"), ("order", "x@dhl.com"), ("shipped", "a@ups.com"), ("none", "")]
    {
        let mut email = ups_email();
        email.subject = subject.into();
        email.from = vec![addr(from, "")];
        emails.push(email);
    }
    for email in &emails {
        let (a, b) = (shared.evaluate(email, &envelope()), separate.evaluate(email, &envelope()));
        assert_eq!(a, b, "{:?} from {:?}", email.subject, email.from);
    }
    let outcome = |i: usize| shared.evaluate(&emails[i], &envelope()).rule;
    assert_eq!(outcome(0).as_deref(), Some("b"));
    assert_eq!(outcome(1).as_deref(), Some("a"));
    assert_eq!(outcome(2).as_deref(), Some("c"));
    assert_eq!(outcome(3).as_deref(), Some("d"));
    assert_eq!(outcome(4), None);
}

#[test]
fn simple_expressions_give_exactly_what_the_template_engine_gives() {
    // Each expression once as it is (computed directly when its values are plain) and once in
    // parentheses, which always goes through the template engine: same value, same error.
    let expressions = [
        "x | int",
        "x | float",
        "x | int if x is defined else none",
        "x|float if x is defined else none",
        "x == 'OK'",
        "x != \\\"OK\\\"",
        "'42' == x",
        "x == y",
        "x != y",
        "subject == 'UPS Update: Order 4711 shipped'",
        "from == 'pkginfo@ups.com'",
        "to != 'x'",
        "range | int if range is defined else none",
        "missing | int if missing is defined else none",
        "missing | float",
        "missing == 'x'",
        "x | replace('.', '') | replace(',', '.') | float",
        "x | trim | int",
        "x | replace('4', '') | int if x is defined else none",
        "x | lower",
        "x | title | upper",
        "x | upper if x is defined else none",
        "missing | lower if missing is defined else none",
    ];
    // `x` and `y` as TOML values of [rule.fields] (None: not set).
    let values = [
        Some("\"42\""),
        Some("\"-7\""),
        Some("\"+3\""),
        Some("\"007\""),
        Some("\"1.5\""),
        Some("\"-0.25e2\""),
        Some("\"abc\""),
        Some("\"\""),
        Some("\" 4\""),
        Some("\"nan\""),
        Some("\"inf\""),
        Some("\"99999999999999999999\""),
        Some("\"OK\""),
        Some("\"1.211,55\""),
        Some("\" Mixed case-words (x) \""),
        Some("\"ΟΔΟΣ\""),
        Some("42"),
        Some("2.5"),
        Some("true"),
        Some("{ expr = \"none\" }"),
        Some("{ expr = \"42\" }"),
        Some("{ expr = \"[1]\" }"),
        None,
    ];
    let email = ups_email();
    let env = envelope();
    let mut fast_paths = 0;
    for expr in expressions {
        for x in values {
            for y in [Some("\"42\""), Some("42"), None] {
                let rule = |e: &str| {
                    let mut text = "[[rule]]\nname = \"r\"\nto = [\"d\"]\n[rule.fields]\n".to_string();
                    if let Some(x) = x {
                        text.push_str(&format!("x = {x}\n"));
                    }
                    if let Some(y) = y {
                        text.push_str(&format!("y = {y}\n"));
                    }
                    text.push_str(&format!("out = {{ expr = \"{e}\" }}\n"));
                    rules(&text)
                };
                let fast = rule(expr);
                if matches!(fast.rules[0].fields.last(), Some((_, Spec::FastExpr { .. }))) {
                    fast_paths += 1;
                } else {
                    panic!("{expr} should have a fast path");
                }
                let (a, b) = (fast.evaluate(&email, &env), rule(&format!("({expr})")).evaluate(&email, &env));
                assert_eq!(a, b, "{expr} with x = {x:?}, y = {y:?}");
            }
        }
    }
    assert_eq!(fast_paths, expressions.len() * values.len() * 3);
}

#[test]
fn each_template_gets_the_names_it_uses_added_to_those_built_before() {
    let text = "[[rule]]\nname = \"r\"\nto = [\"d\"]\n[rule.fields]\n\
                a = \"{{ from.name | title }}\"\n\
                b = \"{{ (to + cc) | join(',') }}\"\n\
                c = \"{{ headers['X-Customer-Id'] ~ '/' ~ subject ~ '/' ~ from }}\"\n\
                d = { expr = \"[a, b] | join(' ') | length\" }\n";
    let out = rules(text).evaluate(&ups_email(), &envelope());
    let fields = &out.payload.to_json()["fields"];
    assert_eq!(fields["a"], json!("Ups"));
    assert_eq!(fields["b"], json!("orders@shop.example,ops@shop.example,audit@shop.example"));
    assert_eq!(fields["c"], json!("C-991/UPS Update: Order 4711 shipped/pkginfo@ups.com"));
    assert_eq!(fields["d"], json!(59));
}

#[test]
fn the_memo_keeps_what_it_is_told_in_words_or_in_a_list() {
    for slots in [1, 64, 65, 200] {
        let mut memo = Memo::new(slots);
        assert_eq!(matches!(memo, Memo::Bits { .. }), slots <= 64, "{slots} slots");
        let mut reference = vec![None; slots];
        for (i, slot) in [0, slots - 1, slots / 2, slots / 3].into_iter().enumerate() {
            let value = i % 2 == 0;
            memo.set(slot, value);
            reference[slot] = Some(value);
        }
        for (slot, expected) in reference.iter().enumerate() {
            assert_eq!(memo.get(slot), *expected, "slot {slot} of {slots}");
        }
    }
}

/// Extraction patterns of each shape (see `Shape`), with the shape they get (a suffix group is
/// left to the regex engine when it resolves groups with a onepass DFA).
const SHAPED_PATTERNS: &[(&str, &str)] = &[
    (r"(?m)^(?P<first>[^\r\n]*?\b(?:ERROR|FATAL)\b[^\r\n]*)", "whole"),
    (r"^(?P<id>\d+)$", "whole"),
    (r"(?P<n>\d+)", "whole"),
    (r"\b(?P<w>\w+)\b", "whole"),
    (r"(?m)^ERROR(?P<rest>.*)", "suffix, onepass"),
    (r"(?m)^Started:\s*(?P<started>[^\r\n]+)", "suffix"),
    (r"x\s*(?P<v>[^\n]+)$", "suffix"),
    (r"(?:ab|a)(?P<v>b\d*)", "suffix"),
    (r"(?:a|ab)(?P<v>b?\d)", "suffix"),
    (r"a.*?(?P<v>\d+)\b", "suffix"),
    (r"(?i)ok[ _]*(?P<v>x+|_+)", "suffix"),
    (r"(?P<n>\d+)x", "groups"),
    (r"(?P<a>\d+)(?P<b>x)?", "groups"),
    (r"(?P<n>(?P<m>\d)+)", "groups"),
    (r"(?P<n>\d+)?", "groups"),
    (r"(?P<n>a)|b", "groups"),
    (r"(x)(?P<v>\d)", "groups"),
    (r"x(?P<v>a)?", "groups"),
];

/// Each of `SHAPED_PATTERNS` as an extraction, and as the regex crate compiles it.
static SHAPED_EXTRACTIONS: std::sync::LazyLock<Vec<(Extraction, regex::Regex)>> = std::sync::LazyLock::new(|| {
    SHAPED_PATTERNS
        .iter()
        .map(|(pattern, _)| {
            let (compiled, hir) = Pattern::new(pattern, load::REGEX_SIZE_LIMIT).unwrap();
            (Extraction::new(Arc::new(compiled), &hir), regex::Regex::new(pattern).unwrap())
        })
        .collect()
});

/// `(group name, text)` of each group found.
type Groups = Vec<(String, String)>;

/// What the `i`th of `SHAPED_PATTERNS` extracts from `value`, and what the regex crate's
/// captures say.
fn extracted_and_expected(i: usize, value: &str) -> (Groups, Groups) {
    let (extraction, reference) = &SHAPED_EXTRACTIONS[i];
    let mut got = Vec::new();
    extraction.each_group(value, |name, text| got.push((name.to_string(), text.to_string())));
    let expected = reference
        .captures(value)
        .map(|c| {
            let names = reference.capture_names().flatten();
            names.filter_map(|n| Some((n.to_string(), c.name(n)?.as_str().to_string()))).collect()
        })
        .unwrap_or_default();
    (got, expected)
}

#[test]
fn groups_are_found_the_same_whatever_the_shape_of_the_regex() {
    for (i, &(pattern, shape)) in SHAPED_PATTERNS.iter().enumerate() {
        let extraction = &SHAPED_EXTRACTIONS[i].0;
        let got = match extraction.shape {
            Shape::Groups => "groups",
            Shape::Whole => "whole",
            Shape::Suffix(_) if extraction.split().is_some() => "suffix",
            Shape::Suffix(_) => "suffix, onepass",
        };
        assert_eq!(got, shape, "{pattern}");
        for value in [
            "",
            "ok\r\nERROR one\r\nFATAL two",
            "Started:   \r\nStarted: 9:00\r\n",
            "12\n34",
            "x 12x 7",
            "x   ",
            "x  y",
            "Äx 5 ü9",
            "b",
            "aab",
            "ab1 abb2",
            "a1 a 22",
            "OK __ OK_x",
            "xERRORx ERROR",
        ] {
            let (got, expected) = extracted_and_expected(i, value);
            assert_eq!(got, expected, "{pattern} on {value:?}");
        }
    }
}

proptest::proptest! {
    #[test]
    fn groups_agree_with_the_regex_whatever_the_shape(
        parts in proptest::collection::vec(
            proptest::sample::select(vec![
                "ERROR", "FATAL", "Started:", "\r\n", "\n", "12", " ", "x", "Ä", "ok", "OK", "a", "b", "_",
            ]),
            0..12,
        )
    ) {
        let value = parts.concat();
        for (i, (pattern, _)) in SHAPED_PATTERNS.iter().enumerate() {
            let (got, expected) = extracted_and_expected(i, &value);
            proptest::prop_assert_eq!(got, expected, "{} on {:?}", pattern, value);
        }
    }
}
