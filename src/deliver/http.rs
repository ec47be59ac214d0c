//! HTTP destinations: Kustomer web hooks (Bearer key), form hooks, any webhook.

use super::{Attempt, REPLY_BODY_MAX, Reply, body_start, cut};
use crate::config::Secret;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue, RETRY_AFTER};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, SystemTime};

/// How much of an error response body goes into the dead-letter reason.
const BODY_START: usize = 200;

/// Why an HTTP destination could not be set up from its config.
#[derive(Debug, thiserror::Error)]
pub enum HttpDestinationError {
    #[error("signing_secret: {0}")]
    Signing(#[source] crate::config::SigningSecretError),
    #[error("token holds characters not allowed in a header")]
    Token(#[source] reqwest::header::InvalidHeaderValue),
    #[error("header name {name:?} is not valid")]
    HeaderName {
        name: String,
        #[source]
        source: reqwest::header::InvalidHeaderName,
    },
    #[error("header {name}: value holds characters not allowed in a header")]
    HeaderValue {
        name: String,
        #[source]
        source: reqwest::header::InvalidHeaderValue,
    },
    #[error("ca_file {}: {source}", path.display())]
    CaRead {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("ca_file {}: not a PEM certificate: {source}", path.display())]
    CaPem {
        path: std::path::PathBuf,
        #[source]
        source: reqwest::Error,
    },
    #[error("HTTP client: {0}")]
    Client(#[source] reqwest::Error),
}

pub struct HttpDestination {
    client: reqwest::Client,
    url: String,
    headers: HeaderMap,
    signer: super::sign::Signer,
}

impl HttpDestination {
    /// A POST to `url`, with `Authorization: Bearer <token>` when a token is given and the
    /// extra `headers` (values sensitive).
    pub fn new(
        url: &str,
        token: Option<&str>,
        extra: Option<&BTreeMap<String, Secret>>,
        signing: &[Secret],
        timeout: Duration,
        ca_file: Option<&Path>,
    ) -> Result<HttpDestination, HttpDestinationError> {
        use HttpDestinationError as E;
        let url = url.to_string();
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Some(token) = token {
            let mut v = HeaderValue::from_str(&format!("Bearer {token}")).map_err(E::Token)?;
            v.set_sensitive(true);
            headers.insert(AUTHORIZATION, v);
        }
        for (name, value) in extra.into_iter().flatten() {
            let n = HeaderName::from_bytes(name.as_bytes())
                .map_err(|source| E::HeaderName { name: name.clone(), source })?;
            let mut v = HeaderValue::from_str(value.expose())
                .map_err(|source| E::HeaderValue { name: name.clone(), source })?;
            v.set_sensitive(true);
            headers.insert(n, v);
        }
        let mut keys = Vec::new();
        for secret in signing {
            keys.push(crate::config::signing_key(secret).map_err(E::Signing)?);
        }
        let signer = super::sign::Signer::new(keys);
        let mut builder = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .user_agent(concat!("mailhook/", env!("CARGO_PKG_VERSION")))
            .pool_idle_timeout(Duration::from_secs(60));
        if let Some(ca) = ca_file {
            let pem = std::fs::read(ca).map_err(|source| E::CaRead { path: ca.to_path_buf(), source })?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|source| E::CaPem { path: ca.to_path_buf(), source })?;
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        let client = builder.build().map_err(E::Client)?;
        Ok(HttpDestination { client, url, headers, signer })
    }

    pub async fn send(&self, id: &str, body: &[u8]) -> Attempt {
        self.send_traced(id, body).await.0
    }

    /// One attempt, with the status and the start of the body the receiver answered.
    pub async fn send_traced(&self, id: &str, body: &[u8]) -> (Attempt, Reply) {
        let mut headers = self.headers.clone();
        if let Ok(v) = HeaderValue::from_str(id) {
            headers.insert("idempotency-key", v.clone());
            if !self.signer.is_empty() {
                let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs();
                headers.insert("webhook-id", v);
                headers.insert("webhook-timestamp", HeaderValue::from(now));
                if let Ok(sig) = HeaderValue::from_str(&self.signer.signature(id, now, body)) {
                    headers.insert("webhook-signature", sig);
                }
            }
        }
        let response = self.client.post(&self.url).headers(headers).body(body.to_vec()).send().await;
        match response {
            Ok(r) => classify(r).await,
            Err(e) => {
                let reason = describe(&e);
                (
                    Attempt::Retry { after: None, reason: reason.clone() },
                    Reply { reply: Some(reason), ..Reply::default() },
                )
            }
        }
    }
}

async fn classify(mut r: reqwest::Response) -> (Attempt, Reply) {
    let status = r.status();
    let after = retry_after(r.headers(), SystemTime::now());
    // Only the start of the body is kept: a receiver's answer is no reason to hold megabytes.
    let mut bytes = Vec::new();
    while bytes.len() <= REPLY_BODY_MAX {
        match r.chunk().await {
            Ok(Some(chunk)) => bytes.extend_from_slice(&chunk),
            _ => break,
        }
    }
    let body = String::from_utf8_lossy(&bytes);
    let reply = Reply {
        status: Some(status.as_u16()),
        reply: None,
        body: (!body.is_empty()).then(|| cut(&body, REPLY_BODY_MAX).to_string()),
    };
    if status.is_success() {
        return (Attempt::Done, reply);
    }
    let reason = format!("HTTP {}: {}", status.as_u16(), body_start(&body, BODY_START));
    let attempt = match status.as_u16() {
        408 | 425 | 429 | 500..=599 => Attempt::Retry { after, reason },
        _ => Attempt::Fail { reason },
    };
    (attempt, reply)
}

/// The delay a response asks for: `Retry-After` (seconds or an HTTP date), else
/// `x-ratelimit-reset` (seconds to wait, or a Unix time in seconds or milliseconds).
pub fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    if let Some(v) = headers.get(RETRY_AFTER).and_then(|v| v.to_str().ok()) {
        let v = v.trim();
        if let Ok(secs) = v.parse::<u64>() {
            return Some(Duration::from_secs(secs));
        }
        if let Ok(at) = httpdate::parse_http_date(v) {
            return Some(at.duration_since(now).unwrap_or_default());
        }
    }
    let reset = headers.get("x-ratelimit-reset").and_then(|v| v.to_str().ok())?.trim().parse::<f64>().ok()?;
    if !reset.is_finite() || reset < 0.0 {
        return None;
    }
    let unix = now.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs_f64();
    let secs = if reset > 1e12 {
        reset / 1000.0 - unix
    } else if reset > 1e9 {
        reset - unix
    } else {
        reset
    };
    Some(Duration::from_secs_f64(secs.max(0.0)))
}

/// A transport error in one line, without the URL (which may hold a hook secret).
fn describe(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection failed"
    } else if e.is_request() {
        "request failed"
    } else {
        "error"
    };
    let mut source = std::error::Error::source(e);
    let mut detail = String::new();
    while let Some(s) = source {
        detail = s.to_string();
        source = s.source();
    }
    if detail.is_empty() { kind.to_string() } else { format!("{kind}: {detail}") }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn retry_after_forms() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        assert_eq!(retry_after(&headers(&[("retry-after", "7")]), now), Some(Duration::from_secs(7)));
        let date = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(retry_after(&headers(&[("retry-after", &date)]), now), Some(Duration::from_secs(30)));
        assert_eq!(retry_after(&headers(&[("x-ratelimit-reset", "12")]), now), Some(Duration::from_secs(12)));
        assert_eq!(retry_after(&headers(&[("x-ratelimit-reset", "1800000020")]), now), Some(Duration::from_secs(20)));
        assert_eq!(retry_after(&headers(&[("x-ratelimit-reset", "1800000005000")]), now), Some(Duration::from_secs(5)));
        assert_eq!(
            retry_after(&headers(&[("retry-after", "3"), ("x-ratelimit-reset", "60")]), now),
            Some(Duration::from_secs(3))
        );
        assert_eq!(retry_after(&headers(&[("retry-after", "soon")]), now), None);
        assert_eq!(retry_after(&HeaderMap::new(), now), None);
    }
}
