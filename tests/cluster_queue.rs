//! The shared queue with real `mailhook serve` processes on one PostgreSQL (a private cluster,
//! see `tests/support/postgres.rs`): mail sent over SMTP to three instances is all delivered,
//! once each; an instance `kill -9`'d while it holds claims has its messages delivered by
//! another once its lease has passed, with the same `Idempotency-Key`; `/healthz` and
//! `/metrics` show the claims an instance holds.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use support::gateway::{Gateway, http_get, message};
use support::hook::{HookOptions, HookServer};
use support::postgres::{PASSWORD, Postgres};
use support::smtp_client::send_message;
use support::wait_for;

/// The lease of these tests: renewed every 667 ms.
const LEASE: &str = "2s";

/// An instance of the cluster on `db` with an SMTP listener and the admin endpoint, delivering
/// to `hook`.
fn instance(pg: &Postgres, db: &str, hook: &HookServer) -> Gateway {
    let config = format!(
        "[cluster]\npostgres = \"{}\"\nlease = \"{LEASE}\"\n\n\
         [smtp]\nlisten = [\"127.0.0.1:0\"]\nrecipients = ['@example\\.com$']\n\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [delivery]\nbackoff = {{ initial = \"200ms\", max = \"500ms\" }}\nrate = \"off\"\n\n\
         [destination.hook]\ntype = \"webhook\"\nurl = \"{}\"\n",
        pg.url_with(db, "${PGPASS}"),
        hook.url("/hook"),
    );
    Gateway::new(&config, "[[rule]]\nname = \"all\"\nto = [\"hook\"]\n").env("PGPASS", PASSWORD)
}

/// The `Idempotency-Key` of every accepted request, by the payload's `id`.
fn keys_by_id(hook: &HookServer) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for r in hook.accepted() {
        let id = r.json.as_ref().and_then(|j| j["id"].as_str()).expect("a payload id").to_string();
        out.entry(id).or_default().push(r.idempotency_key.clone().unwrap_or_default());
    }
    out
}

#[test]
fn three_instances_deliver_everything_and_take_over_a_killed_ones_claims() {
    let pg = Postgres::shared();
    let db = pg.database();
    let hook = HookServer::start(HookOptions::default());
    let mut gws: Vec<Gateway> = (0..3).map(|_| instance(pg, &db, &hook)).collect();
    let mut smtp = Vec::new();
    let mut admin = Vec::new();
    for gw in &mut gws {
        gw.start();
        smtp.push(gw.listening("smtp"));
        admin.push(gw.listening("admin"));
    }

    // Round-robin: every message delivered, once, under its own id.
    let ids: Vec<String> = (0..30).map(|n| send_message(smtp[n % 3], &message(n, "round robin"))).collect();
    wait_for("30 deliveries", Duration::from_secs(30), || keys_by_id(&hook).len() == 30);
    std::thread::sleep(Duration::from_millis(500));
    let keys = keys_by_id(&hook);
    for id in &ids {
        assert_eq!(keys.get(id), Some(&vec![id.clone()]), "{id}: delivered once, its id as the key");
    }
    assert_eq!(pg.sql(&db, "SELECT count(*) FROM queue"), "0");

    // The hook holds its answers: the first instance's rounds hold their claims.
    hook.clear();
    hook.set_delay(Duration::from_secs(8));
    let held: Vec<String> = (0..5).map(|n| send_message(smtp[0], &message(100 + n, "held"))).collect();
    wait_for("the held requests", Duration::from_secs(10), || hook.requests().len() == 5);
    let health: serde_json::Value = {
        std::thread::sleep(Duration::from_secs(1)); // a heartbeat counts the claims
        let (status, _, body) = http_get(admin[0], "/healthz", None);
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    };
    let holder = health["cluster"]["instance"].as_str().unwrap().to_string();
    assert_eq!(health["cluster"]["claims"], 5, "{health}");
    let (_, _, metrics) = http_get(admin[0], "/metrics", None);
    assert!(metrics.contains("mailhook_cluster_claims 5"), "{metrics}");
    assert_eq!(pg.sql(&db, &format!("SELECT count(*) FROM queue WHERE lease_owner = '{holder}'")), "5");

    // kill -9 while its rounds wait: another instance delivers them once the lease has passed.
    gws[0].kill9();
    hook.set_delay(Duration::ZERO);
    let killed_at = Instant::now();
    wait_for("the taken-over deliveries", Duration::from_secs(30), || {
        let keys = keys_by_id(&hook);
        held.iter().all(|id| keys.get(id).is_some_and(|k| k.len() >= 2))
    });
    assert!(killed_at.elapsed() >= Duration::from_secs(1), "taken over before the lease passed");
    for (id, keys) in keys_by_id(&hook) {
        assert!(held.contains(&id), "{id} was not held");
        assert!(keys.iter().all(|k| *k == id), "{id}: every delivery carries its id as the key: {keys:?}");
    }
    wait_for("an empty queue", Duration::from_secs(10), || pg.sql(&db, "SELECT count(*) FROM queue") == "0");
    for gw in &mut gws[1..] {
        assert_eq!(gw.stop(), 0, "{}", gw.logs());
    }
}
