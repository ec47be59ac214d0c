//! `GET /api/v1/lookup?email=<address>[&direction=to]`: the latest archived email from (or to)
//! an address, for a Kustomer workflow's REST action. A workflow reads one JSON object and
//! cannot index into arrays, so every answer is one flat object:
//!
//! - 200 `{"id", "rule", "receivedAt", "from", "subject", "state", "fields_<name>"..., "url", "count"}`;
//!   a field holding a list becomes a comma-joined string, a nested object more `fields_a_b` keys;
//! - 404 `{"error": ..., "count": 0}` when no email is from (or to) that address;
//! - 400 for a missing address, 401 for a missing or wrong key, 429 past `[web] api_rate`.
//!
//! `count` is how many emails the archive holds from (or to) that address.

use super::{Public, blocking};
use crate::config::Rate;
use crate::serve::console::auth::{bearer, same_secret};
use crate::store::{MAX_PAGE, MessageQuery, Record};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Map, Value as Json, json};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::warn;

/// A token bucket that answers at once: a token, or how long until there is one.
pub struct Bucket {
    per_second: Option<f64>,
    state: Mutex<(f64, Instant)>,
}

impl Bucket {
    pub fn new(rate: Rate) -> Bucket {
        let per_second = rate.per_second();
        Bucket { per_second, state: Mutex::new((burst(per_second), Instant::now())) }
    }

    /// Takes a token, or says how long to wait for one.
    pub fn take(&self) -> Result<(), Duration> {
        let Some(rate) = self.per_second else { return Ok(()) };
        let mut s = self.state.lock().expect("bucket lock");
        let now = Instant::now();
        s.0 = (s.0 + now.duration_since(s.1).as_secs_f64() * rate).min(burst(self.per_second));
        s.1 = now;
        if s.0 >= 1.0 {
            s.0 -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - s.0) / rate))
        }
    }
}

/// A burst of one second's worth (at least one).
fn burst(per_second: Option<f64>) -> f64 {
    per_second.map_or(f64::INFINITY, |r| r.max(1.0))
}

#[derive(Debug, Default, Deserialize)]
pub struct LookupParams {
    #[serde(default)]
    email: String,
    #[serde(default)]
    direction: Option<String>,
}

fn answer(status: StatusCode, body: Json) -> Response {
    let mut r = (status, format!("{body}\n")).into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// `GET /api/v1/lookup`.
pub async fn lookup(State(p): State<Arc<Public>>, headers: HeaderMap, Query(q): Query<LookupParams>) -> Response {
    if let Err(wait) = p.lookup_bucket.take() {
        let secs = wait.as_secs().max(1);
        let mut r = answer(StatusCode::TOO_MANY_REQUESTS, json!({"error": "too many requests", "retryAfter": secs}));
        r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        return r;
    }
    let Some(key) = &p.web.api_key else {
        return answer(StatusCode::NOT_FOUND, json!({"error": "the lookup API is not enabled"}));
    };
    if !same_secret(bearer(&headers).unwrap_or("").as_bytes(), key.expose().as_bytes()) {
        let mut r =
            answer(StatusCode::UNAUTHORIZED, json!({"error": "send Authorization: Bearer <the [web] api_key>"}));
        r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return r;
    }
    let email = q.email.trim().to_lowercase();
    if email.is_empty() || !email.contains('@') || email.len() > 320 {
        return answer(StatusCode::BAD_REQUEST, json!({"error": "give the address as ?email=name@example.com"}));
    }
    let to = match q.direction.as_deref() {
        None | Some("from") => false,
        Some("to") => true,
        Some(_) => return answer(StatusCode::BAD_REQUEST, json!({"error": "direction is \"from\" or \"to\""})),
    };
    let archive = p.archive.clone();
    let found = blocking(move || {
        let query = |cursor: Option<String>, limit: usize| MessageQuery {
            from: (!to).then(|| email.clone()),
            to: to.then(|| email.clone()),
            limit,
            cursor,
            ..MessageQuery::default()
        };
        // The latest by when it was received (spool ids are ULIDs: they sort by that time), not
        // by when its delivery ended, which is the archive's own order.
        let mut latest: Option<String> = None;
        let mut count = 0u64;
        let mut cursor = None;
        loop {
            let page = archive.list(&query(cursor, MAX_PAGE))?;
            count += page.items.len() as u64;
            for item in page.items {
                if latest.as_ref().is_none_or(|l| item.id > *l) {
                    latest = Some(item.id);
                }
            }
            match page.next {
                Some(next) => cursor = Some(next),
                None => break,
            }
        }
        let Some(latest) = latest else { return Ok(None) };
        let record = archive.get(&latest)?;
        Ok::<_, crate::store::StoreError>(record.map(|r| (r, count)))
    })
    .await;
    match found {
        Ok(Some((record, count))) => {
            let url = p.links.message(&record.summary.id);
            answer(StatusCode::OK, Json::Object(flat_answer(&record, count, &url)))
        }
        Ok(None) => answer(
            StatusCode::NOT_FOUND,
            json!({"error": format!("no email {} that address", if to { "to" } else { "from" }), "count": 0}),
        ),
        Err(e) => {
            warn!(error = %e, "lookup: the archive failed");
            answer(StatusCode::SERVICE_UNAVAILABLE, json!({"error": "the archive could not be read"}))
        }
    }
}

/// The answer for `record`: one object, no array anywhere in it.
pub fn flat_answer(record: &Record, count: u64, url: &str) -> Map<String, Json> {
    let s = &record.summary;
    let mut out = Map::new();
    out.insert("id".into(), s.id.clone().into());
    out.insert("rule".into(), s.rule.clone().map_or(Json::Null, Json::from));
    out.insert("receivedAt".into(), s.received_at.clone().into());
    out.insert("from".into(), s.from.clone().into());
    out.insert("subject".into(), s.subject.clone().into());
    out.insert("state".into(), s.state.as_str().into());
    if let Some(Json::Object(fields)) = &record.fields {
        for (name, value) in fields {
            flatten(&mut out, &format!("fields_{name}"), value);
        }
    }
    out.insert("url".into(), url.into());
    out.insert("count".into(), count.into());
    out
}

fn flatten(out: &mut Map<String, Json>, key: &str, value: &Json) {
    match value {
        Json::Object(map) => {
            for (k, v) in map {
                flatten(out, &format!("{key}_{k}"), v);
            }
        }
        Json::Array(items) => {
            let text: Vec<String> = items
                .iter()
                .map(|i| match i {
                    Json::String(s) => s.clone(),
                    Json::Null => String::new(),
                    other => other.to_string(),
                })
                .collect();
            out.insert(key.to_string(), Json::String(text.join(", ")));
        }
        scalar => {
            out.insert(key.to_string(), scalar.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Envelope, Source};
    use crate::store::{ArchiveState, Summary};
    use proptest::prelude::*;

    fn record(fields: Option<Json>) -> Record {
        Record {
            summary: Summary {
                id: "01KBXV6Y8Q9W3F0ZJ4M2N5P7RS".into(),
                state: ArchiveState::Delivered,
                received_at: "2026-12-06T10:00:00Z".into(),
                from: "a@example.com".into(),
                subject: "Order 1".into(),
                rule: Some("orders".into()),
                destinations: vec!["k".into()],
            },
            envelope: Envelope::new(Source::Stdin),
            finished_at: String::new(),
            size: 1,
            reason: None,
            fields,
            payload: None,
            attempts: vec![],
        }
    }

    fn has_array(v: &Json) -> bool {
        match v {
            Json::Array(_) => true,
            Json::Object(m) => m.values().any(has_array),
            _ => false,
        }
    }

    fn json_value() -> impl Strategy<Value = Json> {
        let leaf = prop_oneof![
            Just(Json::Null),
            any::<bool>().prop_map(Json::from),
            any::<i64>().prop_map(Json::from),
            "[a-z ,\\[\\]{}\"]{0,8}".prop_map(Json::from),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Json::Array),
                prop::collection::btree_map("[a-z_]{1,6}", inner, 0..6)
                    .prop_map(|m| Json::Object(m.into_iter().collect())),
            ]
        })
    }

    #[test]
    fn fields_are_flattened_by_name() {
        let r = record(Some(json!({"order": 4711, "items": ["a", 2, null], "ship": {"to": "Bonn", "n": [1]}})));
        let got = Json::Object(flat_answer(&r, 3, "https://h.example/m/x"));
        assert_eq!(
            got,
            json!({"id": "01KBXV6Y8Q9W3F0ZJ4M2N5P7RS", "rule": "orders", "receivedAt": "2026-12-06T10:00:00Z",
                   "from": "a@example.com", "subject": "Order 1", "state": "delivered",
                   "fields_order": 4711, "fields_items": "a, 2, ", "fields_ship_to": "Bonn", "fields_ship_n": "1",
                   "url": "https://h.example/m/x", "count": 3})
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        /// Whatever a rule extracted, the answer is one object and holds no array anywhere.
        #[test]
        fn never_an_array(fields in prop::option::of(json_value()), count in any::<u64>()) {
            let answer = Json::Object(flat_answer(&record(fields), count, "u"));
            prop_assert!(!has_array(&answer), "{answer}");
            prop_assert_eq!(&answer["count"], &json!(count));
            prop_assert_eq!(&answer["url"], &json!("u"));
        }
    }
}
