//! The email-hook destination through a relay that speaks STARTTLS and AUTH: mailhook's own
//! SMTP listener plays the relay (a certificate for `localhost` from a test CA that only the
//! sender's `ca_file` trusts).

mod support;

use std::time::Duration;
use support::gateway::{Gateway, message};

const WAIT: Duration = Duration::from_secs(20);

#[test]
fn email_hook_uses_starttls_with_an_extra_ca_and_auth() {
    // The relay: TLS with a self-signed certificate, AUTH required; it keeps what it receives
    // as dead letters (no rule matches) so the test can read the mail back from its spool.
    let mut relay = Gateway::new(
        "[rules]\ndir = \"rules\"\nunmatched = \"dead\"\n\
         [smtp]\nlisten = [\"127.0.0.1:0\"]\nhostname = \"localhost\"\n\
         tls = { cert = \"cert.pem\", key = \"key.pem\" }\nauth = { users = { hookrelay = \"${RELAY_PASSWORD}\" }, required = true }\n",
        "[[rule]]\nname = \"never\"\nto = []\n[rule.when]\nsubject = '^never$'\n",
    )
    .env("RELAY_PASSWORD", "relay-secret-42");
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    std::fs::write(relay.path().join("cert.pem"), cert.cert.pem()).unwrap();
    std::fs::write(relay.path().join("key.pem"), cert.signing_key.serialize_pem()).unwrap();
    relay.start();
    let addr = relay.listening("smtp");

    let config = format!(
        "[delivery]\ntimeout = \"5s\"\nbackoff = {{ initial = \"200ms\", max = \"500ms\" }}\nrate = \"off\"\n\
         [destination.mail]\ntype = \"kustomer-email-hook\"\naddress = \"abc@hooks.kustomerapp.com\"\nkey = \"${{EMAIL_KEY}}\"\n\
         relay = \"smtp://localhost:{}\"\nfrom = \"mailhook@example.com\"\nusername = \"hookrelay\"\npassword = \"${{RELAY_PASSWORD}}\"\n\
         ca_file = \"relay-ca.pem\"\n",
        addr.port()
    );
    let mut gw = Gateway::new(&config, "[[rule]]\nname = \"all\"\nto = [\"mail\"]\n")
        .env("EMAIL_KEY", "the-hook-key")
        .env("RELAY_PASSWORD", "relay-secret-42");
    std::fs::write(gw.path().join("relay-ca.pem"), cert.cert.pem()).unwrap();
    let id = gw.ingest(&message(1, "over tls"));
    gw.start();
    gw.wait_queue(WAIT, "the message sent", |q| q.is_empty());

    let q = relay.wait_queue(WAIT, "the relay to hold the mail", |q| q.len() == 1);
    let relayed = q[0]["id"].as_str().unwrap().to_string();
    let show = relay.run(&["queue", "show", "--json", "--config", "mailhook.toml", &relayed]);
    let shown: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
    let envelope = &shown["meta"]["envelope"];
    assert_eq!(envelope["tls"], true, "the relay was reached over STARTTLS: {shown}");
    assert_eq!(envelope["auth_user"], "hookrelay");
    assert_eq!(envelope["recipients"], serde_json::json!(["abc@hooks.kustomerapp.com"]));
    let raw = relay.raw_message(&relayed);
    let (key, payload) = support::smtp::json_ld(&raw).expect("JSON-LD in the relayed mail");
    assert_eq!(key, "the-hook-key");
    assert_eq!(payload["id"], id.as_str());
    assert!(!gw.logs().contains("relay-secret-42") && !relay.logs().contains("relay-secret-42"));
}

#[test]
fn email_hook_refuses_a_relay_certificate_it_does_not_trust() {
    let mut relay = Gateway::new(
        "[rules]\ndir = \"rules\"\nunmatched = \"dead\"\n[smtp]\nlisten = [\"127.0.0.1:0\"]\nhostname = \"localhost\"\n\
         tls = { cert = \"cert.pem\", key = \"key.pem\" }\n",
        "[[rule]]\nname = \"never\"\nto = []\n[rule.when]\nsubject = '^never$'\n",
    );
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    std::fs::write(relay.path().join("cert.pem"), cert.cert.pem()).unwrap();
    std::fs::write(relay.path().join("key.pem"), cert.signing_key.serialize_pem()).unwrap();
    relay.start();
    let addr = relay.listening("smtp");
    // No ca_file: the self-signed certificate is not trusted, so nothing may be sent in the clear.
    let config = format!(
        "[delivery]\ntimeout = \"5s\"\nretry_for = \"1h\"\nbackoff = {{ initial = \"200ms\", max = \"500ms\" }}\nrate = \"off\"\n\
         [destination.mail]\ntype = \"kustomer-email-hook\"\naddress = \"abc@hooks.kustomerapp.com\"\nkey = \"k\"\n\
         relay = \"smtp://localhost:{}\"\nfrom = \"mailhook@example.com\"\n",
        addr.port()
    );
    let mut gw = Gateway::new(&config, "[[rule]]\nname = \"all\"\nto = [\"mail\"]\n");
    gw.ingest(&message(1, "untrusted"));
    gw.start();
    let q = gw.wait_queue(WAIT, "a deferred delivery", |q| {
        q.len() == 1 && q[0]["state"] == "deferred" && q[0]["last_error"].as_str().is_some()
    });
    let err = q[0]["last_error"].as_str().unwrap();
    assert!(err.contains("mail: relay"), "{err}");
    std::thread::sleep(Duration::from_millis(500));
    assert!(relay.queue().is_empty(), "nothing reached the relay");
}
