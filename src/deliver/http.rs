//! HTTP destinations: Kustomer web hooks (Bearer key), form hooks, any webhook.

use super::{Attempt, REPLY_BODY_MAX, Reply, body_start, cut};
use crate::config::{DestinationConfig, DestinationType};
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue, RETRY_AFTER};
use std::path::Path;
use std::time::{Duration, SystemTime};

/// How much of an error response body goes into the dead-letter reason.
const BODY_START: usize = 200;

pub struct HttpDestination {
    client: reqwest::Client,
    url: String,
    headers: HeaderMap,
    signer: super::sign::Signer,
}

impl HttpDestination {
    pub fn new(d: &DestinationConfig, timeout: Duration, ca_file: Option<&Path>) -> Result<HttpDestination, String> {
        let url = d.url.clone().ok_or("url is missing")?;
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if d.kind == DestinationType::KustomerWebHook {
            let token = d.token.as_ref().ok_or("token is missing")?;
            let mut v = HeaderValue::from_str(&format!("Bearer {}", token.expose()))
                .map_err(|_| "token holds characters not allowed in a header".to_string())?;
            v.set_sensitive(true);
            headers.insert(AUTHORIZATION, v);
        }
        for (name, value) in &d.headers {
            let n =
                HeaderName::from_bytes(name.as_bytes()).map_err(|_| format!("header name {name:?} is not valid"))?;
            let mut v = HeaderValue::from_str(value.expose())
                .map_err(|_| format!("header {name}: value holds characters not allowed in a header"))?;
            v.set_sensitive(true);
            headers.insert(n, v);
        }
        let mut keys = Vec::new();
        for secret in &d.signing_secret.0 {
            keys.push(crate::config::signing_key(secret).map_err(|e| format!("signing_secret: {e}"))?);
        }
        let signer = super::sign::Signer::new(keys);
        let mut builder = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .user_agent(concat!("mailhook/", env!("CARGO_PKG_VERSION")))
            .pool_idle_timeout(Duration::from_secs(60));
        if let Some(ca) = ca_file {
            let pem = std::fs::read(ca).map_err(|e| format!("ca_file {}: {e}", ca.display()))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| format!("ca_file {}: not a PEM certificate: {e}", ca.display()))?;
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        let client = builder.build().map_err(|e| format!("HTTP client: {e}"))?;
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
