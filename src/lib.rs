#![forbid(unsafe_code)]
//! # mailhook
//!
//! A self-hosted gateway that turns email into Kustomer hook events.
//!
//! ```text
//!  ingest ──► spool ──► parse ──► rules ──► deliver
//!  smtp/lmtp   durable   mail-     match,    kustomer web/form/email hook,
//!  imap        on disk   parser    extract,  webhook, file; retries,
//!  stdin                 → Email   payload   backoff, dead letters
//! ```
//!
//! # Layout
//!
//! | module | job |
//! |---|---|
//! | [`model`] | plain types passed between stages: `Envelope`, `Email`, `Outcome` |
//! | [`config`] | `mailhook.toml`: serde structs, `${VAR}` expansion, validation (every error at once) |
//! | [`parse`] | raw bytes → `Email` (the only user of `mail-parser`); pure, never panics |
//! | [`rules`] | `rules/*.toml` → compiled `RuleSet`; `(Email, Envelope) → Outcome`; pure |
//! | [`cmd`] | the operator commands `try`, `test`, `check` |
//!
//! No stage imports a later one: `parse` knows nothing of rules, `rules` nothing of delivery.

pub mod cmd;
pub mod config;
pub mod model;
pub mod parse;
pub mod rules;
