//! `ID.json`: what the spool knows about a message besides its bytes.

use crate::model::{Envelope, Payload};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

/// Current metadata format.
pub const META_VERSION: u32 = 1;

/// The metadata of one spooled message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Meta {
    pub version: u32,
    pub id: String,
    pub envelope: Envelope,
    /// Size of the raw message in bytes.
    pub size: u64,
    /// Delivery attempts made so far (each try of any destination counts once per round).
    #[serde(default)]
    pub attempts: u32,
    /// When the next round of delivery is due (RFC 3339); `None`: as soon as possible.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt: Option<String>,
    /// The rules' decision, made once and kept for every retry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<Decision>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Why the message is a dead letter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_reason: Option<String>,
    /// The rule that matched but could not build its payload (a required field missing), for a
    /// message that died when it was judged: it has no decision to name the rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_rule: Option<String>,
    /// SHA-256 of the raw message, for a source that may offer it again (IMAP): recovery hands
    /// these to the watchers, so that a message spooled just before a crash, before its
    /// watcher noted it, is not spooled a second time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
}

/// What the rules decided: the rule, the payload, and where it goes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    pub rule: Option<String>,
    pub decided_at: String,
    pub payload: Payload,
    /// Each destination with its own delivery state.
    pub destinations: BTreeMap<String, DestStatus>,
}

/// The state of one destination of a message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DestStatus {
    pub state: DestState,
    #[serde(default)]
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

impl DestStatus {
    /// A destination not tried yet.
    pub fn pending() -> DestStatus {
        DestStatus { state: DestState::Pending, attempts: 0, next_attempt: None, last_error: None }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DestState {
    Pending,
    Done,
    Dead,
}

impl Meta {
    pub fn new(envelope: Envelope, size: u64) -> Meta {
        Meta {
            version: META_VERSION,
            id: envelope.id.clone(),
            envelope,
            size,
            attempts: 0,
            next_attempt: None,
            decision: None,
            last_error: None,
            dead_reason: None,
            dead_rule: None,
            fingerprint: None,
        }
    }

    /// When the message is due; `UNIX_EPOCH` (always due) when unset or unreadable.
    pub fn due(&self) -> SystemTime {
        self.next_attempt.as_deref().and_then(parse_time).unwrap_or(SystemTime::UNIX_EPOCH)
    }

    /// The age of the message, from its `received_at`.
    pub fn age(&self, now: SystemTime) -> Duration {
        parse_time(&self.envelope.received_at).and_then(|t| now.duration_since(t).ok()).unwrap_or_default()
    }
}

/// RFC 3339 with milliseconds, UTC.
pub fn format_time(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

pub fn parse_time(s: &str) -> Option<SystemTime> {
    humantime::parse_rfc3339_weak(s).ok()
}
