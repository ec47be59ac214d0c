//! Opening an authenticated IMAP session: TCP, then TLS (implicit or STARTTLS, rustls with the
//! web PKI roots plus an optional extra CA), then LOGIN, AUTHENTICATE PLAIN or XOAUTH2.
//!
//! Errors are worded for the operator and never contain the password or the access token.

use crate::config::{ImapAuth, ImapConfig, ImapTls};
use async_imap::{Authenticator, Client, Session};
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::pki_types::ServerName;

/// The connection under an IMAP session: plain TCP (loopback only) or TLS.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl fmt::Debug for Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stream::Plain(_) => "Stream::Plain",
            Stream::Tls(_) => "Stream::Tls",
        })
    }
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

pub type ImapSession = Session<Stream>;

/// Why a connection could not be made. Network and TLS failures may pass by themselves;
/// refused or unavailable credentials need an operator (see [`ConnectError::is_temporary`]).
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot connect to {server}: {source}")]
    Connect {
        server: String,
        #[source]
        source: io::Error,
    },
    #[error("{server} closed the connection before its greeting")]
    NoGreeting { server: String },
    #[error("no greeting from {server}: {source}")]
    Greeting {
        server: String,
        #[source]
        source: io::Error,
    },
    #[error("{server} during authentication: {source}")]
    Dropped {
        server: String,
        #[source]
        source: io::Error,
    },
    #[error("{server} refused STARTTLS: {source}")]
    Starttls {
        server: String,
        #[source]
        source: io::Error,
    },
    #[error("{host:?} is not a valid TLS server name: {source}")]
    ServerName {
        host: String,
        #[source]
        source: tokio_rustls::rustls::pki_types::InvalidDnsNameError,
    },
    #[error("TLS with {server}: {source}")]
    Handshake {
        server: String,
        #[source]
        source: io::Error,
    },
    #[error("authentication refused for {user}: {reason}")]
    Auth { user: String, reason: String },
    #[error("token_file {}: {source}", path.display())]
    TokenFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("token_command: {0}")]
    TokenCommand(#[source] io::Error),
    #[error("token_command failed ({status}): {stderr}")]
    TokenCommandFailed { status: std::process::ExitStatus, stderr: String },
    #[error("token_command printed something that is not UTF-8")]
    TokenNotUtf8,
    #[error("xoauth2 needs token_file or token_command")]
    NoTokenSource,
    #[error("the XOAUTH2 access token is empty")]
    EmptyToken,
}

impl ConnectError {
    /// Whether reconnecting later may work: a network or TLS failure may pass; refused or
    /// unavailable credentials need an operator.
    pub fn is_temporary(&self) -> bool {
        use ConnectError::*;
        match self {
            Connect { .. }
            | NoGreeting { .. }
            | Greeting { .. }
            | Dropped { .. }
            | Starttls { .. }
            | Handshake { .. } => true,
            ServerName { .. }
            | Auth { .. }
            | TokenFile { .. }
            | TokenCommand(_)
            | TokenCommandFailed { .. }
            | TokenNotUtf8
            | NoTokenSource
            | EmptyToken => false,
        }
    }
}

pub use crate::tls::{CaFileError, tls_config};

/// Everything needed to (re)connect one account, prepared once from its config.
#[derive(Clone)]
pub struct Connector {
    host: String,
    port: u16,
    tls: ImapTls,
    tls_config: Option<Arc<tokio_rustls::rustls::ClientConfig>>,
    user: String,
    auth: ImapAuth,
    password: Option<crate::config::Secret>,
    token_file: Option<PathBuf>,
    token_command: Option<String>,
    timeout: Duration,
}

impl Connector {
    /// Builds a connector; paths in `account` are already resolved. Fails on an unreadable
    /// `ca_file`.
    pub fn new(account: &ImapConfig, ca_file: Option<&Path>, timeout: Duration) -> Result<Connector, CaFileError> {
        let tls_config = match account.tls {
            ImapTls::None => None,
            ImapTls::Implicit | ImapTls::Starttls => Some(Arc::new(tls_config(ca_file)?)),
        };
        let port = account.port.unwrap_or(if account.tls == ImapTls::Implicit { 993 } else { 143 });
        Ok(Connector {
            host: account.host.clone(),
            port,
            tls: account.tls,
            tls_config,
            user: account.user.clone(),
            auth: account.auth,
            password: account.password.clone(),
            token_file: account.token_file.clone(),
            token_command: account.token_command.clone(),
            timeout,
        })
    }

    /// `host:port`, for logs.
    pub fn server(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// Connects, secures and authenticates; every step is bounded by the command timeout.
    pub async fn connect(&self) -> Result<ImapSession, ConnectError> {
        let server = self.server();
        let tcp = within(self.timeout, TcpStream::connect((self.host.as_str(), self.port)))
            .await
            .map_err(|source| ConnectError::Connect { server: server.clone(), source })?;
        let _ = tcp.set_nodelay(true);
        let stream = match self.tls {
            ImapTls::None => Stream::Plain(tcp),
            ImapTls::Implicit => Stream::Tls(Box::new(self.handshake(tcp).await?)),
            ImapTls::Starttls => {
                let mut client = Client::new(Stream::Plain(tcp));
                self.greeting(&mut client).await?;
                within(self.timeout, async {
                    client.run_command_and_check_ok("STARTTLS", None).await.map_err(io::Error::other)
                })
                .await
                .map_err(|source| ConnectError::Starttls { server: server.clone(), source })?;
                let Stream::Plain(tcp) = client.into_inner() else { unreachable!("STARTTLS on a plain stream") };
                Stream::Tls(Box::new(self.handshake(tcp).await?))
            }
        };
        let mut client = Client::new(stream);
        if self.tls != ImapTls::Starttls {
            self.greeting(&mut client).await?;
        }
        self.authenticate(client).await
    }

    async fn greeting(&self, client: &mut Client<Stream>) -> Result<(), ConnectError> {
        let server = self.server();
        match within(self.timeout, async { client.read_response().await }).await {
            Ok(Some(_)) => Ok(()),
            Ok(None) => Err(ConnectError::NoGreeting { server }),
            Err(source) => Err(ConnectError::Greeting { server, source }),
        }
    }

    async fn handshake(&self, tcp: TcpStream) -> Result<TlsStream<TcpStream>, ConnectError> {
        let config = self.tls_config.clone().expect("TLS configured");
        let name = ServerName::try_from(self.host.clone())
            .map_err(|source| ConnectError::ServerName { host: self.host.clone(), source })?;
        within(self.timeout, TlsConnector::from(config).connect(name, tcp))
            .await
            .map_err(|source| ConnectError::Handshake { server: self.server(), source })
    }

    async fn authenticate(&self, client: Client<Stream>) -> Result<ImapSession, ConnectError> {
        let user = self.user.clone();
        let refused = |e: async_imap::error::Error| match e {
            async_imap::error::Error::No(reason) | async_imap::error::Error::Bad(reason) => {
                ConnectError::Auth { user: user.clone(), reason: reason.trim().to_string() }
            }
            other => ConnectError::Dropped { server: self.server(), source: io::Error::other(other) },
        };
        let secret = match self.auth {
            ImapAuth::Login | ImapAuth::Plain => {
                self.password.as_ref().map(|p| p.expose().to_string()).unwrap_or_default()
            }
            ImapAuth::Xoauth2 => self.access_token().await?,
        };
        let result = within(self.timeout, async {
            Ok::<_, io::Error>(match self.auth {
                ImapAuth::Login => client.login(&self.user, &secret).await.map_err(|(e, _)| e),
                ImapAuth::Plain => client
                    .authenticate("PLAIN", Sasl::once(format!("\0{}\0{}", self.user, secret)))
                    .await
                    .map_err(|(e, _)| e),
                ImapAuth::Xoauth2 => client
                    .authenticate(
                        "XOAUTH2",
                        Sasl::once(format!("user={}\x01auth=Bearer {}\x01\x01", self.user, secret)),
                    )
                    .await
                    .map_err(|(e, _)| e),
            })
        })
        .await
        .map_err(|source| ConnectError::Dropped { server: self.server(), source })?;
        result.map_err(refused)
    }

    /// The XOAUTH2 access token, read afresh at each connect (tokens expire within the hour).
    async fn access_token(&self) -> Result<String, ConnectError> {
        let token = if let Some(path) = &self.token_file {
            tokio::fs::read_to_string(path)
                .await
                .map_err(|source| ConnectError::TokenFile { path: path.clone(), source })?
        } else if let Some(command) = &self.token_command {
            let output = within(
                self.timeout,
                tokio::process::Command::new("/bin/sh").arg("-c").arg(command).kill_on_drop(true).output(),
            )
            .await
            .map_err(ConnectError::TokenCommand)?;
            if !output.status.success() {
                let stderr = String::from_utf8_lossy(&output.stderr);
                let first = stderr.lines().next().unwrap_or("").chars().take(200).collect::<String>();
                return Err(ConnectError::TokenCommandFailed { status: output.status, stderr: first });
            }
            String::from_utf8(output.stdout).map_err(|_| ConnectError::TokenNotUtf8)?
        } else {
            return Err(ConnectError::NoTokenSource);
        };
        let token = token.trim().to_string();
        if token.is_empty() {
            return Err(ConnectError::EmptyToken);
        }
        Ok(token)
    }
}

/// A SASL mechanism that sends one initial response, then an empty one to any further challenge
/// (with XOAUTH2 a refusal comes as a challenge holding a JSON error, to be answered empty).
struct Sasl {
    first: Option<String>,
}

impl Sasl {
    fn once(response: String) -> Sasl {
        Sasl { first: Some(response) }
    }
}

impl Authenticator for Sasl {
    type Response = String;
    fn process(&mut self, _challenge: &[u8]) -> String {
        self.first.take().unwrap_or_default()
    }
}

/// Runs `f` with a deadline; a timeout becomes an `io::Error` saying how long was waited.
pub async fn within<T, E: Into<Box<dyn std::error::Error + Send + Sync>>>(
    limit: Duration,
    f: impl Future<Output = Result<T, E>>,
) -> Result<T, io::Error> {
    match tokio::time::timeout(limit, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(io::Error::other(e)),
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no answer within {}", humantime::format_duration(limit)),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn account(text: &str) -> ImapConfig {
        let text = format!("[[imap]]\nname = \"a\"\nhost = \"127.0.0.1\"\nuser = \"u\"\n{text}");
        let config = crate::config::Config::parse(&text, Path::new("m.toml"), Path::new("/"), &|_| None).unwrap();
        config.imap[0].clone()
    }

    #[tokio::test]
    async fn a_refused_connection_is_temporary() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let a = account(&format!("port = {port}\ntls = \"none\"\npassword = \"p\"\n"));
        let e = Connector::new(&a, None, Duration::from_secs(5)).unwrap().connect().await.expect_err("closed port");
        assert!(matches!(e, ConnectError::Connect { .. }) && e.is_temporary(), "{e}");
        assert!(e.to_string().starts_with(&format!("cannot connect to 127.0.0.1:{port}: ")), "{e}");
    }

    #[test]
    fn a_ca_file_without_a_certificate_is_refused_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "no certificate here").unwrap();
        let a = account("password = \"p\"\n");
        let e = Connector::new(&a, Some(&ca), Duration::from_secs(5)).err().expect("empty CA file");
        assert!(matches!(&e, CaFileError::Empty(p) if *p == ca), "{e}");
        let e = Connector::new(&a, Some(&dir.path().join("missing.pem")), Duration::from_secs(5)).err().unwrap();
        assert!(matches!(&e, CaFileError::Read { source, .. } if source.kind() == io::ErrorKind::NotFound), "{e}");
    }
}
