//! The `kustomer-email-hook` destination: Kustomer email hooks read only JSON-LD from a
//! `<script type="application/ld+json" data-kustomer-key="KEY">` tag in the HTML body, so the
//! payload is sent as such an email, through the configured relay, with `lettre`.
//!
//! `smtps://host[:port]` (default 465) is TLS from the first byte. `smtp://host[:port]`
//! (default port 25) needs STARTTLS: a relay that does not offer it (or an attacker who strips
//! it) gets nothing, not even the password, and the attempt is retried later. Only a loopback
//! relay may stay plaintext when it offers no STARTTLS (unless `tls = "starttls"` is written),
//! and `tls = "none"` sends in plaintext anywhere (`check` warns). `username`/`password`
//! authenticate; `ca_file` adds a trusted CA. The Message-ID is derived from the spool id, so
//! every retry of a message is recognisably the same mail.

use super::Attempt;
use crate::config::{EmailHookConfig, RelayTls};
use lettre::message::header::ContentType;
use lettre::message::{Mailbox, Message};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};
use std::path::Path;
use std::time::Duration;

pub struct EmailHook {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
    to: Mailbox,
    key: String,
}

/// Why an email hook could not be set up from its config.
#[derive(Debug, thiserror::Error)]
pub enum EmailHookError {
    #[error("tls contradicts the relay's smtps://")]
    TlsContradicts,
    #[error("relay {0:?} must start with smtp:// or smtps://")]
    RelayScheme(String),
    #[error("relay {relay:?}: bad port {port:?}")]
    RelayPort {
        relay: String,
        port: String,
        #[source]
        source: std::num::ParseIntError,
    },
    #[error("relay {0:?}: expected smtp://host:port")]
    RelayHost(String),
    #[error("ca_file {}: {source}", path.display())]
    CaRead {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("ca_file {}: {source}", path.display())]
    CaPem {
        path: std::path::PathBuf,
        #[source]
        source: lettre::transport::smtp::Error,
    },
    #[error("TLS setup for {host}: {source}")]
    Tls {
        host: String,
        #[source]
        source: lettre::transport::smtp::Error,
    },
    #[error("{key}: {source}")]
    Address {
        key: &'static str,
        #[source]
        source: lettre::address::AddressError,
    },
}

/// `(implicit TLS, host, port)` of a relay URL.
pub fn parse_relay(relay: &str) -> Result<(bool, String, u16), EmailHookError> {
    let (implicit, rest) = if let Some(r) = relay.strip_prefix("smtps://") {
        (true, r)
    } else if let Some(r) = relay.strip_prefix("smtp://") {
        (false, r)
    } else {
        return Err(EmailHookError::RelayScheme(relay.to_string()));
    };
    let rest = rest.trim_end_matches('/');
    let default_port = if implicit { 465 } else { 25 };
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => {
            let port = p.parse::<u16>().map_err(|source| EmailHookError::RelayPort {
                relay: relay.to_string(),
                port: p.to_string(),
                source,
            })?;
            (h, port)
        }
        _ => (rest, default_port),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || host.contains('/') || host.contains('@') {
        return Err(EmailHookError::RelayHost(relay.to_string()));
    }
    Ok((implicit, host.to_string(), port))
}

impl EmailHook {
    pub fn new(d: &EmailHookConfig, timeout: Duration, ca_file: Option<&Path>) -> Result<EmailHook, EmailHookError> {
        let (_, host, port) = parse_relay(&d.relay)?;
        let mode = d.relay_tls().ok_or(EmailHookError::TlsContradicts)?;
        let mut tls = TlsParameters::builder(host.clone());
        if let Some(ca) = ca_file {
            let path = ca.to_path_buf();
            let pem = std::fs::read(ca).map_err(|source| EmailHookError::CaRead { path: path.clone(), source })?;
            let cert = Certificate::from_pem(&pem).map_err(|source| EmailHookError::CaPem { path, source })?;
            tls = tls.add_root_certificate(cert);
        }
        let tls = tls.build_rustls().map_err(|source| EmailHookError::Tls { host: host.clone(), source })?;
        let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host)
            .port(port)
            .timeout(Some(timeout))
            .tls(match mode {
                RelayTls::Implicit => Tls::Wrapper(tls),
                RelayTls::Required => Tls::Required(tls),
                RelayTls::Opportunistic => Tls::Opportunistic(tls),
                RelayTls::None => Tls::None,
            });
        if let (Some(user), Some(pass)) = (&d.username, &d.password) {
            builder = builder.credentials(Credentials::new(user.clone(), pass.expose().to_string()));
        }
        let address = |key: &'static str| move |source| EmailHookError::Address { key, source };
        let from: Mailbox = d.from.parse().map_err(address("from"))?;
        let to: Mailbox = d.address.parse().map_err(address("address"))?;
        let key = d.key.expose().to_string();
        Ok(EmailHook { transport: builder.build(), from, to, key })
    }

    pub async fn send(&self, id: &str, body: &[u8]) -> Attempt {
        let json = String::from_utf8_lossy(body);
        let message = Message::builder()
            .from(self.from.clone())
            .to(self.to.clone())
            .subject(format!("mailhook event {id}"))
            .message_id(Some(format!("<{id}@mailhook>")))
            .header(ContentType::TEXT_HTML)
            .body(html_body(&self.key, &json));
        let message = match message {
            Ok(m) => m,
            Err(e) => {
                return Attempt::Fail { reason: format!("cannot build the email: {e}") };
            }
        };
        match self.transport.send(message).await {
            Ok(_) => Attempt::Done,
            Err(e) if e.is_permanent() => Attempt::Fail { reason: format!("relay refused: {e}") },
            Err(e) => Attempt::Retry { after: None, reason: format!("relay: {e}") },
        }
    }
}

/// The HTML body: the JSON inside a JSON-LD script tag. `<`, `>` and `&` are written
/// `\u003c`, `\u003e` and `\u0026` (the same JSON strings: they can only occur inside strings),
/// so nothing in the payload can close the tag or put the HTML parser into another state
/// (`<!--<script>` would make it swallow the rest of the document); the key is attribute-escaped.
pub fn html_body(key: &str, json: &str) -> String {
    let key = key.replace('&', "&amp;").replace('"', "&quot;").replace('<', "&lt;").replace('>', "&gt;");
    let json = json.replace('<', "\\u003c").replace('>', "\\u003e").replace('&', "\\u0026");
    format!(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"></head><body>\n\
         <script type=\"application/ld+json\" data-kustomer-key=\"{key}\">{json}</script>\n\
         </body></html>\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_urls() {
        assert_eq!(parse_relay("smtp://smtp.example.com:587").unwrap(), (false, "smtp.example.com".into(), 587));
        assert_eq!(parse_relay("smtps://smtp.example.com").unwrap(), (true, "smtp.example.com".into(), 465));
        assert_eq!(parse_relay("smtp://127.0.0.1:2525/").unwrap(), (false, "127.0.0.1".into(), 2525));
        assert_eq!(parse_relay("smtp://[::1]:25").unwrap(), (false, "::1".into(), 25));
        assert!(matches!(parse_relay("http://x"), Err(EmailHookError::RelayScheme(_))));
        assert!(matches!(parse_relay("smtp://host:port"), Err(EmailHookError::RelayPort { .. })));
        assert!(matches!(parse_relay("smtp://user@host"), Err(EmailHookError::RelayHost(_))));
    }

    #[test]
    fn payload_cannot_escape_the_script_tag() {
        let json = r#"{"text":"</script><script>alert(1)</script>"}"#;
        let html = html_body("k\"ey", json);
        assert_eq!(html.matches("</script>").count(), 1, "{html}");
        assert!(html.contains("data-kustomer-key=\"k&quot;ey\""));
        let inner = html.split_once("data-kustomer-key=\"k&quot;ey\">").unwrap().1.split_once("</script>").unwrap().0;
        let back: serde_json::Value = serde_json::from_str(inner).unwrap();
        assert_eq!(back["text"], "</script><script>alert(1)</script>");
    }
}
