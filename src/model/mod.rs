//! Stage-boundary types: plain data that flows from one stage to the next.
//!
//! ```text
//! ingest ─► Envelope + raw bytes ─► parse ─► Email ─► rules ─► Outcome ─► deliver
//! ```
//!
//! Nothing here does I/O or knows about a particular crate's representation: the parse stage
//! converts `mail-parser`'s message into [`Email`], the rules stage turns an [`Email`] and its
//! [`Envelope`] into an [`Outcome`].

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::fmt;

/// Where a message came from. Rules match it with `when.source`
/// (`smtp`, `lmtp`, `stdin`, or `imap:<account>/<folder>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "kind")]
pub enum Source {
    Smtp,
    Lmtp,
    Stdin,
    Imap { account: String, folder: String },
}

impl Source {
    /// The short protocol name used in the default payload's `source` key.
    pub fn protocol(&self) -> &'static str {
        match self {
            Source::Smtp => "smtp",
            Source::Lmtp => "lmtp",
            Source::Stdin => "stdin",
            Source::Imap { .. } => "imap",
        }
    }

    /// Parses the textual form printed by [`fmt::Display`] (`imap:acct/folder` included).
    pub fn parse(s: &str) -> Option<Source> {
        match s {
            "smtp" => Some(Source::Smtp),
            "lmtp" => Some(Source::Lmtp),
            "stdin" => Some(Source::Stdin),
            _ => {
                let rest = s.strip_prefix("imap:")?;
                let (account, folder) = rest.split_once('/')?;
                Some(Source::Imap { account: account.to_string(), folder: folder.to_string() })
            }
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Imap { account, folder } => write!(f, "imap:{account}/{folder}"),
            other => f.write_str(other.protocol()),
        }
    }
}

/// What the transport knew about a message besides its bytes: who handed it over, for whom,
/// and when. Stored with the message in the spool so that rules see the same envelope on every
/// replay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// Spool id; stable across retries and replays. It becomes the payload's `id`.
    pub id: String,
    pub source: Source,
    /// SMTP `MAIL FROM` (empty for the null reverse-path `<>`), `--from` for stdin.
    pub mail_from: Option<String>,
    /// SMTP/LMTP `RCPT TO`, `--to` for stdin, the account address for IMAP.
    pub recipients: Vec<String>,
    /// When the message was accepted, RFC 3339 (UTC).
    pub received_at: String,
    /// Client IP address for SMTP/LMTP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
    /// HELO/EHLO/LHLO name given by the client.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub helo: Option<String>,
    /// Whether the SMTP session used TLS.
    #[serde(default)]
    pub tls: bool,
    /// The user that authenticated with SMTP AUTH.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_user: Option<String>,
}

impl Envelope {
    /// An envelope for a message that arrived on `source` just now, with a fresh spool id.
    pub fn new(source: Source) -> Envelope {
        Envelope {
            id: ulid::Ulid::generate().to_string(),
            source,
            mail_from: None,
            recipients: Vec::new(),
            received_at: now_rfc3339(),
            client: None,
            helo: None,
            tls: false,
            auth_user: None,
        }
    }
}

/// The current time as RFC 3339 in UTC, to the second.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

/// A mailbox: the bare address (`a@b.example`) and its decoded display name.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Address {
    pub address: String,
    pub name: String,
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.address)
    }
}

/// One header field, its value decoded (RFC 2047 encoded words, charsets) and unfolded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub name: String,
    pub value: String,
}

/// An attachment (any part that is not the message body): metadata only, never the content,
/// except that a nested `message/rfc822` is parsed and kept as `message`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    /// Decoded file name (RFC 2231 and RFC 2047 both handled); empty when the part has none.
    pub name: String,
    /// `type/subtype`, lower case.
    pub content_type: String,
    /// Decoded size in bytes.
    pub size: usize,
    /// The parsed message, for `message/rfc822` (forwarded mail).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<Box<Email>>,
}

/// A parsed email: what the rules see. Built by [`crate::parse::parse`] from raw bytes.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Email {
    /// `Message-ID` without angle brackets; empty when missing.
    pub message_id: String,
    /// Decoded subject; empty when missing.
    pub subject: String,
    /// `Date` as RFC 3339; empty when missing or unparseable.
    pub date: String,
    pub from: Vec<Address>,
    pub to: Vec<Address>,
    pub cc: Vec<Address>,
    pub reply_to: Vec<Address>,
    /// Every header in message order, decoded.
    pub headers: Vec<Header>,
    /// The plain-text body, or the HTML body rendered as text when there is no text part.
    pub text: String,
    /// The HTML body; empty when the message has none (never invented from the text part).
    pub html: String,
    pub attachments: Vec<Attachment>,
    /// What could not be read cleanly (bad charset, broken encoding, no headers, …).
    /// Parsing never fails; it says what it skipped here.
    pub problems: Vec<String>,
}

impl Email {
    /// The first value of header `name` (case-insensitive), if any.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|h| h.name.eq_ignore_ascii_case(name)).map(|h| h.value.as_str())
    }

    /// Every value of header `name` (case-insensitive), in message order.
    pub fn headers_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.headers.iter().filter(move |h| h.name.eq_ignore_ascii_case(name)).map(|h| h.value.as_str())
    }
}

/// What the rules decided for one message.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Outcome {
    /// The rule that matched, `None` when no rule did.
    pub rule: Option<String>,
    pub action: Action,
    /// The JSON object to deliver (the rule's `[rule.payload]`, or the default payload).
    pub payload: Payload,
}

impl Outcome {
    /// The JSON object `try` prints, `test` compares and the console's playground shows:
    /// `rule`, `to`, `payload`, `dead` (the reason) or `dropped` when the message would not be
    /// delivered, and `problems` when the parser had to skip or repair something.
    pub fn report(&self, email: &Email) -> serde_json::Map<String, serde_json::Value> {
        use serde_json::Value as Json;
        let mut m = serde_json::Map::new();
        m.insert("rule".into(), self.rule.clone().map_or(Json::Null, Json::String));
        m.insert("to".into(), Json::from(self.destinations().to_vec()));
        match &self.action {
            Action::Dead { reason } => {
                m.insert("dead".into(), Json::String(reason.clone()));
            }
            Action::Drop => {
                m.insert("dropped".into(), Json::Bool(true));
            }
            Action::Deliver { .. } => {}
        }
        if !email.problems.is_empty() {
            m.insert("problems".into(), Json::from(email.problems.clone()));
        }
        m.insert("payload".into(), self.payload.to_json());
        m
    }
}

/// A payload: one JSON object, kept as the compact text that is stored and sent.
///
/// The rules serialise it once; the spool stores it and destinations send it as it is,
/// without building a map of it or serialising it again. [`Payload::to_json`] reads it back
/// for the rare uses that need its values (shrinking a payload that is too large, showing it).
#[derive(Clone)]
pub struct Payload(Box<RawValue>);

impl Payload {
    /// The payload that `value` serialises to; `value` must serialise as a JSON object.
    pub fn of<T: Serialize + ?Sized>(value: &T) -> Payload {
        let raw = serde_json::value::to_raw_value(value).expect("a payload serialises");
        debug_assert!(raw.get().starts_with('{'), "a payload is a JSON object: {raw}");
        Payload(raw)
    }

    /// `{}`.
    pub fn empty() -> Payload {
        Payload(RawValue::from_string(String::from("{}")).expect("{} is JSON"))
    }

    /// The JSON text.
    pub fn as_str(&self) -> &str {
        self.0.get()
    }

    /// The JSON text, taken without copying it.
    pub fn into_string(self) -> String {
        Box::<str>::from(self.0).into_string()
    }

    /// The payload read back as a JSON value (an object).
    pub fn to_json(&self) -> serde_json::Value {
        // The text was written, or read and checked, by serde_json.
        serde_json::from_str(self.as_str()).unwrap_or(serde_json::Value::Null)
    }

    /// The payload read back as a map; `None` if it cannot be (nested deeper than the JSON
    /// reader goes).
    pub fn to_map(&self) -> Option<serde_json::Map<String, serde_json::Value>> {
        serde_json::from_str(self.as_str()).ok()
    }

    /// Whether the object has the key `key` at its top level.
    pub fn has_key(&self, key: &str) -> bool {
        /// Reads an object's keys without keeping them or their values.
        struct Finder<'k>(&'k str);
        impl<'de> serde::de::Visitor<'de> for Finder<'_> {
            type Value = bool;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<bool, A::Error> {
                let mut found = false;
                while let Some(k) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    found |= k == self.0;
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
                Ok(found)
            }
        }
        let mut de = serde_json::Deserializer::from_str(self.as_str());
        serde::Deserializer::deserialize_map(&mut de, Finder(key)).unwrap_or(false)
    }
}

impl Default for Payload {
    fn default() -> Payload {
        Payload::empty()
    }
}

impl PartialEq for Payload {
    fn eq(&self, other: &Payload) -> bool {
        self.as_str() == other.as_str()
    }
}

impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Payload {
    /// As the JSON object it is (embedded in the spool's metadata as it is).
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Payload {
    /// Any JSON object, as its text (a stored payload is read back without being rebuilt).
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Payload, D::Error> {
        let raw = Box::<RawValue>::deserialize(deserializer)?;
        if !raw.get().starts_with('{') {
            return Err(serde::de::Error::custom("a payload must be a JSON object"));
        }
        Ok(Payload(raw))
    }
}

/// What to do with a message once judged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase", tag = "action")]
pub enum Action {
    /// Send the payload to each named destination.
    Deliver { to: Vec<String> },
    /// Keep it as a dead letter (for replay after a rules change), with the reason.
    Dead { reason: String },
    /// Discard it (`[rules] unmatched = "drop"`).
    Drop,
}

impl Outcome {
    /// Destination names, empty unless the action is `Deliver`.
    pub fn destinations(&self) -> &[String] {
        match &self.action {
            Action::Deliver { to } => to,
            _ => &[],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_payload_is_its_compact_text() {
        let value = json!({"id": "m1", "text": "a \"b\"\n", "fields": {"n": 1.5, "list": [1, null]}});
        let payload = Payload::of(&value);
        assert_eq!(payload.as_str(), serde_json::to_string(&value).unwrap());
        assert_eq!(payload.to_json(), value);
        assert_eq!(payload.to_map(), value.as_object().cloned());
        assert_eq!(Payload::empty().as_str(), "{}");
    }

    #[test]
    fn has_key_looks_at_the_top_level_only() {
        let payload = Payload::of(&json!({"fields": {"id": 1}, "i\u{64}": null}));
        assert!(payload.has_key("id"), "present, even when null");
        let payload = Payload::of(&json!({"fields": {"id": 1}, "ids": [{"id": 2}]}));
        assert!(!payload.has_key("id"), "only nested");
        let read: Payload = serde_json::from_str(r#"{"x": 1, "\u0069d": "m1"}"#).unwrap();
        assert!(read.has_key("id"), "an escaped key is read as the key it spells");
    }

    #[test]
    fn a_stored_payload_reads_back_as_it_was_written_and_only_as_an_object() {
        // A decision stored with the payload as an object (any spacing) reads back whole.
        let read: Payload = serde_json::from_str(r#"{ "id": "m1",  "fields": { "n": 1 } }"#).unwrap();
        assert_eq!(read.to_json(), json!({"id": "m1", "fields": {"n": 1}}));
        let written = serde_json::to_string(&json!({ "payload": read })).unwrap();
        assert_eq!(written, r#"{"payload":{"id":"m1","fields":{"n":1}}}"#);
        for bad in ["[1]", "\"text\"", "3", "null"] {
            let err = serde_json::from_str::<Payload>(bad).unwrap_err().to_string();
            assert!(err.contains("a payload must be a JSON object"), "{bad}: {err}");
        }
    }
}
