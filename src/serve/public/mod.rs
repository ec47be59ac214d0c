//! public: what `[web] listen` serves to Kustomer and its agents, and nothing else.
//!
//! | path | what | authorised by |
//! |---|---|---|
//! | `GET /m/{id}?exp=&sig=` | one email, read-only: from, to, date, subject, text, sanitised HTML (framed, sandboxed), attachments | the signed link ([`crate::links`]) |
//! | `GET /m/{id}/html?exp=&sig=` | the email's sanitised HTML, for the page's sandboxed frame | the page's signed link |
//! | `GET /m/{id}/a/{n}?exp=&sig=` | attachment `n`, always as a download | its own signed link |
//! | `GET /api/v1/lookup?email=&direction=from\|to` | the latest email from (or to) an address, as one flat JSON object | `Authorization: Bearer <[web] api_key>` |
//! | `GET /kustomer/card` | the Kustomer Card (see [`card`]) | a signed link or a `[web] card_keys` key, checked by its API |
//! | `GET /kustomer/api/messages` | the emails the card lists | the same |
//! | anything else (the console, `/metrics`, `/healthz`, every action) | 404 | |
//!
//! A link with a missing, wrong or expired signature gets 403 with one body whichever it was;
//! a well signed link to an email the archive no longer holds gets 410. Every page carries a CSP
//! without inline script; only the card may be framed, and only by `[web] frame_ancestors`.
//! The listener is meant to sit behind a TLS reverse proxy (`[web] public_url` is https).

pub mod card;
pub mod lookup;
pub mod page;

use crate::config::{Config, WebConfig};
use crate::links::Links;
pub(crate) use crate::serve::download::blocking;
use crate::serve::headers::{asset, secure};
use crate::store::Archive;
use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value as Json, json};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{info, warn};

#[derive(Debug, thiserror::Error)]
pub enum PublicError {
    #[error("web.listen: cannot listen on {addr}: {source}")]
    Bind { addr: String, source: std::io::Error },
    #[error("web: {0}")]
    Config(&'static str),
}

/// What the public handlers read.
pub struct Public {
    pub(crate) archive: Arc<dyn Archive>,
    pub(crate) links: Links,
    pub(crate) web: WebConfig,
    pub(crate) templates: minijinja::Environment<'static>,
    pub(crate) lookup_bucket: lookup::Bucket,
}

/// The bound public listener, ready to run.
pub struct PublicListener {
    listener: TcpListener,
    addr: SocketAddr,
    public: Public,
}

impl Public {
    /// The public side of `config`; refuses a `[web]` that would serve without signed links.
    pub fn new(config: &Config, archive: Arc<dyn Archive>) -> Result<Public, PublicError> {
        let web = config.web.clone().ok_or(PublicError::Config("no [web] table"))?;
        let links = Links::from_config(&web).ok_or(PublicError::Config("public_url and link_key are required"))?;
        let mut templates = minijinja::Environment::new();
        for (name, text) in [
            ("message.html", include_str!("templates/message.html")),
            ("card.html", include_str!("templates/card.html")),
            ("error.html", include_str!("templates/error.html")),
        ] {
            templates.add_template(name, text).expect("the public templates compile");
        }
        let lookup_bucket = lookup::Bucket::new(web.api_rate);
        Ok(Public { archive, links, web, templates, lookup_bucket })
    }

    /// Every route of the public side; anything else is 404.
    pub fn router(self) -> Router {
        Router::new()
            .route("/m/{id}", get(page::message))
            .route("/m/{id}/html", get(page::html))
            .route("/m/{id}/a/{n}", get(page::attachment))
            .route("/api/v1/lookup", get(lookup::lookup))
            .route("/kustomer/card", get(card::page))
            .route("/kustomer/api/messages", get(card::messages))
            .route("/static/public.css", get(|| async { asset("text/css; charset=utf-8", STYLE) }))
            .route("/static/card.js", get(|| async { asset("text/javascript; charset=utf-8", card::SCRIPT) }))
            .fallback(|| async { (StatusCode::NOT_FOUND, "404 not found\n").into_response() })
            .layer(axum::middleware::map_response(|r| async move { secure(r, PAGE_CSP) }))
            .with_state(Arc::new(self))
    }

    /// Renders a page of this module's templates.
    pub(crate) fn render(&self, status: StatusCode, name: &str, ctx: Json) -> Response {
        match self.templates.get_template(name).and_then(|t| t.render(minijinja::value::Serde(&ctx))) {
            Ok(html) => (status, [(header::CONTENT_TYPE, "text/html; charset=utf-8")], html).into_response(),
            Err(e) => {
                warn!(error = %e, template = name, "public page failed to render");
                (StatusCode::INTERNAL_SERVER_ERROR, "500 the page failed to render\n").into_response()
            }
        }
    }

    /// An error page that says `what` and nothing more.
    pub(crate) fn error(&self, status: StatusCode, what: &str) -> Response {
        self.render(status, "error.html", json!({"status": status.as_u16(), "what": what}))
    }

    /// The 403 of every link that does not verify: the same whichever part is wrong.
    pub(crate) fn forbidden(&self) -> Response {
        self.error(StatusCode::FORBIDDEN, "This link is not valid. Ask for a new one.")
    }

    /// `frame-ancestors` sources: this origin and `[web] frame_ancestors`.
    pub(crate) fn ancestors(&self) -> String {
        std::iter::once("'self'")
            .chain(self.web.frame_ancestors.iter().map(String::as_str))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

impl PublicListener {
    /// Binds `[web] listen` (a port in use refuses to start).
    pub async fn bind(public: Public) -> Result<PublicListener, PublicError> {
        let addr = public.web.listen.clone().ok_or(PublicError::Config("no listen address"))?;
        let bind_error = |source| PublicError::Bind { addr: addr.clone(), source };
        let listener = TcpListener::bind(&addr).await.map_err(bind_error)?;
        let addr = listener.local_addr().map_err(bind_error)?;
        Ok(PublicListener { listener, addr, public })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves until `shutdown` turns true, then lets requests in flight finish (briefly).
    pub async fn run(self, shutdown: watch::Receiver<bool>) {
        let public = self.public;
        info!(protocol = "web", addr = %self.addr, base = %public.links.base(), lookup = public.web.api_key.is_some(), card_keys = public.web.card_keys.len(), "listening");
        let router = public.router();
        crate::serve::serve_http("public", self.listener, router, shutdown).await;
    }
}

const STYLE: &str = include_str!("static/public.css");

/// The CSP of a page without a CSP of its own: nothing inline, never framed.
const PAGE_CSP: &str = "default-src 'none'; style-src 'self'; img-src 'self' data:; frame-src 'self'; \
     base-uri 'none'; form-action 'none'; frame-ancestors 'none'";
