//! config: `mailhook.toml` → [`Config`].
//!
//! Loading happens in three passes, each of which reports *every* problem it finds:
//!
//! 1. TOML syntax (the `toml` crate's message, with line and column);
//! 2. `${VAR}` expansion in every string value; an unset variable is an error naming the key
//!    (`$${` writes a literal `${`);
//! 3. typed deserialisation (`deny_unknown_fields`: a misspelt key is an error naming it),
//!    then [`Config::validate`] for what types cannot say (a destination missing its `url`,
//!    a bad regex, TLS `none` to a remote IMAP server, …).
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
    #[serde(default)]
    pub destination: BTreeMap<String, DestinationConfig>,
    #[serde(default)]
    pub delivery: DeliveryConfig,
    pub admin: Option<AdminConfig>,
    #[serde(default)]
    pub archive: ArchiveConfig,
    /// The public side: signed links, the Kustomer card, the lookup API.
    pub web: Option<WebConfig>,
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
    #[serde(default = "default_max_recipients")]
    pub max_recipients: usize,
    #[serde(default = "default_command_timeout", with = "humantime_serde")]
    pub command_timeout: Duration,
    #[serde(default = "default_data_timeout", with = "humantime_serde")]
    pub data_timeout: Duration,
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

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImapTls {
    #[default]
    Implicit,
    Starttls,
    None,
}

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

/// The kinds of destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DestinationType {
    KustomerWebHook,
    KustomerFormHook,
    KustomerEmailHook,
    Webhook,
    File,
}

impl DestinationType {
    pub fn name(self) -> &'static str {
        match self {
            DestinationType::KustomerWebHook => "kustomer-web-hook",
            DestinationType::KustomerFormHook => "kustomer-form-hook",
            DestinationType::KustomerEmailHook => "kustomer-email-hook",
            DestinationType::Webhook => "webhook",
            DestinationType::File => "file",
        }
    }
}

/// `[destination.NAME]`. One flat table for every type, so that a key that does not belong to
/// the type is reported by name (see [`Config::validate`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DestinationConfig {
    #[serde(rename = "type")]
    pub kind: DestinationType,
    /// web/form hooks, webhook.
    pub url: Option<String>,
    /// kustomer-web-hook: the Bearer key.
    pub token: Option<Secret>,
    /// webhook: extra request headers (values are treated as secrets).
    #[serde(default)]
    pub headers: BTreeMap<String, Secret>,
    /// webhook: Standard Webhooks signing secrets (`whsec_` + base64), one or a list; every
    /// request is signed with each (rotation: list the new one beside the old one).
    #[serde(default)]
    pub signing_secret: OneOrMany<Secret>,
    /// kustomer-email-hook: the hook's address.
    pub address: Option<String>,
    /// kustomer-email-hook: the `data-kustomer-key`.
    pub key: Option<Secret>,
    /// kustomer-email-hook: `smtp://host:port` (STARTTLS when offered) or `smtps://host:port`.
    pub relay: Option<String>,
    /// kustomer-email-hook: envelope and header sender.
    pub from: Option<String>,
    /// kustomer-email-hook: relay AUTH user and password.
    pub username: Option<String>,
    pub password: Option<Secret>,
    /// file: JSON lines appended here.
    pub path: Option<PathBuf>,
    /// Extra CA certificate (PEM) trusted for this destination's TLS.
    pub ca_file: Option<PathBuf>,
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub retry_for: Option<Duration>,
    pub backoff: Option<BackoffConfig>,
    pub max_body: Option<bytesize::ByteSize>,
    pub rate: Option<Rate>,
    pub concurrency: Option<usize>,
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

    /// Parses config text; `env` looks up `${VAR}`s. `file` is only used in error messages.
    pub fn parse(
        text: &str,
        file: &Path,
        base_dir: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, Vec<ConfigError>> {
        let error = |key: String, message: String| ConfigError { file: file.to_path_buf(), key, message };
        let mut table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| vec![error(String::new(), e.to_string().trim_end().to_string())])?;

        let mut errors = Vec::new();
        // Values taken from the environment may be secrets: they are masked in any message.
        let expanded = std::cell::RefCell::new(Vec::<String>::new());
        let lookup = |name: &str| {
            let value = env(name);
            if let Some(v) = &value {
                expanded.borrow_mut().push(v.clone());
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

        let mut config: Config = serde_path_to_error::deserialize(table).map_err(|e| {
            let key = e.path().to_string();
            let key = if key == "." { String::new() } else { key };
            vec![error(key, mask(e.into_inner().to_string()))]
        })?;
        config.base_dir = base_dir.to_path_buf();
        let problems = config.validate();
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(problems.into_iter().map(|(k, m)| error(k, mask(m))).collect())
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
        if path.is_absolute() { path.to_path_buf() } else { self.base_dir.join(path) }
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
            validate_web(web, &mut err);
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
        errs
    }
}

fn validate_destination(name: &str, d: &DestinationConfig, err: &mut impl FnMut(String, String)) {
    use DestinationType::*;
    let at = format!("destination.{name}");
    let present: [(&str, bool); 9] = [
        ("url", d.url.is_some()),
        ("token", d.token.is_some()),
        ("headers", !d.headers.is_empty()),
        ("address", d.address.is_some()),
        ("key", d.key.is_some()),
        ("relay", d.relay.is_some()),
        ("from", d.from.is_some()),
        ("username", d.username.is_some()),
        ("path", d.path.is_some()),
    ];
    let (required, allowed): (&[&str], &[&str]) = match d.kind {
        KustomerWebHook => (&["url", "token"], &["url", "token"]),
        KustomerFormHook => (&["url"], &["url"]),
        KustomerEmailHook => (&["address", "key", "relay", "from"], &["address", "key", "relay", "from", "username"]),
        Webhook => (&["url"], &["url", "headers"]),
        File => (&["path"], &["path"]),
    };
    for (key, is_set) in present {
        if is_set && !allowed.contains(&key) {
            err(format!("{at}.{key}"), format!("is not used by type {:?}", d.kind.name()));
        } else if !is_set && required.contains(&key) {
            err(format!("{at}.{key}"), format!("is required for type {:?}", d.kind.name()));
        }
    }
    if !d.signing_secret.0.is_empty() && d.kind != Webhook {
        err(format!("{at}.signing_secret"), format!("is not used by type {:?}", d.kind.name()));
    }
    for (i, secret) in d.signing_secret.0.iter().enumerate() {
        if let Err(e) = signing_key(secret) {
            err(format!("{at}.signing_secret[{i}]"), e.to_string());
        }
    }
    if d.password.is_some() && d.kind != KustomerEmailHook {
        err(format!("{at}.password"), format!("is not used by type {:?}", d.kind.name()));
    }
    if d.password.is_some() != d.username.is_some() && d.kind == KustomerEmailHook {
        err(format!("{at}.username"), "username and password go together".into());
    }
    if let Some(url) = &d.url
        && (!(url.starts_with("https://") || url.starts_with("http://")) || url.len() < 10)
    {
        err(format!("{at}.url"), "must be an http:// or https:// URL".into());
    }
    if let Some(relay) = &d.relay
        && !(relay.starts_with("smtp://") || relay.starts_with("smtps://"))
    {
        err(format!("{at}.relay"), "must be smtp://host[:port] or smtps://host[:port]".into());
    }
    for (key, value) in [("address", &d.address), ("from", &d.from)] {
        if let Some(v) = value
            && !v.contains('@')
        {
            err(format!("{at}.{key}"), format!("{v:?} is not an email address"));
        }
    }
    if d.concurrency == Some(0) {
        err(format!("{at}.concurrency"), "must be at least 1".into());
    }
    if let Some(b) = &d.backoff
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

fn expand_value(
    value: &mut toml::Value,
    key: String,
    env: &dyn Fn(&str) -> Option<String>,
    err: &mut dyn FnMut(String, String),
) {
    match value {
        toml::Value::String(s) => match expand_env(s, env) {
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
