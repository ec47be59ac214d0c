//! SMTP and LMTP listeners: legacy systems relay their mail here (SMTP, RFC 5321) and mail
//! servers hand it over (LMTP, RFC 2033). Both feed the spool and answer `250` only once the
//! message is on disk.
//!
//! ```text
//! TCP accept ─► allow? ─► connection limits (all, per address)? ─► Session (session.rs) ─► spool draft ─► commit ─► 250
//! ```
//!
//! Limits, as Postfix's smtpd and anvil(8) set them by default: `max_connections` in all and
//! `max_connections_per_ip` per client address (`421` beyond); a command line must arrive
//! whole within `command_timeout` and a body within `data_timeout` plus a second per
//! `min_data_rate` bytes, however slowly it trickles; AUTH closes the session after
//! `auth.max_failures` failures, waits longer after each, and refuses AUTH to an address that
//! failed `auth.max_failures_per_minute` times in a minute ([`clients`]).
//!
//! The listener follows the mini-redis shape: a task per connection whose errors are logged,
//! never propagated; a semaphore for the connection limit; a watch channel for shutdown (new
//! connections and idle sessions get `421`, transactions in progress may finish).

pub mod clients;
mod session;

pub use clients::Clients;
pub use session::{End, Session};

use crate::config::{Config, ListenerConfig, Secret};
use crate::metrics::{ListenerHealth, Metrics};
use crate::spool::Inbox;
use crate::spool::Spool;
use regex::Regex;
use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, error, info, warn};

/// What a session needs to know, built once from `[smtp]` or `[lmtp]`.
pub struct SessionConfig {
    pub lmtp: bool,
    pub hostname: String,
    pub max_size: usize,
    pub recipients: Vec<Regex>,
    pub allow: Vec<ipnet::IpNet>,
    pub tls: Option<TlsAcceptor>,
    pub auth_users: Option<BTreeMap<String, Secret>>,
    pub auth_required: bool,
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    pub max_recipients: usize,
    pub command_timeout: Duration,
    pub data_timeout: Duration,
    /// Bytes per second that earn a body time beyond `data_timeout`.
    pub min_data_rate: u64,
    /// Failed AUTH attempts after which a session is closed.
    pub auth_max_failures: usize,
    /// The wait before answering a failed AUTH, times the session's failures so far.
    pub auth_failure_delay: Duration,
    /// Failed AUTH attempts an address may make in a minute.
    pub auth_failures_per_minute: usize,
    /// Per-address counts, shared by every session of the listener.
    pub clients: Arc<Clients>,
    /// Where connections and refusals are counted.
    pub metrics: Arc<Metrics>,
}

#[derive(Debug, thiserror::Error)]
pub enum ListenerError {
    #[error("{protocol}.tls: {source}")]
    Tls {
        protocol: &'static str,
        #[source]
        source: TlsError,
    },
    #[error("{protocol}.listen: cannot listen on {addr}: {source}")]
    Bind { protocol: &'static str, addr: String, source: io::Error },
    #[error("{protocol}.recipients: {source}")]
    Recipients {
        protocol: &'static str,
        #[source]
        source: regex::Error,
    },
}

impl ListenerError {
    /// A port in use may be free on the next try; a bad certificate or pattern stays bad.
    pub fn is_temporary(&self) -> bool {
        matches!(self, ListenerError::Bind { .. })
    }
}

/// A certificate or key that cannot serve TLS.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{}: {source}", path.display())]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: no PEM certificate in it", .0.display())]
    NoCertificate(std::path::PathBuf),
    #[error("{}: no PEM private key in it", .0.display())]
    NoKey(std::path::PathBuf),
    #[error("{0}")]
    Protocols(#[source] rustls::Error),
    #[error("certificate and key do not go together: {0}")]
    Mismatch(#[source] rustls::Error),
}

impl SessionConfig {
    pub fn protocol(&self) -> &'static str {
        if self.lmtp { "lmtp" } else { "smtp" }
    }

    /// Counts a refusal for `reason` (`not_allowed`, `unknown_recipient`, `too_big`, …).
    pub fn rejected(&self, reason: &str) {
        self.metrics.rejected(self.protocol(), reason);
    }

    pub fn build(
        l: &ListenerConfig,
        lmtp: bool,
        config: &Config,
        metrics: Arc<Metrics>,
    ) -> Result<SessionConfig, ListenerError> {
        let protocol = if lmtp { "lmtp" } else { "smtp" };
        let tls = match &l.tls {
            Some(t) => Some(
                tls_acceptor(&config.resolve(&t.cert), &config.resolve(&t.key))
                    .map_err(|source| ListenerError::Tls { protocol, source })?,
            ),
            None => None,
        };
        let recipients = l
            .recipients
            .iter()
            .map(|r| Regex::new(r).map_err(|source| ListenerError::Recipients { protocol, source }))
            .collect::<Result<_, _>>()?;
        Ok(SessionConfig {
            lmtp,
            hostname: l.hostname.clone(),
            max_size: l.max_size.as_u64() as usize,
            recipients,
            allow: l.allow.clone(),
            tls,
            auth_users: l.auth.as_ref().map(|a| a.users.clone()),
            auth_required: l.auth.as_ref().is_some_and(|a| a.required),
            max_connections: l.max_connections,
            max_connections_per_ip: l.max_connections_per_ip,
            max_recipients: l.max_recipients,
            command_timeout: l.command_timeout,
            data_timeout: l.data_timeout,
            min_data_rate: l.min_data_rate.as_u64().max(1),
            auth_max_failures: l.auth.as_ref().map_or(3, |a| a.max_failures),
            auth_failure_delay: l.auth.as_ref().map_or(Duration::from_secs(1), |a| a.failure_delay),
            auth_failures_per_minute: l.auth.as_ref().map_or(10, |a| a.max_failures_per_minute),
            clients: Arc::new(Clients::default()),
            metrics,
        })
    }
}

/// A TLS acceptor from PEM certificate chain and key files.
pub fn tls_acceptor(cert: &std::path::Path, key: &std::path::Path) -> Result<TlsAcceptor, TlsError> {
    let at = |p: &std::path::Path| {
        let path = p.to_path_buf();
        move |source| TlsError::Read { path, source }
    };
    let cert_pem = std::fs::read(cert).map_err(at(cert))?;
    let key_pem = std::fs::read(key).map_err(at(key))?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut cert_pem.as_slice()).collect::<Result<_, _>>().map_err(at(cert))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(cert.to_path_buf()));
    }
    let key = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .map_err(at(key))?
        .ok_or_else(|| TlsError::NoKey(key.to_path_buf()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Protocols)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(TlsError::Mismatch)?;
    Ok(TlsAcceptor::from(Arc::new(server)))
}

/// A stream that may be upgraded to TLS mid-session (STARTTLS).
pub enum Conn<S> {
    Plain(S),
    Tls(Box<tokio_rustls::server::TlsStream<S>>),
    /// Only while upgrading.
    Closed,
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Conn<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Conn::Closed => Poll::Ready(Ok(())),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Conn<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Conn::Closed => Poll::Ready(Err(io::ErrorKind::NotConnected.into())),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Conn::Closed => Poll::Ready(Ok(())),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Conn::Closed => Poll::Ready(Ok(())),
        }
    }
}

/// A bound SMTP or LMTP listener, ready to run.
pub struct Listener {
    cfg: Arc<SessionConfig>,
    sockets: Vec<(TcpListener, SocketAddr, Arc<ListenerHealth>)>,
}

impl Listener {
    /// Binds every `listen` address (so a port in use is an error at start-up).
    pub async fn bind(
        l: &ListenerConfig,
        lmtp: bool,
        config: &Config,
        metrics: &Arc<Metrics>,
    ) -> Result<Listener, ListenerError> {
        let cfg = Arc::new(SessionConfig::build(l, lmtp, config, metrics.clone())?);
        let protocol = if lmtp { "lmtp" } else { "smtp" };
        let mut sockets = Vec::new();
        for addr in &l.listen {
            let listener = TcpListener::bind(addr).await.map_err(|source| ListenerError::Bind {
                protocol,
                addr: addr.clone(),
                source,
            })?;
            let local =
                listener.local_addr().map_err(|source| ListenerError::Bind { protocol, addr: addr.clone(), source })?;
            let health = metrics.listener(protocol, &local.to_string());
            sockets.push((listener, local, health));
        }
        Ok(Listener { cfg, sockets })
    }

    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.sockets.iter().map(|(_, a, _)| *a).collect()
    }

    /// Accepts connections until shutdown; then answers new ones `421` while the sessions
    /// still open finish (up to `grace`).
    pub async fn run(self, spool: Spool, inbox: Arc<Inbox>, shutdown: watch::Receiver<bool>, grace: Duration) {
        let protocol = if self.cfg.lmtp { "lmtp" } else { "smtp" };
        let permits = Arc::new(Semaphore::new(self.cfg.max_connections));
        let mut loops = JoinSet::new();
        for (listener, addr, health) in self.sockets {
            info!(protocol, addr = %addr, "listening");
            health.set_up(true);
            let ctx = Accept {
                cfg: self.cfg.clone(),
                spool: spool.clone(),
                inbox: inbox.clone(),
                shutdown: shutdown.clone(),
                permits: permits.clone(),
                protocol,
                grace,
            };
            loops.spawn(async move {
                ctx.run(listener, &health).await;
                health.set_up(false);
            });
        }
        while loops.join_next().await.is_some() {}
    }
}

struct Accept {
    cfg: Arc<SessionConfig>,
    spool: Spool,
    inbox: Arc<Inbox>,
    shutdown: watch::Receiver<bool>,
    permits: Arc<Semaphore>,
    protocol: &'static str,
    grace: Duration,
}

impl Accept {
    async fn run(mut self, listener: TcpListener, health: &ListenerHealth) {
        let protocol = self.protocol;
        let mut sessions = JoinSet::new();
        let mut backoff = Duration::from_millis(10);
        let mut deadline: Option<tokio::time::Instant> = None;
        loop {
            let stopping = deadline.is_some();
            if stopping && sessions.is_empty() {
                break;
            }
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = self.shutdown.changed(), if !stopping => {
                    info!(protocol, open = sessions.len(), "shutting down: refusing new connections");
                    deadline = Some(tokio::time::Instant::now() + self.grace);
                    continue;
                }
                _ = sessions.join_next(), if stopping && !sessions.is_empty() => continue,
                _ = tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)), if stopping => {
                    if !sessions.is_empty() {
                        warn!(protocol, open = sessions.len(), "grace period over: closing the remaining sessions");
                    }
                    break;
                }
            };
            while sessions.try_join_next().is_some() {}
            let (mut stream, peer) = match accepted {
                Ok(x) => {
                    backoff = Duration::from_millis(10);
                    x
                }
                Err(e) => {
                    // Out of file descriptors and the like: wait a little, do not spin.
                    error!(protocol, error = %e, "accept failed");
                    health.accept_failed(&e.to_string());
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            self.cfg.metrics.connection(protocol);
            let ip = peer.ip().to_canonical();
            let refusal = if stopping {
                self.cfg.rejected("shutting_down");
                Some("421 4.3.2 Service shutting down, try again later".to_string())
            } else if !self.cfg.allow.iter().any(|net| net.contains(&ip)) {
                info!(protocol, peer = %peer, "client network not allowed");
                self.cfg.rejected("not_allowed");
                Some(format!("554 5.7.1 {ip} is not allowed to connect"))
            } else {
                None
            };
            let permit = match refusal {
                Some(_) => None,
                None => match self.permits.clone().try_acquire_owned() {
                    Ok(p) => Some(p),
                    Err(_) => {
                        warn!(protocol, peer = %peer, max = self.cfg.max_connections, "connection limit reached");
                        self.cfg.rejected("too_many_connections");
                        None
                    }
                },
            };
            let permit = permit.and_then(|p| match self.cfg.clients.connect(ip, self.cfg.max_connections_per_ip) {
                Some(slot) => Some((p, slot)),
                None => {
                    debug!(protocol, peer = %peer, max = self.cfg.max_connections_per_ip, "connection limit per address reached");
                    self.cfg.rejected("too_many_connections_per_ip");
                    None
                }
            });
            let Some(permit) = permit else {
                let line = refusal.unwrap_or_else(|| "421 4.7.0 Too many connections, try again later".to_string());
                tokio::spawn(async move {
                    let _ = stream.write_all(format!("{line}\r\n").as_bytes()).await;
                    let _ = stream.shutdown().await;
                });
                continue;
            };
            debug!(protocol, peer = %peer, "connection");
            let session = Session::new(
                self.cfg.clone(),
                self.spool.clone(),
                self.inbox.clone(),
                self.shutdown.clone(),
                stream,
                peer,
            );
            sessions.spawn(async move {
                session.run().await;
                drop(permit);
            });
        }
    }
}

#[cfg(test)]
mod tests;
