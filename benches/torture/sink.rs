//! [`Sink`]: the webhook the torture scenarios deliver to. A small, fast HTTP server on a
//! loopback port that it keeps for its whole life, so it can go away (the port refuses
//! connections, open connections are cut) and come back on the same port, as a real receiver
//! that restarts does. While up it answers every request according to its [`Mode`]:
//!
//! - [`Mode::Accept`]: `200 {"ok":true}`;
//! - [`Mode::TooMany`]: `429` with `Retry-After: N` (and Kustomer's `x-ratelimit-*` headers);
//! - [`Mode::Slow`]: the request is taken (recorded as delivered: the receiver has done its
//!   work) and answered `200` only after a delay; a sender that gives up before then does not
//!   know it was taken.
//!
//! Every request taken is recorded as a [`Seen`]: the payload's `id`, the `Idempotency-Key`
//! header, and the sequence number of the test message (the last word of its subject).

use crate::support::Background;
use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use serde_json::Value;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How the sink answers while it is up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Accept,
    TooMany { retry_after_secs: u64 },
    Slow(Duration),
}

/// One delivery that reached a destination.
#[derive(Debug, Clone)]
pub struct Seen {
    /// The test message's sequence number (last word of the subject), if it has one.
    pub seq: Option<u64>,
    /// The payload's `id` (the spool id).
    pub id: String,
    /// The `Idempotency-Key` header, for HTTP.
    pub key: Option<String>,
    pub at: Instant,
}

impl Seen {
    /// Reads a default payload (`id`, `subject`).
    pub fn from_payload(payload: &Value, key: Option<String>, at: Instant) -> Seen {
        let subject = payload["subject"].as_str().unwrap_or_default();
        Seen {
            seq: subject.rsplit(' ').next().and_then(|s| s.parse().ok()),
            id: payload["id"].as_str().unwrap_or_default().to_string(),
            key,
            at,
        }
    }
}

#[derive(Default)]
struct Shared {
    mode: Mutex<Option<Mode>>,
    seen: Mutex<Vec<Seen>>,
    seqs: Mutex<HashSet<u64>>,
    /// When each 429 was answered.
    too_many: Mutex<Vec<Instant>>,
    requests: AtomicUsize,
}

pub struct Sink {
    addr: SocketAddr,
    shared: Arc<Shared>,
    server: Option<Background>,
}

impl Sink {
    /// Starts accepting on `127.0.0.1:<free port>`.
    pub fn start() -> Sink {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the sink on 127.0.0.1:0");
        let addr = listener.local_addr().expect("sink address");
        let shared = Arc::new(Shared::default());
        *shared.mode.lock().unwrap() = Some(Mode::Accept);
        let mut sink = Sink { addr, shared, server: None };
        sink.serve(listener);
        sink
    }

    fn serve(&mut self, listener: std::net::TcpListener) {
        let app = Router::new().fallback(handle).with_state(self.shared.clone());
        self.server = Some(Background::spawn(format!("sink-{}", self.addr.port()), listener, move |l| async move {
            let _ = axum::serve(l, app).await;
        }));
    }

    /// The URL to configure as the destination.
    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    /// Goes away: the listener closes (connections are refused) and every open connection is cut.
    pub fn stop(&mut self) {
        self.server = None;
    }

    /// Comes back on the same port.
    pub fn resume(&mut self) {
        assert!(self.server.is_none(), "the sink is already up");
        let deadline = Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match std::net::TcpListener::bind(self.addr) {
                Ok(l) => break l,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("    sink: cannot bind {} again yet ({e}); retrying", self.addr);
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!("the sink cannot bind {} again: {e}", self.addr),
            }
        };
        self.serve(listener);
    }

    pub fn set_mode(&self, mode: Mode) {
        *self.shared.mode.lock().unwrap() = Some(mode);
    }

    /// Every delivery taken so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.shared.seen.lock().unwrap().clone()
    }

    /// Whether every one of `seqs` has been delivered at least once.
    pub fn has_all(&self, seqs: &HashSet<u64>) -> bool {
        let got = self.shared.seqs.lock().unwrap();
        seqs.iter().all(|s| got.contains(s))
    }

    /// How many distinct messages were delivered.
    pub fn distinct(&self) -> usize {
        self.shared.seqs.lock().unwrap().len()
    }

    /// When each 429 was answered.
    pub fn too_many(&self) -> Vec<Instant> {
        self.shared.too_many.lock().unwrap().clone()
    }

    /// Requests of any kind so far.
    pub fn requests(&self) -> usize {
        self.shared.requests.load(Ordering::SeqCst)
    }
}

async fn handle(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let bytes = axum::body::to_bytes(body, 4 << 20).await.unwrap_or_default();
    shared.requests.fetch_add(1, Ordering::SeqCst);
    let mode = shared.mode.lock().unwrap().unwrap_or(Mode::Accept);
    if let Mode::TooMany { retry_after_secs } = mode {
        shared.too_many.lock().unwrap().push(Instant::now());
        return Response::builder()
            .status(429)
            .header("retry-after", retry_after_secs)
            .header("x-ratelimit-limit", 1000)
            .header("x-ratelimit-remaining", 0)
            .header("x-ratelimit-reset", retry_after_secs)
            .body(Body::from(r#"{"errors":[{"status":429,"title":"Too Many Requests"}]}"#))
            .expect("response");
    }
    let payload: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    let key = parts.headers.get("idempotency-key").map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let seen = Seen::from_payload(&payload, key, Instant::now());
    if let Some(seq) = seen.seq {
        shared.seqs.lock().unwrap().insert(seq);
    }
    shared.seen.lock().unwrap().push(seen);
    if let Mode::Slow(delay) = mode {
        tokio::time::sleep(delay).await;
    }
    Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .body(Body::from(r#"{"ok":true}"#))
        .expect("response")
}
