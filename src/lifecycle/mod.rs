//! lifecycle: what happens to mail when the rules change, or when a sender's mail does.
//!
//! ```text
//! archive + live rules + other rules ─► shadow ─► ShadowReport   (`mailhook shadow`, every reload)
//! each new message + its outcome ─────► trial  ─► mailhook_trial_diff_total{kind}
//!                                   └─► drift  ─► fill ratios, active drifts, notify
//! ```
//!
//! It sits after `rules` and `store` (it reads the archive and judges with the rules) and before
//! `pipeline` and `serve`, which feed it and show what it found. [`compare`] says how two
//! judgements of one message differ; [`shadow`] runs that over archived messages; [`trial`]
//! over each new message with the `[rules] trial_dir` rules; [`drift`] tracks, per rule and
//! sender, how often each field is filled.

pub mod compare;
pub mod drift;
pub mod shadow;
pub mod trial;

pub use compare::{Change, Kind};
pub use shadow::{Difference, Scope, ShadowReport};

use crate::model::{Email, Envelope, Outcome};
use std::sync::{Arc, RwLock};

/// The report of the last shadow run of a reload, shared with the console.
pub type SharedReport = Arc<RwLock<Option<ReloadReport>>>;

/// What a reload's shadow run found, and what became of the new rules.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReloadReport {
    #[serde(flatten)]
    pub report: ShadowReport,
    /// Whether the new rules serve now (`false`: `guard = "refuse"` kept the old ones).
    pub applied: bool,
}

/// What the pipeline tells the lifecycle about each message it judges for the first time.
pub struct Observer {
    pub trial: Option<trial::Trial>,
    pub drift: Option<Arc<drift::Drift>>,
}

impl Observer {
    /// Whether there is anything to observe for.
    pub fn is_empty(&self) -> bool {
        self.trial.is_none() && self.drift.is_none()
    }

    /// A new message was judged by the live rules.
    pub fn judged(&self, email: &Email, envelope: &Envelope, outcome: &Outcome) {
        let sender = sender(email, envelope);
        if let Some(t) = &self.trial {
            t.observe(email, envelope, &sender, outcome);
        }
        if let Some(d) = &self.drift {
            d.observe(&sender, &envelope.id, outcome);
        }
    }
}

/// The header `From` address (lowercase), else the envelope sender: as the archive has it.
pub fn sender(email: &Email, envelope: &Envelope) -> String {
    email
        .from
        .first()
        .map(|a| a.address.to_lowercase())
        .filter(|a| !a.is_empty())
        .or_else(|| envelope.mail_from.as_ref().map(|m| m.to_lowercase()))
        .unwrap_or_default()
}
