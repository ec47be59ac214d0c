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
    // 20 named groups, after a label; then groups of which only one takes part in the match.
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
    // `{{ x }}` renders a text field as it is, any other value as the template engine prints it.
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
fn every_context_name_is_there_for_a_template() {
    // Each rule's template uses one of the built-in names.
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
    // A rule whose templates use none of them renders its fields too.
    let out = rules("[[rule]]\nname = \"plain\"\nto = [\"d\"]\n[rule.fields]\na = \"x\"\nb = \"{{ a }}-y\"\n")
        .evaluate(&email, &envelope());
    assert_eq!(out.payload.to_json()["fields"]["b"], json!("x-y"));
}

#[test]
fn rules_sharing_a_condition_give_the_same_outcomes_as_with_it_spelled_apart() {
    // Three rules with the same subject condition (one compiled regex, shared) and the same
    // rules with the condition spelled differently in each.
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
    assert!(Arc::ptr_eq(&shared.rules[0].when[0].regex, &shared.rules[2].when[0].regex), "one regex for a pattern");
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
fn templates_of_one_rule_each_see_the_names_they_use() {
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
fn the_default_payload_has_its_keys_in_order_and_its_values_escaped() {
    let attachment = |name: &str| Attachment { name: name.into(), content_type: "a/b".into(), size: 1, message: None };
    let email = Email {
        subject: "Order \"quoted\" \\ \u{1} ä €".into(),
        from: vec![addr("a@example.com", "A \"the\"\t"), addr("b@example.com", "B")],
        to: vec![addr("", "Only a name"), addr("x\"y@example.net", "")],
        text: "body\r\n\u{7f}</script>\u{2028}".into(),
        attachments: vec![attachment("a.pdf"), attachment(""), attachment("b\\\"c\n.pdf")],
        ..ups_email()
    };
    let fields = json!({"order_id": 4711, "total": 12.5, "nested": {"b": [1, null], "a": "x\"y"}});
    let payload = payload::default_payload(&email, &envelope(), Some("ups \"x\""), fields.as_object().unwrap());
    let expected = concat!(
        r#"{"id":"01TESTID","rule":"ups \"x\"","receivedAt":"2026-12-01T08:31:00Z","source":"smtp","#,
        r#""messageId":"m1@ups.com","from":"a@example.com","fromName":"A \"the\"\t","#,
        r#""to":", x\"y@example.net","cc":"audit@shop.example","#,
        r#""subject":"Order \"quoted\" \\ \u0001 ä €","date":"2026-12-01T09:30:00+01:00","#,
        "\"text\":\"body\\r\\n\u{7f}</script>\u{2028}\",",
        r#""attachments":"a.pdf, b\\\"c\n.pdf","#,
        r#""fields":{"order_id":4711,"total":12.5,"nested":{"b":[1,null],"a":"x\"y"}}}"#,
    );
    assert_eq!(payload.as_str(), expected);
    let unmatched = payload::default_payload(&Email::default(), &envelope(), None, &Map::new());
    assert!(unmatched.as_str().starts_with(r#"{"id":"01TESTID","rule":null,"receivedAt""#), "{unmatched:?}");
}

#[test]
fn the_judge_peak_counts_two_copies_of_each_field_taken_from_the_body() {
    assert_eq!(rules("").judge_peak(), 4, "no rule: the default payload's peak");
    let subject_only = "[[rule]]\nname = \"a\"\nto = [\"x\"]\n[rule.extract]\nsubject = 'Order (?P<order>\\d+)'\n";
    assert_eq!(rules(subject_only).judge_peak(), 4, "a field from the subject is short");
    let one = "[[rule]]\nname = \"a\"\nto = [\"x\"]\n[rule.extract]\nbody = ['(?s)(?P<whole>Job .*)']\n";
    assert_eq!(rules(one).judge_peak(), 6);
    // Two names in the body, one of them in two regexes, one in the HTML; another rule with one.
    let several = "[[rule]]\nname = \"a\"\nto = [\"x\"]\n[rule.extract]\n\
                   body = ['(?P<a>x+)(?P<b>y+)', '(?P<a>z+)']\nhtml = '(?P<c>.*)'\nsubject = '(?P<d>.*)'\n\
                   [[rule]]\nname = \"b\"\nto = [\"x\"]\n[rule.extract]\nbody = '(?P<e>.*)'\n";
    assert_eq!(rules(several).judge_peak(), 4 + 2 * 3, "the rule with the most: a, b and c");
}
