//! What every answer of the console and of the public pages carries, and their static assets.

use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};

/// Adds the headers every answer carries: `page_csp` (with `X-Frame-Options: DENY`) unless the
/// handler set its own CSP (an email's HTML, framed), `nosniff`, no referrer, no caching.
pub(super) fn secure(mut response: Response, page_csp: &'static str) -> Response {
    let h = response.headers_mut();
    if !h.contains_key(header::CONTENT_SECURITY_POLICY) {
        h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(page_csp));
        h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    }
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// A static asset compiled into the binary.
pub(super) fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}
