//! deliver: one attempt to hand a payload to one destination → [`Attempt`].
//!
//! ```text
//! rules ─► Outcome ─► pipeline ─► deliver::Destination::send ─► Done | Retry(after) | Fail(reason)
//! ```
//!
//! | type | module | how |
//! |---|---|---|
//! | `kustomer-web-hook` | [`http`] | POST JSON with `Authorization: Bearer <token>` |
//! | `kustomer-form-hook` | [`http`] | POST JSON, no auth |
//! | `webhook` | [`http`] | POST JSON with the configured headers, signed as Standard Webhooks says with `signing_secret` ([`sign`]) |
//! | `kustomer-email-hook` | [`email`] | an HTML email carrying the payload as JSON-LD, via an SMTP relay |
//! | `file` | [`file`] | one JSON line appended and flushed to disk |
//!
//! Every request carries the spool id (`Idempotency-Key` header; payload `id`). How an answer
//! is classified (DESIGN.md): 2xx done; 408, 425, 429, 5xx, timeouts and connection errors are
//! retried (honouring `Retry-After` and `x-ratelimit-reset`); other 4xx fail at once with the
//! status and the start of the body. Anything unexpected is treated as temporary.
//!
//! Pacing lives in [`throttle`] (token bucket per destination, concurrency cap, backoff);
//! payload shrinking to `max_body` in [`shrink`].

pub mod email;
pub mod file;
pub mod http;
pub mod shrink;
pub mod sign;
pub mod throttle;

use crate::config::{Config, DestinationConfig, DestinationType};
use std::path::Path;
use std::time::Duration;

/// The result of one delivery attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// The destination has the payload.
    Done,
    /// Try again later; `after` is the delay the receiver asked for, if it did.
    Retry { after: Option<Duration>, reason: String },
    /// It will never work (e.g. 4xx): a dead letter.
    Fail { reason: String },
}

/// What a receiver answered to one attempt, for the archive: the HTTP status or the SMTP
/// reply, and the start of the response body ([`REPLY_BODY_MAX`] bytes at most).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reply {
    /// HTTP status code (HTTP destinations).
    pub status: Option<u16>,
    /// The SMTP relay's reply (email hooks), or what went wrong before any answer.
    pub reply: Option<String>,
    /// The first [`REPLY_BODY_MAX`] bytes of the response body (cut on a character boundary).
    pub body: Option<String>,
}

/// How much of a response body an attempt keeps.
pub const REPLY_BODY_MAX: usize = 2048;

/// `s` cut to at most `max` bytes, on a character boundary.
pub fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Errors building a destination from its config (bad CA file, unparsable relay URL, …).
#[derive(Debug, thiserror::Error)]
#[error("destination {name}: {message}")]
pub struct BuildError {
    pub name: String,
    pub message: String,
}

/// A configured destination, ready to send.
pub enum Destination {
    Http(http::HttpDestination),
    Email(email::EmailHook),
    File(file::FileDestination),
}

impl Destination {
    /// Builds the destination `name` from its config.
    pub fn build(name: &str, d: &DestinationConfig, config: &Config) -> Result<Destination, BuildError> {
        let err = |message: String| BuildError { name: name.to_string(), message };
        let timeout = d.timeout.unwrap_or(config.delivery.timeout);
        let ca = d.ca_file.as_ref().map(|p| config.resolve(p));
        Ok(match d.kind {
            DestinationType::KustomerWebHook | DestinationType::KustomerFormHook | DestinationType::Webhook => {
                Destination::Http(http::HttpDestination::new(d, timeout, ca.as_deref()).map_err(err)?)
            }
            DestinationType::KustomerEmailHook => {
                Destination::Email(email::EmailHook::new(d, timeout, ca.as_deref()).map_err(err)?)
            }
            DestinationType::File => {
                let path = config.resolve(d.path.as_deref().unwrap_or(Path::new("")));
                Destination::File(file::FileDestination::open(&path).map_err(err)?)
            }
        })
    }

    /// One attempt to deliver `body` (the JSON payload) for spool message `id`.
    pub async fn send(&self, id: &str, body: &[u8]) -> Attempt {
        self.send_traced(id, body).await.0
    }

    /// [`Destination::send`], with what the receiver answered.
    pub async fn send_traced(&self, id: &str, body: &[u8]) -> (Attempt, Reply) {
        match self {
            Destination::Http(h) => h.send_traced(id, body).await,
            Destination::Email(e) => {
                let attempt = e.send(id, body).await;
                let reply = match &attempt {
                    Attempt::Done => None,
                    Attempt::Retry { reason, .. } | Attempt::Fail { reason } => Some(reason.clone()),
                };
                (attempt, Reply { reply, ..Reply::default() })
            }
            Destination::File(f) => (f.send(body).await, Reply::default()),
        }
    }
}

/// The first `n` characters of a response body, on one line, for error messages.
pub(crate) fn body_start(body: &str, n: usize) -> String {
    let one_line: String = body.chars().map(|c| if c.is_control() { ' ' } else { c }).take(n).collect();
    let one_line = one_line.trim().to_string();
    if body.chars().count() > n { format!("{one_line}…") } else { one_line }
}
