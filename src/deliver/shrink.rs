//! Payload shrinking: a payload over `max_body` is made to fit (drop `html`, then cut `text`,
//! say so with `"truncated": true`) rather than sent to fail with 413. Pure.

use crate::model::Payload;
use serde_json::value::RawValue;
use serde_json::{Map, Value as Json};

/// A payload that cannot be made to fit `max_body`: permanent, sending it again would fail the
/// same way.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "payload of {size} bytes cannot be shrunk under max_body ({max} bytes): fields other than html and text are too large"
)]
pub struct TooLarge {
    pub size: usize,
    pub max: usize,
}

/// The body to send for `payload`: its text when that is at most `max_body` bytes, else the
/// payload shrunk to fit. Fails when it cannot fit even without `html` and with an empty
/// `text`.
pub fn encode(payload: &Payload, max_body: usize) -> Result<Vec<u8>, TooLarge> {
    let text = payload.as_str();
    if text.len() <= max_body {
        return Ok(text.as_bytes().to_vec());
    }
    if hopeless(text, max_body) {
        return Err(too_large(text.len(), max_body));
    }
    let map = payload.to_map().ok_or_else(|| too_large(text.len(), max_body))?;
    encode_map(&map, max_body)
}

/// `payload` made to fit `max_body` (see [`encode`]): what the spool keeps, so that it never
/// stores more than any destination will take. A payload that fits, or that cannot be made to
/// fit, is returned as it is (sending it will say why it failed).
pub fn fit(payload: Payload, max_body: usize) -> Payload {
    if payload.as_str().len() <= max_body || hopeless(payload.as_str(), max_body) {
        return payload;
    }
    let Some(map) = payload.to_map() else { return payload };
    // The text of a big message is in both: let it go before the map is cut down and written.
    drop(payload);
    Payload::of(&fit_map(map, max_body))
}

/// Whether the payload `json` is over `max_body` even without `html` and `text`, so that no
/// shrinking can make it fit. Read without copying a value, so that a payload holding a field
/// of many megabytes is not read into a map (a copy of it) only to be refused; `false` when it
/// cannot be read so (then the map says).
fn hopeless(json: &str, max_body: usize) -> bool {
    let Ok(map) = serde_json::from_str::<std::collections::BTreeMap<&str, &RawValue>>(json) else { return false };
    // Each kept member costs at least its key, its value, two quotes, a colon and a comma.
    let rest: usize =
        map.iter().filter(|(k, _)| !matches!(**k, "html" | "text")).map(|(k, v)| k.len() + v.get().len() + 4).sum();
    rest > max_body
}

/// [`encode`] of a payload as a map.
fn encode_map(payload: &Map<String, Json>, max_body: usize) -> Result<Vec<u8>, TooLarge> {
    let body = serde_json::to_vec(payload).expect("JSON serialises");
    if body.len() <= max_body {
        return Ok(body);
    }
    shrink(payload, body.len(), max_body).map(|(body, _)| body)
}

/// [`fit`] of a payload as a map.
fn fit_map(mut payload: Map<String, Json>, max_body: usize) -> Map<String, Json> {
    pre_trim(&mut payload, max_body);
    let size = serde_json::to_vec(&payload).expect("JSON serialises").len();
    if size <= max_body {
        return payload;
    }
    match shrink(&payload, size, max_body) {
        Ok((_, shrunk)) => shrunk,
        Err(_) => payload,
    }
}

/// The shrinking of [`encode`] for a payload whose serialisation is `original` bytes long:
/// the body and the shrunk map.
fn shrink(
    payload: &Map<String, Json>,
    original: usize,
    max_body: usize,
) -> Result<(Vec<u8>, Map<String, Json>), TooLarge> {
    let mut p = payload.clone();
    p.insert("truncated".into(), Json::Bool(true));
    p.shift_remove("html");
    let body = serde_json::to_vec(&p).expect("JSON serialises");
    if body.len() <= max_body {
        return Ok((body, p));
    }
    let text = match p.get("text") {
        Some(Json::String(t)) => t.clone(),
        _ => return Err(too_large(original, max_body)),
    };
    p.insert("text".into(), Json::String(String::new()));
    let without_text = serde_json::to_vec(&p).expect("JSON serialises").len();
    if without_text > max_body {
        return Err(too_large(original, max_body));
    }
    // Keep the longest prefix of `text` (on a char boundary) whose escaped form fits: the
    // escaped length grows with the prefix, so a binary search finds it.
    let budget = max_body - without_text;
    let escaped_len = |n: usize| serde_json::to_string(&text[..n]).expect("JSON serialises").len() - 2;
    let (mut lo, mut hi) = (0usize, text.len());
    while lo < hi {
        let mut mid = lo + (hi - lo).div_ceil(2);
        while !text.is_char_boundary(mid) {
            mid -= 1;
        }
        if mid <= lo {
            // No char boundary strictly between lo and hi: lo is the answer.
            break;
        }
        if escaped_len(mid) <= budget {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    let keep = lo;
    p.insert("text".into(), Json::String(text[..keep].to_string()));
    let body = serde_json::to_vec(&p).expect("JSON serialises");
    debug_assert!(body.len() <= max_body);
    Ok((body, p))
}

/// Cheap first cut for very large payloads: an `html` or `text` value that alone is longer
/// than `max_body` cannot be sent whole anyway, so it is dropped (`html`) or cut to `max_body`
/// bytes (`text`) in place, before anything is serialised. [`encode`] does the exact fit.
pub fn pre_trim(payload: &mut Map<String, Json>, max_body: usize) {
    let mut trimmed = false;
    if payload.get("html").and_then(Json::as_str).is_some_and(|h| h.len() > max_body) {
        payload.shift_remove("html");
        trimmed = true;
    }
    if let Some(Json::String(text)) = payload.get_mut("text")
        && text.len() > max_body
    {
        let mut keep = max_body;
        while !text.is_char_boundary(keep) {
            keep -= 1;
        }
        text.truncate(keep);
        text.shrink_to_fit();
        trimmed = true;
    }
    if trimmed {
        payload.insert("truncated".into(), Json::Bool(true));
    }
}

fn too_large(size: usize, max: usize) -> TooLarge {
    TooLarge { size, max }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn map(v: Json) -> Map<String, Json> {
        v.as_object().unwrap().clone()
    }

    fn obj(v: Json) -> Payload {
        Payload::of(&v)
    }

    #[test]
    fn small_payload_is_sent_as_is() {
        let p = obj(json!({"id": "1", "text": "hello", "html": "<p>hello</p>"}));
        assert_eq!(encode(&p, 1000).unwrap(), serde_json::to_vec(&map(p.to_json())).unwrap());
        assert_eq!(fit(p.clone(), 1000), p);
    }

    #[test]
    fn what_the_spool_keeps_fits_the_largest_destination() {
        let p = obj(json!({"id": "1", "text": "t".repeat(3000), "html": "x".repeat(5000)}));
        let kept = fit(p.clone(), 1000);
        assert!(kept.as_str().len() <= 1000, "{}", kept.as_str().len());
        assert_eq!(kept.to_json()["truncated"], true);
        assert_eq!(encode(&kept, 1000).unwrap(), kept.as_str().as_bytes(), "sent as kept");
        assert_eq!(encode(&p, 1000).unwrap(), encode(&kept, 1000).unwrap(), "the same either way");
    }

    #[test]
    fn html_goes_first() {
        let p = obj(json!({"id": "1", "text": "hello", "html": "x".repeat(5000)}));
        let out: Json = serde_json::from_slice(&encode(&p, 1000).unwrap()).unwrap();
        assert_eq!(out, json!({"id": "1", "text": "hello", "truncated": true}));
    }

    #[test]
    fn then_text_is_cut_to_fit_exactly() {
        let text = "äöü \"quoted\" \n".repeat(2000);
        let p = obj(json!({"id": "1", "subject": "s", "text": text, "html": "<p>x</p>"}));
        for max in [200usize, 1000, 4096, 400_000] {
            let body = encode(&p, max).unwrap();
            assert!(body.len() <= max, "{} > {max}", body.len());
            let out: Json = serde_json::from_slice(&body).unwrap();
            if p.as_str().len() > max {
                assert_eq!(out["truncated"], true);
                let kept = out["text"].as_str().unwrap();
                assert!(text.starts_with(kept));
                // Close to the limit: within one escaped character of it.
                assert!(max - body.len() <= 6, "{max} - {} too much slack", body.len());
            }
        }
    }

    #[test]
    fn pre_trim_cuts_only_what_cannot_fit_anyway() {
        let mut p = map(json!({"text": "é".repeat(1000), "html": "x".repeat(5000), "subject": "s"}));
        pre_trim(&mut p, 1001);
        assert_eq!(p["text"].as_str().unwrap().len(), 1000, "cut on a char boundary");
        assert!(p.get("html").is_none());
        assert_eq!(p["truncated"], true);
        let mut small = map(json!({"text": "short", "html": "<p>x</p>"}));
        pre_trim(&mut small, 1000);
        assert_eq!(small, map(json!({"text": "short", "html": "<p>x</p>"})));
    }

    #[test]
    fn a_payload_too_large_without_its_text_is_refused_without_being_read_into_a_map() {
        let payloads = [
            obj(json!({"id": "1", "fields": {"whole": "x".repeat(3000)}, "text": "t".repeat(3000)})),
            obj(json!({"id": "1", "subject": "é\"".repeat(400), "text": "t".repeat(3000), "html": "<p>x</p>"})),
            obj(json!({"id": "1", "text": "t".repeat(3000), "html": "x".repeat(3000)})),
        ];
        for p in &payloads {
            for max in (0..4000).step_by(7) {
                let map = map(p.to_json());
                // Said hopeless only where the exact shrink fails too.
                if hopeless(p.as_str(), max) {
                    assert!(encode_map(&map, max).is_err(), "max {max}: {}", p.as_str().len());
                    assert!(encode(p, max).is_err());
                    assert_eq!(&fit(p.clone(), max), p, "returned as it is");
                }
                assert_eq!(encode(p, max).is_ok(), encode_map(&map, max).is_ok(), "max {max}");
            }
        }
        let big = &payloads[0];
        assert!(hopeless(big.as_str(), 2000), "the field alone is 3,000 bytes");
        assert!(!hopeless(big.as_str(), 3100));
    }

    #[test]
    fn impossible_shrink_is_an_error() {
        let p = obj(json!({"id": "1", "fields": {"blob": "x".repeat(5000)}, "text": "t"}));
        assert!(encode(&p, 1000).unwrap_err().to_string().contains("cannot be shrunk"));
    }
}
