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
