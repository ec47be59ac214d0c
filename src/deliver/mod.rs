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
//! is classified (docs/design.md): 2xx done; 408, 425, 429, 5xx, timeouts and connection errors are
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

use crate::config::{Config, DestinationConfig};
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

/// A destination that could not be built from its config (bad CA file, unparsable relay URL,
/// output file that cannot be opened, …): `serve` refuses to start.
#[derive(Debug, thiserror::Error)]
#[error("destination {name}: {problem}")]
pub struct BuildError {
    pub name: String,
    #[source]
    pub problem: BuildProblem,
}

/// What was wrong, by kind of destination.
#[derive(Debug, thiserror::Error)]
pub enum BuildProblem {
    /// Named (by `[drift] notify`, say) but not a `[destination.NAME]` of the config.
    #[error("no [destination.*] of that name")]
    Undeclared,
    #[error(transparent)]
    Http(#[from] http::HttpDestinationError),
    #[error(transparent)]
    Email(#[from] email::EmailHookError),
    #[error(transparent)]
    File(#[from] file::OpenError),
}

/// A configured destination, ready to send.
pub struct Destination {
    target: Target,
    /// The config's secret values, redacted from every reason it reports.
    secrets: Vec<String>,
}

enum Target {
    Http(http::HttpDestination),
    Email(email::EmailHook),
    File(file::FileDestination),
}

impl Destination {
    /// Builds the destination `name` from its config.
    pub fn build(name: &str, d: &DestinationConfig, config: &Config) -> Result<Destination, BuildError> {
        let err = |problem: BuildProblem| BuildError { name: name.to_string(), problem };
        let timeout = d.pacing().timeout.unwrap_or(config.delivery.timeout);
        let ca = |p: &Option<std::path::PathBuf>| p.as_ref().map(|p| config.resolve(p));
        let target = match d {
            DestinationConfig::KustomerWebHook(h) => {
                let token = Some(h.token.expose());
                Target::Http(
                    http::HttpDestination::new(&h.url, token, None, &[], timeout, ca(&h.ca_file).as_deref())
                        .map_err(|e| err(e.into()))?,
                )
            }
            DestinationConfig::KustomerFormHook(h) => Target::Http(
                http::HttpDestination::new(&h.url, None, None, &[], timeout, ca(&h.ca_file).as_deref())
                    .map_err(|e| err(e.into()))?,
            ),
            DestinationConfig::Webhook(h) => Target::Http(
                http::HttpDestination::new(
                    &h.url,
                    None,
                    Some(&h.headers),
                    &h.signing_secret.0,
                    timeout,
                    ca(&h.ca_file).as_deref(),
                )
                .map_err(|e| err(e.into()))?,
            ),
            DestinationConfig::KustomerEmailHook(e) => {
                Target::Email(email::EmailHook::new(e, timeout, ca(&e.ca_file).as_deref()).map_err(|e| err(e.into()))?)
            }
            DestinationConfig::File(f) => {
                Target::File(file::FileDestination::open(&config.resolve(&f.path)).map_err(|e| err(e.into()))?)
            }
        };
        // Every secret of the config (a receiver may echo any header it was sent, and one
        // destination's key may be another's), longest first, so that a secret that holds
        // another is redacted whole. As in config errors, values under 4 bytes are left alone:
        // they are common words and digits, not secrets worth a mangled message.
        let mut secrets: Vec<String> =
            config.secrets().into_iter().map(|s| s.expose().to_string()).filter(|s| s.len() >= 4).collect();
        secrets.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        secrets.dedup();
        Ok(Destination { target, secrets })
    }

    /// One attempt to deliver `body` (the JSON payload) for spool message `id`. The reason of
    /// a failure never holds a configured secret, even when the receiver echoed one back.
    pub async fn send(&self, id: &str, body: &[u8]) -> Attempt {
        self.send_traced(id, body).await.0
    }

    /// [`Destination::send`], with what the receiver answered. Neither the reason of a failure
    /// nor the answer kept for the archive ever holds a configured secret.
    pub async fn send_traced(&self, id: &str, body: &[u8]) -> (Attempt, Reply) {
        let (attempt, reply) = match &self.target {
            Target::Http(h) => h.send_traced(id, body).await,
            Target::Email(e) => {
                let attempt = e.send(id, body).await;
                let reply = match &attempt {
                    Attempt::Done => None,
                    Attempt::Retry { reason, .. } | Attempt::Fail { reason } => Some(reason.clone()),
                };
                (attempt, Reply { reply, ..Reply::default() })
            }
            Target::File(f) => (f.send(body).await, Reply::default()),
        };
        let attempt = match attempt {
            Attempt::Done => Attempt::Done,
            Attempt::Retry { after, reason } => Attempt::Retry { after, reason: redact(reason, &self.secrets) },
            Attempt::Fail { reason } => Attempt::Fail { reason: redact(reason, &self.secrets) },
        };
        let reply = Reply {
            status: reply.status,
            reply: reply.reply.map(|r| redact(r, &self.secrets)),
            body: reply.body.map(|b| redact(b, &self.secrets)),
        };
        (attempt, reply)
    }
}

/// `text` with every occurrence of each secret replaced by `***`.
pub(crate) fn redact(mut text: String, secrets: &[String]) -> String {
    for s in secrets {
        if text.contains(s.as_str()) {
            text = text.replace(s.as_str(), "***");
        }
    }
    text
}

/// The first `n` characters of a response body, on one line, for error messages.
pub(crate) fn body_start(body: &str, n: usize) -> String {
    let one_line: String = body.chars().map(|c| if c.is_control() { ' ' } else { c }).take(n).collect();
    let one_line = one_line.trim().to_string();
    if body.chars().count() > n { format!("{one_line}…") } else { one_line }
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn every_occurrence_of_every_secret_is_redacted() {
        let secrets = ["token-long-1".to_string(), "token".to_string()];
        assert_eq!(
            redact("echo: Bearer token-long-1, token, token-long-1".into(), &secrets),
            "echo: Bearer ***, ***, ***"
        );
        assert_eq!(redact("nothing here".into(), &secrets), "nothing here");
    }
}
