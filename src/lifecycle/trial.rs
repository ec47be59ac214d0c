//! trial: rules from `[rules] trial_dir` judged beside the live rules on every new message,
//! never delivered. Each disagreement is counted (`mailhook_trial_diff_total{kind}`) and the
//! latest [`RECENT`] are kept for the console, so a rule can run on real mail for a week before
//! it is promoted into the rules directory.
//!
//! The trial set is loaded at start and again at every rules reload (SIGHUP, or a change in the
//! live rules directory). A trial set with errors is logged and left out; the live rules never
//! depend on it.

use super::compare::{Kind, breaks, compare};
use super::shadow::Difference;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::model::{Email, Envelope, Outcome};
use crate::rules::{RuleError, RuleSet, Unmatched};
use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

/// Disagreements kept for the console.
pub const RECENT: usize = 100;

pub struct Trial {
    dir: PathBuf,
    config: Arc<Config>,
    rules: RwLock<Option<Arc<RuleSet>>>,
    recent: Mutex<VecDeque<Difference>>,
    metrics: Arc<Metrics>,
}

impl Trial {
    /// The trial of `config`'s `[rules] trial_dir`, if it names one (not loaded yet: see
    /// [`Trial::reload`]).
    pub fn new(config: &Config, metrics: Arc<Metrics>) -> Option<Trial> {
        let dir = config.resolve(config.rules.trial_dir.as_ref()?);
        for kind in Kind::ALL {
            metrics.trial_diff(kind.label(), 0);
        }
        Some(Trial {
            dir,
            config: Arc::new(config.clone()),
            rules: RwLock::new(None),
            recent: Mutex::new(VecDeque::new()),
            metrics,
        })
    }

    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    /// Loads the trial rules again (destinations are checked as for live rules, so a trial set
    /// can be promoted as it is). On errors the trial stops until a reload succeeds.
    pub fn reload(&self) -> Result<usize, Vec<RuleError>> {
        let loaded =
            RuleSet::load_dir(&self.dir, Unmatched::from_config(&self.config.rules.unmatched)).and_then(|set| {
                let errors = set.check_destinations(|d| self.config.destination.contains_key(d));
                if errors.is_empty() { Ok(set) } else { Err(errors) }
            });
        let mut slot = self.rules.write().unwrap_or_else(|e| e.into_inner());
        match loaded {
            Ok(set) => {
                let n = set.rules().len();
                *slot = Some(Arc::new(set));
                Ok(n)
            }
            Err(errors) => {
                *slot = None;
                Err(errors)
            }
        }
    }

    /// Judges a new message with the trial rules and counts how that differs from `live`.
    pub fn observe(&self, email: &Email, envelope: &Envelope, sender: &str, live: &Outcome) {
        let Some(rules) = self.rules.read().unwrap_or_else(|e| e.into_inner()).clone() else { return };
        let trial = rules.evaluate(email, envelope);
        let Some((kind, changes)) = compare(live, &trial) else { return };
        self.metrics.trial_diff(kind.label(), 1);
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        if recent.len() == RECENT {
            recent.pop_back();
        }
        recent.push_front(Difference {
            id: envelope.id.clone(),
            sender: sender.to_string(),
            subject: email.subject.clone(),
            kind,
            breaks: breaks(live, &trial),
            rule_before: live.rule.clone(),
            rule_after: trial.rule,
            changes,
        });
    }

    /// The latest disagreements, newest first.
    pub fn recent(&self) -> Vec<Difference> {
        self.recent.lock().unwrap_or_else(|e| e.into_inner()).iter().cloned().collect()
    }
}
