//! rules: `rules/*.toml` → a compiled [`RuleSet`]; `(&Email, &Envelope) → Outcome`.
//!
//! ```text
//! parse ─► Email + Envelope ─► rules ─► Outcome { rule, action, payload } ─► deliver
//! ```
//!
//! Loading ([`RuleSet::load_dir`], or [`load_rules`] for a config) reads every `*.toml` file of
//! a directory in name order and compiles everything once: each distinct regex pattern into one
//! `regex::Regex` (rules that use the same pattern share it), each template and expression
//! into one sandboxed minijinja environment. It reports *all* errors of all files together,
//! each naming the file, the line, the rule and the key. Evaluation ([`RuleSet::evaluate`]) is
//! pure:
//!
//! 1. rules run in file order, then in order within a file; the first whose every `when` key
//!    matches (`Regex::is_match`; multi-valued keys such as `to` hold when any value matches)
//!    wins;
//! 2. `[rule.extract]` regexes run in order (`Regex::captures` on every value of the key);
//!    named groups become fields, the first value found for a name wins;
//! 3. required fields that extraction alone provides are checked; then `[rule.fields]` are
//!    computed in order (each sees the ones before it, and may replace an extracted field);
//!    then the remaining required fields are checked. A missing field (absent, null or empty)
//!    or a failing template makes the message a dead letter with the reason;
//! 4. the payload is `[rule.payload]` if the rule has one, else the default payload; either
//!    is serialised by serde_json, keys in the order they were set.
//!
//! Every template and expression is evaluated by minijinja, sandboxed: no loader (no file
//! access), no network, a fuel limit on every evaluation.

mod context;
mod load;
mod payload;

use crate::model::{Action, Email, Envelope, Outcome, Payload};
use regex::Regex;
use serde_json::{Map, Value as Json};
use std::cell::OnceCell;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use load::{RULE_FILE_EXTENSION, load_rules};
use payload::default_payload;

/// What happens to a message that no rule matches (`[rules] unmatched`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unmatched {
    /// Keep it as a dead letter, for replay once a rule exists.
    Dead,
    /// Discard it.
    Drop,
    /// Deliver the default payload (with `"rule": null`) to this destination.
    Deliver(String),
}

impl Unmatched {
    /// Parses the config value: `dead`, `drop`, or a destination name.
    pub fn from_config(value: &str) -> Unmatched {
        match value {
            "dead" => Unmatched::Dead,
            "drop" => Unmatched::Drop,
            other => Unmatched::Deliver(other.to_string()),
        }
    }
}

/// One problem found while loading rules: where it is and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleError {
    pub file: PathBuf,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// The rule's name, or `#N` (1-based position in its file) when it has no valid name.
    pub rule: Option<String>,
    /// The key inside the rule (`when.subject`, `extract.body[1]`, `fields.total`).
    pub key: Option<String>,
    pub message: String,
}

impl fmt::Display for RuleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(rule) = &self.rule {
            if rule.starts_with('#') {
                write!(f, ": rule {rule}")?;
            } else {
                write!(f, ": rule {rule:?}")?;
            }
        }
        if let Some(key) = &self.key {
            write!(f, ": {key}")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// What a `when` or `extract` key looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Target {
    From,
    To,
    Cc,
    Recipient,
    Source,
    Subject,
    Body,
    Html,
    Attachment,
    Header(String),
}

impl Target {
    pub(crate) fn parse(key: &str) -> Option<Target> {
        Some(match key {
            "from" => Target::From,
            "to" => Target::To,
            "cc" => Target::Cc,
            "recipient" => Target::Recipient,
            "source" => Target::Source,
            "subject" => Target::Subject,
            "body" => Target::Body,
            "html" => Target::Html,
            "attachment" => Target::Attachment,
            _ => {
                let name = key.strip_prefix("header.")?;
                if name.is_empty() || !name.bytes().all(|b| b.is_ascii_graphic() && b != b':') {
                    return None;
                }
                Target::Header(name.to_ascii_lowercase())
            }
        })
    }

    /// Relative cost of matching: short values first, whole bodies last.
    fn cost(&self) -> u8 {
        match self {
            Target::Source | Target::Subject => 0,
            Target::From | Target::To | Target::Cc | Target::Recipient => 1,
            Target::Header(_) => 2,
            Target::Attachment => 3,
            Target::Body => 4,
            Target::Html => 5,
        }
    }

    /// Calls `f` on each value of this target until it returns true; true if one did.
    fn any<'s>(&self, input: &'s Input<'_>, mut f: impl FnMut(&'s str) -> bool) -> bool {
        let email = input.email;
        match self {
            Target::From => email.from.iter().any(|a| f(&a.address)),
            Target::To => email.to.iter().any(|a| f(&a.address)),
            Target::Cc => email.cc.iter().any(|a| f(&a.address)),
            Target::Recipient => input.envelope.recipients.iter().any(|r| f(r)),
            Target::Source => f(input.source.get_or_init(|| input.envelope.source.to_string())),
            Target::Subject => f(&email.subject),
            Target::Body => f(&email.text),
            Target::Html => f(&email.html),
            Target::Attachment => email.attachments.iter().any(|a| f(&a.name)),
            Target::Header(name) => email.headers.iter().any(|h| h.name.eq_ignore_ascii_case(name) && f(&h.value)),
        }
    }
}

/// The message under evaluation, with values derived once.
struct Input<'a> {
    email: &'a Email,
    envelope: &'a Envelope,
    /// `envelope.source` as rules see it, made when a rule first asks.
    source: OnceCell<String>,
}

/// A `when` condition: the regex matches a value of the target.
#[derive(Debug)]
struct Matcher {
    target: Target,
    regex: Arc<Regex>,
}

impl Matcher {
    fn matches(&self, input: &Input<'_>) -> bool {
        self.target.any(input, |value| self.regex.is_match(value))
    }
}

/// The extraction regexes of one `[rule.extract]` key, in order.
#[derive(Debug)]
struct Extractor {
    target: Target,
    regexes: Vec<Arc<Regex>>,
}

/// A computed value: `[rule.fields]` and `[rule.payload]` entries.
#[derive(Debug)]
pub(crate) enum Spec {
    /// Name of a compiled template in the environment; renders to a string.
    Template(String),
    /// Name of a compiled `{% set %}` template holding an expression; a typed result.
    Expr(String),
    Literal(Json),
    Array(Vec<Spec>),
    Object(Vec<(String, Spec)>),
}

/// One compiled rule.
#[derive(Debug)]
pub struct Rule {
    pub name: String,
    pub file: PathBuf,
    pub line: usize,
    /// Destination names; empty means matching mail is dropped.
    pub to: Vec<String>,
    pub require: Vec<String>,
    /// `when` conditions, cheap targets first (all must hold, so their order is free).
    when: Vec<Matcher>,
    extract: Vec<Extractor>,
    fields: Vec<(String, Spec)>,
    payload: Option<Vec<(String, Spec)>>,
}

/// What judging a message takes at its peak, as a multiple of its size, when no rule extracts a
/// field from its body: the raw bytes, the decoded text, and the payload written from it (then,
/// while the payload is cut to `max_body`, the raw bytes, the payload and the map read back from
/// it). Measured with `scripts/bench-bigmail` (docs/benchmarks.md).
const BASE_JUDGE_PEAK: u64 = 4;

/// Every rule of a rules directory, compiled, plus what to do with unmatched mail.
pub struct RuleSet {
    rules: Vec<Rule>,
    unmatched: Unmatched,
    templates: context::Templates,
    files: Vec<PathBuf>,
    /// Signed links added to payloads and offered to templates (`[web] public_url`).
    links: Option<std::sync::Arc<crate::links::Links>>,
    /// See [`RuleSet::judge_peak`].
    judge_peak: u64,
}

impl fmt::Debug for RuleSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RuleSet").field("rules", &self.rules.len()).field("files", &self.files).finish()
    }
}

impl RuleSet {
    /// Loads and compiles every `*.toml` file in `dir` (name order; hidden files skipped).
    pub fn load_dir(dir: &Path, unmatched: Unmatched) -> Result<RuleSet, Vec<RuleError>> {
        let sources = load::read_dir(dir)?;
        RuleSet::from_sources(&sources, unmatched)
    }

    /// Compiles rules from `(file name, TOML text)` pairs, in the given order.
    ///
    /// ```
    /// use mailhook::model::{Envelope, Source};
    /// use mailhook::rules::{RuleSet, Unmatched};
    ///
    /// let rules = RuleSet::from_sources(
    ///     &[("rules/10-ups.toml".into(), r#"
    ///         [[rule]]
    ///         name = "ups"
    ///         to = ["orders"]
    ///         [rule.extract]
    ///         subject = 'Order (?P<order_id>\d+)'
    ///         [rule.fields]
    ///         order_id = { expr = "order_id | int" }
    ///     "#.to_string())],
    ///     Unmatched::Dead,
    /// ).unwrap();
    /// let email = mailhook::parse::parse(b"Subject: Order 4711 shipped\r\n\r\n");
    /// let outcome = rules.evaluate(&email, &Envelope::new(Source::Stdin));
    /// assert_eq!(outcome.rule.as_deref(), Some("ups"));
    /// assert_eq!(outcome.payload.to_json()["fields"]["order_id"], 4711);
    /// ```
    pub fn from_sources(sources: &[(PathBuf, String)], unmatched: Unmatched) -> Result<RuleSet, Vec<RuleError>> {
        load::compile(sources, unmatched)
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    pub fn unmatched(&self) -> &Unmatched {
        &self.unmatched
    }

    /// Every destination name a rule sends to, with an error for each that `exists` rejects.
    pub fn check_destinations(&self, exists: impl Fn(&str) -> bool) -> Vec<RuleError> {
        let mut errors = Vec::new();
        for rule in &self.rules {
            for (i, dest) in rule.to.iter().enumerate() {
                if !exists(dest) {
                    errors.push(RuleError {
                        file: rule.file.clone(),
                        line: Some(rule.line),
                        rule: Some(rule.name.clone()),
                        key: Some(format!("to[{i}]")),
                        message: format!("unknown destination {dest:?} (not a [destination.*] in the config)"),
                    });
                }
            }
        }
        errors
    }

    /// Adds signed links to every payload and offers them to templates (see [`crate::links`]).
    pub fn set_links(&mut self, links: Option<std::sync::Arc<crate::links::Links>>) {
        self.links = links;
    }

    /// What judging a message takes at its peak with these rules, as a multiple of its size:
    /// the raw bytes, the decoded text and the payload that holds the text (4, measured with the
    /// default payload), and for each field that a rule extracts from the body or the HTML,
    /// which may be as long as the message, two more: the field, and its copy in the template
    /// context or in the payload. Templates are not counted: their fuel bounds what they write.
    pub fn judge_peak(&self) -> u64 {
        self.judge_peak
    }

    /// [`RuleSet::judge_peak`] of `rules`, worked out once when they are loaded.
    fn peak_of(rules: &[Rule]) -> u64 {
        let whole_message_fields = |rule: &Rule| {
            let mut names: Vec<&str> = rule
                .extract
                .iter()
                .filter(|ex| matches!(ex.target, Target::Body | Target::Html))
                .flat_map(|ex| ex.regexes.iter().flat_map(|r| r.capture_names().flatten()))
                .collect();
            names.sort_unstable();
            names.dedup();
            names.len() as u64
        };
        let most = rules.iter().map(whole_message_fields).max().unwrap_or(0);
        BASE_JUDGE_PEAK + 2 * most
    }

    /// Judges one message. Pure: the same inputs give the same outcome.
    pub fn evaluate(&self, email: &Email, envelope: &Envelope) -> Outcome {
        let outcome = self.judge(email, envelope);
        let Some(links) = self.links.as_ref().filter(|_| !matches!(outcome.action, Action::Drop)) else {
            return outcome;
        };
        let default = outcome
            .rule
            .as_deref()
            .and_then(|r| self.rules.iter().find(|x| x.name == r))
            .is_none_or(|r| r.payload.is_none() || matches!(outcome.action, Action::Dead { .. }));
        let payload = links.augment(outcome.payload, &envelope.id, email, default);
        Outcome { payload, ..outcome }
    }

    fn judge(&self, email: &Email, envelope: &Envelope) -> Outcome {
        let input = Input { email, envelope, source: OnceCell::new() };
        if let Some(rule) = self.rules.iter().find(|rule| rule.when.iter().all(|m| m.matches(&input))) {
            return self.apply(rule, &input);
        }
        let action = match &self.unmatched {
            Unmatched::Dead => Action::Dead { reason: "no rule matched".to_string() },
            Unmatched::Drop => Action::Drop,
            Unmatched::Deliver(dest) => Action::Deliver { to: vec![dest.clone()] },
        };
        let payload = match action {
            Action::Drop => Payload::empty(),
            _ => default_payload(email, envelope, None, &Map::new()),
        };
        Outcome { rule: None, action, payload }
    }

    fn apply(&self, rule: &Rule, input: &Input<'_>) -> Outcome {
        // In the order found; the first value of a name wins.
        let mut fields = Map::new();
        for ex in &rule.extract {
            for regex in &ex.regexes {
                ex.target.any(input, |value| {
                    if let Some(caps) = regex.captures(value) {
                        for (name, m) in regex.capture_names().zip(caps.iter()) {
                            if let (Some(name), Some(m)) = (name, m)
                                && !fields.contains_key(name)
                            {
                                fields.insert(name.to_string(), Json::from(m.as_str()));
                            }
                        }
                    }
                    false // keep looking: a later value may hold other groups
                });
            }
        }

        let dead = |reason: String, fields: &Map<String, Json>| Outcome {
            rule: Some(rule.name.clone()),
            action: Action::Dead { reason },
            payload: default_payload(input.email, input.envelope, Some(&rule.name), fields),
        };
        let missing = |fields: &Map<String, Json>, skip: &dyn Fn(&str) -> bool| -> Option<String> {
            let missing: Vec<&str> = rule
                .require
                .iter()
                .map(String::as_str)
                .filter(|name| !skip(name) && is_missing(fields.get(*name)))
                .collect();
            (!missing.is_empty()).then(|| missing_reason(&rule.name, &missing))
        };

        let computed = |name: &str| rule.fields.iter().any(|(k, _)| k == name);
        if let Some(reason) = missing(&fields, &computed) {
            return dead(reason, &fields);
        }
        if rule.to.is_empty() {
            // A rule that drops what it matches: nothing will be sent, nothing to build.
            return Outcome { rule: Some(rule.name.clone()), action: Action::Drop, payload: Payload::empty() };
        }

        // The context copies what templates may read (the text, the fields): it is let go
        // before a payload is written, so that a big message's copies are not all held at once.
        let mut ctx =
            context::Context::new(input.email, input.envelope, &rule.name, fields).with_links(self.links.as_deref());
        for (key, spec) in &rule.fields {
            match self.templates.eval(spec, &ctx) {
                Ok(value) => ctx.set(key, value),
                Err(e) => return dead(format!("rule {:?}: fields.{key}: {e}", rule.name), &ctx.into_fields()),
            }
        }
        if let Some(reason) = missing(ctx.fields(), &|_| false) {
            return dead(reason, &ctx.into_fields());
        }

        let payload = match &rule.payload {
            None => default_payload(input.email, input.envelope, Some(&rule.name), &ctx.into_fields()),
            Some(specs) => {
                let mut payload = Map::new();
                for (key, spec) in specs {
                    match self.templates.eval(spec, &ctx) {
                        Ok(value) => payload.insert(key.clone(), value),
                        Err(e) => {
                            drop(payload);
                            return dead(format!("rule {:?}: payload.{key}: {e}", rule.name), &ctx.into_fields());
                        }
                    };
                }
                drop(ctx);
                Payload::of(&payload)
            }
        };
        Outcome { rule: Some(rule.name.clone()), action: Action::Deliver { to: rule.to.clone() }, payload }
    }
}

fn is_missing(value: Option<&Json>) -> bool {
    match value {
        None | Some(Json::Null) => true,
        Some(Json::String(s)) => s.trim().is_empty(),
        Some(_) => false,
    }
}

fn missing_reason(rule: &str, missing: &[&str]) -> String {
    format!("rule {rule:?}: missing required field{} {}", if missing.len() == 1 { "" } else { "s" }, missing.join(", "))
}

#[cfg(test)]
mod tests;
