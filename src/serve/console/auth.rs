//! Sessions, CSRF tokens and the headers every console answer carries.
//!
//! A session is a random id in an `HttpOnly; SameSite=Strict` cookie (`Secure` when the
//! console is served over TLS), kept in memory for [`SESSION_TTL`] from login. Each session
//! has its own CSRF token, written into every form (and a `<meta>` for the script); a
//! state-changing POST without it is refused (403). Without `[admin] token` (loopback only)
//! a session is opened on the first page seen, so the CSRF check still applies.

use axum::http::{HeaderMap, HeaderValue, header};
use ring::rand::{SecureRandom, SystemRandom};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub const COOKIE: &str = "mailhook_session";

/// How long a session lasts from login.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);

/// Sessions kept at most (the oldest go first).
const MAX_SESSIONS: usize = 1000;

/// The console's pages: scripts and styles only from its own files, nothing from elsewhere,
/// never framed.
pub const PAGE_CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
     connect-src 'self'; form-action 'self'; frame-src 'self'; base-uri 'none'; frame-ancestors 'none'";

/// An email's sanitised HTML: no script, nothing loaded but inline images, framed only by the
/// console itself; `sandbox` makes it an opaque origin even when opened on its own.
pub const EMAIL_CSP: &str = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; sandbox; base-uri 'none'; form-action 'none'; frame-ancestors 'self'";

/// The same, with remote images allowed (the operator asked for them for one message).
pub const EMAIL_CSP_REMOTE_IMAGES: &str = "default-src 'none'; img-src data: https: http:; style-src 'unsafe-inline'; sandbox; base-uri 'none'; form-action 'none'; frame-ancestors 'self'";

#[derive(Debug, Clone)]
pub struct Session {
    pub id: String,
    pub csrf: String,
    expires: Instant,
}

pub struct Sessions {
    map: Mutex<HashMap<String, Session>>,
    random: SystemRandom,
}

impl Default for Sessions {
    fn default() -> Self {
        Sessions { map: Mutex::new(HashMap::new()), random: SystemRandom::new() }
    }
}

impl Sessions {
    fn random_hex(&self) -> String {
        let mut bytes = [0u8; 32];
        self.random.fill(&mut bytes).expect("the system's random source");
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Opens a session.
    pub fn open(&self) -> Session {
        let session = Session { id: self.random_hex(), csrf: self.random_hex(), expires: Instant::now() + SESSION_TTL };
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        map.retain(|_, s| s.expires > now);
        if map.len() >= MAX_SESSIONS
            && let Some(oldest) = map.values().min_by_key(|s| s.expires).map(|s| s.id.clone())
        {
            map.remove(&oldest);
        }
        map.insert(session.id.clone(), session.clone());
        session
    }

    /// The live session the request's cookie names.
    pub fn find(&self, headers: &HeaderMap) -> Option<Session> {
        let id = cookie(headers, COOKIE)?;
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        match map.get(&id) {
            Some(s) if s.expires > Instant::now() => Some(s.clone()),
            Some(_) => {
                map.remove(&id);
                None
            }
            None => None,
        }
    }

    pub fn close(&self, id: &str) {
        self.map.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
    }
}

/// The value of cookie `name` in the request.
pub fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

/// The `Set-Cookie` value that opens `session` in the browser.
pub fn set_cookie(session: &Session, secure: bool) -> HeaderValue {
    let secure = if secure { "; Secure" } else { "" };
    HeaderValue::from_str(&format!(
        "{COOKIE}={}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
        session.id,
        SESSION_TTL.as_secs()
    ))
    .expect("hex and ASCII")
}

/// The `Set-Cookie` value that ends the session in the browser.
pub fn clear_cookie() -> HeaderValue {
    HeaderValue::from_static("mailhook_session=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0")
}

/// Compares a presented secret with the expected one in a time that depends only on the
/// expected one's length, not on how many leading bytes are right.
pub fn same_secret(presented: &[u8], expected: &[u8]) -> bool {
    let mut diff = presented.len() ^ expected.len();
    for (i, e) in expected.iter().enumerate() {
        let p = presented.get(i).copied().unwrap_or(!*e);
        diff |= usize::from(p ^ e);
    }
    diff == 0
}

/// The Bearer token of a request, if any.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "))
}

/// Whether the request names this machine as its host (`127.0.0.1`, `[::1]`, `localhost`):
/// a console without a token refuses any other, so a page elsewhere cannot reach it through a
/// name that resolves to 127.0.0.1 (DNS rebinding).
pub fn loopback_host(headers: &HeaderMap) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let name = match host.rsplit_once(':') {
        Some((name, port)) if port.chars().all(|c| c.is_ascii_digit()) => name,
        _ => host,
    };
    let name = name.trim_start_matches('[').trim_end_matches(']');
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Whether a POST comes from a page of another site (`Sec-Fetch-Site`, else `Origin` against
/// `Host`).
pub fn cross_site(headers: &HeaderMap) -> bool {
    if let Some(site) = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()) {
        return !matches!(site, "same-origin" | "none");
    }
    match (
        headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()),
        headers.get(header::HOST).and_then(|v| v.to_str().ok()),
    ) {
        (Some(origin), Some(host)) => {
            origin.strip_prefix("http://").or_else(|| origin.strip_prefix("https://")) != Some(host)
        }
        (Some(_), None) => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret(b"s3cret", b"s3cret"));
        assert!(!same_secret(b"s3cre", b"s3cret"));
        assert!(!same_secret(b"s3cretX", b"s3cret"));
        assert!(!same_secret(b"", b"s3cret"));
    }

    #[test]
    fn sessions_open_find_close() {
        let sessions = Sessions::default();
        let s = sessions.open();
        assert_eq!(s.id.len(), 64);
        assert_ne!(s.id, s.csrf);
        let h = headers(&[("cookie", &format!("a=b; {COOKIE}={}", s.id))]);
        assert_eq!(sessions.find(&h).map(|f| f.csrf), Some(s.csrf.clone()));
        sessions.close(&s.id);
        assert!(sessions.find(&h).is_none());
        assert!(sessions.find(&headers(&[("cookie", "mailhook_session=forged")])).is_none());
    }

    #[test]
    fn hosts_and_origins() {
        assert!(loopback_host(&headers(&[("host", "127.0.0.1:9025")])));
        assert!(loopback_host(&headers(&[("host", "[::1]:9025")])));
        assert!(loopback_host(&headers(&[("host", "localhost")])));
        assert!(!loopback_host(&headers(&[("host", "evil.example:9025")])));
        assert!(!loopback_host(&HeaderMap::new()));
        assert!(cross_site(&headers(&[("sec-fetch-site", "cross-site")])));
        assert!(!cross_site(&headers(&[("sec-fetch-site", "same-origin")])));
        assert!(cross_site(&headers(&[("origin", "http://evil.example"), ("host", "127.0.0.1:9025")])));
        assert!(!cross_site(&headers(&[("origin", "http://127.0.0.1:9025"), ("host", "127.0.0.1:9025")])));
        assert!(!cross_site(&headers(&[("host", "127.0.0.1:9025")])), "curl sends no Origin");
    }
}
