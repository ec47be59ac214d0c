//! The rule playground: one email through the rules (the running ones, or with one file
//! replaced by text edited in the browser), and for each rule before the one that matched the
//! first `when` key that failed. Nothing is saved: the rules are compiled in memory with the
//! same functions `mailhook try` uses ([`RuleSet::from_sources`], [`RuleSet::evaluate`]).

use crate::model::{Email, Envelope, Outcome};
use crate::rules::{RuleError, RuleSet, Unmatched};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// Why one rule did or did not take the message.
#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    pub rule: String,
    pub file: String,
    pub matched: bool,
    /// The first `when` key that did not hold (`None` for the rule that matched, or when it
    /// cannot be told).
    pub failed: Option<String>,
}

/// The outcome, and the verdict on every rule up to the one that matched.
pub struct Judged {
    pub outcome: Outcome,
    pub verdicts: Vec<Verdict>,
}

/// Compiles `sources` and judges `email` with them.
pub fn judge(
    sources: &[(PathBuf, String)],
    unmatched: Unmatched,
    email: &Email,
    envelope: &Envelope,
) -> Result<Judged, Vec<RuleError>> {
    let rules = RuleSet::from_sources(sources, unmatched)?;
    let outcome = rules.evaluate(email, envelope);
    let mut verdicts = Vec::new();
    let mut index_in_file: Vec<(PathBuf, usize)> = Vec::new();
    for rule in rules.rules() {
        let n = index_in_file.iter().filter(|(f, _)| f == &rule.file).count();
        index_in_file.push((rule.file.clone(), n));
        let matched = outcome.rule.as_deref() == Some(rule.name.as_str());
        let failed = if matched { None } else { first_failed(sources, &rule.file, n, email, envelope) };
        verdicts.push(Verdict { rule: rule.name.clone(), file: display(&rule.file), matched, failed });
        if matched {
            break;
        }
    }
    Ok(Judged { outcome, verdicts })
}

fn display(p: &Path) -> String {
    p.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_else(|| p.display().to_string())
}

/// The first key of the `n`th rule of `file` whose condition alone does not hold: each key is
/// compiled as a rule of its own and judged by the same engine.
fn first_failed(
    sources: &[(PathBuf, String)],
    file: &Path,
    n: usize,
    email: &Email,
    envelope: &Envelope,
) -> Option<String> {
    let (_, text) = sources.iter().find(|(p, _)| p == file)?;
    let doc: toml::Table = toml::from_str(text).ok()?;
    let rule = doc.get("rule")?.as_array()?.get(n)?.as_table()?;
    let when = rule.get("when")?.as_table()?;
    for (key, value) in when {
        let mut one = toml::Table::new();
        one.insert(key.clone(), value.clone());
        let mut probe = toml::Table::new();
        probe.insert("name".into(), toml::Value::String("probe".into()));
        probe.insert("to".into(), toml::Value::Array(Vec::new()));
        probe.insert("when".into(), toml::Value::Table(one));
        let mut doc = toml::Table::new();
        doc.insert("rule".into(), toml::Value::Array(vec![toml::Value::Table(probe)]));
        let text = toml::to_string(&doc).ok()?;
        let rules = RuleSet::from_sources(&[(file.to_path_buf(), text)], Unmatched::Drop).ok()?;
        if rules.evaluate(email, envelope).rule.is_none() {
            return Some(key.clone());
        }
    }
    None
}
