//! config: `mailhook.toml` → [`Config`].
//!
//! Loading reports *every* problem it finds, each as `file:line: key.path: problem`
//! ([`ConfigError`]), in three passes:
//!
//! 1. TOML syntax (every error the parser recovers from, with its line); nothing more is read
//!    from a file that is not TOML;
//! 2. `${VAR}` expansion in every string value; an unset variable is an error naming the key
//!    (`$${` writes a literal `${`);
//! 3. typed deserialisation (`deny_unknown_fields`: a misspelt key is an error naming it and
//!    the nearest valid key); each key in error is set aside and the rest deserialised again,
//!    so that one run finds them all. Each `[destination.NAME]` is read by its `type` into a
//!    table of that type's keys only. Then [`Config::validate`] for what types cannot say (a
//!    bad regex, TLS `none` to a remote IMAP server, a token over `http://`, an open listener,
//!    …). [`Config::warnings`] names what is allowed but weaker than the defaults (`check`
//!    prints them, `serve` logs them).
//!
//! Lines come from the spans of toml's parsed tables ([`toml::de::DeTable`]), key paths from
//! `serde_path_to_error`. [`Config::check`] also says where the rules are when the config has
//! errors, so `mailhook check` reports the rules' errors with the config's.
//!
//! Values from the environment are expanded after the syntax pass and never appear in error
//! messages; secret values are held in [`Secret`], whose `Debug` prints `***`.
//!
//! Relative paths (`spool.dir`, `rules.dir`, certificate and output files) are resolved against
//! the directory that holds the config file, so a service started from anywhere finds them.

mod cluster;
mod diagnose;
mod rate;

use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use cluster::{ClusterConfig, PgTls, PostgresUrl, UrlError};
pub use rate::{Rate, RateError};

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
    #[serde(default)]
    pub archive: ArchiveConfig,
    #[serde(default)]
    pub drift: DriftConfig,
    /// The public side: signed links, the Kustomer card, the lookup API.
    pub web: Option<WebConfig>,
    /// Several instances sharing one PostgreSQL (today: the archive lives there).
    pub cluster: Option<ClusterConfig>,
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
    /// A reload judges this many of the newest archived messages with the old and the new
    /// rules and logs the difference (0: no shadow run).
    #[serde(default = "default_shadow_last")]
    pub shadow_last: usize,
    /// `warn` (apply the new rules, warn about what they break) or `refuse` (keep the old
    /// rules when a message that had matched would be unmatched or dead).
    #[serde(default = "default_guard")]
    pub guard: String,
    /// Rules tried beside the live ones on every new message, never delivered.
    pub trial_dir: Option<PathBuf>,
}

impl Default for RulesConfig {
    fn default() -> Self {
        RulesConfig {
            dir: default_rules_dir(),
            unmatched: default_unmatched(),
            shadow_last: default_shadow_last(),
            guard: default_guard(),
            trial_dir: None,
        }
    }
}

fn default_shadow_last() -> usize {
    1000
}
fn default_guard() -> String {
    "warn".to_string()
}

/// `[drift]`: alarms when a sender's mail stops fitting the rule that matched it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriftConfig {
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Messages of one rule from one sender in a window; the last window is compared with
    /// the one before it.
    #[serde(default = "default_drift_window")]
    pub window: usize,
    /// A fill rate that falls by more than this (0..1) is a drift.
    #[serde(default = "default_drift_drop")]
    pub drop: f64,
    /// Each window must hold at least this many messages before it is judged.
    #[serde(default = "default_drift_min_messages")]
    pub min_messages: usize,
    /// `address` (each sender address) or `domain` (each sender domain).
    #[serde(default = "default_drift_sender")]
    pub sender: String,
    /// Rule and sender pairs tracked at most; the least recently seen goes when full.
    #[serde(default = "default_drift_max_tracked")]
    pub max_tracked: usize,
    /// A destination that gets a `rule.drift` payload per new drift and `rule.drift.resolved`.
    pub notify: Option<String>,
    /// The console's address as the integration owner reaches it (`https://mailhook.example.com`),
    /// for the example links of a drift; default: the admin endpoint's own address.
    pub console_url: Option<String>,
}

impl Default for DriftConfig {
    fn default() -> Self {
        DriftConfig {
            enabled: true,
            window: default_drift_window(),
            drop: default_drift_drop(),
            min_messages: default_drift_min_messages(),
            sender: default_drift_sender(),
            max_tracked: default_drift_max_tracked(),
            notify: None,
            console_url: None,
        }
    }
}

fn default_drift_window() -> usize {
    50
}
fn default_drift_drop() -> f64 {
    0.5
}
fn default_drift_min_messages() -> usize {
    10
}
fn default_drift_sender() -> String {
    "address".to_string()
}
fn default_drift_max_tracked() -> usize {
    10_000
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
        /// Standard Webhooks signing secrets (`whsec_` + base64), one or a list; every request
        /// is signed with each (rotation: list the new one beside the old one).
        #[serde(default)]
        signing_secret: OneOrMany<Secret>,
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
            DestinationConfig::Webhook(d) => d.headers.values().chain(&d.signing_secret.0).collect(),
            DestinationConfig::KustomerFormHook(_) | DestinationConfig::File(_) => Vec::new(),
        }
    }

    /// Deserialises one `[destination.NAME]` table. Errors carry their key path
    /// (`destination.NAME.KEY`), which serde loses inside an internally tagged enum.
    fn from_table(name: &str, value: toml::Value) -> Result<DestinationConfig, (String, Problem)> {
        fn read<T: serde::de::DeserializeOwned>(
            at: &str,
            kind: &'static str,
            table: toml::Table,
        ) -> Result<T, (String, Problem)> {
            serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
                let inner = e.path().to_string();
                let message = one_line(&e.into_inner().to_string());
                // Unknown and missing keys are reported on the table: name the key itself.
                let named = |prefix: &str| {
                    message.strip_prefix(prefix).and_then(|r| r.strip_prefix('`')).and_then(|r| r.split_once('`'))
                };
                if let Some((key, _)) = named("unknown field ") {
                    (format!("{at}.{key}"), Problem::NotUsed(kind))
                } else if let Some((key, _)) = named("missing field ") {
                    (format!("{at}.{key}"), Problem::Required(kind))
                } else if inner == "." {
                    (at.to_string(), Problem::Value(message))
                } else {
                    (format!("{at}.{inner}"), Problem::Value(message))
                }
            })
        }
        let at = format!("destination.{name}");
        let toml::Value::Table(mut table) = value else {
            return Err((at, Problem::Value("must be a table".into())));
        };
        let kind = match table.remove("type") {
            Some(toml::Value::String(s)) => s,
            Some(_) => return Err((format!("{at}.type"), Problem::Value("must be a string".into()))),
            None => return Err((format!("{at}.type"), Problem::Missing("type".into()))),
        };
        const TYPES: [&str; 5] = ["kustomer-web-hook", "kustomer-form-hook", "kustomer-email-hook", "webhook", "file"];
        let d = match kind.as_str() {
            "kustomer-web-hook" => DestinationConfig::KustomerWebHook(read(&at, TYPES[0], table)?),
            "kustomer-form-hook" => DestinationConfig::KustomerFormHook(read(&at, TYPES[1], table)?),
            "kustomer-email-hook" => DestinationConfig::KustomerEmailHook(read(&at, TYPES[2], table)?),
            "webhook" => DestinationConfig::Webhook(read(&at, TYPES[3], table)?),
            "file" => DestinationConfig::File(read(&at, TYPES[4], table)?),
            other => {
                let expected: Vec<String> = TYPES.iter().map(|t| t.to_string()).collect();
                let nearest = diagnose::nearest(other, &expected).map(str::to_string);
                return Err((
                    format!("{at}.type"),
                    Problem::Unknown { what: "value", given: other.to_string(), nearest, expected },
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
    /// Bearer token required on every admin request when set; the console's login asks for it.
    pub token: Option<Secret>,
    /// Serve the operator console (pages and JSON API) beside `/healthz` and `/metrics`. Without
    /// a token it is only allowed on a loopback address.
    #[serde(default = "default_true")]
    pub console: bool,
}

/// `[archive]`: what is kept of each finished message (see `docs/design.md`, "Archive").
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArchiveConfig {
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// The SQLite database; default `SPOOL/archive/archive.db`.
    pub path: Option<PathBuf>,
    /// Messages older than this are removed.
    #[serde(default = "default_archive_keep", with = "humantime_serde")]
    pub keep: Duration,
    /// The oldest messages are removed while the archive is larger than this.
    #[serde(default = "default_archive_max_size")]
    pub max_size: bytesize::ByteSize,
}

impl Default for ArchiveConfig {
    fn default() -> Self {
        ArchiveConfig { enabled: true, path: None, keep: default_archive_keep(), max_size: default_archive_max_size() }
    }
}

fn default_archive_keep() -> Duration {
    Duration::from_secs(30 * 86400)
}

fn default_archive_max_size() -> bytesize::ByteSize {
    bytesize::ByteSize::gb(5)
}

/// `[web]`: what is served to Kustomer and its agents (see `src/serve/public/`), and the
/// links put in payloads.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebConfig {
    /// The public listener (behind a TLS reverse proxy). Without it, links are still built
    /// (another instance may serve them).
    pub listen: Option<String>,
    /// The base of every link, as the browser reaches it (`https://mailhook.example.com`).
    pub public_url: Option<String>,
    /// The payload key that holds the email's link.
    #[serde(default = "default_url_field")]
    pub url_field: String,
    /// The key links are signed with (at least 32 characters; give it through `${VAR}`).
    pub link_key: Option<Secret>,
    /// How long a link is valid, counted from when the email was received.
    #[serde(default = "default_link_ttl", with = "humantime_serde")]
    pub link_ttl: Duration,
    /// Keys links were signed with before `link_key`: still accepted.
    #[serde(default)]
    pub old_link_keys: Vec<Secret>,
    /// Bearer key of `GET /api/v1/lookup`; without it the lookup API is off.
    pub api_key: Option<Secret>,
    /// Lookup requests allowed (all callers together).
    #[serde(default = "default_api_rate")]
    pub api_rate: Rate,
    /// The Kustomer Cards SDK script the card page loads.
    #[serde(default = "default_card_js")]
    pub kustomer_card_js: String,
    /// The conversation's or KObject's custom attribute holding a mailhook link or id.
    #[serde(default = "default_card_attribute")]
    pub card_attribute: String,
    /// Keys a card may present (each a read key to the archived mail of every customer).
    #[serde(default)]
    pub card_keys: Vec<Secret>,
    /// Rules whose mail the card may show; empty: every rule's.
    #[serde(default)]
    pub card_rules: Vec<String>,
    /// Who may frame the card (`Content-Security-Policy: frame-ancestors`).
    #[serde(default = "default_frame_ancestors")]
    pub frame_ancestors: Vec<String>,
}

fn default_url_field() -> String {
    "url".to_string()
}
fn default_link_ttl() -> Duration {
    Duration::from_secs(90 * 86400)
}
fn default_api_rate() -> Rate {
    Rate::per_minute(600.0)
}
fn default_card_js() -> String {
    "https://cdn.kustomerapp.com/card-js/latest/kustomer-card.min.js".to_string()
}
fn default_card_attribute() -> String {
    "mailhookUrlStr".to_string()
}
fn default_frame_ancestors() -> Vec<String> {
    vec!["https://*.kustomerapp.com".to_string()]
}

/// The shortest `link_key` accepted.
pub const MIN_LINK_KEY: usize = 32;
/// The shortest `api_key` or card key accepted.
pub const MIN_API_KEY: usize = 16;

fn validate_web(web: &WebConfig, err: &mut impl FnMut(String, String)) {
    if let Some(listen) = &web.listen
        && listen.parse::<SocketAddr>().is_err()
    {
        err("web.listen".into(), format!("{listen:?} is not an IP:port address"));
    }
    if web.listen.is_some() && web.public_url.is_none() {
        err("web.public_url".into(), "is required with web.listen: the links it serves are built on it".into());
    }
    if let Some(url) = &web.public_url {
        if let Some(problem) = url_problem(url) {
            err("web.public_url".into(), problem);
        } else if url.contains(['?', '#']) {
            err("web.public_url".into(), "must be a base URL, without ? or #".into());
        }
        match &web.link_key {
            None => {
                err("web.link_key".into(), "is required with web.public_url: links cannot be signed without it".into())
            }
            Some(k) if k.expose().len() < MIN_LINK_KEY => {
                err("web.link_key".into(), format!("is too short: use at least {MIN_LINK_KEY} random characters"))
            }
            Some(_) => {}
        }
    }
    for (i, k) in web.old_link_keys.iter().enumerate() {
        if k.expose().len() < MIN_LINK_KEY {
            err(format!("web.old_link_keys[{i}]"), format!("is too short: use at least {MIN_LINK_KEY} characters"));
        }
    }
    if web.url_field.trim().is_empty() {
        err("web.url_field".into(), "must not be empty".into());
    }
    if web.link_ttl.is_zero() {
        err("web.link_ttl".into(), "must be longer than zero".into());
    }
    if let Some(k) = &web.api_key
        && k.expose().len() < MIN_API_KEY
    {
        err("web.api_key".into(), format!("is too short: use at least {MIN_API_KEY} random characters"));
    }
    for (i, k) in web.card_keys.iter().enumerate() {
        if k.expose().len() < MIN_API_KEY || !k.expose().chars().all(|c| c.is_ascii_graphic()) {
            err(
                format!("web.card_keys[{i}]"),
                format!("use at least {MIN_API_KEY} random printable characters, no spaces"),
            );
        }
    }
    if let Some(problem) = url_problem(&web.kustomer_card_js) {
        err("web.kustomer_card_js".into(), problem);
    } else if web
        .kustomer_card_js
        .contains(|c: char| c.is_whitespace() || matches!(c, ';' | ',' | '\'' | '"' | '?' | '#'))
    {
        // It becomes a CSP source of the card page: one URL, nothing that could end the directive.
        err("web.kustomer_card_js".into(), "must be one plain URL (no query, spaces, ; or quotes)".into());
    }
    if web.card_attribute.trim().is_empty() {
        err("web.card_attribute".into(), "must not be empty".into());
    }
    if web.frame_ancestors.is_empty() {
        err("web.frame_ancestors".into(), "needs at least one source (Kustomer frames the card)".into());
    }
    for (i, a) in web.frame_ancestors.iter().enumerate() {
        if a.is_empty() || a.contains(|c: char| c.is_whitespace() || c == ';' || c == ',' || c == '\'') {
            err(
                format!("web.frame_ancestors[{i}]"),
                format!("{a:?} is not one CSP source (such as https://*.kustomerapp.com)"),
            );
        }
    }
}

/// Why `url` cannot be a base the browser reaches safely: https, or http to a loopback host.
fn url_problem(url: &str) -> Option<String> {
    if let Some(rest) = url.strip_prefix("https://") {
        return (rest.is_empty() || rest.starts_with('/')).then(|| "has no host".to_string());
    }
    let Some(rest) = url.strip_prefix("http://") else {
        return Some("must be an https:// URL".to_string());
    };
    let host = rest.split('/').next().unwrap_or("");
    let host = match host.rsplit_once(':') {
        Some((h, port)) if port.chars().all(|c| c.is_ascii_digit()) => h,
        _ => host,
    };
    (!is_loopback_host(host)).then(|| "must be https:// (plain http:// only to a loopback host)".to_string())
}

fn default_admin_listen() -> String {
    "127.0.0.1:9025".to_string()
}

/// One thing wrong with a config file, printed `file:line: key: problem`.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    /// The file the error is in.
    pub file: PathBuf,
    /// 1-based line of the key (or of its table, for a missing key), when known.
    pub line: Option<usize>,
    /// Dotted key path (`destination.ops.url`); empty for a whole-file problem.
    pub key: String,
    #[source]
    pub problem: Problem,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if !self.key.is_empty() {
            write!(f, ": {}", self.key)?;
        }
        write!(f, ": {}", self.problem)
    }
}

/// What is wrong at a key.
#[derive(Debug, thiserror::Error)]
pub enum Problem {
    #[error("cannot read: {0}")]
    Unreadable(#[source] std::io::Error),
    /// Not TOML; the message is the parser's, without its excerpt of the file.
    #[error("{0}")]
    Syntax(String),
    #[error(transparent)]
    Env(#[from] EnvError),
    /// A key or value the config does not have; `nearest` is the valid one it most resembles.
    #[error("unknown {what} `{given}`{}", suggestion(nearest.as_deref(), expected))]
    Unknown { what: &'static str, given: String, nearest: Option<String>, expected: Vec<String> },
    #[error("missing key `{0}`")]
    Missing(String),
    /// A value of the wrong type or shape (the deserialiser's words, on one line).
    #[error("{0}")]
    Value(String),
    #[error("is required for type {0:?}")]
    Required(&'static str),
    #[error("is not used by type {0:?}")]
    NotUsed(&'static str),
    /// Anything else [`Config::validate`] refuses, in a sentence.
    #[error("{0}")]
    Invalid(String),
}

fn suggestion(nearest: Option<&str>, expected: &[String]) -> String {
    match (nearest, expected) {
        (Some(n), _) => format!(" \u{2014} did you mean `{n}`?"),
        (None, []) => " (nothing is expected here)".to_string(),
        (None, e) => format!(" (expected one of: {})", e.join(", ")),
    }
}

/// An unusable `${VAR}` reference.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvError {
    #[error("unclosed ${{ in value")]
    Unclosed,
    #[error("${{{0}}} is not a valid environment variable reference")]
    BadName(String),
    #[error("environment variable {0} is not set")]
    Unset(String),
}

/// A problem [`Config::validate`] found, by key path.
#[derive(Debug)]
pub struct Invalid {
    pub key: String,
    pub problem: Problem,
}

/// Everything a look at a config file found: the config when it is valid, every error when it
/// is not, and where its rules are whenever the file says so without an error on the way (so
/// that `mailhook check` reports the rules' errors together with the config's).
#[derive(Debug)]
pub struct Checked {
    pub config: Option<Config>,
    pub errors: Vec<ConfigError>,
    pub rules: Option<RulesSite>,
}

/// Where the rules are and what they may name, as far as the config file says.
#[derive(Debug, Clone)]
pub struct RulesSite {
    /// `rules.dir`, resolved against the config file's directory.
    pub dir: PathBuf,
    pub unmatched: String,
    /// Every `[destination.NAME]` declared, valid or not.
    pub destinations: std::collections::BTreeSet<String>,
}

impl Checked {
    pub fn into_result(self) -> Result<Config, Vec<ConfigError>> {
        match self.config {
            Some(config) if self.errors.is_empty() => Ok(config),
            _ => Err(self.errors),
        }
    }
}

/// Attempts at deserialising a config with errors, each after removing the key of the last
/// error; bounds the work on a file that is wrong everywhere.
const MAX_PASSES: usize = 100;

impl Config {
    /// Reads, expands and validates the config file at `path`, using the process environment
    /// for `${VAR}`. Returns every error found.
    pub fn load(path: &Path) -> Result<Config, Vec<ConfigError>> {
        Config::check(path).into_result()
    }

    /// [`Config::load`], also saying where the rules are when the config has errors.
    pub fn check(path: &Path) -> Checked {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) => {
                let error = ConfigError {
                    file: path.to_path_buf(),
                    line: None,
                    key: String::new(),
                    problem: Problem::Unreadable(e),
                };
                return Checked { config: None, errors: vec![error], rules: None };
            }
        };
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let base = if base.as_os_str().is_empty() { PathBuf::from(".") } else { base };
        Config::check_text(&text, path, &base, &|name| std::env::var(name).ok())
    }

    /// [`load`](Self::load) for the commands that only read and move spool files (`queue`,
    /// `replay`, `ingest`): only `[spool]` and `[rules]` must have their `${VAR}`s set. An unset
    /// variable elsewhere reads as empty and whatever it makes invalid is not reported: such a
    /// config must never deliver, and these commands never do.
    pub fn load_for_spool(path: &Path) -> Result<Config, Vec<ConfigError>> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            vec![ConfigError {
                file: path.to_path_buf(),
                line: None,
                key: String::new(),
                problem: Problem::Unreadable(e),
            }]
        })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let base = if base.as_os_str().is_empty() { PathBuf::from(".") } else { base };
        Config::check_text_with(&text, path, &base, &|name| std::env::var(name).ok(), &["spool", "rules", "cluster"])
            .into_result()
    }

    /// Parses config text; `env` looks up `${VAR}`s. `file` is only used in error messages.
    pub fn parse(
        text: &str,
        file: &Path,
        base_dir: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, Vec<ConfigError>> {
        Config::check_text(text, file, base_dir, env).into_result()
    }

    /// [`Config::parse`], reporting every error: the syntax errors, else every unset variable,
    /// unknown key and bad value (each key in error is set aside and the rest read again), and
    /// what [`Config::validate`] finds in the rest.
    pub fn check_text(text: &str, file: &Path, base_dir: &Path, env: &dyn Fn(&str) -> Option<String>) -> Checked {
        Config::check_text_with(text, file, base_dir, env, &[])
    }

    /// [`Config::check_text`]; with `only_needed` non-empty, only the `${VAR}`s under those
    /// top-level keys must be set (see [`load_for_spool`](Self::load_for_spool)).
    fn check_text_with(
        text: &str,
        file: &Path,
        base_dir: &Path,
        env: &dyn Fn(&str) -> Option<String>,
        only_needed: &[&str],
    ) -> Checked {
        use diagnose::KeyPath;
        let line = |offset: Option<usize>| offset.map(|o| diagnose::line_at(text, o));
        let error = |line: Option<usize>, key: &KeyPath, problem: Problem| ConfigError {
            file: file.to_path_buf(),
            line,
            key: key.to_string(),
            problem,
        };

        let (table, syntax) = toml::de::DeTable::parse_recoverable(text);
        if !syntax.is_empty() {
            let mut errors: Vec<ConfigError> = syntax
                .iter()
                .map(|e| {
                    let at = line(e.span().map(|s| s.start));
                    error(at, &KeyPath::default(), Problem::Syntax(one_line(e.message())))
                })
                .collect();
            errors.sort_by_key(|e| e.line.unwrap_or(usize::MAX));
            return Checked { config: None, errors, rules: None };
        }
        let original = table.into_inner();
        let mut table = original.clone();
        let mut errors = Vec::new();
        // Keys set aside because of an error, and keys suggested for a misspelt one: whatever
        // follows from their absence is not news.
        let mut removed: Vec<KeyPath> = Vec::new();

        // Values taken from the environment may be secrets: they are masked in any message.
        let expanded = std::cell::RefCell::new(Vec::<String>::new());
        // Keys whose unset variables were read as empty (see `only_needed`): nothing under them
        // is reported.
        let mut lenient: Vec<String> = Vec::new();
        let mut unset = Vec::new();
        let mut literal = Vec::new();
        diagnose::each_string(&mut table, &KeyPath::default(), &mut |key, value, start| {
            let shown = key.to_string();
            if shown == "cluster.postgres"
                && let Some(problem) = cluster::literal_password(value)
            {
                literal.push((key.clone(), start, problem));
            }
            let needed = only_needed.is_empty()
                || only_needed.iter().any(|top| shown == *top || shown.starts_with(&format!("{top}.")));
            let emptied = std::cell::Cell::new(false);
            let lookup = |name: &str| {
                let value = env(name);
                if let Some(v) = &value {
                    expanded.borrow_mut().push(v.clone());
                }
                if value.is_none() && !needed {
                    emptied.set(true);
                    return Some(String::new());
                }
                value
            };
            let result = expand_env(value, &lookup);
            if emptied.get() {
                lenient.push(shown);
            }
            match result {
                Ok(v) => *value = std::borrow::Cow::Owned(v),
                Err(e) => unset.push((key.clone(), start, e)),
            }
        });
        for (key, start, e) in unset {
            errors.push(error(line(diagnose::offset_of(&original, &key).or(Some(start))), &key, e.into()));
            diagnose::remove(&mut table, &key);
            removed.push(key);
        }
        for (key, start, problem) in literal {
            errors.push(error(
                line(diagnose::offset_of(&original, &key).or(Some(start))),
                &key,
                Problem::Invalid(problem),
            ));
            removed.push(key);
        }
        let expanded = expanded.into_inner();
        let mask = |message: String| mask_values(message, &expanded);

        // Destinations are read one by one, by their `type`, so that each error keeps its key
        // path (serde loses it inside an internally tagged enum) and every one is reported.
        let destination_tables: toml::Table = match table.remove("destination") {
            None => toml::Table::new(),
            Some(value) => match toml::Table::deserialize(toml::de::ValueDeserializer::from(value)) {
                Ok(t) => t,
                Err(e) => {
                    let key = KeyPath::parse("destination");
                    errors.push(error(
                        line(diagnose::offset_of(&original, &key)),
                        &key,
                        Problem::Value(format!("must be a table of tables ({})", one_line(e.message()))),
                    ));
                    toml::Table::new()
                }
            },
        };

        let mut config = None;
        for _ in 0..MAX_PASSES {
            let attempt = toml::de::Deserializer::from(toml::Spanned::new(0..text.len(), table.clone()));
            let e = match serde_path_to_error::deserialize::<_, Config>(attempt) {
                Ok(c) => {
                    config = Some(c);
                    break;
                }
                Err(e) => e,
            };
            let at = KeyPath::from_serde(e.path());
            let inner = e.into_inner();
            let message = one_line(inner.message());
            let (key, problem, set_aside) = if let Some((what, given, expected)) = diagnose::unknown(&message) {
                // serde's path ends at the table for a key, at the key for a value.
                let named = at.0.last() == Some(&diagnose::Step::Key(given.clone()));
                let key = if what == "key" && !named { at.key(&given) } else { at.clone() };
                let nearest = diagnose::nearest(&given, &expected).map(str::to_string);
                let given = if what == "value" { mask(given) } else { given };
                if let (Some(n), "key") = (&nearest, what) {
                    removed.push(KeyPath(key.0[..key.0.len() - 1].to_vec()).key(n));
                }
                (key.clone(), Some(Problem::Unknown { what, given, nearest, expected }), key)
            } else if let Some(name) = message.strip_prefix("missing field `").and_then(|r| r.split_once('`')) {
                let key = at.key(name.0);
                // A key set aside for an error leaves its table incomplete: set the table aside.
                let problem = (!removed.contains(&key)).then(|| Problem::Missing(name.0.to_string()));
                (key, problem, at.clone())
            } else {
                (at.clone(), Some(Problem::Value(mask(message))), at.clone())
            };
            if let Some(problem) = problem {
                let offset = diagnose::offset_of(&original, &key).or(inner.span().map(|s| s.start));
                errors.push(error(line(offset), &key, problem));
            }
            if set_aside.is_empty() || !diagnose::remove(&mut table, &set_aside) {
                break;
            }
            removed.push(set_aside);
        }

        let declared: std::collections::BTreeSet<String> = destination_tables.keys().cloned().collect();
        let mut destinations = BTreeMap::new();
        for (name, value) in destination_tables {
            match DestinationConfig::from_table(&name, value) {
                Ok(d) => {
                    destinations.insert(name, d);
                }
                Err((key, problem)) => {
                    let key = KeyPath::parse(&key);
                    // A key set aside for an unset variable is reported already.
                    if removed.iter().any(|r| key.starts_with(r)) {
                        continue;
                    }
                    let problem = match problem {
                        Problem::Value(m) => Problem::Value(mask(m)),
                        Problem::Unknown { what, given, nearest, expected } => {
                            Problem::Unknown { what, given: mask(given), nearest, expected }
                        }
                        other => other,
                    };
                    errors.push(error(line(diagnose::offset_of(&original, &key)), &key, problem));
                    removed.push(key);
                }
            }
        }

        let Some(mut config) = config else {
            errors.sort_by_key(|e| e.line.unwrap_or(usize::MAX));
            errors.retain(|e| !lenient.iter().any(|k| e.key == *k || e.key.starts_with(&format!("{k}."))));
            return Checked { config: None, errors, rules: None };
        };
        config.base_dir = base_dir.to_path_buf();
        config.destination = destinations;

        for Invalid { key, problem } in config.validate_with(&|name| declared.contains(name)) {
            let path = KeyPath::parse(&key);
            if removed.iter().any(|r| path.starts_with(r) || r.starts_with(&path)) {
                continue;
            }
            let problem = match problem {
                Problem::Invalid(m) => Problem::Invalid(mask(m)),
                other => other,
            };
            errors.push(error(line(diagnose::offset_of(&original, &path)), &path, problem));
        }
        errors.retain(|e| !lenient.iter().any(|k| e.key == *k || e.key.starts_with(&format!("{k}."))));
        errors.sort_by_key(|e| e.line.unwrap_or(usize::MAX));

        // Only `unmatched` can be wrong without leaving the rules directory in doubt.
        let rules_known =
            !errors.iter().any(|e| (e.key == "rules" || e.key.starts_with("rules.")) && e.key != "rules.unmatched");
        let rules = rules_known.then(|| RulesSite {
            dir: config.resolve(&config.rules.dir),
            unmatched: config.rules.unmatched.clone(),
            destinations: declared,
        });
        if errors.is_empty() {
            Checked { config: Some(config), errors, rules }
        } else {
            Checked { config: None, errors, rules }
        }
    }

    /// Resolves a path from the config against the config file's directory.
    /// Where the archive is, when it is enabled.
    pub fn archive_path(&self) -> Option<PathBuf> {
        if !self.archive.enabled {
            return None;
        }
        Some(match &self.archive.path {
            Some(p) => self.resolve(p),
            None => self.resolve(&self.spool.dir).join("archive").join("archive.db"),
        })
    }

    pub fn resolve(&self, path: &Path) -> PathBuf {
        let joined = if path.is_absolute() { path.to_path_buf() } else { self.base_dir.join(path) };
        // `./rules` beside a config in `.` is `rules`, not `././rules`.
        let clean: PathBuf = joined.components().filter(|c| !matches!(c, std::path::Component::CurDir)).collect();
        if clean.as_os_str().is_empty() { PathBuf::from(".") } else { clean }
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
        if let Some(cluster) = &self.cluster
            && cluster.postgres.plaintext_to_remote()
        {
            warnings.push((
                "cluster.postgres".to_string(),
                format!(
                    "sslmode=disable: the database password and every message cross the network to {:?} in plaintext",
                    cluster.postgres.host()
                ),
            ));
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
        all.extend(self.cluster.as_ref().and_then(|c| c.postgres.password_secret()));
        all
    }

    /// Checks what the types cannot; returns every problem with its key.
    pub fn validate(&self) -> Vec<Invalid> {
        self.validate_with(&|name| self.destination.contains_key(name))
    }

    /// [`Config::validate`], with `declared` saying which destination names exist.
    fn validate_with(&self, declared: &dyn Fn(&str) -> bool) -> Vec<Invalid> {
        let errs = std::cell::RefCell::new(Vec::<Invalid>::new());
        let err =
            |key: String, message: String| errs.borrow_mut().push(Invalid { key, problem: Problem::Invalid(message) });

        let unmatched = self.rules.unmatched.as_str();
        if unmatched != "dead" && unmatched != "drop" && !declared(unmatched) {
            err(
                "rules.unmatched".into(),
                format!("{unmatched:?} is neither \"dead\", \"drop\" nor a destination name"),
            );
        }
        if !["warn", "refuse"].contains(&self.rules.guard.as_str()) {
            err("rules.guard".into(), format!("{:?} is neither \"warn\" nor \"refuse\"", self.rules.guard));
        }
        let drift = &self.drift;
        if drift.window == 0 {
            err("drift.window".into(), "must be at least 1".into());
        }
        if !(drift.drop > 0.0 && drift.drop <= 1.0) {
            err("drift.drop".into(), "must be more than 0 and at most 1".into());
        }
        if drift.min_messages == 0 || drift.min_messages > drift.window {
            err("drift.min_messages".into(), format!("must be between 1 and drift.window ({})", drift.window));
        }
        if !["address", "domain"].contains(&drift.sender.as_str()) {
            err("drift.sender".into(), format!("{:?} is neither \"address\" nor \"domain\"", drift.sender));
        }
        if drift.max_tracked == 0 {
            err("drift.max_tracked".into(), "must be at least 1".into());
        }
        if let Some(n) = &drift.notify
            && !self.destination.contains_key(n)
        {
            err("drift.notify".into(), format!("{n:?} is not a [destination.*] name"));
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
            validate_destination(name, d, &mut |k, m| err(k, m));
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
        if let Some(admin) = &self.admin
            && admin.console
            && admin.token.is_none()
            && admin.listen.parse::<SocketAddr>().is_ok_and(|a| !a.ip().is_loopback())
        {
            err(
                "admin.token".into(),
                format!(
                    "the console on {} would be open to the network: set a token, listen on a loopback address, or set console = false",
                    admin.listen
                ),
            );
        }
        if let Some(web) = &self.web {
            validate_web(web, &mut |k, m| err(k, m));
            if web.listen.is_some() && !self.archive.enabled {
                err("web.listen".into(), "serves archived mail: it needs [archive] enabled".into());
            }
            let admin = self.admin.as_ref().map(|a| a.listen.as_str());
            let fixed_port =
                web.listen.as_deref().and_then(|l| l.parse::<SocketAddr>().ok()).is_some_and(|a| a.port() != 0);
            if fixed_port && web.listen.as_deref() == admin {
                err("web.listen".into(), "must differ from admin.listen: the public side is served on its own".into());
            }
        }
        if self.archive.keep.is_zero() {
            err("archive.keep".into(), "must be longer than zero".into());
        }
        if let Some(cluster) = &self.cluster {
            cluster::validate(cluster, &mut |k, m| err(k, m));
        }
        errs.into_inner()
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
        DestinationConfig::Webhook(h) => {
            http(&h.url, (!h.headers.is_empty()).then_some("headers"), err);
            for (i, secret) in h.signing_secret.0.iter().enumerate() {
                if let Err(e) = signing_key(secret) {
                    err(format!("{at}.signing_secret[{i}]"), e.to_string());
                }
            }
        }
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

/// What is wrong with a Standard Webhooks signing secret (the secret itself is never shown).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SigningSecretError {
    #[error("must start with \"whsec_\" followed by base64")]
    Prefix,
    #[error("the part after \"whsec_\" is not base64")]
    Base64,
    #[error("decodes to {0} bytes: use at least 24 random bytes")]
    Short(usize),
}

/// A value given either alone or as a list (`key = "a"` or `key = ["a", "b"]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OneOrMany<T>(pub Vec<T>);

impl<T> Default for OneOrMany<T> {
    fn default() -> Self {
        OneOrMany(Vec::new())
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for OneOrMany<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either<T> {
            One(T),
            Many(Vec<T>),
        }
        match Either::deserialize(d) {
            Ok(Either::One(v)) => Ok(OneOrMany(vec![v])),
            Ok(Either::Many(v)) => Ok(OneOrMany(v)),
            Err(_) => Err(serde::de::Error::custom("expected a string or a list of strings")),
        }
    }
}

/// The key bytes of a `whsec_<base64>` signing secret.
pub fn signing_key(secret: &Secret) -> Result<Vec<u8>, SigningSecretError> {
    use base64::Engine;
    let b64 = secret.expose().strip_prefix("whsec_").ok_or(SigningSecretError::Prefix)?;
    let key = base64::engine::general_purpose::STANDARD.decode(b64).map_err(|_| SigningSecretError::Base64)?;
    if key.len() < 24 {
        return Err(SigningSecretError::Short(key.len()));
    }
    Ok(key)
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

/// Replaces `${NAME}` with the variable's value; `$${` is a literal `${`.
fn expand_env(s: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, EnvError> {
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
            let end = tail.find('}').ok_or(EnvError::Unclosed)?;
            let name = &tail[..end];
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(EnvError::BadName(name.to_string()));
            }
            let value = env(name).ok_or_else(|| EnvError::Unset(name.to_string()))?;
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
