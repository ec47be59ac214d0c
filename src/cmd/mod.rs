//! The operator commands that need no running server: `try`, `test`, `check`, `shadow`, ...
//! Each returns an [`Exit`] code; `main.rs` only parses arguments and calls them.

pub mod check;
pub mod golden;
pub mod ingest;
pub mod queue;
pub mod shadow;
pub mod try_rules;

use crate::config::Config;
use crate::model::{Email, Envelope, Outcome, Source};
use crate::rules::{RuleError, RuleSet, Unmatched};
use serde::Deserialize;
use serde_json::{Map, Value as Json};
use std::path::{Path, PathBuf};

/// Process exit codes (sysexits.h).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Everything went well.
    Ok = 0,
    /// `test`: at least one golden file did not match; `shadow`: a message would be judged differently.
    Failed = 1,
    /// EX_USAGE: the command line was wrong.
    Usage = 64,
    /// EX_DATAERR: an input file could not be read.
    DataErr = 65,
    /// EX_TEMPFAIL: try again later (the spool cannot take the message).
    TempFail = 75,
    /// EX_CONFIG: the config or the rules are invalid.
    Config = 78,
}

impl Exit {
    /// The worse of two exit codes (a config error outranks unreadable input, which
    /// outranks a failed test).
    pub fn max(self, other: Exit) -> Exit {
        if (other as i32) > (self as i32) { other } else { self }
    }
}

/// Where `try` and `test` take their rules from.
#[derive(Debug, Clone, Default)]
pub struct RulesSource {
    /// `--rules DIR`; wins over the config's `[rules] dir`.
    pub rules_dir: Option<PathBuf>,
    /// `--config FILE`: its `[rules]` section (dir and unmatched) and destination names.
    pub config: Option<PathBuf>,
}

impl RulesSource {
    /// Loads the rules; on failure prints every error to stderr and returns the exit code.
    pub fn load(&self) -> Result<RuleSet, Exit> {
        let config = match &self.config {
            Some(path) => match Config::load(path) {
                Ok(c) => Some(c),
                Err(errors) => {
                    for e in errors {
                        eprintln!("{e}");
                    }
                    return Err(Exit::Config);
                }
            },
            None => None,
        };
        let (dir, unmatched) = match (&self.rules_dir, &config) {
            (Some(dir), c) => {
                (dir.clone(), c.as_ref().map_or(Unmatched::Dead, |c| Unmatched::from_config(&c.rules.unmatched)))
            }
            (None, Some(c)) => (c.resolve(&c.rules.dir), Unmatched::from_config(&c.rules.unmatched)),
            (None, None) => (PathBuf::from("rules"), Unmatched::Dead),
        };
        let rules = RuleSet::load_dir(&dir, unmatched).map_err(|errors| {
            print_rule_errors(&errors);
            Exit::Config
        })?;
        if let Some(c) = &config {
            let errors = rules.check_destinations(|d| c.destination.contains_key(d));
            if !errors.is_empty() {
                print_rule_errors(&errors);
                return Err(Exit::Config);
            }
        }
        Ok(rules)
    }
}

/// Loads the config and opens its spool, which must exist already (`serve` creates it).
/// Prints what is wrong and returns the exit code: 78 for the config, 75 for the spool.
/// Only the `${VAR}`s of `[spool]` and `[rules]` need be set ([`Config::load_for_spool`]):
/// the commands that open the spool this way never deliver.
pub(crate) fn open_spool(config_path: &Path) -> Result<(Config, crate::spool::Spool), Exit> {
    let config = Config::load_for_spool(config_path).map_err(|errors| {
        for e in errors {
            eprintln!("{e}");
        }
        Exit::Config
    })?;
    let dir = config.resolve(&config.spool.dir);
    if let Some(cluster) = &config.cluster {
        // The queue is in the cluster's database; this command claims nothing.
        let spool = crate::spool::Spool::open_cluster(cluster, &|p| config.resolve(p), None, &dir).map_err(|e| {
            eprintln!("cannot use the spool: {e}");
            Exit::TempFail
        })?;
        return Ok((config, spool));
    }
    if !dir.is_dir() {
        eprintln!("spool directory {} does not exist (mailhook serve creates it)", dir.display());
        return Err(Exit::TempFail);
    }
    let options = crate::spool::SpoolOptions::of(&config);
    let spool = crate::spool::Spool::open(&dir, options).map_err(|e| {
        eprintln!("cannot use the spool: {e}");
        Exit::TempFail
    })?;
    Ok((config, spool))
}

pub fn print_rule_errors(errors: &[RuleError]) {
    for e in errors {
        eprintln!("{e}");
    }
    eprintln!("{} error{} in rules; nothing was loaded", errors.len(), if errors.len() == 1 { "" } else { "s" });
}

/// The envelope a message is judged with outside a server (`try`, `test`): what a sidecar
/// `NAME.envelope.toml` or the command line says, otherwise source `stdin` and the message's
/// own To and Cc addresses as recipients.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvelopeSpec {
    /// `smtp`, `lmtp`, `stdin` or `imap:ACCOUNT/FOLDER`.
    pub source: Option<String>,
    pub mail_from: Option<String>,
    pub recipients: Option<Vec<String>>,
}

/// Why the envelope of a `try` or `test` case could not be made.
#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {}", path.display(), crate::config::one_line(&source.to_string()))]
    Syntax {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("unknown source {0:?} (smtp, lmtp, stdin or imap:ACCOUNT/FOLDER)")]
    Source(String),
}

impl EnvelopeSpec {
    /// Reads `NAME.envelope.toml` beside `eml`, if there is one.
    pub fn sidecar(eml: &Path) -> Result<Option<EnvelopeSpec>, EnvelopeError> {
        let path = eml.with_extension("envelope.toml");
        match std::fs::read_to_string(&path) {
            Ok(text) => toml::from_str(&text).map(Some).map_err(|source| EnvelopeError::Syntax { path, source }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(EnvelopeError::Read { path, source }),
        }
    }

    pub fn envelope(&self, email: &Email) -> Result<Envelope, EnvelopeError> {
        let source = match &self.source {
            Some(s) => Source::parse(s).ok_or_else(|| EnvelopeError::Source(s.clone()))?,
            None => Source::Stdin,
        };
        let mut envelope = Envelope::new(source);
        envelope.mail_from = self.mail_from.clone();
        envelope.recipients = match &self.recipients {
            Some(r) => r.clone(),
            None => email.to.iter().chain(&email.cc).map(|a| a.address.clone()).filter(|a| !a.is_empty()).collect(),
        };
        Ok(envelope)
    }
}

/// The JSON object `try` prints and `test` compares: `rule`, `to`, `payload`, `dead` (the
/// reason) or `dropped` when the message would not be delivered, and `problems` when the
/// parser had to skip or repair something.
pub fn outcome_json(email: &Email, outcome: &Outcome) -> Map<String, Json> {
    outcome.report(email)
}
