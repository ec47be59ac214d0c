//! config: `mailhook.toml` → [`Config`].
//!
//! Loading happens in three passes, each of which reports *every* problem it finds:
//!
//! 1. TOML syntax (the `toml` crate's message, with line and column);
//! 2. `${VAR}` expansion in every string value; an unset variable is an error naming the key
//!    (`$${` writes a literal `${`);
//! 3. typed deserialisation (`deny_unknown_fields`: a misspelt key is an error naming it; each
//!    `[destination.NAME]` is read by its `type` into a table of that type's keys only), then
//!    [`Config::validate`] for what types cannot say (a bad regex, TLS `none` to a remote IMAP
//!    server, a token over `http://`, an open listener, …). [`Config::warnings`] names what is
//!    allowed but weaker than the defaults (`check` prints them, `serve` logs them).
//!
//! Values from the environment are expanded after the syntax pass and never appear in error
//! messages; secret values are held in [`Secret`], whose `Debug` prints `***`.
//!
//! Relative paths (`spool.dir`, `rules.dir`, certificate and output files) are resolved against
//! the directory that holds the config file, so a service started from anywhere finds them.

mod rate;

use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use rate::Rate;

/// A string that must not be printed: passwords, tokens, hook keys.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }
    /// The secret itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

/// The whole `mailhook.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub spool: SpoolConfig,
    #[serde(default)]
    pub rules: RulesConfig,
    pub smtp: Option<ListenerConfig>,
    pub lmtp: Option<ListenerConfig>,
    #[serde(default)]
    pub imap: Vec<ImapConfig>,
    /// Read by [`Config::parse`] one table at a time (see [`DestinationConfig::from_table`]).
    #[serde(default, skip_deserializing)]
    pub destination: BTreeMap<String, DestinationConfig>,
    #[serde(default)]
    pub delivery: DeliveryConfig,
    pub admin: Option<AdminConfig>,
    /// Directory of the config file; relative paths are resolved against it.
    #[serde(skip)]
    pub base_dir: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpoolConfig {
    #[serde(default = "default_spool_dir")]
    pub dir: PathBuf,
    /// Flush every write to stable storage before acknowledging. Turn off only to measure.
    #[serde(default = "default_true")]
    pub fsync: bool,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        SpoolConfig { dir: default_spool_dir(), fsync: true }
    }
}

fn default_spool_dir() -> PathBuf {
    PathBuf::from("./spool")
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RulesConfig {
    #[serde(default = "default_rules_dir")]
    pub dir: PathBuf,
    /// `dead` (keep for replay), `drop`, or a destination name.
    #[serde(default = "default_unmatched")]
    pub unmatched: String,
}

impl Default for RulesConfig {
    fn default() -> Self {
        RulesConfig { dir: default_rules_dir(), unmatched: default_unmatched() }
    }
}

fn default_rules_dir() -> PathBuf {
    PathBuf::from("./rules")
}
fn default_unmatched() -> String {
    "dead".to_string()
}

/// `[smtp]` and `[lmtp]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    pub listen: Vec<String>,
    #[serde(default = "default_hostname")]
    pub hostname: String,
    #[serde(default = "default_max_size")]
    pub max_size: bytesize::ByteSize,
    /// Client networks allowed to connect; others get 554 at connect.
    #[serde(default = "default_allow")]
    pub allow: Vec<ipnet::IpNet>,
    /// Regexes a recipient must match (any); others get 550 at RCPT. Empty: every recipient.
    #[serde(default)]
    pub recipients: Vec<String>,
    pub tls: Option<TlsConfig>,
    pub auth: Option<AuthConfig>,
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Connections one client address may hold at once; more get `421`.
    #[serde(default = "default_max_connections_per_ip")]
    pub max_connections_per_ip: usize,
    #[serde(default = "default_max_recipients")]
    pub max_recipients: usize,
    /// The longest a whole command line may take to arrive, however it trickles in.
    #[serde(default = "default_command_timeout", with = "humantime_serde")]
    pub command_timeout: Duration,
    /// The longest a message body (DATA, or each BDAT chunk) may take, plus one second per
    /// `min_data_rate` bytes received.
    #[serde(default = "default_data_timeout", with = "humantime_serde")]
    pub data_timeout: Duration,
    /// Bytes per second a body must arrive at, on average, to earn time beyond `data_timeout`.
    #[serde(default = "default_min_data_rate")]
    pub min_data_rate: bytesize::ByteSize,
}

impl ListenerConfig {
    /// Whether every `listen` address is a loopback one.
    pub fn loopback_only(&self) -> bool {
        self.listen.iter().all(|a| a.parse::<SocketAddr>().is_ok_and(|a| a.ip().is_loopback()))
    }

    /// Whether some `recipients` pattern matches every address (it matches the empty string).
    pub fn accepts_any_recipient(&self) -> bool {
        self.recipients.iter().any(|r| regex::Regex::new(r).is_ok_and(|re| re.is_match("")))
    }
}

fn default_hostname() -> String {
    "localhost".to_string()
}
fn default_max_size() -> bytesize::ByteSize {
    bytesize::ByteSize::mb(25)
}
fn default_allow() -> Vec<ipnet::IpNet> {
    vec!["127.0.0.0/8".parse().expect("literal"), "::1/128".parse().expect("literal")]
}
fn default_max_connections() -> usize {
    1000
}
fn default_max_connections_per_ip() -> usize {
    20
}
fn default_min_data_rate() -> bytesize::ByteSize {
    bytesize::ByteSize::b(500)
}
fn default_max_recipients() -> usize {
    100
}
fn default_command_timeout() -> Duration {
    Duration::from_secs(300)
}
fn default_data_timeout() -> Duration {
    Duration::from_secs(600)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    pub users: BTreeMap<String, Secret>,
    /// Refuse MAIL before AUTH.
    #[serde(default)]
    pub required: bool,
    /// Failed AUTH attempts after which the session is closed.
    #[serde(default = "default_auth_max_failures")]
    pub max_failures: usize,
    /// Wait before answering a failed AUTH: this, times the session's failures so far.
    #[serde(default = "default_auth_failure_delay", with = "humantime_serde")]
    pub failure_delay: Duration,
    /// Failed AUTH attempts one client address may make in a minute, over all its
    /// connections; past that its AUTH commands get `421` until the minute is over.
    #[serde(default = "default_auth_failures_per_minute")]
    pub max_failures_per_minute: usize,
}

fn default_auth_max_failures() -> usize {
    3
}
fn default_auth_failure_delay() -> Duration {
    Duration::from_secs(1)
}
fn default_auth_failures_per_minute() -> usize {
    10
}

/// `[[imap]]`: one watched account.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImapConfig {
    pub name: String,
    pub host: String,
    pub port: Option<u16>,
    #[serde(default)]
    pub tls: ImapTls,
    pub ca_file: Option<PathBuf>,
    pub user: String,
    pub password: Option<Secret>,
    /// `login` (default), `plain`, or `xoauth2`.
    #[serde(default)]
    pub auth: ImapAuth,
    /// XOAUTH2 access token read from this file at each connect.
    pub token_file: Option<PathBuf>,
    /// XOAUTH2 access token printed by this command at each connect.
    pub token_command: Option<String>,
    #[serde(default = "default_folders")]
    pub folders: Vec<String>,
    #[serde(default)]
    pub after: After,
    #[serde(default = "default_true")]
    pub idle: bool,
    #[serde(default = "default_poll", with = "humantime_serde")]
    pub poll: Duration,
}

fn default_folders() -> Vec<String> {
    vec!["INBOX".to_string()]
}
fn default_true() -> bool {
    true
}
fn default_poll() -> Duration {
    Duration::from_secs(60)
}

/// `tls` of an IMAP account or an email hook's relay: `implicit`, `starttls` or `none`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    #[default]
    Implicit,
    Starttls,
    None,
}

pub type ImapTls = TlsMode;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImapAuth {
    #[default]
    Login,
    Plain,
    Xoauth2,
}

/// What the IMAP watcher does to a message once it is in the spool.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum After {
    #[default]
    Seen,
    Delete,
    Move(String),
}

impl<'de> Deserialize<'de> for After {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        match s.as_str() {
            "seen" => Ok(After::Seen),
            "delete" => Ok(After::Delete),
            _ => match s.strip_prefix("move:") {
                Some(folder) if !folder.trim().is_empty() => Ok(After::Move(folder.to_string())),
                _ => Err(serde::de::Error::custom(format!(
                    "expected \"seen\", \"delete\" or \"move:FOLDER\", found {s:?}"
                ))),
            },
        }
    }
}

/// `[destination.NAME]`: one variant per `type`, each with only the keys that type uses
/// (`deny_unknown_fields`), so a key that does not belong to the type is refused by name.
///
/// [`Config::parse`] reads each destination through [`DestinationConfig::from_table`], which
/// keeps the key path of every error (`destination.NAME.KEY`).
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum DestinationConfig {
    KustomerWebHook(WebHookConfig),
    KustomerFormHook(FormHookConfig),
    KustomerEmailHook(EmailHookConfig),
    Webhook(WebhookConfig),
    File(FileConfig),
}

/// A destination's overrides of `[delivery]`; every type takes them.
#[derive(Debug, Clone, Copy, Default)]
pub struct Pacing {
    pub timeout: Option<Duration>,
    pub retry_for: Option<Duration>,
    pub backoff: Option<BackoffConfig>,
    pub max_body: Option<bytesize::ByteSize>,
    pub rate: Option<Rate>,
    pub concurrency: Option<usize>,
}

/// Declares a destination type's table: its own keys, then the [`Pacing`] keys every type takes.
macro_rules! destination_table {
    ($(#[$m:meta])* $name:ident { $($(#[$fm:meta])* $field:ident : $ty:ty,)* }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct $name {
            $($(#[$fm])* pub $field: $ty,)*
            #[serde(default, with = "humantime_serde")]
            pub timeout: Option<Duration>,
            #[serde(default, with = "humantime_serde")]
            pub retry_for: Option<Duration>,
            pub backoff: Option<BackoffConfig>,
            pub max_body: Option<bytesize::ByteSize>,
            pub rate: Option<Rate>,
            pub concurrency: Option<usize>,
        }

        impl $name {
            fn pacing(&self) -> Pacing {
                Pacing {
                    timeout: self.timeout,
                    retry_for: self.retry_for,
                    backoff: self.backoff,
                    max_body: self.max_body,
                    rate: self.rate,
                    concurrency: self.concurrency,
                }
            }
        }
    };
}

destination_table! {
    /// `type = "kustomer-web-hook"`: POST with `Authorization: Bearer <token>`.
    WebHookConfig {
        url: String,
        token: Secret,
        /// Extra CA certificate (PEM) trusted for this destination's TLS.
        ca_file: Option<PathBuf>,
    }
}

destination_table! {
    /// `type = "kustomer-form-hook"`: POST, no key.
    FormHookConfig {
        url: String,
        ca_file: Option<PathBuf>,
    }
}

destination_table! {
    /// `type = "webhook"`: POST with the configured headers (their values are secrets).
    WebhookConfig {
        url: String,
        #[serde(default)]
        headers: BTreeMap<String, Secret>,
        ca_file: Option<PathBuf>,
    }
}

destination_table! {
    /// `type = "kustomer-email-hook"`: an HTML email through an SMTP relay.
    EmailHookConfig {
        /// The hook's address.
        address: String,
        /// The `data-kustomer-key`.
        key: Secret,
        /// `smtp://host[:port]` or `smtps://host[:port]`.
        relay: String,
        /// Envelope and header sender.
        from: String,
        /// Relay AUTH user and password.
        username: Option<String>,
        password: Option<Secret>,
        /// `starttls`, `implicit` or `none`; see [`EmailHookConfig::relay_tls`].
        tls: Option<TlsMode>,
        ca_file: Option<PathBuf>,
    }
}

destination_table! {
    /// `type = "file"`: JSON lines appended to `path`.
    FileConfig {
        path: PathBuf,
    }
}

/// How an email hook reaches its relay, from `relay` and `tls`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayTls {
    /// TLS from the first byte (`smtps://`, or `tls = "implicit"`).
    Implicit,
    /// STARTTLS, or no delivery at all (a temporary failure).
    Required,
    /// STARTTLS when offered, else plaintext: only for a loopback relay without `tls`.
    Opportunistic,
    /// Plaintext (`tls = "none"`).
    None,
}

impl EmailHookConfig {
    /// The relay's TLS: `smtps://` is implicit TLS; `smtp://` is STARTTLS, required, except to
    /// a loopback relay, which may stay plaintext unless `tls = "starttls"` is written;
    /// `tls = "none"` is plaintext (`check` warns). `None` when `tls` contradicts `smtps://`.
    pub fn relay_tls(&self) -> Option<RelayTls> {
        let implicit = self.relay.starts_with("smtps://");
        match (implicit, self.tls) {
            (true, None | Some(TlsMode::Implicit)) => Some(RelayTls::Implicit),
            (true, Some(_)) => None,
            (false, Some(TlsMode::Implicit)) => Some(RelayTls::Implicit),
            (false, Some(TlsMode::Starttls)) => Some(RelayTls::Required),
            (false, Some(TlsMode::None)) => Some(RelayTls::None),
            (false, None) if is_loopback_host(relay_host(&self.relay)) => Some(RelayTls::Opportunistic),
            (false, None) => Some(RelayTls::Required),
        }
    }
}

/// The host part of `smtp[s]://host[:port]`, brackets removed (best effort: for policy only).
fn relay_host(relay: &str) -> &str {
    let rest = relay.split_once("://").map_or(relay, |(_, r)| r).trim_end_matches('/');
    if let Some(v6) = rest.strip_prefix('[') {
        v6.split_once(']').map_or(v6, |(h, _)| h)
    } else {
        rest.rsplit_once(':').map_or(rest, |(h, _)| h)
    }
}

/// The host part of an `http[s]://` URL (best effort: for policy only).
fn url_host(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let authority = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    relay_host(authority)
}

impl DestinationConfig {
    /// The `type` value.
    pub fn type_name(&self) -> &'static str {
        match self {
            DestinationConfig::KustomerWebHook(_) => "kustomer-web-hook",
            DestinationConfig::KustomerFormHook(_) => "kustomer-form-hook",
            DestinationConfig::KustomerEmailHook(_) => "kustomer-email-hook",
            DestinationConfig::Webhook(_) => "webhook",
            DestinationConfig::File(_) => "file",
        }
    }

    /// Its overrides of `[delivery]`.
    pub fn pacing(&self) -> Pacing {
        match self {
            DestinationConfig::KustomerWebHook(d) => d.pacing(),
            DestinationConfig::KustomerFormHook(d) => d.pacing(),
            DestinationConfig::KustomerEmailHook(d) => d.pacing(),
            DestinationConfig::Webhook(d) => d.pacing(),
            DestinationConfig::File(d) => d.pacing(),
        }
    }

    /// Every secret value it holds (tokens, keys, passwords, header values), to be redacted
    /// from whatever is stored or logged about it.
    pub fn secrets(&self) -> Vec<&Secret> {
        match self {
            DestinationConfig::KustomerWebHook(d) => vec![&d.token],
            DestinationConfig::KustomerEmailHook(d) => std::iter::once(&d.key).chain(&d.password).collect(),
            DestinationConfig::Webhook(d) => d.headers.values().collect(),
            DestinationConfig::KustomerFormHook(_) | DestinationConfig::File(_) => Vec::new(),
        }
    }

    /// Deserialises one `[destination.NAME]` table. Errors carry their key path
    /// (`destination.NAME.KEY`), which serde loses inside an internally tagged enum.
    fn from_table(name: &str, value: toml::Value) -> Result<DestinationConfig, (String, String)> {
        fn read<T: serde::de::DeserializeOwned>(
            at: &str,
            kind: &str,
            table: toml::Table,
        ) -> Result<T, (String, String)> {
            serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
                let inner = e.path().to_string();
                let message = e.into_inner().to_string();
                // Unknown and missing keys are reported on the table: name the key itself.
                let named = |prefix: &str| {
                    message.strip_prefix(prefix).and_then(|r| r.strip_prefix('`')).and_then(|r| r.split_once('`'))
                };
                if let Some((key, _)) = named("unknown field ") {
                    (format!("{at}.{key}"), format!("is not used by type {kind:?}"))
                } else if let Some((key, _)) = named("missing field ") {
                    (format!("{at}.{key}"), format!("is required for type {kind:?}"))
                } else if inner == "." {
                    (at.to_string(), message)
                } else {
                    (format!("{at}.{inner}"), message)
                }
            })
        }
        let at = format!("destination.{name}");
        let toml::Value::Table(mut table) = value else {
            return Err((at, "must be a table".into()));
        };
        let kind = match table.remove("type") {
            Some(toml::Value::String(s)) => s,
            Some(_) => return Err((format!("{at}.type"), "must be a string".into())),
            None => return Err((format!("{at}.type"), "is required".into())),
        };
        let d = match kind.as_str() {
            "kustomer-web-hook" => DestinationConfig::KustomerWebHook(read(&at, &kind, table)?),
            "kustomer-form-hook" => DestinationConfig::KustomerFormHook(read(&at, &kind, table)?),
            "kustomer-email-hook" => DestinationConfig::KustomerEmailHook(read(&at, &kind, table)?),
            "webhook" => DestinationConfig::Webhook(read(&at, &kind, table)?),
            "file" => DestinationConfig::File(read(&at, &kind, table)?),
            other => {
                return Err((
                    format!("{at}.type"),
                    format!(
                        "unknown type {other:?}: expected kustomer-web-hook, kustomer-form-hook, \
                         kustomer-email-hook, webhook or file"
                    ),
                ));
            }
        };
        Ok(d)
    }
}

/// `[delivery]`: defaults for every destination.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliveryConfig {
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    #[serde(default = "default_retry_for", with = "humantime_serde")]
    pub retry_for: Duration,
    #[serde(default)]
    pub backoff: BackoffConfig,
    #[serde(default = "default_max_body")]
    pub max_body: bytesize::ByteSize,
    #[serde(default = "default_rate")]
    pub rate: Rate,
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            timeout: default_timeout(),
            retry_for: default_retry_for(),
            backoff: BackoffConfig::default(),
            max_body: default_max_body(),
            rate: default_rate(),
            concurrency: default_concurrency(),
        }
    }
}

fn default_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_retry_for() -> Duration {
    Duration::from_secs(3 * 24 * 3600)
}
fn default_max_body() -> bytesize::ByteSize {
    bytesize::ByteSize::kb(400)
}
fn default_rate() -> Rate {
    Rate::per_minute(1000.0)
}
fn default_concurrency() -> usize {
    8
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackoffConfig {
    #[serde(default = "default_backoff_initial", with = "humantime_serde")]
    pub initial: Duration,
    #[serde(default = "default_backoff_max", with = "humantime_serde")]
    pub max: Duration,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        BackoffConfig { initial: default_backoff_initial(), max: default_backoff_max() }
    }
}

fn default_backoff_initial() -> Duration {
    Duration::from_secs(5)
}
fn default_backoff_max() -> Duration {
    Duration::from_secs(15 * 60)
}

/// `[admin]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    #[serde(default = "default_admin_listen")]
    pub listen: String,
    /// Bearer token required on every admin request when set.
    pub token: Option<Secret>,
}

fn default_admin_listen() -> String {
    "127.0.0.1:9025".to_string()
}

/// One thing wrong with a config file: the key it is about and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file the error is in.
    pub file: PathBuf,
    /// Dotted key path (`destination.ops.url`); empty for a whole-file problem.
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}: {}", self.file.display(), self.message)
        } else {
            write!(f, "{}: {}: {}", self.file.display(), self.key, self.message)
        }
    }
}

impl Config {
    /// Reads, expands and validates the config file at `path`, using the process environment
    /// for `${VAR}`. Returns every error found.
    pub fn load(path: &Path) -> Result<Config, Vec<ConfigError>> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            vec![ConfigError { file: path.to_path_buf(), key: String::new(), message: format!("cannot read: {e}") }]
        })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let base = if base.as_os_str().is_empty() { PathBuf::from(".") } else { base };
        Config::parse(&text, path, &base, &|name| std::env::var(name).ok())
    }

    /// [`load`](Self::load) for the commands that only read and move spool files (`queue`,
    /// `replay`, `ingest`): only `[spool]` and `[rules]` must have their `${VAR}`s set. An unset
    /// variable elsewhere reads as empty and whatever it makes invalid is not reported: such a
    /// config must never deliver, and these commands never do.
    pub fn load_for_spool(path: &Path) -> Result<Config, Vec<ConfigError>> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            vec![ConfigError { file: path.to_path_buf(), key: String::new(), message: format!("cannot read: {e}") }]
        })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let base = if base.as_os_str().is_empty() { PathBuf::from(".") } else { base };
        Config::parse_with(&text, path, &base, &|name| std::env::var(name).ok(), &["spool", "rules"])
    }

    /// Parses config text; `env` looks up `${VAR}`s. `file` is only used in error messages.
    pub fn parse(
        text: &str,
        file: &Path,
        base_dir: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, Vec<ConfigError>> {
        Config::parse_with(text, file, base_dir, env, &[])
    }

    /// [`parse`](Self::parse); with `only_needed` non-empty, only the `${VAR}`s under those
    /// top-level keys must be set (see [`load_for_spool`](Self::load_for_spool)).
    fn parse_with(
        text: &str,
        file: &Path,
        base_dir: &Path,
        env: &dyn Fn(&str) -> Option<String>,
        only_needed: &[&str],
    ) -> Result<Config, Vec<ConfigError>> {
        let error = |key: String, message: String| ConfigError { file: file.to_path_buf(), key, message };
        let mut table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| vec![error(String::new(), e.to_string().trim_end().to_string())])?;

        let mut errors = Vec::new();
        // Values taken from the environment may be secrets: they are masked in any message.
        let expanded = std::cell::RefCell::new(Vec::<String>::new());
        let unset = std::cell::RefCell::new(Vec::<String>::new());
        let lookup = |key: &str, name: &str| {
            let value = env(name);
            if let Some(v) = &value {
                expanded.borrow_mut().push(v.clone());
            }
            let needed = only_needed.is_empty()
                || only_needed.iter().any(|top| key == *top || key.starts_with(&format!("{top}.")));
            if value.is_none() && !needed {
                unset.borrow_mut().push(key.to_string());
                return Some(String::new());
            }
            value
        };
        for (key, value) in table.iter_mut() {
            expand_value(value, key.clone(), &lookup, &mut |k, m| errors.push(error(k, m)));
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let expanded = expanded.into_inner();
        let mask = |message: String| mask_values(message, &expanded);
        let unset = unset.into_inner();
        let reported = |e: &ConfigError| !unset.iter().any(|k| e.key == *k || e.key.starts_with(&format!("{k}.")));

        // Destinations are read one by one, so each error keeps its key path and every
        // destination's error is reported.
        let destinations = match table.remove("destination") {
            None => toml::Table::new(),
            Some(toml::Value::Table(t)) => t,
            Some(_) => return Err(vec![error("destination".into(), "must be a table of tables".into())]),
        };
        let mut config: Config = serde_path_to_error::deserialize(table).map_err(|e| {
            let key = e.path().to_string();
            let key = if key == "." { String::new() } else { key };
            vec![error(key, mask(e.into_inner().to_string()))]
        })?;
        let mut errors = Vec::new();
        let mut unreadable = Vec::new();
        for (name, value) in destinations {
            match DestinationConfig::from_table(&name, value) {
                Ok(d) => {
                    config.destination.insert(name, d);
                }
                Err((key, message)) => {
                    errors.push(error(key, mask(message)));
                    unreadable.push(name);
                }
            }
        }
        config.base_dir = base_dir.to_path_buf();
        // A destination that could not be read is still a name `unmatched` may use.
        let named_unreadable =
            |e: &ConfigError| e.key == "rules.unmatched" && unreadable.contains(&config.rules.unmatched);
        errors.extend(config.validate().into_iter().map(|(k, m)| error(k, mask(m))).filter(|e| !named_unreadable(e)));
        errors.retain(reported);
        if errors.is_empty() { Ok(config) } else { Err(errors) }
    }

    /// Resolves a path from the config against the config file's directory.
    pub fn resolve(&self, path: &Path) -> PathBuf {
        if path.is_absolute() { path.to_path_buf() } else { self.base_dir.join(path) }
    }

    /// What is allowed but weakens a default: `(key, message)` for each. `check` prints them
    /// and `serve` logs them at start.
    pub fn warnings(&self) -> Vec<(String, String)> {
        let mut warnings = Vec::new();
        for (section, listener) in [("smtp", &self.smtp), ("lmtp", &self.lmtp)] {
            if let Some(l) = listener
                && !l.loopback_only()
                && l.accepts_any_recipient()
            {
                warnings.push((
                    format!("{section}.recipients"),
                    "accepts mail for any address from other machines: anyone allowed to connect can \
                     create events"
                        .to_string(),
                ));
            }
        }
        for (name, d) in &self.destination {
            if let DestinationConfig::KustomerEmailHook(e) = d
                && e.relay_tls() == Some(RelayTls::None)
                && !is_loopback_host(relay_host(&e.relay))
            {
                warnings.push((
                    format!("destination.{name}.tls"),
                    "\"none\": the hook key, the payload and any relay password cross the network in plaintext"
                        .to_string(),
                ));
            }
        }
        warnings
    }

    /// Every secret value of the config (destinations' tokens, keys, passwords and header
    /// values, IMAP passwords, SMTP/LMTP AUTH passwords, the admin token), to be redacted from
    /// whatever is stored or logged.
    pub fn secrets(&self) -> Vec<&Secret> {
        let mut all: Vec<&Secret> = self.destination.values().flat_map(DestinationConfig::secrets).collect();
        all.extend(self.imap.iter().filter_map(|i| i.password.as_ref()));
        for listener in [&self.smtp, &self.lmtp].into_iter().flatten() {
            all.extend(listener.auth.iter().flat_map(|a| a.users.values()));
        }
        all.extend(self.admin.as_ref().and_then(|a| a.token.as_ref()));
        all
    }

    /// Checks what the types cannot; returns `(key, message)` for every problem.
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut errs: Vec<(String, String)> = Vec::new();
        let mut err = |k: String, m: String| errs.push((k, m));

        let unmatched = self.rules.unmatched.as_str();
        if unmatched != "dead" && unmatched != "drop" && !self.destination.contains_key(unmatched) {
            err(
                "rules.unmatched".into(),
                format!("{unmatched:?} is neither \"dead\", \"drop\" nor a destination name"),
            );
        }

        for (section, listener) in [("smtp", &self.smtp), ("lmtp", &self.lmtp)] {
            let Some(l) = listener else { continue };
            if l.listen.is_empty() {
                err(format!("{section}.listen"), "needs at least one address".into());
            }
            let mut all_loopback = true;
            for (i, addr) in l.listen.iter().enumerate() {
                match addr.parse::<SocketAddr>() {
                    Ok(a) => all_loopback &= a.ip().is_loopback(),
                    Err(_) => err(format!("{section}.listen[{i}]"), format!("{addr:?} is not an IP:port address")),
                }
            }
            if !all_loopback && l.recipients.is_empty() {
                err(
                    format!("{section}.recipients"),
                    "is empty on a listener reachable from other machines: list the addresses to accept \
                     (or write recipients = ['.*'] to accept any)"
                        .into(),
                );
            }
            if l.max_connections_per_ip == 0 {
                err(format!("{section}.max_connections_per_ip"), "must be at least 1".into());
            }
            if l.min_data_rate.as_u64() == 0 {
                err(format!("{section}.min_data_rate"), "must be at least 1B".into());
            }
            for (i, re) in l.recipients.iter().enumerate() {
                if let Err(e) = regex::Regex::new(re) {
                    err(format!("{section}.recipients[{i}]"), format!("invalid regex: {}", one_line(&e.to_string())));
                }
            }
            if let Some(auth) = &l.auth {
                if l.tls.is_none() && !all_loopback {
                    err(
                        format!("{section}.auth"),
                        "AUTH is only offered over TLS: set tls, or listen on loopback only".into(),
                    );
                }
                if auth.users.is_empty() {
                    err(format!("{section}.auth.users"), "needs at least one user".into());
                }
                if auth.max_failures == 0 || auth.max_failures_per_minute == 0 {
                    err(
                        format!("{section}.auth"),
                        "max_failures and max_failures_per_minute must be at least 1".into(),
                    );
                }
            }
            if let Some(tls) = &l.tls {
                for (k, p) in [("cert", &tls.cert), ("key", &tls.key)] {
                    if !self.resolve(p).is_file() {
                        err(format!("{section}.tls.{k}"), format!("{} is not a readable file", p.display()));
                    }
                }
            }
            if l.max_recipients == 0 {
                err(format!("{section}.max_recipients"), "must be at least 1".into());
            }
            if l.max_connections == 0 {
                err(format!("{section}.max_connections"), "must be at least 1".into());
            }
        }

        let mut names = std::collections::HashSet::new();
        for (i, imap) in self.imap.iter().enumerate() {
            let at = format!("imap[{i}]");
            if imap.name.trim().is_empty() || imap.name.contains('/') {
                err(format!("{at}.name"), "must be non-empty and contain no '/'".into());
            } else if !names.insert(imap.name.as_str()) {
                err(format!("{at}.name"), format!("{:?} is used by another [[imap]] account", imap.name));
            }
            if imap.tls == ImapTls::None && !is_loopback_host(&imap.host) {
                err(format!("{at}.tls"), format!("\"none\" is only allowed to a loopback host, not {:?}", imap.host));
            }
            match imap.auth {
                ImapAuth::Login | ImapAuth::Plain if imap.password.is_none() => {
                    err(format!("{at}.password"), "is required for LOGIN/PLAIN authentication".into())
                }
                ImapAuth::Xoauth2 if imap.token_file.is_none() == imap.token_command.is_none() => {
                    err(format!("{at}.auth"), "xoauth2 needs exactly one of token_file or token_command".into())
                }
                _ => {}
            }
            if imap.folders.is_empty() {
                err(format!("{at}.folders"), "needs at least one folder".into());
            }
            if imap.poll.is_zero() {
                err(format!("{at}.poll"), "must be longer than zero".into());
            }
        }

        for (name, d) in &self.destination {
            validate_destination(name, d, &mut err);
        }
        let b = &self.delivery.backoff;
        if b.initial > b.max {
            err("delivery.backoff".into(), "initial must not be longer than max".into());
        }
        if self.delivery.concurrency == 0 {
            err("delivery.concurrency".into(), "must be at least 1".into());
        }
        if let Some(admin) = &self.admin
            && admin.listen.parse::<SocketAddr>().is_err()
        {
            err("admin.listen".into(), format!("{:?} is not an IP:port address", admin.listen));
        }
        if let Some(token) = self.admin.as_ref().and_then(|a| a.token.as_ref())
            && token.expose().trim().is_empty()
        {
            err("admin.token".into(), "is empty: remove it for no token, or set one".into());
        }
        errs
    }
}

fn validate_destination(name: &str, d: &DestinationConfig, err: &mut impl FnMut(String, String)) {
    let at = format!("destination.{name}");
    let http = |url: &str, secret: Option<&str>, err: &mut dyn FnMut(String, String)| {
        let plain = url.starts_with("http://");
        if !(url.starts_with("https://") || plain) || url.len() < 10 {
            err(format!("{at}.url"), "must be an http:// or https:// URL".into());
        } else if let Some(what) = secret
            && plain
            && !is_loopback_host(url_host(url))
        {
            err(
                format!("{at}.url"),
                format!("http:// would send the {what} in plaintext to {:?}: use https://", url_host(url)),
            );
        }
    };
    match d {
        DestinationConfig::KustomerWebHook(h) => http(&h.url, Some("token"), err),
        DestinationConfig::KustomerFormHook(h) => http(&h.url, None, err),
        DestinationConfig::Webhook(h) => http(&h.url, (!h.headers.is_empty()).then_some("headers"), err),
        DestinationConfig::KustomerEmailHook(e) => {
            if e.password.is_some() != e.username.is_some() {
                err(format!("{at}.username"), "username and password go together".into());
            }
            if !(e.relay.starts_with("smtp://") || e.relay.starts_with("smtps://")) {
                err(format!("{at}.relay"), "must be smtp://host[:port] or smtps://host[:port]".into());
            } else if e.relay_tls().is_none() {
                err(format!("{at}.tls"), "smtps:// is implicit TLS: remove tls, or write \"implicit\"".into());
            }
            for (key, v) in [("address", &e.address), ("from", &e.from)] {
                if !v.contains('@') {
                    err(format!("{at}.{key}"), format!("{v:?} is not an email address"));
                }
            }
        }
        DestinationConfig::File(_) => {}
    }
    let pacing = d.pacing();
    if pacing.concurrency == Some(0) {
        err(format!("{at}.concurrency"), "must be at least 1".into());
    }
    if let Some(b) = &pacing.backoff
        && b.initial > b.max
    {
        err(format!("{at}.backoff"), "initial must not be longer than max".into());
    }
}

fn is_loopback_host(host: &str) -> bool {
    host == "localhost"
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Replaces every occurrence of the given values (those long enough to be secrets rather than
/// common words or digits) with `***`.
fn mask_values(mut message: String, values: &[String]) -> String {
    for v in values {
        if v.len() >= 4 && message.contains(v.as_str()) {
            message = message.replace(v.as_str(), "***");
        }
    }
    message
}

/// Joins a multi-line error message into one line.
pub(crate) fn one_line(s: &str) -> String {
    s.split('\n').map(str::trim_end).filter(|l| !l.is_empty()).collect::<Vec<_>>().join(" ")
}

fn expand_value(
    value: &mut toml::Value,
    key: String,
    env: &dyn Fn(&str, &str) -> Option<String>,
    err: &mut dyn FnMut(String, String),
) {
    match value {
        toml::Value::String(s) => match expand_env(s, &|name| env(&key, name)) {
            Ok(expanded) => *s = expanded,
            Err(m) => err(key, m),
        },
        toml::Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                expand_value(item, format!("{key}[{i}]"), env, err);
            }
        }
        toml::Value::Table(table) => {
            for (k, v) in table.iter_mut() {
                expand_value(v, format!("{key}.{k}"), env, err);
            }
        }
        _ => {}
    }
}

/// Replaces `${NAME}` with the variable's value; `$${` is a literal `${`.
fn expand_env(s: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    if !s.contains('$') {
        return Ok(s.to_string());
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos..];
        if let Some(tail) = after.strip_prefix("$${") {
            out.push_str("${");
            rest = tail;
        } else if let Some(tail) = after.strip_prefix("${") {
            let end = tail.find('}').ok_or_else(|| "unclosed ${ in value".to_string())?;
            let name = &tail[..end];
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(format!("${{{name}}} is not a valid environment variable reference"));
            }
            let value = env(name).ok_or_else(|| format!("environment variable {name} is not set"))?;
            out.push_str(&value);
            rest = &tail[end + 1..];
        } else {
            out.push('$');
            rest = &after[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests;
