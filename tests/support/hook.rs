//! [`HookServer`]: a local HTTP server that answers like Kustomer's inbound web/form hooks.
//!
//! Any path is accepted (`/v1/hooks/web/HASH`, `/v1/hooks/form/ORG/HASH`, `/hook`, …). How a
//! request is answered, first rule that applies:
//!
//! 1. `set_down(true)` → 503 for every request;
//! 2. a queued scripted response (`push_status`, `push_429`, `push_response`), used once;
//! 3. a method other than POST → 405;
//! 4. with a token configured, a missing or wrong `Authorization: Bearer <token>` → 401;
//! 5. a body over `max_body` bytes (400 000 by default, like Kustomer) → 413;
//! 6. a body that is not a JSON object → 400;
//! 7. otherwise 200 with `{"ok":true}`.
//!
//! Every request is recorded (rejected ones too) before it is answered, so once a client has
//! seen the answer the record is there. `set_delay` holds the answer back after recording, which
//! also lets a test see a request the client gave up on (timeout) and then retried.

use super::{Background, poll_until, poll_until_async};
use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::Response;
use serde_json::Value;
use std::collections::VecDeque;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Bodies longer than this are not even read into memory (answered 413, `body_len` = 0).
const HARD_BODY_CAP: usize = 64 * 1024 * 1024;

/// The `x-ratelimit-limit` value sent with scripted 429s (Kustomer's hook budget per minute).
pub const RATE_LIMIT: u32 = 1000;

#[derive(Debug, Clone)]
pub struct HookOptions {
    /// When set, every request must carry `Authorization: Bearer <token>` (else 401).
    pub token: Option<String>,
    /// Largest accepted body in bytes; one byte more is answered 413.
    pub max_body: usize,
}

impl Default for HookOptions {
    fn default() -> Self {
        HookOptions { token: None, max_body: 400_000 }
    }
}

/// A one-off answer queued with [`HookServer::push_response`].
#[derive(Debug, Clone)]
pub struct Scripted {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Scripted {
    /// An answer with `status` and the server's usual JSON body for that status.
    pub fn status(status: u16) -> Scripted {
        Scripted { status, headers: Vec::new(), body: default_body(status) }
    }

    pub fn header(mut self, name: &str, value: impl ToString) -> Scripted {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }
}

/// One request as the server saw it.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// When the request (head and body) had arrived.
    pub at: Instant,
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    /// The status the server answered with.
    pub status: u16,
    pub authorization: Option<String>,
    pub idempotency_key: Option<String>,
    pub content_type: Option<String>,
    pub user_agent: Option<String>,
    /// Every header, names in lower case, in arrival order.
    pub headers: Vec<(String, String)>,
    pub body_len: usize,
    pub body: Vec<u8>,
    /// The body parsed as JSON, when it is JSON (of any shape).
    pub json: Option<Value>,
}

impl Recorded {
    /// First value of header `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    pub fn is_accepted(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// A one-line summary, used in panic messages.
    pub fn summary(&self) -> String {
        let id = self.json.as_ref().and_then(|j| j.get("id")).map(|v| v.to_string()).unwrap_or_else(|| "-".into());
        format!(
            "{} {} -> {} (idempotency-key {:?}, payload id {}, {} bytes)",
            self.method, self.path, self.status, self.idempotency_key, id, self.body_len
        )
    }
}

struct Shared {
    opts: HookOptions,
    log: Mutex<Vec<Recorded>>,
    script: Mutex<VecDeque<Scripted>>,
    down: AtomicBool,
    delay: Mutex<Duration>,
}

/// A stand-in for Kustomer's inbound hooks on `127.0.0.1:<ephemeral port>`; stops when dropped.
pub struct HookServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    _background: Background,
}

impl HookServer {
    pub fn start(opts: HookOptions) -> HookServer {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind hook server on 127.0.0.1:0");
        let addr = listener.local_addr().expect("hook server address");
        let shared = Arc::new(Shared {
            opts,
            log: Mutex::new(Vec::new()),
            script: Mutex::new(VecDeque::new()),
            down: AtomicBool::new(false),
            delay: Mutex::new(Duration::ZERO),
        });
        let app = Router::new().fallback(handle).with_state(shared.clone());
        let background = Background::spawn(format!("hook-server-{}", addr.port()), listener, move |l| async move {
            let _ = axum::serve(l, app).await;
        });
        HookServer { addr, shared, _background: background }
    }

    /// A server with default options and `Authorization: Bearer <token>` required.
    pub fn with_token(token: &str) -> HookServer {
        HookServer::start(HookOptions { token: Some(token.to_string()), ..HookOptions::default() })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `http://127.0.0.1:PORT/path` (a missing leading `/` is added).
    pub fn url(&self, path: &str) -> String {
        if path.starts_with('/') {
            format!("{}{}", self.base_url(), path)
        } else {
            format!("{}/{}", self.base_url(), path)
        }
    }

    /// Queues a one-off answer with `status` for the next request (after those already queued).
    pub fn push_status(&self, status: u16) {
        self.push_response(Scripted::status(status));
    }

    /// Queues a one-off 429 carrying `Retry-After: N`, `x-ratelimit-limit: 1000`,
    /// `x-ratelimit-remaining: 0` and `x-ratelimit-reset: N` (seconds until the window resets).
    pub fn push_429(&self, retry_after_secs: u64) {
        self.push_response(
            Scripted::status(429)
                .header("retry-after", retry_after_secs)
                .header("x-ratelimit-limit", RATE_LIMIT)
                .header("x-ratelimit-remaining", 0)
                .header("x-ratelimit-reset", retry_after_secs),
        );
    }

    /// Queues any one-off answer (status, extra headers, body).
    pub fn push_response(&self, response: Scripted) {
        self.shared.script.lock().unwrap().push_back(response);
    }

    /// While `down`, every request is answered 503 (queued answers wait until it is back up).
    pub fn set_down(&self, down: bool) {
        self.shared.down.store(down, Ordering::SeqCst);
    }

    /// Holds every answer back by `delay` (after the request is recorded). `Duration::ZERO` turns it off.
    pub fn set_delay(&self, delay: Duration) {
        *self.shared.delay.lock().unwrap() = delay;
    }

    /// Every request so far, in arrival order, rejected ones included.
    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.log.lock().unwrap().clone()
    }

    /// The requests answered with a 2xx status.
    pub fn accepted(&self) -> Vec<Recorded> {
        self.requests().into_iter().filter(Recorded::is_accepted).collect()
    }

    /// Forgets every recorded request (queued answers, down and delay are kept).
    pub fn clear(&self) {
        self.shared.log.lock().unwrap().clear();
    }

    /// Waits (blocking this thread) until at least `n` requests were accepted; returns them all.
    /// Panics after `timeout`, listing every request that did arrive.
    pub fn wait_for_accepted(&self, n: usize, timeout: Duration) -> Vec<Recorded> {
        poll_until(timeout, || self.accepted_if(n)).unwrap_or_else(|| self.fail_wait("accepted", n, timeout))
    }

    /// Like [`HookServer::wait_for_accepted`], but yields to the caller's tokio runtime while waiting.
    pub async fn wait_for_accepted_async(&self, n: usize, timeout: Duration) -> Vec<Recorded> {
        match poll_until_async(timeout, || self.accepted_if(n)).await {
            Some(v) => v,
            None => self.fail_wait("accepted", n, timeout),
        }
    }

    /// Waits (blocking) until at least `n` requests arrived, whatever they were answered.
    pub fn wait_for_requests(&self, n: usize, timeout: Duration) -> Vec<Recorded> {
        poll_until(timeout, || {
            let all = self.requests();
            (all.len() >= n).then_some(all)
        })
        .unwrap_or_else(|| self.fail_wait("received", n, timeout))
    }

    fn accepted_if(&self, n: usize) -> Option<Vec<Recorded>> {
        let accepted = self.accepted();
        (accepted.len() >= n).then_some(accepted)
    }

    fn fail_wait(&self, what: &str, n: usize, timeout: Duration) -> ! {
        let all = self.requests();
        let mut msg = format!(
            "hook server {}: expected {n} request(s) {what} within {timeout:?}; {} arrived:",
            self.addr,
            all.len()
        );
        for (i, r) in all.iter().enumerate() {
            let _ = write!(msg, "\n  #{i}: {}", r.summary());
        }
        panic!("{msg}");
    }
}

fn reason(status: u16) -> &'static str {
    StatusCode::from_u16(status).ok().and_then(|s| s.canonical_reason()).unwrap_or("Error")
}

fn default_body(status: u16) -> String {
    if (200..300).contains(&status) {
        r#"{"ok":true}"#.to_string()
    } else {
        serde_json::json!({"errors": [{"status": status, "title": reason(status)}]}).to_string()
    }
}

fn header_string(headers: &HeaderMap, name: header::HeaderName) -> Option<String> {
    headers.get(name).map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
}

fn bearer_ok(headers: &HeaderMap, token: &str) -> bool {
    let Some(value) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    match value.split_once(' ') {
        Some((scheme, given)) => scheme.eq_ignore_ascii_case("bearer") && given.trim() == token,
        None => false,
    }
}

async fn handle(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let bytes = axum::body::to_bytes(body, HARD_BODY_CAP).await.ok();
    let at = Instant::now();
    let body_len = bytes.as_ref().map_or(0, |b| b.len());
    let json: Option<Value> = bytes.as_ref().and_then(|b| serde_json::from_slice(b).ok());

    let answer = if shared.down.load(Ordering::SeqCst) {
        Scripted::status(503)
    } else if let Some(scripted) = shared.script.lock().unwrap().pop_front() {
        scripted
    } else if parts.method != Method::POST {
        Scripted::status(405).header("allow", "POST")
    } else if let Some(token) = &shared.opts.token
        && !bearer_ok(&parts.headers, token)
    {
        Scripted::status(401)
    } else if bytes.is_none() || body_len > shared.opts.max_body {
        Scripted::status(413)
    } else if !matches!(json, Some(Value::Object(_))) {
        Scripted::status(400)
    } else {
        Scripted::status(200)
    };

    let recorded = Recorded {
        at,
        method: parts.method.to_string(),
        path: parts.uri.path().to_string(),
        query: parts.uri.query().map(str::to_string),
        status: answer.status,
        authorization: header_string(&parts.headers, header::AUTHORIZATION),
        idempotency_key: header_string(&parts.headers, header::HeaderName::from_static("idempotency-key")),
        content_type: header_string(&parts.headers, header::CONTENT_TYPE),
        user_agent: header_string(&parts.headers, header::USER_AGENT),
        headers: parts
            .headers
            .iter()
            .map(|(n, v)| (n.as_str().to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
            .collect(),
        body_len,
        body: bytes.map(|b| b.to_vec()).unwrap_or_default(),
        json,
    };
    shared.log.lock().unwrap().push(recorded);

    let delay = *shared.delay.lock().unwrap();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }

    let mut response =
        Response::builder().status(answer.status).header(header::CONTENT_TYPE, "application/json; charset=utf-8");
    for (name, value) in &answer.headers {
        response = response.header(name.as_str(), value.as_str());
    }
    response.body(Body::from(answer.body)).unwrap_or_else(|e| {
        Response::builder().status(500).body(Body::from(format!("bad scripted response: {e}"))).unwrap()
    })
}
