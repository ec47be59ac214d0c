//! Standard Webhooks signatures for `webhook` destinations with `signing_secret`.
//!
//! Each request carries `webhook-id` (the spool id, the same on every retry),
//! `webhook-timestamp` (Unix seconds of this attempt) and `webhook-signature`:
//! `v1,<base64 of HMAC-SHA256(key, "{id}.{timestamp}.{body}")>`, one entry per configured
//! secret, separated by spaces, so a receiver can rotate its secret without a gap. The key is
//! the base64-decoded part of `whsec_<base64>`.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The keys of a destination's signing secrets, decoded at start-up.
#[derive(Clone, Default)]
pub struct Signer {
    keys: Vec<Vec<u8>>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Signer({} keys)", self.keys.len())
    }
}

impl Signer {
    pub fn new(keys: Vec<Vec<u8>>) -> Signer {
        Signer { keys }
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The `webhook-signature` value for message `id` sent at `timestamp` (Unix seconds).
    pub fn signature(&self, id: &str, timestamp: u64, body: &[u8]) -> String {
        use base64::Engine;
        let mut out = String::new();
        for key in &self.keys {
            let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes a key of any length");
            mac.update(id.as_bytes());
            mac.update(b".");
            mac.update(timestamp.to_string().as_bytes());
            mac.update(b".");
            mac.update(body);
            if !out.is_empty() {
                out.push(' ');
            }
            out.push_str("v1,");
            out.push_str(&base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes()));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Secret, signing_key};

    /// The example of the Standard Webhooks specification (its reference libraries test it).
    #[test]
    fn published_example_vector() {
        let key = signing_key(&Secret::new("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")).unwrap();
        let signer = Signer::new(vec![key]);
        assert_eq!(
            signer.signature("msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, br#"{"test": 2432232314}"#),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn one_entry_per_secret_in_order() {
        let a = signing_key(&Secret::new("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")).unwrap();
        let b = signing_key(&Secret::new("whsec_c2VjcmV0LW9mLWEtcm90YXRlZC1lbmRwb2ludA==")).unwrap();
        let both =
            Signer::new(vec![a, b]).signature("msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, br#"{"test": 2432232314}"#);
        let entries: Vec<&str> = both.split(' ').collect();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0], "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
        assert!(entries[1].starts_with("v1,") && entries[1] != entries[0]);
    }

    #[test]
    fn secrets_are_checked_without_being_shown() {
        use crate::config::SigningSecretError;
        assert_eq!(signing_key(&Secret::new("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")), Err(SigningSecretError::Prefix));
        assert_eq!(signing_key(&Secret::new("whsec_not base64!")), Err(SigningSecretError::Base64));
        assert_eq!(signing_key(&Secret::new("whsec_c2hvcnQ=")), Err(SigningSecretError::Short(5)));
    }
}
