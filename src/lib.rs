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
//! In the order a message meets them, then the parts that serve them all:
//!
//! | module | job |
//! |---|---|
//! | [`cluster`] | with `[cluster]`: the shared PostgreSQL's connection and schema, this instance's heartbeat and peers, IMAP folder leases, the IMAP dedupe ledger and checkpoints |
//! | [`ingest`] | SMTP/LMTP listeners, IMAP watchers, stdin: bytes + envelope → spool, acknowledged once durable |
//! | [`spool`] | the durable queue on disk (with `[cluster]`: in PostgreSQL, claimed with leases); the only owner of message state; the in-memory hand-over to delivery |
//! | [`parse`] | raw bytes → `Email` (the only user of `mail-parser`); pure, never panics |
//! | [`rules`] | `rules/*.toml` → compiled `RuleSet`; `(Email, Envelope) → Outcome`; pure |
//! | [`deliver`] | one attempt to one destination: Kustomer hooks, webhook, file |
//! | [`store`] | the message archive behind one boundary (`Archive`): SQLite with full-text search, retention; PostgreSQL with `[cluster]` |
//! | [`lifecycle`] | rule changes and sender changes: shadow runs over the archive, trial rules, drift alarms |
//! | [`pipeline`] | delivery workers: claim → parse → rules → deliver → done / deferred / dead |
//! | [`serve`] | `mailhook serve`: builds every stage from the config, reloads rules, the admin endpoint, the public listener (signed pages, Kustomer card, lookup API), shutdown |
//! | [`cmd`] | the operator commands: `try`, `test`, `check`, `ingest`, `queue`, `replay`, `shadow` |
//! | [`model`] | plain types passed between stages: `Envelope`, `Email`, `Outcome`, `Payload` |
//! | [`config`] | `mailhook.toml`: serde structs, `${VAR}` expansion, validation (every error at once) |
//! | [`links`] | signed links to an email's public page and attachments (`[web]`) |
//! | [`tls`] | the TLS client settings (web PKI roots plus an extra CA) of IMAP and the database |
//! | [`backoff`] | the retry schedule shared by delivery and the IMAP watchers |
//! | [`metrics`] | counters and health of every part, for `/metrics` and `/healthz` |
//! | [`logging`] | the tracing subscriber: text or JSON lines |
//!
//! No stage imports a later one: `ingest` knows only the cluster, the spool and the model, `parse` nothing of
//! rules, `rules` nothing of delivery. The design, the spool's on-disk format and the delivery
//! semantics are written down in `docs/design.md`.

pub mod cluster;
pub mod ingest;
pub mod spool;
pub mod parse;
pub mod rules;
pub mod deliver;
pub mod store;
pub mod lifecycle;
pub mod pipeline;
pub mod serve;
pub mod cmd;
pub mod model;
pub mod config;
pub mod backoff;
pub mod links;
pub mod tls;
pub mod metrics;
pub mod logging;
