//! The signed pages: one email read-only, its sanitised HTML, its attachments.
//!
//! The checks come in one order: the id must be a ULID and the signature must verify (else
//! 403, one body for every reason), then the archive must still hold the email (else 410).
//! The HTML is the console's sanitised HTML ([`crate::serve::console::html::sanitise`]) under
//! the console's email CSP, framed with `sandbox`: the same three locks.

use super::{Public, blocking};
use crate::links::Links;
use crate::serve::console::{auth, html};
use crate::store::{Record, is_id};
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;
use std::sync::Arc;
use std::time::SystemTime;
use tracing::warn;

/// `?exp=&sig=`.
#[derive(Debug, Default, Deserialize)]
pub struct Signature {
    #[serde(default)]
    pub exp: String,
    #[serde(default)]
    pub sig: String,
}

type St = State<Arc<Public>>;

/// What a signed request for message `id` finds.
pub(crate) enum Found {
    Message(Box<Record>, Vec<u8>),
    /// The signature verifies, but retention removed the email.
    Gone,
    /// Wrong, missing or expired signature, or an id that is no id.
    Forbidden,
    Failed,
}

/// The message `id`, when `resource` is signed by `s`.
pub(crate) async fn signed(p: &Public, id: &str, resource: &str, s: &Signature) -> Found {
    if !is_id(id) || !p.links.verify(resource, &s.exp, &s.sig, SystemTime::now()) {
        return Found::Forbidden;
    }
    let (archive, id) = (p.archive.clone(), id.to_string());
    let loaded = blocking(move || {
        let Some(record) = archive.get(&id)? else { return Ok(None) };
        let raw = archive.raw(&id)?.unwrap_or_default();
        Ok::<_, crate::store::StoreError>(Some((record, raw)))
    })
    .await;
    match loaded {
        Ok(Some((record, raw))) => Found::Message(Box::new(record), raw),
        Ok(None) => Found::Gone,
        Err(e) => {
            warn!(error = %e, "public page: the archive failed");
            Found::Failed
        }
    }
}

fn refuse(p: &Public, found: Found) -> Response {
    match found {
        Found::Forbidden => p.forbidden(),
        Found::Gone => p.error(
            StatusCode::GONE,
            "This email is no longer kept: the archive removed it after its retention period.",
        ),
        _ => p.error(StatusCode::INTERNAL_SERVER_ERROR, "The archive could not be read. Try again later."),
    }
}

/// `GET /m/{id}?exp=&sig=`.
pub async fn message(State(p): St, UrlPath(id): UrlPath<String>, Query(s): Query<Signature>) -> Response {
    let (record, raw) = match signed(&p, &id, &Links::message_resource(&id), &s).await {
        Found::Message(r, raw) => (r, raw),
        other => return refuse(&p, other),
    };
    let email = blocking(move || crate::parse::parse(&raw)).await;
    let query = format!("exp={}&sig={}", s.exp, s.sig);
    let attachments: Vec<_> = email
        .attachments
        .iter()
        .enumerate()
        .map(|(n, a)| {
            json!({
                "name": if a.name.is_empty() { format!("part-{n}") } else { a.name.clone() },
                "type": a.content_type,
                "size": a.size,
                "url": format!("/{}?{}", Links::attachment_resource(&id, n), p.links.sign(&Links::attachment_resource(&id, n), p.links.expiry(&id)).query()),
            })
        })
        .collect();
    let list = |l: &[crate::model::Address]| {
        l.iter()
            .map(|a| if a.name.is_empty() { a.address.clone() } else { format!("{} <{}>", a.name, a.address) })
            .collect::<Vec<_>>()
            .join(", ")
    };
    let ctx = json!({
        "id": id,
        "subject": email.subject,
        "from": list(&email.from),
        "to": list(&email.to),
        "cc": list(&email.cc),
        "date": email.date,
        "received_at": record.summary.received_at,
        "text": email.text,
        "html": (!email.html.is_empty()).then(|| format!("/m/{id}/html?{query}")),
        "attachments": attachments,
    });
    let mut r = p.render(StatusCode::OK, "message.html", ctx);
    // Framed by the card (and so by Kustomer) as the card's viewer.
    let csp = format!(
        "default-src 'none'; style-src 'self'; img-src 'self' data:; frame-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors {}",
        p.ancestors()
    );
    if let Ok(v) = HeaderValue::from_str(&csp) {
        r.headers_mut().insert(header::CONTENT_SECURITY_POLICY, v);
    }
    r
}

/// `GET /m/{id}/html?exp=&sig=`: the sanitised HTML, remote images blocked.
pub async fn html(State(p): St, UrlPath(id): UrlPath<String>, Query(s): Query<Signature>) -> Response {
    let raw = match signed(&p, &id, &Links::message_resource(&id), &s).await {
        Found::Message(_, raw) => raw,
        other => return refuse(&p, other),
    };
    let body = blocking(move || html::sanitise(&crate::parse::parse(&raw).html, false)).await;
    // The console's email CSP, with the card's ancestors allowed: Kustomer → card → page → this.
    let csp = auth::EMAIL_CSP.replace("frame-ancestors 'self'", &format!("frame-ancestors {}", p.ancestors()));
    let mut r = ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], body).into_response();
    if let Ok(v) = HeaderValue::from_str(&csp) {
        r.headers_mut().insert(header::CONTENT_SECURITY_POLICY, v);
    }
    r
}

/// `GET /m/{id}/a/{n}?exp=&sig=`: always a download, whatever type it claims.
pub async fn attachment(
    State(p): St,
    UrlPath((id, n)): UrlPath<(String, usize)>,
    Query(s): Query<Signature>,
) -> Response {
    let raw = match signed(&p, &id, &Links::attachment_resource(&id, n), &s).await {
        Found::Message(_, raw) => raw,
        other => return refuse(&p, other),
    };
    match crate::serve::download::attachment(raw, n).await {
        Some(download) => download,
        None => p.error(StatusCode::NOT_FOUND, "This email has no such attachment."),
    }
}
