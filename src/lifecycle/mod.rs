//! lifecycle: what happens to mail when the rules change.
//!
//! ```text
//! archive + live rules + other rules ─► shadow ─► ShadowReport   (`mailhook shadow`)
//! ```
//!
//! It sits after `rules` and `store` (it reads the archive and judges with the rules) and before
//! `pipeline` and `serve`. [`compare`] says how two judgements of one message differ;
//! [`shadow`] runs that over archived messages.

pub mod compare;
pub mod shadow;

pub use compare::{Change, Kind};
pub use shadow::{Difference, Scope, ShadowReport};
