//! admin: the operator's HTTP endpoint of `mailhook serve` (`[admin] listen`, loopback by
//! default).
//!
//! | path | answer |
//! |---|---|
//! | `GET /healthz` | `200 {"status":"ok"}` (plus `"warnings": [...]` for drifts in progress) when every listener accepts, every IMAP folder synced within twice its interval and the spool takes a file; else `503 {"status":"unhealthy","problems":[...]}` |
//! | `GET /metrics` | every counter of [`Metrics`], Prometheus text format 0.0.4 |
//! | the console's pages and JSON API | see [`super::console`] (unless `[admin] console = false`) |
//! | anything else | 404 |
//!
//! With `[admin] token`, every request to `/healthz`, `/metrics` or an unknown path must carry `Authorization: Bearer <token>` (else 401,
//! whatever the method: the token is checked before routing, so nothing about the
//! routes shows through to a client without it);
//! the comparison takes the same time however much of the token is right, and the token is
//! never logged. The socket is bound before `serve` starts working, so a port in use refuses to
//! start; the server stops on shutdown.

use crate::cluster::Node;
use crate::config::{AdminConfig, Secret};
use crate::metrics::Metrics;
use crate::spool::Spool;
use axum::Router;
use axum::extract::State as Extract;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{info, warn};

/// The content type of the Prometheus text exposition format.
pub const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4";

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("admin.listen: cannot listen on {addr}: {source}")]
    Bind { addr: String, source: std::io::Error },
    #[error(
        "admin.listen: the console on {0} would be open to the network without [admin] token: set a token, listen on a loopback address, or set console = false"
    )]
    OpenConsole(SocketAddr),
}

/// The bound admin endpoint, ready to run.
pub struct Admin {
    listener: TcpListener,
    addr: SocketAddr,
    state: Arc<AdminState>,
    console: Option<super::console::Console>,
}

struct AdminState {
    metrics: Arc<Metrics>,
    spool: Spool,
    token: Option<Secret>,
    probes: AtomicU64,
    cluster: Option<Arc<Node>>,
}

impl Admin {
    /// Binds `[admin] listen` (so a port in use is an error at start-up).
    pub async fn bind(
        config: &AdminConfig,
        metrics: Arc<Metrics>,
        spool: Spool,
        console: Option<super::console::Console>,
        cluster: Option<Arc<Node>>,
    ) -> Result<Admin, AdminError> {
        let bind_error = |source| AdminError::Bind { addr: config.listen.clone(), source };
        let listener = TcpListener::bind(&config.listen).await.map_err(bind_error)?;
        let addr = listener.local_addr().map_err(bind_error)?;
        let state =
            Arc::new(AdminState { metrics, spool, token: config.token.clone(), probes: AtomicU64::new(0), cluster });
        if console.is_some() && config.token.is_none() && !addr.ip().is_loopback() {
            return Err(AdminError::OpenConsole(addr));
        }
        Ok(Admin { listener, addr, state, console })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves until `shutdown` turns true, then lets requests in flight finish (briefly).
    pub async fn run(self, shutdown: watch::Receiver<bool>) {
        let mut router = Router::new()
            .route("/healthz", get(healthz))
            .route("/metrics", get(metrics))
            .fallback(not_found)
            .layer(axum::middleware::from_fn_with_state(self.state.clone(), authenticate))
            .with_state(self.state.clone());
        if let Some(console) = self.console {
            router = router.merge(console.router());
        }
        info!(protocol = "admin", addr = %self.addr, auth = self.state.token.is_some(), "listening");
        if !self.addr.ip().is_loopback() && self.state.token.is_none() {
            warn!(addr = %self.addr, "the admin endpoint is reachable beyond this machine without [admin] token");
        }
        crate::serve::serve_http("admin", self.listener, router, shutdown).await;
    }
}

impl AdminState {
    /// `None` when the request may go on; else the 401 answer.
    fn refuse(&self, headers: &HeaderMap) -> Option<Response> {
        let expected = self.token.as_ref()?;
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if same_secret(presented.as_bytes(), expected.expose().as_bytes()) {
            return None;
        }
        let mut response =
            (StatusCode::UNAUTHORIZED, "401 unauthorized: send Authorization: Bearer <token>\n").into_response();
        response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        Some(response)
    }

    /// Every problem that makes the gateway unhealthy now.
    async fn problems(&self) -> Vec<String> {
        let now = SystemTime::now();
        let mut problems: Vec<String> = Vec::new();
        problems.extend(self.metrics.listeners().iter().filter_map(|l| l.problem(now)));
        problems.extend(self.metrics.folders().iter().filter_map(|f| f.problem(now)));
        let (spool, n) = (self.spool.clone(), self.probes.fetch_add(1, Ordering::Relaxed));
        if spool.shared().is_some() {
            // The queue is the cluster's database: it must answer.
            if let Err(e) = spool.probe_async().await {
                problems.push(e.to_string());
            }
            return problems;
        }
        match tokio::task::spawn_blocking(move || probe_spool(&spool, n)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => problems.push(e.to_string()),
            Err(e) => problems.push(format!("spool: probe did not finish: {e}")),
        }
        problems
    }
}

/// The spool cannot take a message: `/healthz` reports it.
#[derive(Debug, thiserror::Error)]
#[error("spool {}: cannot write: {source}", dir.display())]
struct ProbeError {
    dir: std::path::PathBuf,
    source: std::io::Error,
}

/// Creates, writes and removes a file in the spool's `tmp/`, on the file system of the spool's
/// database: what a big message needs, and what fails when that file system cannot be written.
fn probe_spool(spool: &Spool, n: u64) -> Result<(), ProbeError> {
    let tmp = spool.dir().join("tmp");
    let path = tmp.join(format!(".healthz-{}-{n}", std::process::id()));
    let result = std::fs::File::options()
        .write(true)
        .create_new(true)
        .open(&path)
        .and_then(|mut f| f.write_all(b"ok"))
        .and_then(|()| std::fs::remove_file(&path));
    result.map_err(|source| {
        let _ = std::fs::remove_file(&path);
        ProbeError { dir: tmp, source }
    })
}

async fn healthz(Extract(state): Extract<Arc<AdminState>>) -> Response {
    let problems = state.problems().await;
    // Drifts are listed but do not make the gateway unhealthy: mail still flows.
    let warnings = state.metrics.warnings();
    let (status, mut body) = if problems.is_empty() {
        (StatusCode::OK, serde_json::json!({"status": "ok"}))
    } else {
        warn!(problems = %problems.join("; "), "unhealthy");
        (StatusCode::SERVICE_UNAVAILABLE, serde_json::json!({"status": "unhealthy", "problems": problems}))
    };
    if !warnings.is_empty() {
        body["warnings"] = serde_json::json!(warnings);
    }
    if let Some(node) = &state.cluster {
        body["cluster"] = cluster_health(node);
    }
    json(status, body)
}

/// This instance in the cluster: its id, the IMAP folders it holds, its live peers (as of the
/// last heartbeat).
fn cluster_health(node: &Node) -> serde_json::Value {
    let leases: Vec<serde_json::Value> =
        node.held().into_iter().map(|k| serde_json::json!({"account": k.account, "folder": k.folder})).collect();
    serde_json::json!({
        "instance": node.id(),
        "host": node.host(),
        "leases": leases,
        "claims": node.claims(),
        "peers": node.peers(),
    })
}

/// The cluster's lines of `/metrics`.
fn cluster_metrics(node: &Node) -> String {
    use crate::metrics::escape_label as e;
    let mut out = String::new();
    out.push_str("# HELP mailhook_cluster_instance This instance's id in the cluster (value 1).\n");
    out.push_str("# TYPE mailhook_cluster_instance gauge\n");
    out.push_str(&format!("mailhook_cluster_instance{{id=\"{}\",host=\"{}\"}} 1\n", e(node.id()), e(node.host())));
    out.push_str("# HELP mailhook_cluster_peers Other instances with a heartbeat within three leases.\n");
    out.push_str("# TYPE mailhook_cluster_peers gauge\n");
    out.push_str(&format!("mailhook_cluster_peers {}\n", node.peers().len()));
    out.push_str("# HELP mailhook_cluster_claims Messages of the shared queue this instance holds (claimed, lease renewed at the last heartbeat).\n");
    out.push_str("# TYPE mailhook_cluster_claims gauge\n");
    out.push_str(&format!("mailhook_cluster_claims {}\n", node.claims()));
    out.push_str("# HELP mailhook_cluster_folder_lease IMAP folders this instance holds the lease of (value 1).\n");
    out.push_str("# TYPE mailhook_cluster_folder_lease gauge\n");
    for k in node.held() {
        out.push_str(&format!(
            "mailhook_cluster_folder_lease{{account=\"{}\",folder=\"{}\"}} 1\n",
            e(&k.account),
            e(&k.folder)
        ));
    }
    out
}

async fn metrics(Extract(state): Extract<Arc<AdminState>>) -> Response {
    let spool = state.spool.clone();
    match tokio::task::spawn_blocking(move || spool.gauges()).await {
        Ok(Ok(gauges)) => state.metrics.set_spool(gauges),
        Ok(Err(e)) => warn!(error = %e, "cannot count the spool for /metrics"),
        Err(e) => warn!(error = %e, "cannot count the spool for /metrics"),
    }
    let mut text = state.metrics.render();
    if let Some(node) = &state.cluster {
        text.push_str(&cluster_metrics(node));
    }
    let mut response = text.into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(METRICS_CONTENT_TYPE));
    response
}

async fn not_found() -> Response {
    (StatusCode::NOT_FOUND, "404 not found: try /healthz or /metrics\n").into_response()
}

/// Runs before routing: a request without the token gets 401, whichever path and method.
async fn authenticate(
    Extract(state): Extract<Arc<AdminState>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match state.refuse(request.headers()) {
        Some(refused) => refused,
        None => next.run(request).await,
    }
}

fn json(status: StatusCode, body: serde_json::Value) -> Response {
    let mut response = (status, format!("{body}\n")).into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// Compares a presented secret with the expected one in a time that depends only on the
/// expected one's length, not on how many leading bytes are right.
fn same_secret(presented: &[u8], expected: &[u8]) -> bool {
    let mut diff = presented.len() ^ expected.len();
    for (i, e) in expected.iter().enumerate() {
        let p = presented.get(i).copied().unwrap_or(!*e);
        diff |= usize::from(p ^ e);
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::State;
    use std::time::Duration;

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret(b"s3cret", b"s3cret"));
        assert!(!same_secret(b"s3cre", b"s3cret"));
        assert!(!same_secret(b"s3cretX", b"s3cret"));
        assert!(!same_secret(b"S3cret", b"s3cret"));
        assert!(!same_secret(b"", b"s3cret"));
        assert!(same_secret(b"", b""));
    }

    #[test]
    fn spool_is_counted_by_state_with_the_oldest_deferred_age() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), crate::spool::SpoolOptions { fsync: false, keep_raw: false }).unwrap();
        let envelope = || crate::model::Envelope::new(crate::model::Source::Stdin);
        let a = spool.store(envelope(), b"Subject: a\r\n\r\na\r\n").unwrap();
        let b = spool.store(envelope(), b"Subject: b\r\n\r\nb\r\n").unwrap();
        spool.store(envelope(), b"Subject: c\r\n\r\nc\r\n").unwrap();
        spool.transition_blocking(&a, State::Incoming, State::Deferred, None).unwrap();
        spool.transition_blocking(&b, State::Incoming, State::Dead, None).unwrap();
        let g = spool.gauges().unwrap();
        assert_eq!((g.incoming, g.deferred, g.dead), (1, 1, 1));
        let age = g.oldest_deferred_age.expect("a deferred message has an age");
        assert!(age < Duration::from_secs(60), "{age:?}");
        assert!(probe_spool(&spool, 0).is_ok());
        assert!(std::fs::read_dir(dir.path().join("tmp")).unwrap().next().is_none(), "the probe file is gone");
    }
}
