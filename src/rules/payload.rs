//! The default payload: one flat JSON object a Kustomer workflow can read without indexing
//! into arrays (lists are given as comma-joined strings).

use crate::model::{Address, Email, Envelope};
use serde_json::{Map, Value as Json};

/// Builds the default payload of DESIGN.md for `email`, judged by `rule` (None: unmatched).
pub fn default_payload(
    email: &Email,
    envelope: &Envelope,
    rule: Option<&str>,
    fields: Map<String, Json>,
) -> Map<String, Json> {
    let joined = |list: &[Address]| list.iter().map(|a| a.address.as_str()).collect::<Vec<_>>().join(", ");
    let from = email.from.first();
    let mut p = Map::with_capacity(15);
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
    p.insert(
        "attachments".into(),
        email
            .attachments
            .iter()
            .map(|a| a.name.as_str())
            .filter(|n| !n.is_empty())
            .collect::<Vec<_>>()
            .join(", ")
            .into(),
    );
    p.insert("fields".into(), Json::Object(fields));
    p
}
