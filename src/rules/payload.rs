//! The default payload: one flat JSON object a Kustomer workflow can read without indexing
//! into arrays (lists are given as comma-joined strings).

use crate::model::{Address, Email, Envelope};
use serde_json::{Map, Value as Json};
use std::sync::LazyLock;

/// The default payload's keys, in order.
const KEYS: [&str; 14] = [
    "id",
    "rule",
    "receivedAt",
    "source",
    "messageId",
    "from",
    "fromName",
    "to",
    "cc",
    "subject",
    "date",
    "text",
    "attachments",
    "fields",
];

/// The payload with every key and no values: cloning it copies the keys and the hash table
/// as they are, instead of hashing every key again for every message.
static EMPTY: LazyLock<Map<String, Json>> =
    LazyLock::new(|| KEYS.iter().map(|k| (k.to_string(), Json::Null)).collect());

/// Builds the default payload of DESIGN.md for `email`, judged by `rule` (None: unmatched).
pub fn default_payload(
    email: &Email,
    envelope: &Envelope,
    rule: Option<&str>,
    fields: Map<String, Json>,
) -> Map<String, Json> {
    let from = email.from.first();
    let values: [Json; KEYS.len()] = [
        envelope.id.clone().into(),
        rule.map_or(Json::Null, Json::from),
        envelope.received_at.clone().into(),
        envelope.source.protocol().into(),
        email.message_id.clone().into(),
        from.map(|a| a.address.clone()).unwrap_or_default().into(),
        from.map(|a| a.name.clone()).unwrap_or_default().into(),
        join(email.to.iter().map(|a: &Address| a.address.as_str())).into(),
        join(email.cc.iter().map(|a: &Address| a.address.as_str())).into(),
        email.subject.clone().into(),
        email.date.clone().into(),
        email.text.clone().into(),
        join(email.attachments.iter().map(|a| a.name.as_str()).filter(|n| !n.is_empty())).into(),
        Json::Object(fields),
    ];
    let mut payload = EMPTY.clone();
    for (slot, value) in payload.values_mut().zip(values) {
        *slot = value;
    }
    payload
}

/// The items separated by `", "` (as `[..].join(", ")` does).
fn join<'a>(items: impl Iterator<Item = &'a str> + Clone) -> String {
    let len = items.clone().map(|s| s.len() + 2).sum::<usize>();
    let mut out = String::with_capacity(len.saturating_sub(2));
    for (i, item) in items.enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        out.push_str(item);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Attachment, Source};
    use serde_json::json;

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
            subject: "Order 4711".into(),
            date: "2026-12-01T09:30:00+01:00".into(),
            from: vec![addr("a@example.com", "A"), addr("b@example.com", "B")],
            to: vec![addr("", "Only a name"), addr("x@example.net", ""), addr("y@example.net", "Y")],
            cc: vec![addr("c@example.org", "")],
            text: "body\r\n".into(),
            attachments: vec![attachment("a.pdf"), attachment(""), attachment("b.pdf")],
            ..Email::default()
        };
        let mut envelope = Envelope::new(Source::Imap { account: "ops".into(), folder: "INBOX".into() });
        envelope.recipients = vec!["hook@example.com".into()];
        let fields: Map<String, Json> = json!({"order_id": 4711, "carrier": "UPS"}).as_object().cloned().unwrap();
        for email in [full, Email::default()] {
            for rule in [Some("ups"), None] {
                let fast = default_payload(&email, &envelope, rule, fields.clone());
                let slow = reference(&email, &envelope, rule, fields.clone());
                assert_eq!(fast, slow);
                assert!(fast.keys().eq(slow.keys()), "key order");
                assert_eq!(fast.get("fields"), Some(&Json::Object(fields.clone())), "lookups by key still work");
            }
        }
    }
}
