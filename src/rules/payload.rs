//! The default payload: one flat JSON object a Kustomer workflow can read without indexing
//! into arrays (lists are given as comma-joined strings).
//!
//! It is written straight to its JSON text from the email (`model::json`): no map of owned
//! keys and copied values is built for a message only to be serialised.

use super::context::Fields;
use crate::model::json::{self, Object};
use crate::model::{Email, Envelope, Payload};

/// Builds the default payload of DESIGN.md for `email`, judged by `rule` (None: unmatched).
pub(crate) fn default_payload(email: &Email, envelope: &Envelope, rule: Option<&str>, fields: &Fields) -> Payload {
    // The text, the subject, the fields and room for the rest (a tenth more for escapes): one
    // allocation for most payloads.
    let size = email.text.len() + email.subject.len() + fields.size_hint();
    let mut text = String::with_capacity(size + size / 10 + 512);
    let mut p = Object::new(&mut text);
    let from = email.from.first();
    p.str("id", &envelope.id);
    match rule {
        Some(rule) => p.str("rule", rule),
        None => p.name("rule").push_str("null"),
    }
    p.str("receivedAt", &envelope.received_at);
    p.str("source", envelope.source.protocol());
    p.str("messageId", &email.message_id);
    p.str("from", from.map_or("", |a| a.address.as_str()));
    p.str("fromName", from.map_or("", |a| a.name.as_str()));
    json::push_joined(p.name("to"), email.to.iter().map(|a| a.address.as_str()));
    json::push_joined(p.name("cc"), email.cc.iter().map(|a| a.address.as_str()));
    p.str("subject", &email.subject);
    p.str("date", &email.date);
    p.str("text", &email.text);
    let names = email.attachments.iter().map(|a| a.name.as_str()).filter(|n| !n.is_empty());
    json::push_joined(p.name("attachments"), names);
    fields.write(p.name("fields"), true);
    p.end();
    Payload::from_object_text(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Address, Attachment, Source};
    use serde_json::{Map, Value as Json, json};

    /// The payload built key by key, as DESIGN.md describes it.
    fn reference(
        email: &Email,
        envelope: &Envelope,
        rule: Option<&str>,
        fields: Map<String, Json>,
    ) -> Map<String, Json> {
        let joined = |list: &[Address]| list.iter().map(|a| a.address.as_str()).collect::<Vec<_>>().join(", ");
        let from = email.from.first();
        let names: Vec<&str> = email.attachments.iter().map(|a| a.name.as_str()).filter(|n| !n.is_empty()).collect();
        let mut p = Map::new();
        p.insert("id".into(), envelope.id.clone().into());
        p.insert("rule".into(), rule.map_or(Json::Null, Json::from));
        p.insert("receivedAt".into(), envelope.received_at.clone().into());
        p.insert("source".into(), envelope.source.protocol().into());
        p.insert("messageId".into(), email.message_id.clone().into());
        p.insert("from".into(), from.map(|a| a.address.clone()).unwrap_or_default().into());
        p.insert("fromName".into(), from.map(|a| a.name.clone()).unwrap_or_default().into());
        p.insert("to".into(), joined(&email.to).into());
        p.insert("cc".into(), joined(&email.cc).into());
        p.insert("subject".into(), email.subject.clone().into());
        p.insert("date".into(), email.date.clone().into());
        p.insert("text".into(), email.text.clone().into());
        p.insert("attachments".into(), names.join(", ").into());
        p.insert("fields".into(), Json::Object(fields));
        p
    }

    fn addr(address: &str, name: &str) -> Address {
        Address { address: address.into(), name: name.into() }
    }

    fn attachment(name: &str) -> Attachment {
        Attachment { name: name.into(), content_type: "application/pdf".into(), size: 1, message: None }
    }

    #[test]
    fn same_keys_order_and_values_as_built_key_by_key() {
        let full = Email {
            message_id: "m1@example.com".into(),
            subject: "Order 4711 \"quoted\" \\ \u{1} ä €".into(),
            date: "2026-12-01T09:30:00+01:00".into(),
            from: vec![addr("a@example.com", "A \"the\" Sender\t"), addr("b@example.com", "B")],
            to: vec![addr("", "Only a name"), addr("x\"y@example.net", ""), addr("y@example.net", "Y")],
            cc: vec![addr("c@example.org", "")],
            text: "body\r\n\u{7f}</script>\u{2028}".into(),
            attachments: vec![attachment("a.pdf"), attachment(""), attachment("b\\\"c\n.pdf")],
            ..Email::default()
        };
        let mut envelope = Envelope::new(Source::Imap { account: "ops".into(), folder: "INBOX".into() });
        envelope.recipients = vec!["hook@example.com".into()];
        let map: Map<String, Json> =
            json!({"order_id": 4711, "carrier": "UPS", "total": 12.5, "nested": {"b": [1, null], "a": "x\"y"}})
                .as_object()
                .cloned()
                .unwrap();
        let mut fields = Fields::default();
        for (k, v) in &map {
            fields.insert(k, v.clone());
        }
        for email in [full, Email::default()] {
            for rule in [Some("ups \"x\""), None] {
                let fast = default_payload(&email, &envelope, rule, &fields);
                let slow = reference(&email, &envelope, rule, map.clone());
                // The very text serialising the map gives: same keys, order, values, escapes.
                assert_eq!(fast.as_str(), serde_json::to_string(&slow).unwrap());
                assert_eq!(fast.to_map(), Some(slow));
            }
        }
    }
}
