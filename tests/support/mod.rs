//! Shared test support for integration tests: local stand-ins for the outside services that
//! mailhook delivers to. Include it from a test file with `mod support;`.
//!
//! - [`hook::HookServer`]: an HTTP server that behaves like Kustomer's inbound web/form hooks
//!   (Bearer auth, 400 KB body limit, scripted 429/5xx faults) and records every request.
//! - [`smtp::SmtpSink`]: a plain SMTP server that accepts the mail an email-hook destination sends,
//!   with optional AUTH and scripted DATA replies, plus [`smtp::json_ld`] to read the payload back.
//! - [`smtp_client::SmtpClient`]: a raw-socket SMTP/LMTP client for scripted dialogues with
//!   mailhook's own listeners (pipelining, STARTTLS, malformed input), printing the dialogue on
//!   failure.
//! - [`dovecot::Dovecot`]: a private Dovecot IMAP server (a real one, started as a child process
//!   with its own temp dir and ports; optional TLS, IDLE off, XOAUTH2) for the IMAP watcher, with
//!   [`dovecot::ImapClient`] to set up and inspect its mailboxes. Needs `dovecot-imapd` installed.
//!
//! - [`browser::Driver`]: chromedriver and a headless Chromium for page tests.
//! - [`tmpfs::Tmpfs`]: a tmpfs to turn read-only and back (needs root).
//! - [`postgres::Postgres`]: a private PostgreSQL cluster (initdb + pg_ctl on a free loopback
//!   port, in a temporary directory), shared by a test binary, one database per test. Needs
//!   `postgresql` installed.
//!
//! Every in-process server binds `127.0.0.1:0`, runs on its own thread with its own tokio runtime
//! (so it works from sync tests, async tests and while a `mailhook` subprocess talks to it) and
//! stops when dropped; Dovecot runs as a child process on free loopback ports and is killed when
//! dropped. Each test starts its own servers, so tests can run in parallel.
#![allow(dead_code)]

pub mod browser;
pub mod dovecot;
pub mod gateway;
pub mod hook;
pub mod http;
pub mod postgres;
pub mod smtp;
pub mod smtp_client;
pub mod tls;
pub mod tmpfs;

use std::time::{Duration, Instant};

/// Installs the `ring` rustls provider for this process. Call it before building a reqwest
/// `Client` (reqwest is built without a provider of its own and panics otherwise). Idempotent.
pub fn init_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A reqwest client for talking to the support servers (ring provider installed first).
pub fn http_client() -> reqwest::Client {
    init_crypto();
    reqwest::Client::builder().timeout(Duration::from_secs(30)).build().expect("build reqwest client")
}

/// Polls `f` every few milliseconds until it returns `Some` or `timeout` passes.
pub(crate) fn poll_until<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Async form of [`poll_until`], for tests whose own runtime must keep running while they wait.
pub(crate) async fn poll_until_async<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A server thread with its own tokio runtime, stopped and joined on drop.
pub(crate) struct Background {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Background {
    /// Runs `serve(listener)` on a new thread until the returned value is dropped. The listener
    /// must already be bound (so callers know the address before this returns).
    pub(crate) fn spawn<F, Fut>(name: String, listener: std::net::TcpListener, serve: F) -> Background
    where
        F: FnOnce(tokio::net::TcpListener) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()>,
    {
        listener.set_nonblocking(true).expect("set listener non-blocking");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || {
                let rt =
                    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("build server runtime");
                rt.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
                    tokio::select! {
                        _ = serve(listener) => {}
                        _ = stopped => {}
                    }
                });
                // Drops every connection task still running (keep-alive clients, delayed answers).
                rt.shutdown_timeout(Duration::from_millis(500));
            })
            .expect("spawn server thread");
        Background { stop: Some(stop), thread: Some(thread) }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Polls `f` every 50 ms until it holds; panics naming `what` after `timeout`.
pub fn wait_for(what: &str, timeout: std::time::Duration, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + timeout;
    while !f() {
        assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
