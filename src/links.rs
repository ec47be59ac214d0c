//! links: signed links to an email's public page and to its attachments (`[web]`).
//!
//! A link is `{public_url}/m/{id}?exp={unix seconds}&sig={signature}` (an attachment:
//! `/m/{id}/a/{n}?exp=&sig=`), where the signature is the HMAC-SHA256, keyed with
//! `[web] link_key`, of `mailhook-link-v1|{resource}|{exp}` (the resource is `m/{id}` or
//! `m/{id}/a/{n}`), in unpadded base64url. It therefore covers the id and the expiry, and a
//! link to one attachment opens nothing else. Links signed with one of `[web] old_link_keys`
//! still verify, so the key can be rotated without breaking the links already sent.
//!
//! A link expires `[web] link_ttl` after the email was received (the time in its ULID id), so
//! the payload of a message is the same on every retry and every replay of the same message.
//!
//! [`Links::augment`] adds the links to a payload: the page's link under `[web] url_field`
//! (default `url`) to every payload that has no such key, and `attachmentUrls` (the links of
//! the attachments that `attachments` names, in the same order, comma-joined) to the default
//! payload. Rules see them in templates as `links.url`, `links.attachment_urls` and
//! `links.attachments` (a list of `{name, url}`).

use crate::config::WebConfig;
use crate::model::{Email, Payload};
use hmac::{Hmac, Mac};
use serde_json::Value as Json;
use sha2::Sha256;
use std::time::{Duration, SystemTime};

/// Builds and checks signed links. Its `Debug` shows no key.
pub struct Links {
    base: String,
    url_field: String,
    ttl: Duration,
    /// The signing key first, then the old keys that still verify.
    keys: Vec<Vec<u8>>,
}

impl std::fmt::Debug for Links {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Links").field("base", &self.base).field("keys", &self.keys.len()).finish()
    }
}

/// One link's parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signed {
    pub exp: u64,
    pub sig: String,
}

impl Signed {
    /// `exp=...&sig=...`.
    pub fn query(&self) -> String {
        format!("exp={}&sig={}", self.exp, self.sig)
    }
}

impl Links {
    /// The links of `[web]`, when it has a `public_url` and a `link_key` (validation makes
    /// sure one does not come without the other).
    pub fn from_config(web: &WebConfig) -> Option<Links> {
        let base = web.public_url.as_deref()?.trim_end_matches('/').to_string();
        let key = web.link_key.as_ref()?;
        let keys = std::iter::once(key).chain(&web.old_link_keys).map(|k| k.expose().as_bytes().to_vec()).collect();
        Some(Links { base, url_field: web.url_field.clone(), ttl: web.link_ttl, keys })
    }

    /// For tests and tools: links on `base` signed with `key`, then verified with `old` too.
    pub fn new(base: &str, key: &[u8], old: &[&[u8]], ttl: Duration) -> Links {
        let keys = std::iter::once(key).chain(old.iter().copied()).map(<[u8]>::to_vec).collect();
        Links { base: base.trim_end_matches('/').to_string(), url_field: "url".into(), ttl, keys }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    pub fn url_field(&self) -> &str {
        &self.url_field
    }

    /// When links to message `id` expire: `link_ttl` after the time in its ULID (after now
    /// for an id that is not one).
    pub fn expiry(&self, id: &str) -> u64 {
        let received = ulid::Ulid::from_string(id).map(|u| u.datetime()).unwrap_or_else(|_| SystemTime::now());
        unix(received + self.ttl)
    }

    /// The signature of `resource` until `exp`.
    pub fn sign(&self, resource: &str, exp: u64) -> Signed {
        use base64::Engine;
        let mac = mac(&self.keys[0], resource, exp);
        Signed { exp, sig: base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes()) }
    }

    /// Whether `sig` signs `resource` until `exp`, with the key or an old one, and `exp` is
    /// not past `now`. Takes the same time whichever part is wrong.
    pub fn verify(&self, resource: &str, exp: &str, sig: &str, now: SystemTime) -> bool {
        use base64::Engine;
        let Ok(exp) = exp.parse::<u64>() else { return false };
        let Ok(tag) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(sig) else { return false };
        let mut good = false;
        for key in &self.keys {
            good |= mac(key, resource, exp).verify_slice(&tag).is_ok();
        }
        good && exp >= unix(now)
    }

    /// The resource of message `id`'s page.
    pub fn message_resource(id: &str) -> String {
        format!("m/{id}")
    }

    /// The resource of attachment `n` of message `id`.
    pub fn attachment_resource(id: &str, n: usize) -> String {
        format!("m/{id}/a/{n}")
    }

    /// The link to message `id`'s page.
    pub fn message(&self, id: &str) -> String {
        let resource = Links::message_resource(id);
        format!("{}/{resource}?{}", self.base, self.sign(&resource, self.expiry(id)).query())
    }

    /// The link to attachment `n` of message `id`.
    pub fn attachment(&self, id: &str, n: usize) -> String {
        let resource = Links::attachment_resource(id, n);
        format!("{}/{resource}?{}", self.base, self.sign(&resource, self.expiry(id)).query())
    }

    /// The attachments `attachments` names (`(index, name)`), with their links.
    pub fn attachments<'e>(&self, id: &str, email: &'e Email) -> Vec<(&'e str, String)> {
        email
            .attachments
            .iter()
            .enumerate()
            .filter(|(_, a)| !a.name.is_empty())
            .map(|(n, a)| (a.name.as_str(), self.attachment(id, n)))
            .collect()
    }

    /// `payload` with the links added: the page's under `url_field` when it has no such key,
    /// and, for a `default` payload, `attachmentUrls`. A payload that cannot be read back as
    /// an object is left as it is.
    pub fn augment(&self, payload: Payload, id: &str, email: &Email, default: bool) -> Payload {
        let has_url = payload.has_key(&self.url_field);
        if has_url && !default {
            return payload;
        }
        let Some(mut map) = payload.to_map() else { return payload };
        if !has_url {
            map.insert(self.url_field.clone(), Json::String(self.message(id)));
        }
        if default {
            let urls: Vec<String> = self.attachments(id, email).into_iter().map(|(_, u)| u).collect();
            map.insert("attachmentUrls".into(), Json::String(urls.join(", ")));
        }
        Payload::of(&map)
    }
}

fn mac(key: &[u8], resource: &str, exp: u64) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes a key of any length");
    mac.update(b"mailhook-link-v1|");
    mac.update(resource.as_bytes());
    mac.update(b"|");
    mac.update(exp.to_string().as_bytes());
    mac
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs()
}

/// `links` as rules templates see it: `url`, `attachment_urls` (comma-joined) and
/// `attachments` (`{name, url}` each); empty strings and an empty list without
/// `[web] public_url`.
pub fn template_json(links: Option<&Links>, id: &str, email: &Email) -> Json {
    let (url, attachments) = links.map_or((String::new(), Vec::new()), |l| (l.message(id), l.attachments(id, email)));
    let joined = attachments.iter().map(|(_, u)| u.as_str()).collect::<Vec<_>>().join(", ");
    let list: Vec<Json> =
        attachments.into_iter().map(|(name, url)| serde_json::json!({"name": name, "url": url})).collect();
    serde_json::json!({"url": url, "attachment_urls": joined, "attachments": list})
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Attachment;

    const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";
    const OLD: &[u8] = b"the-key-before-the-last-rotation!";
    const ID: &str = "01KBXV6Y8Q9W3F0ZJ4M2N5P7RS";

    fn parts(url: &str) -> (String, String, String) {
        let (path, query) = url.split_once('?').unwrap();
        let mut exp = String::new();
        let mut sig = String::new();
        for (k, v) in form_urlencoded::parse(query.as_bytes()) {
            match &*k {
                "exp" => exp = v.into_owned(),
                "sig" => sig = v.into_owned(),
                _ => panic!("unexpected {k}"),
            }
        }
        (path.to_string(), exp, sig)
    }

    #[test]
    fn a_link_is_the_hmac_of_its_resource_and_expiry() {
        let links = Links::new("https://mailhook.example.com/", KEY, &[], Duration::from_secs(90 * 86400));
        let url = links.message(ID);
        let (path, exp, sig) = parts(&url);
        assert_eq!(path, format!("https://mailhook.example.com/m/{ID}"));
        let received = ulid::Ulid::from_string(ID).unwrap().datetime();
        assert_eq!(exp.parse::<u64>().unwrap(), unix(received) + 90 * 86400);
        // The formula of the module's documentation, computed with another HMAC implementation.
        let tag = ring::hmac::sign(
            &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, KEY),
            format!("mailhook-link-v1|m/{ID}|{exp}").as_bytes(),
        );
        use base64::Engine;
        assert_eq!(sig, base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(tag.as_ref()));
    }

    #[test]
    fn forged_expired_other_resource_and_rotated_out_all_fail() {
        let now = SystemTime::now();
        let signer = Links::new("https://h.example", KEY, &[], Duration::from_secs(3600));
        let resource = Links::message_resource(ID);
        let exp = unix(now) + 60;
        let good = signer.sign(&resource, exp);
        assert!(signer.verify(&resource, &exp.to_string(), &good.sig, now));
        // Forged: another signature, another expiry, another resource.
        let mut forged = good.sig.clone();
        forged.replace_range(0..1, if forged.starts_with('A') { "B" } else { "A" });
        assert!(!signer.verify(&resource, &exp.to_string(), &forged, now));
        assert!(!signer.verify(&resource, &(exp + 1).to_string(), &good.sig, now));
        assert!(!signer.verify(&Links::attachment_resource(ID, 0), &exp.to_string(), &good.sig, now));
        assert!(!signer.verify(&resource, "", "", now));
        // Expired.
        assert!(!signer.verify(&resource, &exp.to_string(), &good.sig, now + Duration::from_secs(61)));
        // Rotated: the new key with the old one still listed accepts it; once the old key is
        // dropped from the list, it is refused.
        let rotated = Links::new("https://h.example", OLD, &[KEY], Duration::from_secs(3600));
        assert!(rotated.verify(&resource, &exp.to_string(), &good.sig, now));
        let dropped = Links::new("https://h.example", OLD, &[], Duration::from_secs(3600));
        assert!(!dropped.verify(&resource, &exp.to_string(), &good.sig, now));
    }

    #[test]
    fn augment_adds_url_and_attachment_urls() {
        let links = Links::new("https://h.example", KEY, &[], Duration::from_secs(3600));
        let email = Email {
            attachments: vec![
                Attachment { name: "a.pdf".into(), content_type: "application/pdf".into(), size: 1, message: None },
                Attachment { name: "".into(), content_type: "text/plain".into(), size: 1, message: None },
                Attachment { name: "b.csv".into(), content_type: "text/csv".into(), size: 1, message: None },
            ],
            ..Email::default()
        };
        let default = Payload::of(&serde_json::json!({"id": ID, "attachments": "a.pdf, b.csv"}));
        let got = links.augment(default, ID, &email, true).to_json();
        assert_eq!(got["url"], links.message(ID));
        assert_eq!(got["attachmentUrls"], format!("{}, {}", links.attachment(ID, 0), links.attachment(ID, 2)));
        let custom = Payload::of(&serde_json::json!({"url": "mine"}));
        assert_eq!(links.augment(custom, ID, &email, false).to_json(), serde_json::json!({"url": "mine"}));
    }
}
