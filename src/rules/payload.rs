//! The default payload: one flat JSON object a Kustomer workflow can read without indexing
//! into arrays (lists are given as comma-joined strings).

use crate::model::{Address, Email, Envelope, Payload};
use serde::Serialize;
use serde_json::{Map, Value as Json};

/// The default payload's keys, in the order they are written.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct DefaultPayload<'a> {
    id: &'a str,
    rule: Option<&'a str>,
    received_at: &'a str,
    source: &'a str,
    message_id: &'a str,
    from: &'a str,
    from_name: &'a str,
    to: String,
    cc: String,
    subject: &'a str,
    date: &'a str,
    text: &'a str,
    attachments: String,
    fields: &'a Map<String, Json>,
}

/// Builds the default payload for `email`, judged by `rule` (None: unmatched).
pub(crate) fn default_payload(
    email: &Email,
    envelope: &Envelope,
    rule: Option<&str>,
    fields: &Map<String, Json>,
) -> Payload {
    let joined = |list: &[Address]| list.iter().map(|a| a.address.as_str()).collect::<Vec<_>>().join(", ");
    let from = email.from.first();
    let attachments: Vec<&str> = email.attachments.iter().map(|a| a.name.as_str()).filter(|n| !n.is_empty()).collect();
    Payload::of(&DefaultPayload {
        id: &envelope.id,
        rule,
        received_at: &envelope.received_at,
        source: envelope.source.protocol(),
        message_id: &email.message_id,
        from: from.map_or("", |a| a.address.as_str()),
        from_name: from.map_or("", |a| a.name.as_str()),
        to: joined(&email.to),
        cc: joined(&email.cc),
        subject: &email.subject,
        date: &email.date,
        text: &email.text,
        attachments: attachments.join(", "),
        fields,
    })
}
