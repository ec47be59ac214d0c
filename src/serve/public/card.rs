//! The Kustomer Card: `GET /kustomer/card`, a page for a Klass View `DynamicCard` iFrame.
//!
//! The page loads the Cards SDK (`[web] kustomer_card_js`) and the card's own script
//! (`/static/card.js`, no inline script), which calls `Kustomer.initialize`, reads the
//! customer's emails and the conversation's (or KObject's) `[web] card_attribute` from the
//! context, asks `GET /kustomer/api/messages` for that customer's emails, lists them (date,
//! subject, rule, three fields) and opens each in the signed page ([`super::page`]) in a frame
//! below it, then calls `Kustomer.resize()`. Kustomer's `parentUrl` and `id` query parameters
//! are left alone: the page never redirects. Opened outside Kustomer with `?link=<a signed
//! link>` (or `?m=ID&exp=&sig=`), it shows that one email.
//!
//! The API answers only a request that carries either
//! - a signed link (`link=`): that one email; or
//! - a card key (`Authorization: Bearer`, one of `[web] card_keys`): the emails from or to the
//!   addresses given as `email=` (the customer's, from the context).
//!
//! Kustomer gives the card nothing mailhook can verify and the context comes from the browser:
//! whoever holds a card key can read the archived mail of any address. `[web] card_rules`
//! limits whose rules' mail the card may show. Framing: `frame-ancestors` is `[web]
//! frame_ancestors`; there is no `X-Frame-Options`.

use super::page::Signature;
use super::{Public, blocking};
use crate::links::Links;
use crate::serve::console::auth::{bearer, same_secret};
use crate::store::{MessageQuery, Summary, is_id};
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value as Json, json};
use std::sync::Arc;
use std::time::SystemTime;
use tracing::warn;

pub(crate) const SCRIPT: &str = include_str!("static/card.js");

/// Addresses one request may ask about.
const MAX_ADDRESSES: usize = 10;
/// Emails the card lists at most.
const MAX_LISTED: usize = 25;
/// Fields shown per email.
const KEY_FIELDS: usize = 3;

/// `GET /kustomer/card`.
pub async fn page(State(p): State<Arc<Public>>) -> Response {
    let mut r = p.render(
        StatusCode::OK,
        "card.html",
        json!({"sdk": p.web.kustomer_card_js, "attribute": p.web.card_attribute}),
    );
    let csp = format!(
        "default-src 'none'; script-src 'self' {}; style-src 'self'; img-src 'self' data:; connect-src 'self'; \
         frame-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors {}",
        p.web.kustomer_card_js,
        p.ancestors()
    );
    match HeaderValue::from_str(&csp) {
        Ok(v) => {
            r.headers_mut().insert(header::CONTENT_SECURITY_POLICY, v);
        }
        Err(_) => return p.error(StatusCode::INTERNAL_SERVER_ERROR, "The card is misconfigured."),
    }
    r
}

fn answer(status: StatusCode, body: Json) -> Response {
    let mut r = (status, format!("{body}\n")).into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// The id of a signed link (`https://…/m/ID?exp=&sig=` or `m/ID?exp=&sig=`), when it verifies.
pub fn verified_link(links: &Links, link: &str, now: SystemTime) -> Option<String> {
    let at = link.rfind("m/")?;
    let (path, query) = link[at..].split_once('?')?;
    let id = path.strip_prefix("m/")?;
    let mut s = Signature::default();
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        match &*k {
            "exp" => s.exp = v.into_owned(),
            "sig" => s.sig = v.into_owned(),
            _ => {}
        }
    }
    (is_id(id) && links.verify(&Links::message_resource(id), &s.exp, &s.sig, now)).then(|| id.to_string())
}

/// `GET /kustomer/api/messages?email=…&link=…&current=…`.
pub async fn messages(State(p): State<Arc<Public>>, headers: HeaderMap, RawQuery(q): RawQuery) -> Response {
    let (mut emails, mut link, mut current) = (Vec::new(), None, None);
    for (k, v) in form_urlencoded::parse(q.unwrap_or_default().as_bytes()) {
        match &*k {
            "email" if emails.len() < MAX_ADDRESSES && v.contains('@') && v.len() <= 320 => {
                emails.push(v.trim().to_lowercase())
            }
            "link" => link = Some(v.into_owned()),
            "current" => current = Some(v.into_owned()),
            _ => {}
        }
    }
    let presented = bearer(&headers).unwrap_or("");
    // Every key is compared, so the time taken does not tell which one came close.
    let key_ok =
        p.web.card_keys.iter().fold(false, |ok, k| same_secret(presented.as_bytes(), k.expose().as_bytes()) | ok);
    let now = SystemTime::now();
    let linked = link.as_deref().and_then(|l| verified_link(&p.links, l, now));
    if !key_ok && linked.is_none() {
        return answer(StatusCode::FORBIDDEN, json!({"error": "this card needs a card key or a signed mailhook link"}));
    }
    if !key_ok {
        emails.clear();
    }
    let current = linked.clone().or(current.filter(|c| is_id(c)));
    let archive = p.archive.clone();
    let rules = p.web.card_rules.clone();
    let found = blocking(move || {
        let mut found: Vec<Summary> = Vec::new();
        for email in &emails {
            for to in [false, true] {
                let q = MessageQuery {
                    from: (!to).then(|| email.clone()),
                    to: to.then(|| email.clone()),
                    limit: MAX_LISTED,
                    ..MessageQuery::default()
                };
                found.extend(archive.list(&q)?.items);
            }
        }
        let mut records = Vec::new();
        if let Some(id) = &linked
            && let Some(r) = archive.get(id)?
        {
            found.push(r.summary);
        }
        found.retain(|s| rules.is_empty() || s.rule.as_ref().is_some_and(|r| rules.contains(r)));
        found.sort_by(|a, b| b.id.cmp(&a.id));
        found.dedup_by(|a, b| a.id == b.id);
        found.truncate(MAX_LISTED);
        for s in found {
            let fields = archive.get(&s.id)?.and_then(|r| r.fields);
            records.push((s, fields));
        }
        Ok::<_, crate::store::StoreError>(records)
    })
    .await;
    let records = match found {
        Ok(r) => r,
        Err(e) => {
            warn!(error = %e, "card: the archive failed");
            return answer(StatusCode::SERVICE_UNAVAILABLE, json!({"error": "the archive could not be read"}));
        }
    };
    let messages: Vec<Json> = records
        .into_iter()
        .map(|(s, fields)| {
            let fields: Vec<Json> = match fields {
                Some(Json::Object(m)) => m
                    .into_iter()
                    .filter(|(_, v)| !v.is_null())
                    .take(KEY_FIELDS)
                    .map(|(name, v)| json!({"name": name, "value": v.as_str().map_or_else(|| v.to_string(), str::to_string)}))
                    .collect(),
                _ => Vec::new(),
            };
            let resource = Links::message_resource(&s.id);
            let view = format!("/{resource}?{}", p.links.sign(&resource, p.links.expiry(&s.id)).query());
            json!({
                "id": s.id, "receivedAt": s.received_at, "subject": s.subject, "rule": s.rule, "from": s.from,
                "fields": fields, "view": view, "current": current.as_deref() == Some(s.id.as_str()),
            })
        })
        .collect();
    answer(StatusCode::OK, json!({"messages": messages}))
}
