//! `[cluster]`: the PostgreSQL that several instances share (see `docs/design.md`, "Cluster").
//!
//! The database is named by a URL, `postgres://user:${PGPASS}@host:port/db`. Its password may
//! only come from the environment: a password written in the file is a config error (checked
//! on the text before `${VAR}` expansion, see [`literal_password`]). The variable holds the
//! password itself, any characters included (it is not percent-decoded). The URL is held as a
//! [`PostgresUrl`], whose `Debug` and `Display` show `***` in place of the password.
//!
//! TLS follows the rest of the config: to a host other than loopback (or a unix socket),
//! `sslmode=require` (TLS, the certificate checked against the public roots and `ca_file`) or
//! `sslmode=disable` written out (plaintext, `check` warns); no `sslmode`, or `prefer`, which
//! would fall back to plaintext without a word, is an error.

use super::Secret;
use serde::Deserialize;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// `[cluster]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// `postgres://user:${PGPASS}@host:port/database`, with `?sslmode=require` to a remote host.
    pub postgres: PostgresUrl,
    /// How long a claim on a message or an IMAP folder holds without being renewed.
    #[serde(default = "default_lease", with = "humantime_serde")]
    pub lease: Duration,
    /// A PEM file of CA certificates the server's certificate is checked against, besides the
    /// public roots (for `sslmode=require`).
    pub ca_file: Option<PathBuf>,
}

fn default_lease() -> Duration {
    Duration::from_secs(30)
}

/// How to protect the connection to the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PgTls {
    /// TLS, the server's certificate checked.
    Require,
    /// Plaintext.
    Disable,
}

/// The database URL. Prints with its password masked.
#[derive(Clone, PartialEq, Eq)]
pub struct PostgresUrl {
    url: Secret,
    /// The password alone, for [`super::Config::secrets`] (redacted wherever it shows up).
    password: Option<Secret>,
}

impl<'de> Deserialize<'de> for PostgresUrl {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<PostgresUrl, D::Error> {
        String::deserialize(d).map(PostgresUrl::new)
    }
}

/// What is wrong with a database URL (never showing the password).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    #[error("must be a postgres:// or postgresql:// URL")]
    Scheme,
    #[error("is not a usable URL: {0}")]
    Syntax(String),
    #[error("has a password in its query: give it in the user part, through the environment (user:${{PGPASS}}@host)")]
    PasswordInQuery,
    #[error("names no host")]
    NoHost,
    #[error("names no user")]
    NoUser,
    #[error("sslmode {0:?} is none of require, disable")]
    SslMode(String),
    #[error(
        "would send the password to {0:?} without TLS: add ?sslmode=require (or write ?sslmode=disable to accept plaintext)"
    )]
    Plaintext(String),
}

/// The parts of a URL: everything but the password, and the password (raw).
struct Parts<'a> {
    /// The URL without its password.
    bare: String,
    password: Option<&'a str>,
    /// `scheme://user`, and what follows the user part (from its `@`).
    head: String,
    tail: &'a str,
}

fn split(url: &str) -> Result<Parts<'_>, UrlError> {
    let rest = url.strip_prefix("postgres://").or_else(|| url.strip_prefix("postgresql://")).ok_or(UrlError::Scheme)?;
    let scheme = &url[..url.len() - rest.len()];
    // The password came from the environment as is, so it may hold `@`, `/` or `?`: the user
    // part ends at the last `@`.
    let Some(at) = rest.rfind('@') else {
        return Ok(Parts { bare: url.to_string(), password: None, head: scheme.to_string(), tail: rest });
    };
    let (userinfo, tail) = (&rest[..at], &rest[at..]);
    let (user, password) = match userinfo.split_once(':') {
        Some((user, password)) => (user, Some(password)),
        None => (userinfo, None),
    };
    Ok(Parts { bare: format!("{scheme}{user}{tail}"), password, head: format!("{scheme}{user}"), tail })
}

impl PostgresUrl {
    pub fn new(url: impl Into<String>) -> PostgresUrl {
        let url = url.into();
        let password = split(&url).ok().and_then(|p| p.password).filter(|p| !p.is_empty()).map(Secret::new);
        PostgresUrl { url: Secret::new(url), password }
    }

    /// The password as a [`Secret`], when the URL has one.
    pub fn password_secret(&self) -> Option<&Secret> {
        self.password.as_ref()
    }

    /// The URL with `***` for its password.
    pub fn redacted(&self) -> String {
        match split(self.url.expose()) {
            Ok(Parts { password: Some(_), head, tail, .. }) => format!("{head}:***{tail}"),
            Ok(Parts { bare, .. }) => bare,
            Err(_) => "***".to_string(),
        }
    }

    /// The password, when the URL has one.
    pub fn password(&self) -> Option<&str> {
        split(self.url.expose()).ok().and_then(|p| p.password)
    }

    /// The connection settings, and whether TLS is required. Checks what [`validate`] checks.
    pub fn connect_config(&self) -> Result<(tokio_postgres::Config, PgTls), UrlError> {
        let parts = split(self.url.expose())?;
        if query_value(&parts.bare, "password").is_some() {
            return Err(UrlError::PasswordInQuery);
        }
        let mode = query_value(&parts.bare, "sslmode");
        // tokio-postgres knows disable/prefer/require only; `sslmode` is read here.
        let mut config: tokio_postgres::Config = without_query_key(&parts.bare, "sslmode")
            .parse()
            .map_err(|e: tokio_postgres::Error| UrlError::Syntax(e.to_string()))?;
        if let Some(password) = parts.password {
            config.password(password);
        }
        if config.get_hosts().is_empty() {
            return Err(UrlError::NoHost);
        }
        if config.get_user().is_none() {
            return Err(UrlError::NoUser);
        }
        let local = config.get_hosts().iter().all(|h| match h {
            tokio_postgres::config::Host::Tcp(name) => super::is_loopback_host(name),
            tokio_postgres::config::Host::Unix(_) => true,
        });
        let tls = match mode.as_deref() {
            Some("require") | Some("verify-full") | Some("verify-ca") => PgTls::Require,
            Some("disable") => PgTls::Disable,
            None | Some("prefer") if local => PgTls::Disable,
            None | Some("prefer") => return Err(UrlError::Plaintext(self.host())),
            Some(other) => return Err(UrlError::SslMode(other.to_string())),
        };
        config.ssl_mode(match tls {
            PgTls::Require => tokio_postgres::config::SslMode::Require,
            PgTls::Disable => tokio_postgres::config::SslMode::Disable,
        });
        config.connect_timeout(Duration::from_secs(10));
        if config.get_application_name().is_none() {
            config.application_name("mailhook");
        }
        Ok((config, tls))
    }

    /// The host part, for messages.
    pub fn host(&self) -> String {
        let bare = split(self.url.expose()).map(|p| p.bare).unwrap_or_default();
        let rest = bare.split_once("://").map_or("", |(_, r)| r);
        let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
        rest.split(['/', '?']).next().unwrap_or_default().to_string()
    }

    /// Whether TLS is off to a host beyond this machine (allowed when written, but `check` warns).
    pub fn plaintext_to_remote(&self) -> bool {
        match self.connect_config() {
            Ok((config, PgTls::Disable)) => config.get_hosts().iter().any(|h| match h {
                tokio_postgres::config::Host::Tcp(name) => !super::is_loopback_host(name),
                tokio_postgres::config::Host::Unix(_) => false,
            }),
            _ => false,
        }
    }
}

/// The value of `key` in the URL's query, if given. Query values needing no decoding only
/// (`sslmode` values are plain words).
fn query_value(url: &str, key: &str) -> Option<String> {
    let query = url.split_once('?')?.1;
    query.split('&').find_map(|kv| kv.split_once('=').filter(|(k, _)| *k == key).map(|(_, v)| v.to_string()))
}

/// `url` without `key=...` in its query.
fn without_query_key(url: &str, key: &str) -> String {
    let Some((base, query)) = url.split_once('?') else { return url.to_string() };
    let kept: Vec<&str> = query.split('&').filter(|kv| kv.split_once('=').map_or(*kv, |(k, _)| k) != key).collect();
    if kept.is_empty() { base.to_string() } else { format!("{base}?{}", kept.join("&")) }
}

impl fmt::Debug for PostgresUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.redacted())
    }
}

impl fmt::Display for PostgresUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// Checks `[cluster]` (what serde cannot): reports `(key, message)` for each problem.
pub(super) fn validate(cluster: &ClusterConfig, err: &mut dyn FnMut(String, String)) {
    if let Err(e) = cluster.postgres.connect_config() {
        err("cluster.postgres".into(), e.to_string());
    }
    if cluster.lease < Duration::from_secs(2) {
        err("cluster.lease".into(), "must be at least 2s (it is renewed at a third of its length)".into());
    }
}

/// Whether the raw text of `cluster.postgres` (before `${VAR}` expansion) writes a password
/// itself rather than through `${VAR}`: the message to report, if so.
pub(super) fn literal_password(raw: &str) -> Option<String> {
    let password = split(raw).ok()?.password?;
    if password.is_empty() || is_reference(password) {
        return None;
    }
    Some(
        "writes the password in the file: give it through the environment, as in \
         postgres://user:${PGPASS}@host/db"
            .to_string(),
    )
}

/// Whether `s` is one `${NAME}` reference and nothing else.
fn is_reference(s: &str) -> bool {
    s.strip_prefix("${")
        .and_then(|r| r.strip_suffix('}'))
        .is_some_and(|name| !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_password_never_prints() {
        let url = PostgresUrl::new("postgres://hook:s3cr@t/pw?x@db.example.com:5433/mail?sslmode=require");
        assert_eq!(url.redacted(), "postgres://hook:***@db.example.com:5433/mail?sslmode=require");
        assert_eq!(format!("{url}"), url.redacted());
        assert!(!format!("{url:?}").contains("s3cr"), "{url:?}");
        assert_eq!(url.password(), Some("s3cr@t/pw?x"));
        assert_eq!(url.host(), "db.example.com:5433");
        let (config, tls) = url.connect_config().unwrap();
        assert_eq!(config.get_password(), Some(&b"s3cr@t/pw?x"[..]));
        assert_eq!(config.get_dbname(), Some("mail"));
        assert_eq!(config.get_ports(), &[5433]);
        assert_eq!(tls, PgTls::Require);
        let bad = PostgresUrl::new("postgres://hook:s3cr@t@db.example.com/mail?sslmode=nope");
        let e = bad.connect_config().unwrap_err();
        assert!(!e.to_string().contains("s3cr") && !format!("{e:?}").contains("s3cr"), "{e}");
    }

    #[test]
    fn tls_to_a_remote_host_is_required_or_written_off() {
        let tls = |u: &str| PostgresUrl::new(u).connect_config().map(|(_, t)| t);
        assert_eq!(tls("postgres://u:p@127.0.0.1:5432/db"), Ok(PgTls::Disable));
        assert_eq!(tls("postgres://u:p@localhost/db"), Ok(PgTls::Disable));
        assert_eq!(tls("postgres://u:p@localhost/db?sslmode=require"), Ok(PgTls::Require));
        assert_eq!(tls("postgres://u:p@db.example.com/db?sslmode=require"), Ok(PgTls::Require));
        assert_eq!(tls("postgres://u:p@db.example.com/db?sslmode=disable"), Ok(PgTls::Disable));
        assert!(PostgresUrl::new("postgres://u:p@db.example.com/db?sslmode=disable").plaintext_to_remote());
        assert!(!PostgresUrl::new("postgres://u:p@127.0.0.1/db").plaintext_to_remote());
        assert!(
            matches!(tls("postgres://u:p@db.example.com/db"), Err(UrlError::Plaintext(h)) if h == "db.example.com")
        );
        assert!(matches!(tls("postgres://u:p@10.0.0.5/db?sslmode=prefer"), Err(UrlError::Plaintext(_))));
        assert!(matches!(tls("postgres://u:p@10.0.0.5/db?sslmode=allow"), Err(UrlError::SslMode(_))));
        assert_eq!(tls("mysql://u:p@localhost/db"), Err(UrlError::Scheme));
        assert_eq!(tls("postgres://localhost/db"), Err(UrlError::NoUser));
        assert_eq!(tls("postgres://u@localhost/db?password=hunter2"), Err(UrlError::PasswordInQuery));
    }

    #[test]
    fn only_a_reference_may_stand_for_the_password() {
        assert!(literal_password("postgres://u:hunter2@h/db").is_some());
        assert!(literal_password("postgres://u:${PGPASS}x@h/db").is_some());
        assert!(literal_password("postgres://u:${PGPASS}@h/db").is_none());
        assert!(literal_password("postgres://u@h/db").is_none());
        assert!(literal_password("${DATABASE_URL}").is_none());
    }
}
