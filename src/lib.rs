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
//! | [`spool`] | the durable queue on disk; the only owner of message state |
//! | [`deliver`] | one attempt to one destination: Kustomer hooks, webhook, file |
//! | [`pipeline`] | delivery workers: claim → parse → rules → deliver → done / deferred / dead |
//! | [`metrics`] | counters and health of every part, for `/metrics` and `/healthz` |
//! | [`admin`] | the HTTP endpoint for operators: `/healthz`, `/metrics` |
//! | [`reload`] | reloads the rules on a change in their directory or SIGHUP |
//! | [`app`] | builds every stage from the config, runs `serve`, owns shutdown |
//! | [`cmd`] | the operator commands: `try`, `test`, `check`, `ingest`, `queue`, `replay` |
//!
//! No stage imports a later one: `parse` knows nothing of rules, `rules` nothing of delivery.

pub mod admin;
pub mod app;
pub mod cmd;
pub mod config;
pub mod deliver;
pub mod ingest;
pub mod logging;
pub mod metrics;
pub mod model;
pub mod parse;
pub mod pipeline;
pub mod reload;
pub mod rules;
pub mod spool;
