//! A local HTTP server for the benchmarks' webhook destinations: `app` served on 127.0.0.1 from
//! its own thread and current-thread runtime (so its CPU is apart from what is measured), until
//! dropped. Include it with `#[path = "common/sink.rs"] mod sink;`.

use std::net::SocketAddr;
use std::time::Duration;

pub struct Sink {
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sink {
    /// Starts serving `app`; `on_thread` runs first on the sink's thread (to note its id, say).
    pub fn start(app: axum::Router, on_thread: impl FnOnce() + Send + 'static) -> Sink {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind sink on 127.0.0.1:0");
        listener.set_nonblocking(true).expect("non-blocking listener");
        let addr = listener.local_addr().expect("sink address");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready, is_ready) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("bench-sink".into())
            .spawn(move || {
                on_thread();
                let _ = ready.send(());
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("sink runtime");
                rt.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
                    tokio::select! {
                        _ = axum::serve(listener, app) => {}
                        _ = stopped => {}
                    }
                });
                rt.shutdown_timeout(Duration::from_millis(200));
            })
            .expect("spawn sink thread");
        let _ = is_ready.recv();
        Sink { addr, stop: Some(stop), thread: Some(thread) }
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Sink {
    /// A sink that answers `200 {}` to every request and hands `seen` the `subject` of each JSON
    /// payload (bodies up to `limit` bytes), as a webhook destination sees mailhook's payloads.
    #[allow(dead_code)]
    pub fn subjects(limit: usize, seen: impl Fn(&str) + Send + Sync + 'static) -> Sink {
        let seen = std::sync::Arc::new(seen);
        let app = axum::Router::new().fallback(move |request: axum::extract::Request| {
            let seen = seen.clone();
            async move {
                let body = axum::body::to_bytes(request.into_body(), limit).await.unwrap_or_default();
                let payload = serde_json::from_slice::<serde_json::Value>(&body).ok();
                if let Some(subject) = payload.as_ref().and_then(|v| v["subject"].as_str()) {
                    seen(subject);
                }
                axum::response::Response::builder()
                    .status(axum::http::StatusCode::OK)
                    .header(axum::http::header::CONTENT_TYPE, "application/json")
                    .body(axum::body::Body::from("{}"))
                    .expect("response")
            }
        });
        Sink::start(app, || {})
    }
}
