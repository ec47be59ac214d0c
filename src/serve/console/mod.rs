//! console: the operator's web pages and JSON API, on the admin listener beside `/healthz` and
//! `/metrics`.
//!
//! | path | what |
//! |---|---|
//! | `GET /login`, `POST /login` (form `token`), `POST /logout` | the session (see [`auth`]) |
//! | `GET /` | overview: counts by state, messages per hour (24 h), rules and their fields, destinations, IMAP folders |
//! | `GET /messages?q=&state=&rule=&from=&to=&destination=&source=&since=&cursor=` | the archive, newest first |
//! | `GET /messages/{id}` | one message: headers, text, HTML (framed), attachments, rule, fields, payload, attempts |
//! | `GET /messages/{id}/raw`, `/html`, `/attachments/{n}` | the `.eml`; the sanitised HTML; one attachment |
//! | `POST /messages/{id}/retry\|replay\|drop` | the spool's own actions (CSRF token required) |
//! | `GET /dead`, `POST /dead` | dead letters, and an action on the ones ticked |
//! | `GET /playground`, `POST /playground` | an email through the rules, optionally with one file edited |
//! | `GET /tail`, `GET /tail/events` | the live tail (Server-Sent Events) |
//! | `GET /changes`, `GET /api/v1/changes` | rule changes: the last reload's shadow run, trial rules, drifts ([`changes`]) |
//! | `GET /drift` | the drifts in progress, each with example messages to open in the playground ([`changes`]) |
//! | `GET /api/v1/messages`, `GET /api/v1/messages/{id}`, `POST /api/v1/messages/{id}/{action}` | JSON, `Authorization: Bearer <[admin] token>` |
//!
//! Pages are rendered on the server (minijinja, templates embedded in the binary); the one
//! script and stylesheet are files of the console's own. The page handlers ask the archive,
//! the spool and the rules; they never reach into the pipeline. Retry, replay and drop are the
//! spool's own actions ([`crate::spool::actions`], [`crate::pipeline::replay`]), so they behave
//! exactly as `mailhook queue retry|drop` and `mailhook replay`.

pub mod auth;
pub mod changes;
pub mod html;
pub mod playground;

use crate::config::{Config, Secret};
use crate::metrics::Metrics;
use crate::pipeline::{Replayed, SharedRules};
use crate::rules::Unmatched;
use crate::serve::download::blocking;
use crate::serve::headers::{asset, secure};
use crate::spool::actions::{self, ActionError};
use crate::spool::{Spool, State};
use crate::store::{Archive, ArchiveState, ArchiveWriter, MessageQuery, Record, StoreError, is_id};
use auth::{Session, Sessions};
use axum::Router;
use axum::extract::{Form, Path as UrlPath, Query, RawQuery, State as Extract};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use minijinja::value::Serde;
use serde::Deserialize;
use serde_json::{Value as Json, json};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tracing::{info, warn};

const STYLE: &str = include_str!("static/console.css");
const SCRIPT: &str = include_str!("static/console.js");

/// Everything the console reads, and how it checks who asks.
pub struct Console {
    archive: Option<Arc<dyn Archive>>,
    writer: Option<ArchiveWriter>,
    spool: Spool,
    rules: SharedRules,
    unmatched: String,
    max_body: usize,
    metrics: Arc<Metrics>,
    token: Option<Secret>,
    secure_cookie: bool,
    sessions: Sessions,
    templates: minijinja::Environment<'static>,
    /// Rule changes and drift ([`changes`]), when `serve` hands them over.
    lifecycle: Option<changes::Lifecycle>,
}

impl Console {
    pub fn new(
        config: &Config,
        archive: Option<Arc<dyn Archive>>,
        writer: Option<ArchiveWriter>,
        spool: Spool,
        rules: SharedRules,
        metrics: Arc<Metrics>,
    ) -> Console {
        let mut templates = minijinja::Environment::new();
        for (name, text) in [
            ("base.html", include_str!("templates/base.html")),
            ("login.html", include_str!("templates/login.html")),
            ("overview.html", include_str!("templates/overview.html")),
            ("messages.html", include_str!("templates/messages.html")),
            ("message.html", include_str!("templates/message.html")),
            ("dead.html", include_str!("templates/dead.html")),
            ("playground.html", include_str!("templates/playground.html")),
            ("tail.html", include_str!("templates/tail.html")),
            ("error.html", include_str!("templates/error.html")),
            ("changes.html", include_str!("templates/changes.html")),
            ("drift.html", include_str!("templates/drift.html")),
        ] {
            templates.add_template(name, text).expect("the console's templates compile");
        }
        templates
            .add_filter("urlencode", |s: String| -> String { form_urlencoded::byte_serialize(s.as_bytes()).collect() });
        Console {
            archive,
            writer,
            spool,
            rules,
            unmatched: config.rules.unmatched.clone(),
            max_body: config.delivery.max_body.as_u64() as usize,
            metrics,
            token: config.admin.as_ref().and_then(|a| a.token.clone()),
            secure_cookie: false,
            sessions: Sessions::default(),
            templates,
            lifecycle: None,
        }
    }

    /// The console's routes.
    pub fn router(self) -> Router {
        let state = Arc::new(self);
        Router::new()
            .route("/", get(overview))
            .route("/login", get(login_page).post(login))
            .route("/logout", post(logout))
            .route("/messages", get(messages))
            .route("/messages/{id}", get(message))
            .route("/messages/{id}/raw", get(raw))
            .route("/messages/{id}/html", get(email_html))
            .route("/messages/{id}/attachments/{n}", get(attachment))
            .route("/messages/{id}/{action}", post(page_action))
            .route("/dead", get(dead).post(dead_action))
            .route("/playground", get(playground_page).post(playground_run))
            .route("/tail", get(tail))
            .route("/tail/events", get(tail_events))
            .route("/changes", get(changes::page))
            .route("/drift", get(changes::drift_page))
            .route("/api/v1/changes", get(changes::api))
            .route("/static/console.css", get(|| async { asset("text/css; charset=utf-8", STYLE) }))
            .route("/static/console.js", get(|| async { asset("text/javascript; charset=utf-8", SCRIPT) }))
            .route("/api/v1/messages", get(api_list))
            .route("/api/v1/messages/{id}", get(api_get))
            .route("/api/v1/messages/{id}/{action}", post(api_action))
            .layer(axum::middleware::map_response(|r| async move { secure(r, auth::PAGE_CSP) }))
            .with_state(state)
    }
}

type St = Arc<Console>;

/// Who may see a page: the session, and the cookie to set when one was opened just now.
struct Gate {
    session: Session,
    set_cookie: Option<HeaderValue>,
}

impl Console {
    /// The session of a page request; else the answer (to the login page, or 403 for a host
    /// that is not this machine when there is no token).
    fn gate(&self, headers: &HeaderMap) -> Result<Gate, Box<Response>> {
        if self.token.is_none() && !auth::loopback_host(headers) {
            let why = "this console without a token answers only to 127.0.0.1 or localhost";
            return Err(Box::new(self.error(StatusCode::FORBIDDEN, why)));
        }
        if let Some(session) = self.sessions.find(headers) {
            return Ok(Gate { session, set_cookie: None });
        }
        if self.token.is_none() {
            let session = self.sessions.open();
            let cookie = auth::set_cookie(&session, self.secure_cookie);
            return Ok(Gate { session, set_cookie: Some(cookie) });
        }
        Err(Box::new((StatusCode::SEE_OTHER, [(header::LOCATION, "/login")]).into_response()))
    }

    /// [`Console::gate`] plus the CSRF token of a state-changing form (403 without it).
    fn gate_post(&self, headers: &HeaderMap, csrf: Option<&str>) -> Result<Gate, Box<Response>> {
        let gate = match self.gate(headers) {
            Ok(g) if g.set_cookie.is_none() => g,
            // A session opened by this very POST cannot have a form token yet.
            Ok(_) => return Err(Box::new(self.error(StatusCode::FORBIDDEN, "missing or wrong CSRF token"))),
            Err(r) => return Err(r),
        };
        match csrf {
            Some(t) if auth::same_secret(t.as_bytes(), gate.session.csrf.as_bytes()) => Ok(gate),
            _ => Err(Box::new(self.error(StatusCode::FORBIDDEN, "missing or wrong CSRF token"))),
        }
    }

    /// `None` when an API request may go on; else 401 (or 403 for a cross-site POST to a
    /// console without a token).
    fn api_refuse(&self, headers: &HeaderMap, post: bool) -> Option<Response> {
        match &self.token {
            Some(token) => {
                let presented = auth::bearer(headers).unwrap_or("");
                if auth::same_secret(presented.as_bytes(), token.expose().as_bytes()) {
                    return None;
                }
                let mut r = api_error(StatusCode::UNAUTHORIZED, "send Authorization: Bearer <[admin] token>");
                r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                Some(r)
            }
            None if !auth::loopback_host(headers) => Some(api_error(
                StatusCode::FORBIDDEN,
                "this console without a token answers only to 127.0.0.1 or localhost",
            )),
            None if post && auth::cross_site(headers) => Some(api_error(StatusCode::FORBIDDEN, "cross-site request")),
            None => None,
        }
    }

    fn render(&self, gate: &Gate, status: StatusCode, template: &str, mut ctx: Json) -> Response {
        if let Some(m) = ctx.as_object_mut() {
            m.insert("csrf".into(), Json::String(gate.session.csrf.clone()));
            m.insert("login".into(), Json::Bool(self.token.is_some()));
            m.insert("archive".into(), Json::Bool(self.archive.is_some()));
        }
        let body = match self.templates.get_template(template).and_then(|t| t.render(Serde(&ctx))) {
            Ok(body) => body,
            Err(e) => {
                warn!(template, error = %e, "console page failed to render");
                return (StatusCode::INTERNAL_SERVER_ERROR, "page failed to render\n").into_response();
            }
        };
        let mut r = (status, [(header::CONTENT_TYPE, "text/html; charset=utf-8")], body).into_response();
        if let Some(c) = &gate.set_cookie {
            r.headers_mut().insert(header::SET_COOKIE, c.clone());
        }
        r
    }

    /// An error page (no session needed, nothing of the request echoed back but `message`).
    fn error(&self, status: StatusCode, message: &str) -> Response {
        let ctx = json!({"status": status.as_u16(), "message": message});
        let body = self
            .templates
            .get_template("error.html")
            .and_then(|t| t.render(Serde(&ctx)))
            .unwrap_or_else(|_| message.to_string());
        (status, [(header::CONTENT_TYPE, "text/html; charset=utf-8")], body).into_response()
    }

    fn archive(&self) -> Result<Arc<dyn Archive>, StoreError> {
        self.archive
            .clone()
            .ok_or_else(|| StoreError::Io(std::io::Error::other("the archive is off ([archive] enabled = false)")))
    }
}

fn api_error(status: StatusCode, message: &str) -> Response {
    json_response(status, json!({"error": message}))
}

fn json_response(status: StatusCode, body: Json) -> Response {
    let mut r = (status, format!("{body}\n")).into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

// ---- login ---------------------------------------------------------------------------------

async fn login_page(Extract(c): Extract<St>, headers: HeaderMap) -> Response {
    if c.token.is_none() {
        return (StatusCode::SEE_OTHER, [(header::LOCATION, "/")]).into_response();
    }
    if c.sessions.find(&headers).is_some() {
        return (StatusCode::SEE_OTHER, [(header::LOCATION, "/")]).into_response();
    }
    login_form(&c, StatusCode::OK, None)
}

fn login_form(c: &Console, status: StatusCode, problem: Option<&str>) -> Response {
    let body = c
        .templates
        .get_template("login.html")
        .and_then(|t| t.render(Serde(&json!({"problem": problem}))))
        .unwrap_or_default();
    (status, [(header::CONTENT_TYPE, "text/html; charset=utf-8")], body).into_response()
}

#[derive(Deserialize)]
struct LoginForm {
    #[serde(default)]
    token: String,
}

async fn login(Extract(c): Extract<St>, Form(form): Form<LoginForm>) -> Response {
    let Some(token) = &c.token else {
        return (StatusCode::SEE_OTHER, [(header::LOCATION, "/")]).into_response();
    };
    if !auth::same_secret(form.token.as_bytes(), token.expose().as_bytes()) {
        // Slows down guessing; the token itself is never logged.
        tokio::time::sleep(Duration::from_millis(300)).await;
        warn!("console login refused: wrong token");
        return login_form(&c, StatusCode::UNAUTHORIZED, Some("That is not the token."));
    }
    let session = c.sessions.open();
    info!("console login");
    let mut r = (StatusCode::SEE_OTHER, [(header::LOCATION, "/")]).into_response();
    r.headers_mut().insert(header::SET_COOKIE, auth::set_cookie(&session, c.secure_cookie));
    r
}

#[derive(Deserialize)]
struct CsrfForm {
    csrf: Option<String>,
}

async fn logout(Extract(c): Extract<St>, headers: HeaderMap, Form(form): Form<CsrfForm>) -> Response {
    let gate = match c.gate_post(&headers, form.csrf.as_deref()) {
        Ok(g) => g,
        Err(r) => return *r,
    };
    c.sessions.close(&gate.session.id);
    let to = if c.token.is_some() { "/login" } else { "/" };
    let mut r = (StatusCode::SEE_OTHER, [(header::LOCATION, to)]).into_response();
    r.headers_mut().insert(header::SET_COOKIE, auth::clear_cookie());
    r
}

// ---- overview ------------------------------------------------------------------------------

async fn overview(Extract(c): Extract<St>, headers: HeaderMap) -> Response {
    let gate = match c.gate(&headers) {
        Ok(g) => g,
        Err(r) => return *r,
    };
    let now = SystemTime::now();
    let day_ago = now - Duration::from_secs(24 * 3600);
    let archive = c.archive.clone();
    let spool = c.spool.clone();
    let data = blocking(move || -> Result<Json, StoreError> {
        let spool_counts = spool.gauges().ok();
        let Some(a) = archive else {
            return Ok(json!({"spool": spool_counts.map(|g| json!({"incoming": g.incoming, "deferred": g.deferred, "dead": g.dead}))}));
        };
        let counts: Vec<Json> =
            a.counts_by_state()?.into_iter().map(|(s, n)| json!({"state": s.as_str(), "count": n})).collect();
        let hourly = a.hourly(day_ago)?;
        let rules: Vec<Json> = a
            .rule_stats(day_ago)?
            .into_iter()
            .map(|r| {
                let fields: Vec<Json> = r
                    .filled
                    .iter()
                    .map(|(k, n)| json!({"name": k, "share": (*n * 100 + r.matches / 2) / r.matches.max(1)}))
                    .collect();
                json!({"rule": r.rule, "matches": r.matches, "fields": fields})
            })
            .collect();
        let destinations: Vec<Json> = a
            .destinations()?
            .into_iter()
            .map(|d| {
                let state = match (d.last.outcome.as_str(), d.last.status) {
                    (_, Some(429)) => "paused by a 429",
                    ("delivered", _) => "ok",
                    ("deferred", _) => "deferring",
                    _ => "failing",
                };
                let error = d.last_error.as_ref().map(|e| {
                    json!({"at": e.at, "what": e.status.map(|s| format!("HTTP {s}")).or(e.reply.clone()).unwrap_or_default()})
                });
                json!({"name": d.destination, "state": state, "last": d.last.at, "error": error})
            })
            .collect();
        Ok(json!({
            "counts": counts,
            "hours": hour_bars(&hourly, now),
            "rules": rules,
            "destinations": destinations,
            "spool": spool_counts.map(|g| json!({"incoming": g.incoming, "deferred": g.deferred, "dead": g.dead})),
        }))
    })
    .await;
    let mut ctx = match data {
        Ok(d) => d,
        Err(e) => return c.error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    };
    let folders: Vec<Json> = c
        .metrics
        .folders()
        .into_iter()
        .map(|f| {
            let ago = f.last_sync.map(|t| humantime::format_duration(round(now.duration_since(t).unwrap_or_default())).to_string());
            json!({"account": f.account, "folder": f.folder, "connected": f.connected, "ago": ago, "error": f.last_error})
        })
        .collect();
    ctx["folders"] = Json::from(folders);
    ctx["page"] = json!("overview");
    c.render(&gate, StatusCode::OK, "overview.html", ctx)
}

fn round(d: Duration) -> Duration {
    Duration::from_secs(d.as_secs())
}

/// 24 bars, one per hour ending now, as SVG geometry (no inline style: the CSP forbids it).
fn hour_bars(hourly: &[(u64, u64)], now: SystemTime) -> Json {
    let now_hour = now.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs() / 3600;
    let counts: BTreeMap<u64, u64> = hourly.iter().map(|(h, n)| (h / 3600, *n)).collect();
    let max = counts.values().copied().max().unwrap_or(0).max(1);
    let bars: Vec<Json> = (0..24u64)
        .map(|i| {
            let hour = now_hour - 23 + i;
            let n = counts.get(&hour).copied().unwrap_or(0);
            let h = (n as f64 * 100.0 / max as f64).round() as u64;
            json!({"x": i * 20, "y": 100 - h, "h": h, "n": n, "label": format!("{:02}:00 UTC", hour % 24)})
        })
        .collect();
    json!({"bars": bars, "max": max, "total": counts.values().sum::<u64>()})
}

// ---- messages ------------------------------------------------------------------------------

#[derive(Debug, Default, Deserialize)]
struct ListParams {
    q: Option<String>,
    state: Option<String>,
    rule: Option<String>,
    from: Option<String>,
    to: Option<String>,
    destination: Option<String>,
    source: Option<String>,
    since: Option<String>,
    limit: Option<usize>,
    cursor: Option<String>,
}

/// A query from the URL's parameters (empty ones are no filter); a bad one says which.
fn to_query(p: &ListParams, now: SystemTime) -> Result<MessageQuery, String> {
    let set = |v: &Option<String>| v.as_ref().map(|s| s.trim().to_string()).filter(|s| !s.is_empty());
    let state = match set(&p.state) {
        Some(s) => {
            Some(ArchiveState::parse(&s).ok_or_else(|| format!("state: {s:?} is not delivered, dropped or dead"))?)
        }
        None => None,
    };
    let since = match set(&p.since) {
        // "24h", "7d" ago, or a moment (RFC 3339).
        Some(s) => Some(match humantime::parse_duration(&s) {
            Ok(d) => now.checked_sub(d).unwrap_or(SystemTime::UNIX_EPOCH),
            Err(_) => humantime::parse_rfc3339_weak(&s)
                .map_err(|_| format!("since: {s:?} is neither a duration (24h) nor a time (RFC 3339)"))?,
        }),
        None => None,
    };
    let cursor = set(&p.cursor);
    if let Some(c) = &cursor
        && c.parse::<u64>().is_err()
    {
        return Err("cursor: not a cursor of this list".into());
    }
    Ok(MessageQuery {
        q: set(&p.q),
        state,
        rule: set(&p.rule),
        destination: set(&p.destination),
        from: set(&p.from),
        to: set(&p.to),
        source: set(&p.source),
        since,
        until: None,
        limit: p.limit.unwrap_or(50),
        cursor,
    })
}

async fn messages(Extract(c): Extract<St>, headers: HeaderMap, RawQuery(raw_query): RawQuery) -> Response {
    let gate = match c.gate(&headers) {
        Ok(g) => g,
        Err(r) => return *r,
    };
    let params: ListParams = serde_urlencoded_lossy(raw_query.as_deref());
    let query = match to_query(&params, SystemTime::now()) {
        Ok(q) => q,
        Err(e) => return c.error(StatusCode::BAD_REQUEST, &e),
    };
    let archive = match c.archive() {
        Ok(a) => a,
        Err(e) => return c.error(StatusCode::NOT_FOUND, &e.to_string()),
    };
    let q = query.clone();
    let page = match blocking(move || archive.list(&q)).await {
        Ok(p) => p,
        Err(e) => return c.error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    };
    // The link to the next page keeps the filters.
    let next = page.next.as_ref().map(|n| {
        let mut pairs: Vec<(&str, String)> = Vec::new();
        for (k, v) in [
            ("q", &params.q),
            ("state", &params.state),
            ("rule", &params.rule),
            ("from", &params.from),
            ("to", &params.to),
            ("destination", &params.destination),
            ("source", &params.source),
            ("since", &params.since),
        ] {
            if let Some(v) = v.as_ref().filter(|v| !v.is_empty()) {
                pairs.push((k, v.clone()));
            }
        }
        pairs.push(("cursor", n.clone()));
        format!("/messages?{}", encode_pairs(&pairs))
    });
    let ctx = json!({
        "page": "messages",
        "items": page.items,
        "next": next,
        "filters": {
            "q": params.q, "state": params.state, "rule": params.rule, "from": params.from, "to": params.to,
            "destination": params.destination, "source": params.source, "since": params.since,
        },
    });
    c.render(&gate, StatusCode::OK, "messages.html", ctx)
}

/// Form-encodes `pairs` for a link.
fn encode_pairs(pairs: &[(&str, String)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={}", form_urlencoded::byte_serialize(v.as_bytes()).collect::<String>()))
        .collect::<Vec<_>>()
        .join("&")
}

/// Query parameters; unknown ones are ignored, and a malformed query is no filter at all.
fn serde_urlencoded_lossy<T: for<'de> Deserialize<'de> + Default>(raw: Option<&str>) -> T {
    let pairs: Vec<(String, String)> =
        form_urlencoded::parse(raw.unwrap_or("").as_bytes()).map(|(k, v)| (k.into_owned(), v.into_owned())).collect();
    let map: serde_json::Map<String, Json> = pairs
        .into_iter()
        .map(|(k, v)| {
            let v = if k == "limit" { v.parse::<u64>().map(Json::from).unwrap_or(Json::Null) } else { Json::String(v) };
            (k, v)
        })
        .collect();
    serde_json::from_value(Json::Object(map)).unwrap_or_default()
}

/// The archived message `id`, read off the async threads: `Ok(None)` when there is none.
async fn load(c: &Console, id: &str) -> Result<Option<(Record, Vec<u8>)>, StoreError> {
    if !is_id(id) {
        return Ok(None);
    }
    let archive = c.archive()?;
    let id = id.to_string();
    blocking(move || {
        let Some(record) = archive.get(&id)? else { return Ok(None) };
        let raw = archive.raw(&id)?.unwrap_or_default();
        Ok(Some((record, raw)))
    })
    .await
}

/// [`load`], with the page's answer when the message is not there (404) or cannot be read.
async fn found(c: &Console, id: &str) -> Result<(Record, Vec<u8>), Response> {
    match load(c, id).await {
        Ok(Some(x)) => Ok(x),
        Ok(None) => Err(c.error(StatusCode::NOT_FOUND, "no such message in the archive")),
        Err(e) => Err(c.error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string())),
    }
}

async fn message(
    Extract(c): Extract<St>,
    headers: HeaderMap,
    UrlPath(id): UrlPath<String>,
    Query(view): Query<ViewParams>,
) -> Response {
    let gate = match c.gate(&headers) {
        Ok(g) => g,
        Err(r) => return *r,
    };
    let (record, raw) = match found(&c, &id).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let email = blocking(move || crate::parse::parse(&raw)).await;
    let payload_text = record.payload.as_ref().map(|p| serde_json::to_string(p).unwrap_or_default());
    let payload_size = payload_text.as_ref().map(String::len).unwrap_or(0);
    let in_spool = {
        let (spool, id) = (c.spool.clone(), id.clone());
        blocking(move || spool.find(&id).map(|s| s.dir_name())).await
    };
    let attachments: Vec<Json> = email
        .attachments
        .iter()
        .enumerate()
        .map(|(i, a)| json!({"n": i, "name": if a.name.is_empty() { format!("part-{i}") } else { a.name.clone() }, "type": a.content_type, "size": a.size}))
        .collect();
    let ctx = json!({
        "page": "messages",
        "m": record.summary,
        "source": record.envelope.source.to_string(),
        "envelope": record.envelope,
        "reason": record.reason,
        "size": record.size,
        "finished_at": record.finished_at,
        "headers": email.headers.iter().map(|h| json!({"name": h.name, "value": h.value})).collect::<Vec<_>>(),
        "text": email.text,
        "has_html": !email.html.is_empty(),
        "remote": view.remote.unwrap_or(0) == 1,
        "attachments": attachments,
        "fields": record.fields.as_ref().map(pretty),
        "payload": record.payload.as_ref().map(pretty),
        "payload_size": payload_size,
        "payload_limit": c.max_body,
        "payload_share": format!("{:.1}", payload_size as f64 * 100.0 / c.max_body.max(1) as f64),
        "attempts": record.attempts,
        "in_spool": in_spool,
        "problems": email.problems,
    });
    c.render(&gate, StatusCode::OK, "message.html", ctx)
}

fn pretty(v: &Json) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default()
}

#[derive(Debug, Default, Deserialize)]
struct ViewParams {
    remote: Option<u8>,
}

async fn raw(Extract(c): Extract<St>, headers: HeaderMap, UrlPath(id): UrlPath<String>) -> Response {
    if let Err(r) = c.gate(&headers) {
        return *r;
    }
    match found(&c, &id).await {
        Ok((_, raw)) => (
            [
                (header::CONTENT_TYPE, "message/rfc822".to_string()),
                (header::CONTENT_DISPOSITION, format!("attachment; filename=\"{id}.eml\"")),
            ],
            raw,
        )
            .into_response(),
        Err(r) => r,
    }
}

async fn email_html(
    Extract(c): Extract<St>,
    headers: HeaderMap,
    UrlPath(id): UrlPath<String>,
    Query(view): Query<ViewParams>,
) -> Response {
    if let Err(r) = c.gate(&headers) {
        return *r;
    }
    let raw = match found(&c, &id).await {
        Ok((_, raw)) => raw,
        Err(r) => return r,
    };
    let remote = view.remote.unwrap_or(0) == 1;
    let body = blocking(move || {
        let email = crate::parse::parse(&raw);
        html::sanitise(&email.html, remote)
    })
    .await;
    let csp = if remote { auth::EMAIL_CSP_REMOTE_IMAGES } else { auth::EMAIL_CSP };
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CONTENT_SECURITY_POLICY, csp),
            (header::X_FRAME_OPTIONS, "SAMEORIGIN"),
        ],
        body,
    )
        .into_response()
}

async fn attachment(
    Extract(c): Extract<St>,
    headers: HeaderMap,
    UrlPath((id, n)): UrlPath<(String, usize)>,
) -> Response {
    if let Err(r) = c.gate(&headers) {
        return *r;
    }
    let raw = match found(&c, &id).await {
        Ok((_, raw)) => raw,
        Err(r) => return r,
    };
    match crate::serve::download::attachment(raw, n).await {
        Some(download) => download,
        None => c.error(StatusCode::NOT_FOUND, "no such attachment"),
    }
}

// ---- actions -------------------------------------------------------------------------------

/// What an action did, for a page's notice or the API's answer.
#[derive(Debug)]
enum Acted {
    Done(String),
    NotFound(String),
    Conflict(String),
    Failed(String),
}

/// Retry, replay or drop one message, through the spool's own functions.
async fn act(c: &Console, id: &str, action: &str) -> Acted {
    if !is_id(id) {
        return Acted::NotFound(format!("{id:?} is not a message id"));
    }
    let (spool, rules, archive) = (c.spool.clone(), c.rules.read().expect("rules lock").clone(), c.archive.clone());
    let (id, action) = (id.to_string(), action.to_string());
    let acted = blocking(move || {
        let spooled = |r: Result<String, ActionError>| match r {
            Ok(line) => Acted::Done(line),
            Err(ActionError::NotFound(m)) => Acted::NotFound(format!("{m}: not in the spool")),
            Err(e @ (ActionError::Busy(_) | ActionError::AlreadyQueued(_))) => Acted::Conflict(e.to_string()),
            Err(e) => Acted::Failed(e.to_string()),
        };
        match action.as_str() {
            "retry" => spooled(actions::retry(&spool, &id).map(|to| format!("{id}: queued for delivery now ({to})"))),
            "drop" => spooled(actions::drop(&spool, &id).map(|from| format!("{id}: dropped from {from}"))),
            "replay" if spool.find(&id).is_some() => {
                spooled(crate::pipeline::replay(&spool, &rules, &id).map(|r| match r {
                    Replayed::Queued { rule, to } => {
                        format!("{id}: rule {} → {}", rule.unwrap_or_else(|| "(no rule)".into()), to.join(", "))
                    }
                    Replayed::StillDead(reason) => format!("{id}: still a dead letter: {reason}"),
                    Replayed::Dropped(_) => format!("{id}: a rule drops it; removed"),
                }))
            }
            // Delivered (or dropped) long ago: only the archive has it. It goes into the spool
            // again as a new message, judged by the current rules.
            "replay" => {
                let Some(archive) = archive else { return Acted::NotFound(format!("{id}: not in the spool")) };
                let (record, raw) = match (archive.get(&id), archive.raw(&id)) {
                    (Ok(Some(r)), Ok(Some(raw))) => (r, raw),
                    (Err(e), _) | (_, Err(e)) => return Acted::Failed(e.to_string()),
                    _ => return Acted::NotFound(format!("{id}: neither in the spool nor in the archive")),
                };
                let mut envelope = record.envelope;
                envelope.received_at = crate::model::now_rfc3339();
                match spool.store(envelope, &raw) {
                    Ok(new) => Acted::Done(format!("{id}: queued again from the archive as {new}")),
                    Err(e) => Acted::Failed(e.to_string()),
                }
            }
            other => Acted::NotFound(format!("no action {other:?}: retry, replay or drop")),
        }
    })
    .await;
    if let Acted::Done(line) = &acted {
        info!(action = %line, "console action");
    }
    acted
}

#[derive(Deserialize)]
struct ActionForm {
    csrf: Option<String>,
    back: Option<String>,
}

/// Where to go after a form: a path of the console's own, else the message list.
fn back_to(back: Option<&str>) -> String {
    match back {
        Some(b) if b.starts_with('/') && !b.starts_with("//") && !b.contains('\\') && !b.contains("://") => {
            b.to_string()
        }
        _ => "/messages".to_string(),
    }
}

async fn page_action(
    Extract(c): Extract<St>,
    headers: HeaderMap,
    UrlPath((id, action)): UrlPath<(String, String)>,
    Form(form): Form<ActionForm>,
) -> Response {
    let gate = match c.gate_post(&headers, form.csrf.as_deref()) {
        Ok(g) => g,
        Err(r) => return *r,
    };
    let (status, notice) = match act(&c, &id, &action).await {
        Acted::Done(line) => (StatusCode::OK, line),
        Acted::NotFound(line) => (StatusCode::NOT_FOUND, line),
        Acted::Conflict(line) => (StatusCode::CONFLICT, line),
        Acted::Failed(line) => (StatusCode::INTERNAL_SERVER_ERROR, line),
    };
    let back = back_to(form.back.as_deref());
    notice_page(&c, &gate, status, vec![notice], &back)
}

fn notice_page(c: &Console, gate: &Gate, status: StatusCode, lines: Vec<String>, back: &str) -> Response {
    let ctx = json!({"page": "", "status": status.as_u16(), "notices": lines, "back": back});
    c.render(gate, status, "error.html", ctx)
}

// ---- dead letters --------------------------------------------------------------------------

async fn dead(Extract(c): Extract<St>, headers: HeaderMap) -> Response {
    let gate = match c.gate(&headers) {
        Ok(g) => g,
        Err(r) => return *r,
    };
    let spool = c.spool.clone();
    let listed = blocking(move || -> Result<Vec<Json>, crate::spool::SpoolError> {
        let mut out = Vec::new();
        // Newest first, at most 500.
        for id in spool.list(State::Dead)?.into_iter().rev().take(500) {
            let Ok(meta) = spool.read_meta(State::Dead, &id) else { continue };
            let rule = meta.decision.as_ref().and_then(|d| d.rule.clone());
            out.push(json!({
                "id": id,
                "received_at": meta.envelope.received_at,
                "from": meta.envelope.mail_from,
                "rule": rule,
                "reason": meta.dead_reason,
                "attempts": meta.attempts,
            }));
        }
        Ok(out)
    })
    .await;
    match listed {
        Ok(items) => c.render(&gate, StatusCode::OK, "dead.html", json!({"page": "dead", "items": items})),
        Err(e) => c.error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

async fn dead_action(Extract(c): Extract<St>, headers: HeaderMap, body: String) -> Response {
    // Several `id` fields: read the form by hand.
    let mut csrf = None;
    let mut action = String::new();
    let mut ids = Vec::new();
    for (k, v) in form_urlencoded::parse(body.as_bytes()) {
        match k.as_ref() {
            "csrf" => csrf = Some(v.into_owned()),
            "action" => action = v.into_owned(),
            "id" => ids.push(v.into_owned()),
            _ => {}
        }
    }
    let gate = match c.gate_post(&headers, csrf.as_deref()) {
        Ok(g) => g,
        Err(r) => return *r,
    };
    if ids.is_empty() {
        return notice_page(&c, &gate, StatusCode::BAD_REQUEST, vec!["No message was ticked.".into()], "/dead");
    }
    let mut lines = Vec::new();
    let mut worst = StatusCode::OK;
    for id in ids.iter().take(1000) {
        let (status, line) = match act(&c, id, &action).await {
            Acted::Done(l) => (StatusCode::OK, l),
            Acted::NotFound(l) => (StatusCode::NOT_FOUND, l),
            Acted::Conflict(l) => (StatusCode::CONFLICT, l),
            Acted::Failed(l) => (StatusCode::INTERNAL_SERVER_ERROR, l),
        };
        if status != StatusCode::OK {
            worst = status;
        }
        lines.push(line);
    }
    notice_page(&c, &gate, worst, lines, "/dead")
}

// ---- playground ----------------------------------------------------------------------------

#[derive(Debug, Default, Deserialize)]
struct PlaygroundForm {
    csrf: Option<String>,
    /// An archived message to use.
    id: Option<String>,
    /// A pasted (or uploaded, by the page's script) message.
    eml: Option<String>,
    /// The rules file being edited, and its text.
    file: Option<String>,
    rules: Option<String>,
}

/// The running rules' files, as `(path, text)`.
fn rule_sources(rules: &crate::rules::RuleSet) -> Vec<(PathBuf, String)> {
    rules.files().iter().map(|p| (p.clone(), std::fs::read_to_string(p).unwrap_or_default())).collect()
}

async fn playground_page(Extract(c): Extract<St>, headers: HeaderMap, Query(form): Query<PlaygroundForm>) -> Response {
    let gate = match c.gate(&headers) {
        Ok(g) => g,
        Err(r) => return *r,
    };
    let rules = c.rules.read().expect("rules lock").clone();
    let sources = blocking(move || rule_sources(&rules)).await;
    let file = form.file.filter(|f| sources.iter().any(|(p, _)| &p.display().to_string() == f));
    let file = file.or_else(|| sources.first().map(|(p, _)| p.display().to_string()));
    let text = sources.iter().find(|(p, _)| Some(p.display().to_string()) == file).map(|(_, t)| t.clone());
    let ctx = json!({
        "page": "playground",
        "files": sources.iter().map(|(p, _)| p.display().to_string()).collect::<Vec<_>>(),
        "file": file,
        "rules": text,
        "id": form.id,
        "eml": form.eml,
    });
    c.render(&gate, StatusCode::OK, "playground.html", ctx)
}

async fn playground_run(Extract(c): Extract<St>, headers: HeaderMap, Form(form): Form<PlaygroundForm>) -> Response {
    let gate = match c.gate_post(&headers, form.csrf.as_deref()) {
        Ok(g) => g,
        Err(r) => return *r,
    };
    // The message: pasted text wins over an archived id.
    let pasted = form.eml.clone().filter(|e| !e.trim().is_empty());
    let from_archive = match (&pasted, form.id.as_deref().map(str::trim).filter(|i| !i.is_empty())) {
        (None, Some(id)) => match load(&c, id).await {
            Ok(Some((record, raw))) => Some((record.envelope, raw)),
            Ok(None) => return c.error(StatusCode::NOT_FOUND, "no such message in the archive"),
            Err(e) => return c.error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
        },
        _ => None,
    };
    let (envelope, raw) = match (from_archive, pasted) {
        (Some(x), _) => x,
        (None, Some(text)) => {
            // Pasted text has lost its CRLFs in the browser; the parser reads both.
            let raw = text.into_bytes();
            let email = crate::parse::parse(&raw);
            let mut envelope = crate::model::Envelope::new(crate::model::Source::Stdin);
            envelope.mail_from = email.from.first().map(|a| a.address.clone());
            envelope.recipients =
                email.to.iter().chain(&email.cc).map(|a| a.address.clone()).filter(|a| !a.is_empty()).collect();
            (envelope, raw)
        }
        (None, None) => {
            return c.error(StatusCode::BAD_REQUEST, "paste a message, upload one, or give an archived message's id");
        }
    };
    let rules = c.rules.read().expect("rules lock").clone();
    let unmatched = Unmatched::from_config(&c.unmatched);
    let (file, edited) = (form.file.clone(), form.rules.clone());
    let result = blocking(move || {
        let mut sources = rule_sources(&rules);
        if let (Some(file), Some(text)) = (&file, &edited)
            && let Some(slot) = sources.iter_mut().find(|(p, _)| &p.display().to_string() == file)
        {
            slot.1 = text.replace("\r\n", "\n");
        }
        let files: Vec<String> = sources.iter().map(|(p, _)| p.display().to_string()).collect();
        let email = crate::parse::parse(&raw);
        let judged = playground::judge(&sources, unmatched, &email, &envelope);
        (files, email, judged)
    })
    .await;
    let (files, email, judged) = result;
    let mut ctx = json!({
        "page": "playground",
        "files": files,
        "file": form.file,
        "rules": form.rules,
        "id": form.id,
        "eml": form.eml,
        "subject": email.subject,
    });
    match judged {
        Ok(j) => {
            let report = j.outcome.report(&email);
            let payload = pretty(&report["payload"]);
            let size = j.outcome.payload.as_str().len();
            ctx["result"] = json!({
                "rule": j.outcome.rule,
                "to": j.outcome.destinations(),
                "dead": report.get("dead"),
                "dropped": report.get("dropped").is_some(),
                "payload": payload,
                "size": size,
                "limit": c.max_body,
                "fields": report["payload"].get("fields").map(pretty),
                "verdicts": j.verdicts,
            });
        }
        Err(errors) => {
            ctx["errors"] = Json::from(errors.iter().map(|e| e.to_string()).collect::<Vec<_>>());
        }
    }
    c.render(&gate, StatusCode::OK, "playground.html", ctx)
}

// ---- live tail -----------------------------------------------------------------------------

async fn tail(Extract(c): Extract<St>, headers: HeaderMap) -> Response {
    let gate = match c.gate(&headers) {
        Ok(g) => g,
        Err(r) => return *r,
    };
    c.render(&gate, StatusCode::OK, "tail.html", json!({"page": "tail", "live": c.writer.is_some()}))
}

async fn tail_events(Extract(c): Extract<St>, headers: HeaderMap) -> Response {
    if let Err(r) = c.gate(&headers) {
        return *r;
    }
    let Some(writer) = &c.writer else {
        return c.error(StatusCode::NOT_FOUND, "the live tail needs the archive ([archive] enabled = true)");
    };
    let rx = writer.subscribe();
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        loop {
            match rx.recv().await {
                Ok(event) => {
                    let data = serde_json::to_string(&event).unwrap_or_default();
                    return Some((Ok::<Event, std::convert::Infallible>(Event::default().data(data)), rx));
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::default()).into_response()
}

// ---- JSON API ------------------------------------------------------------------------------

async fn api_list(Extract(c): Extract<St>, headers: HeaderMap, RawQuery(raw_query): RawQuery) -> Response {
    if let Some(r) = c.api_refuse(&headers, false) {
        return r;
    }
    let params: ListParams = serde_urlencoded_lossy(raw_query.as_deref());
    let query = match to_query(&params, SystemTime::now()) {
        Ok(q) => q,
        Err(e) => return api_error(StatusCode::BAD_REQUEST, &e),
    };
    let archive = match c.archive() {
        Ok(a) => a,
        Err(e) => return api_error(StatusCode::NOT_FOUND, &e.to_string()),
    };
    match blocking(move || archive.list(&query)).await {
        Ok(page) => json_response(StatusCode::OK, json!({"messages": page.items, "next": page.next})),
        Err(e) => api_error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

async fn api_get(Extract(c): Extract<St>, headers: HeaderMap, UrlPath(id): UrlPath<String>) -> Response {
    if let Some(r) = c.api_refuse(&headers, false) {
        return r;
    }
    match load(&c, &id).await {
        Ok(Some((record, raw))) => {
            let email = blocking(move || crate::parse::parse(&raw)).await;
            let mut body = serde_json::to_value(&record).unwrap_or_default();
            body["headers"] =
                Json::from(email.headers.iter().map(|h| json!({"name": h.name, "value": h.value})).collect::<Vec<_>>());
            json_response(StatusCode::OK, body)
        }
        Ok(None) => api_error(StatusCode::NOT_FOUND, "no such message in the archive"),
        Err(e) => api_error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

async fn api_action(
    Extract(c): Extract<St>,
    headers: HeaderMap,
    UrlPath((id, action)): UrlPath<(String, String)>,
) -> Response {
    if let Some(r) = c.api_refuse(&headers, true) {
        return r;
    }
    match act(&c, &id, &action).await {
        Acted::Done(line) => json_response(StatusCode::OK, json!({"id": id, "action": action, "result": line})),
        Acted::NotFound(line) => api_error(StatusCode::NOT_FOUND, &line),
        Acted::Conflict(line) => api_error(StatusCode::CONFLICT, &line),
        Acted::Failed(line) => api_error(StatusCode::INTERNAL_SERVER_ERROR, &line),
    }
}
