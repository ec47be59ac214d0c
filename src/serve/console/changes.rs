//! The "Rule changes" page (`GET /changes`), the "Drift" page (`GET /drift`) and their JSON (`GET /api/v1/changes`): the last
//! reload's shadow run (what the new rules changed, or why the guard refused them), the trial
//! rules' latest disagreements with the live rules, and the drifts in progress with example
//! messages. Read from the lifecycle's shared state; nothing here judges mail.

use super::{Console, St, json_response};
use crate::lifecycle::{Difference, Observer, SharedReport};
use axum::extract::State as Extract;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde_json::{Value as Json, json};
use std::sync::Arc;

/// What the page reads.
pub struct Lifecycle {
    report: SharedReport,
    observer: Arc<Observer>,
}

impl Console {
    /// Shows the reload reports, trial disagreements and drifts of this `serve`.
    pub fn with_lifecycle(mut self, report: SharedReport, observer: Arc<Observer>) -> Console {
        self.lifecycle = Some(Lifecycle { report, observer });
        self
    }

    fn changes(&self) -> Json {
        let Some(l) = &self.lifecycle else {
            return json!({"reload": null, "trial": null, "drifts": null});
        };
        let reload = l.report.read().unwrap_or_else(|e| e.into_inner()).clone().map(|r| {
            let mut v = serde_json::to_value(&r).expect("a report serialises");
            v["differences"] = differences(&r.report.differences);
            v["summary"] = Json::String(r.report.counts.line());
            v
        });
        let trial = l
            .observer
            .trial
            .as_ref()
            .map(|t| json!({"dir": t.dir().display().to_string(), "recent": differences(&t.recent())}));
        let drifts = l.observer.drift.as_ref().map(|d| serde_json::to_value(d.active()).expect("drifts serialise"));
        json!({"reload": reload, "trial": trial, "drifts": drifts})
    }
}

/// Each difference with its diff lines as the command line prints them.
fn differences(list: &[Difference]) -> Json {
    Json::from(
        list.iter()
            .map(|d| {
                let mut v = serde_json::to_value(d).expect("a difference serialises");
                v["kindWords"] = Json::String(d.kind.words().to_string());
                v["lines"] = Json::from(d.changes.iter().map(|c| c.line()).collect::<Vec<_>>());
                v
            })
            .collect::<Vec<_>>(),
    )
}

pub(super) async fn page(Extract(c): Extract<St>, headers: HeaderMap) -> Response {
    let gate = match c.gate(&headers) {
        Ok(g) => g,
        Err(r) => return *r,
    };
    let mut ctx = c.changes();
    ctx["page"] = json!("changes");
    c.render(&gate, StatusCode::OK, "changes.html", ctx)
}

/// The Drift page: the drifts in progress with their example messages.
pub(super) async fn drift_page(Extract(c): Extract<St>, headers: HeaderMap) -> Response {
    let gate = match c.gate(&headers) {
        Ok(g) => g,
        Err(r) => return *r,
    };
    let mut ctx = c.changes();
    ctx["page"] = json!("drift");
    c.render(&gate, StatusCode::OK, "drift.html", ctx)
}

pub(super) async fn api(Extract(c): Extract<St>, headers: HeaderMap) -> Response {
    if let Some(r) = c.api_refuse(&headers, false) {
        return r;
    }
    json_response(StatusCode::OK, c.changes())
}
